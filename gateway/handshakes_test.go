package gateway

import (
	"net"
	"testing"
	"time"

	"github.com/wicketgw/wicket/ca"
	"github.com/wicketgw/wicket/gateway/audit"
	"github.com/wicketgw/wicket/tunnel"
	"github.com/wicketgw/wicket/tunnel/loopback"
)

// TestSilentConnectionsDoNotStarveHandshakes holds 5,000 silent TCP connections from one
// source (127.0.0.2) open on the gateway port and checks that an agent still reconnects and
// a user still connects from another in well under a second (issue 10, item 3).
func TestSilentConnectionsDoNotStarveHandshakes(t *testing.T) {
	checkLeaks(t)
	const silent = 5000
	tg := startGateway(t, nil)
	agentCreds := tg.enroll(ca.RoleAgent, "db1")
	userCreds := tg.enroll(ca.RoleUser, "alice")
	a, err := tg.connectAgent(agentCreds, "i", map[string]string{"echo": echoServer(t)})
	if err != nil {
		t.Fatal(err)
	}
	a.close()

	conns := loopback.SilentConns(t, tg.Addr().String(), net.IPv4(127, 0, 0, 2), silent)
	total, fromSrc := tg.handshakes.inProgress("127.0.0.2")
	t.Logf("handshakes in progress: %d, from 127.0.0.2: %d", total, fromSrc)
	if fromSrc > maxHandshakesPerSource {
		t.Fatalf("%d handshakes in progress from one source, over the cap of %d", fromSrc, maxHandshakesPerSource)
	}

	t0 := time.Now()
	a, err = tg.connectAgent(agentCreds, "i2", map[string]string{"echo": echoServer(t)})
	agentTook := time.Since(t0)
	if err != nil {
		t.Fatalf("agent reconnect under load: %v", err)
	}
	defer a.close()
	t0 = time.Now()
	u, err := tg.dial(tunnel.ALPNClient, userCreds)
	userTook := time.Since(t0)
	if err != nil {
		t.Fatalf("user connect under load: %v", err)
	}
	defer u.Close()
	echoOnce(t, u, "echo", "hello under load")
	t.Logf("with %d silent connections held: agent reconnect %s, user connect %s", len(conns),
		agentTook.Round(time.Millisecond), userTook.Round(time.Millisecond))
	// Under a second on a quiet machine; the bound on failure is generous for shared CI.
	if agentTook > 3*time.Second || userTook > 3*time.Second {
		t.Errorf("agent reconnect took %s, user connect %s; want well under 3s", agentTook, userTook)
	}
}

// TestSilentConnectionClosedAfterFirstBytesTimeout checks that a connection that sends
// nothing is closed after firstBytesTimeout, well before the whole handshake's timeout.
func TestSilentConnectionClosedAfterFirstBytesTimeout(t *testing.T) {
	checkLeaks(t)
	tg := startGateway(t, func(c *Config) { c.HandshakeTimeout = 30 * time.Second })
	c, err := net.Dial("tcp", tg.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	t0 := time.Now()
	_ = c.SetReadDeadline(time.Now().Add(20 * time.Second))
	_, err = c.Read(make([]byte, 1))
	took := time.Since(t0)
	t.Logf("silent connection closed after %s (%v)", took.Round(time.Millisecond), err)
	if ne, ok := err.(net.Error); ok && ne.Timeout() {
		t.Fatalf("the gateway did not close a silent connection within 20s")
	}
	if took > firstBytesTimeout+5*time.Second {
		t.Errorf("closed after %s, want about %s", took, firstBytesTimeout)
	}
	tg.waitAudit("tls.refused timeout", func(r audit.Record) bool { return r.Type == audit.TypeTLSRefused && r.Reason == refusedTimeout })
}

// TestHandshakeLimiterEvictsTheBusiestSource checks the limiter's rules without a network.
func TestHandshakeLimiterEvictsTheBusiestSource(t *testing.T) {
	l := newHandshakeLimiter(4, 3)
	conn := func(ip string) *pipeConn {
		return &pipeConn{addr: &net.TCPAddr{IP: net.ParseIP(ip), Port: 1}}
	}
	var hostile []*pipeConn
	for range 3 {
		c := conn("10.0.0.2")
		hostile = append(hostile, c)
		if l.admit(c) == nil {
			t.Fatal("refused under the per-source cap")
		}
	}
	if l.admit(conn("10.0.0.2")) != nil {
		t.Fatal("admitted a fourth handshake from one source, cap 3")
	}
	if l.admit(conn("10.0.0.3")) == nil {
		t.Fatal("refused another source")
	}
	// Full (4): a new source gets in, the busiest source's oldest is closed.
	if l.admit(conn("10.0.0.4")) == nil {
		t.Fatal("refused a new arrival when full")
	}
	if !hostile[0].closed || hostile[1].closed {
		t.Fatalf("evicted %v %v, want the oldest of the busiest source only", hostile[0].closed, hostile[1].closed)
	}
	if total, n := l.inProgress("10.0.0.2"); total != 4 || n != 2 {
		t.Fatalf("in progress %d, from the busiest %d; want 4 and 2", total, n)
	}
}

// pipeConn is a net.Conn that only knows its remote address and whether it was closed.
type pipeConn struct {
	net.Conn
	addr   net.Addr
	closed bool
}

func (c *pipeConn) RemoteAddr() net.Addr { return c.addr }
func (c *pipeConn) Close() error         { c.closed = true; return nil }
