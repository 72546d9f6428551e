package public

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"testing"
	"time"
)

// Serve's shutdown: a request in flight when the context ends finishes normally; an upgraded
// connection still open when the grace period ends is closed; Serve then returns nil and a
// second Serve is refused.
func TestShutdownDrainsThenCloses(t *testing.T) {
	checkLeaks(t)
	host := testHost("shutdown")
	release := make(chan struct{})
	inSlow := make(chan struct{})
	mux := http.NewServeMux()
	mux.HandleFunc("/slow", func(w http.ResponseWriter, r *http.Request) {
		close(inSlow)
		<-release
		io.WriteString(w, "finished")
	})
	mux.HandleFunc("/ws", func(w http.ResponseWriter, r *http.Request) {
		c, brw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			return
		}
		defer c.Close()
		fmt.Fprint(brw, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: hold\r\nConnection: Upgrade\r\n\r\n")
		brw.Flush()
		_, _ = io.Copy(io.Discard, brw) // until either side closes
	})
	e := startEnv(t, envOptions{hosts: map[string]Host{host: {Resource: "web", Access: AccessPublic}}}, mux)
	e.waitCert(host)

	// An upgraded connection that nobody closes.
	ws, err := tls.Dial("tcp", e.ln.Addr().String(), &tls.Config{RootCAs: e.pebble.IssuedRoots, ServerName: host, NextProtos: []string{"http/1.1"}})
	if err != nil {
		t.Fatal(err)
	}
	defer ws.Close()
	fmt.Fprintf(ws, "GET /ws HTTP/1.1\r\nHost: %s\r\nUpgrade: hold\r\nConnection: Upgrade\r\n\r\n", host)
	wsr := bufio.NewReader(ws)
	if resp, err := http.ReadResponse(wsr, nil); err != nil || resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("upgrade: %v %v", resp, err)
	}

	// A request in flight.
	type result struct {
		status int
		body   string
		err    error
	}
	slow := make(chan result, 1)
	go func() {
		st, body, _, _, err := get(e.client(nil, false), e.url(host, "/slow"), nil)
		slow <- result{st, body, err}
	}()
	<-inSlow

	stopped := make(chan struct{})
	start := time.Now()
	go func() { e.stop(); close(stopped) }()
	// New connections are refused once shutdown has begun.
	deadline := time.Now().Add(5 * time.Second)
	for {
		c, err := tls.Dial("tcp", e.ln.Addr().String(), &tls.Config{RootCAs: e.pebble.IssuedRoots, ServerName: host})
		if err != nil {
			break
		}
		c.Close()
		if time.Now().After(deadline) {
			t.Fatal("the listener still accepts 5s after shutdown began")
		}
		time.Sleep(10 * time.Millisecond)
	}
	close(release)
	if r := <-slow; r.err != nil || r.status != http.StatusOK || r.body != "finished" {
		t.Fatalf("the in-flight request: %d %q %v", r.status, r.body, r.err)
	}
	// The upgraded connection is cut when the grace period (2s in these tests) ends.
	_ = ws.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := wsr.ReadByte(); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("the upgraded connection was not closed at the end of the grace period: %v", err)
	}
	<-stopped
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("shutdown took %v with a 2s grace period", d)
	}
	if err := e.srv.Serve(context.Background()); err == nil {
		t.Fatal("a second Serve was accepted")
	}
}
