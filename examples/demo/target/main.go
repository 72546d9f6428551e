// Command target is the demo's private resource: a small HTTP service that
// stands for the database or internal site an agent would expose. It listens
// on loopback only.
package main

import (
	"flag"
	"fmt"
	"log"
	"net/http"
	"time"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:18080", "address to listen on")
	flag.Parse()
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "hello from the private demo target at %s (%s)\n", *listen, time.Now().UTC().Format(time.RFC3339))
	})
	srv := &http.Server{Addr: *listen, Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	log.Printf("demo target listening on %s", *listen)
	log.Fatal(srv.ListenAndServe())
}
