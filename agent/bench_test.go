package agent

import (
	"io"
	"log/slog"
	"net"
	"testing"
	"time"

	"github.com/wicketgw/wicket/agent/internal/testpki"
)

// BenchmarkStreamOpen measures what the agent adds to opening a connection:
// a stream-open through a session to the agent, which dials the target and
// answers, plus one 64-byte round trip, against the baseline of dialing the
// target directly and doing the same round trip. Run:
//
//	go test -run - -bench StreamOpen ./agent/
func BenchmarkStreamOpen(b *testing.B) {
	p := testpki.New("example.test")
	gw := startGateway(b, p)
	now := time.Now()
	dir, _ := storeAgent(b, p, gw.url(), "db1", now.Add(-time.Minute), now.Add(time.Hour))
	target := echoServer(b)
	startAgent(b, Config{DataDir: dir, Expose: map[string]string{"echo": target}, Logger: slog.New(slog.DiscardHandler)})
	gs := gw.next(b)
	msg := make([]byte, 64)
	buf := make([]byte, 64)
	trip := func(c net.Conn) {
		if _, err := c.Write(msg); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(c, buf); err != nil {
			b.Fatal(err)
		}
		c.Close()
	}
	b.Run("direct-tcp", func(b *testing.B) {
		for b.Loop() {
			c, err := net.Dial("tcp", target)
			if err != nil {
				b.Fatal(err)
			}
			trip(c)
		}
	})
	b.Run("through-agent", func(b *testing.B) {
		for b.Loop() {
			st, err := gs.open("echo")
			if err != nil {
				b.Fatal(err)
			}
			trip(st)
		}
	})
}
