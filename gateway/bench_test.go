package gateway

import (
	"io"
	"net"
	"testing"

	"github.com/wicketgw/wicket/tunnel"
)

// benchSetup starts a gateway, an agent exposing an echo server, and a user session.
func benchSetup(b *testing.B) (echo string, user *tunnel.Session) {
	b.Helper()
	tg := startGateway(b, nil)
	echo = echoServer(b)
	tg.mustAgent("db1", map[string]string{"echo": echo})
	return echo, tg.dialUser("alice")
}

// BenchmarkStreamOpen: the cost of reaching a resource through the gateway (user stream open,
// policy, gateway-to-agent stream open, agent dial, both replies), against the baseline of a
// plain TCP dial to the same echo server in the same run.
func BenchmarkStreamOpen(b *testing.B) {
	echo, user := benchSetup(b)
	b.Run("baseline=tcp-dial", func(b *testing.B) {
		for b.Loop() {
			c, err := net.Dial("tcp", echo)
			if err != nil {
				b.Fatal(err)
			}
			c.Close()
		}
	})
	b.Run("via-gateway", func(b *testing.B) {
		for b.Loop() {
			st, err := openStream(user, "echo")
			if err != nil {
				b.Fatal(err)
			}
			st.Close()
		}
	})
}

// BenchmarkEchoThroughput: one stream carrying 1 MiB writes echoed back (so every byte
// crosses the gateway twice), against the baseline of the same over plain TCP.
func BenchmarkEchoThroughput(b *testing.B) {
	echo, user := benchSetup(b)
	const chunk = 1 << 20
	run := func(b *testing.B, c net.Conn) {
		buf := make([]byte, chunk)
		got := make([]byte, chunk)
		b.SetBytes(chunk)
		for b.Loop() {
			errc := make(chan error, 1)
			go func() { _, err := c.Write(buf); errc <- err }()
			if _, err := io.ReadFull(c, got); err != nil {
				b.Fatal(err)
			}
			if err := <-errc; err != nil {
				b.Fatal(err)
			}
		}
	}
	b.Run("baseline=tcp", func(b *testing.B) {
		c, err := net.Dial("tcp", echo)
		if err != nil {
			b.Fatal(err)
		}
		defer c.Close()
		run(b, c)
	})
	b.Run("via-gateway", func(b *testing.B) {
		st, err := openStream(user, "echo")
		if err != nil {
			b.Fatal(err)
		}
		defer st.Close()
		run(b, st)
	})
}
