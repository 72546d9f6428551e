package test

import (
	"bytes"
	"errors"
	"io"
	"net"
	"regexp"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/wicketgw/wicket/tunnel/loopback"
)

// floodServer is a resource that sends floodBytes to each connection, then
// only reads, and reports how each connection's reads ended (EOF or an
// error). It stops writing before the test cuts the stream so that its
// read, not a write, is the call that learns of a reset (a socket reports a
// reset once).
const floodBytes = 256 << 10

func floodServer(t *testing.T) (addr string, readEnds <-chan error) {
	t.Helper()
	ends := make(chan error, 10)
	addr = loopback.Serve(t, func(c net.Conn) {
		wrote := make(chan struct{})
		go func() { defer close(wrote); _, _ = c.Write(bytes.Repeat([]byte("x"), floodBytes)) }()
		_ = c.SetDeadline(time.Now().Add(waitTimeout))
		_, err := io.Copy(io.Discard, c)
		if err == nil {
			err = io.EOF
		}
		ends <- err
		c.Close()
		<-wrote
	})
	return addr, ends
}

// TestCutTransferResets: a gateway killed mid-transfer makes `wicket connect`
// reset the local connection (the client's read fails with ECONNRESET, not a
// clean end of file) and makes the agent reset its connection to the
// resource too, so neither end takes a cut transfer for a complete one.
func TestCutTransferResets(t *testing.T) {
	h := NewHarness(t)
	gw := h.StartGateway(GatewayOptions{Policy: allowAlice})
	flood, resourceEnds := floodServer(t)
	h.StartAgent(gw, "db1", "flood="+flood)
	_, local := h.Connect(h.Login(gw, "alice"), "flood")

	expectReset(t, "gateway killed", local, gw.kill9)

	select {
	case err := <-resourceEnds:
		if !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("the agent ended its connection to the resource with %v, want a reset", err)
		}
	case <-time.After(waitTimeout):
		t.Fatal("the agent kept its connection to the resource after the gateway died")
	}
}

// TestCutStdioExits: `wicket connect --stdio` whose gateway dies exits
// non-zero promptly while its stdin stays open.
func TestCutStdioExits(t *testing.T) {
	h := NewHarness(t)
	gw := h.StartGateway(GatewayOptions{Policy: allowAlice})
	h.StartAgent(gw, "db1", "echo="+echoServer(t))
	user := h.Login(gw, "alice")
	p, stdin := h.StartWithStdin("connect --stdio", nil, "connect", "echo", "--stdio", "--data-dir", user)
	if _, err := io.WriteString(stdin, "hello through stdio\n"); err != nil {
		t.Fatal(err)
	}
	p.WaitFor(`^hello through stdio$`)
	gw.kill9()
	killed := time.Now()
	select {
	case <-p.done:
	case <-time.After(15 * time.Second):
		t.Fatalf("connect --stdio still runs %s after its gateway died (stdin open)\n%s", time.Since(killed).Round(time.Second), p.Output())
	}
	took := time.Since(killed)
	if p.waitErr == nil {
		t.Fatalf("connect --stdio exited 0 after its stream was cut\n%s", p.Output())
	}
	t.Logf("connect --stdio exited (%v) %s after the gateway was killed", p.waitErr, took.Round(time.Millisecond))
	if took > 5*time.Second {
		t.Errorf("connect --stdio took %s to exit, want a few seconds at most", took)
	}
}

// recordServer is a resource that records what each connection sent and
// answers "ok" once the client has finished sending.
type recordServer struct {
	addr string
	mu   sync.Mutex
	got  []string
	seen chan struct{}
}

func newRecordServer(t *testing.T) *recordServer {
	r := &recordServer{seen: make(chan struct{}, 100)}
	r.addr = loopback.Serve(t, func(c net.Conn) {
		_ = c.SetDeadline(time.Now().Add(waitTimeout))
		b, _ := io.ReadAll(c)
		r.mu.Lock()
		r.got = append(r.got, string(b))
		r.mu.Unlock()
		r.seen <- struct{}{}
		_, _ = c.Write([]byte("ok"))
	})
	return r
}

func (r *recordServer) connections() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.got...)
}

// TestGaveUpNotForwarded: a client that connects, writes and closes while
// the gateway is down never reaches the resource, even once the gateway is
// back; a client that waits for its answer is served as before.
func TestGaveUpNotForwarded(t *testing.T) {
	h := NewHarness(t)
	gw := h.StartGateway(GatewayOptions{Policy: allowAlice, Args: []string{"--grace-period", "0"}})
	rec := newRecordServer(t)
	h.StartAgent(gw, "db1", "rec="+rec.addr)
	conn, local := h.Connect(h.Login(gw, "alice"), "rec")

	if err := gw.Stop(); err != nil {
		t.Fatal(err)
	}
	conn.WaitFor(`no session to the gateway`)
	c, err := net.DialTimeout("tcp", local, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Write([]byte("DROP TABLE users;")); err != nil {
		t.Fatal(err)
	}
	c.Close()
	// Connect says so at once; on a build without the watch the line never comes.
	if _, err := conn.waitFor(regexp.MustCompile(`nothing was forwarded`), 3*time.Second); err != nil {
		t.Errorf("connect did not notice the client gave up: %v", err)
	}

	gw = h.StartGateway(GatewayOptions{DataDir: gw.DataDir, Listen: gw.Addr, Policy: allowAlice})
	gw.WaitAgentOnline("db1", "rec")
	// A client that waits for its answer gets through the restarted gateway.
	eventually(t, "a request through the restarted gateway", func() bool {
		c, err := net.DialTimeout("tcp", local, 10*time.Second)
		if err != nil {
			return false
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := c.Write([]byte("ping")); err != nil {
			return false
		}
		_ = c.(*net.TCPConn).CloseWrite()
		b, _ := io.ReadAll(c)
		return string(b) == "ok"
	})
	// Whatever the held connection would have sent has had time to arrive by
	// now; give it one more second to be sure.
	deadline := time.After(time.Second)
	for done := false; !done; {
		select {
		case <-rec.seen:
		case <-deadline:
			done = true
		}
	}
	for _, got := range rec.connections() {
		if got != "ping" {
			t.Fatalf("the resource received %q from a client that had closed before its stream opened", got)
		}
	}
}

// TestCutByAgentResets: the other two places a transfer can be cut, with the
// gateway staying up. An agent killed mid-transfer, and a resource that
// resets its connection, each reach the client of `wicket connect` as a reset
// (ECONNRESET), never as a clean end of file: the gateway resets the user's
// stream (a yamux RST) instead of closing it.
func TestCutByAgentResets(t *testing.T) {
	h := NewHarness(t)
	gw := h.StartGateway(GatewayOptions{Policy: allowAlice})
	flood, _ := floodServer(t)
	resetter := resetServer(t)
	agent, _ := h.StartAgent(gw, "db1", "flood="+flood, "resetter="+resetter)
	user := h.Login(gw, "alice")
	_, viaReset := h.Connect(user, "resetter")
	_, viaFlood := h.Connect(user, "flood")

	expectReset(t, "resource resets", viaReset, func() {}) // the resource resets by itself after its bytes
	expectReset(t, "agent killed", viaFlood, agent.kill9)
}

// expectReset reads floodBytes through the connect listener local (the
// resource has sent all it sends before the cut; the client waits for more,
// as one does mid-download), runs cut, and checks that the rest of the read
// fails with ECONNRESET: not a clean end of file, not a hang.
func expectReset(t *testing.T, what, local string, cut func()) {
	t.Helper()
	c, err := net.DialTimeout("tcp", local, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(waitTimeout))
	if _, err := io.ReadFull(c, make([]byte, floodBytes)); err != nil {
		t.Fatalf("%s: transfer before the cut: %v", what, err)
	}
	cut()
	cutAt := time.Now()
	n, err := io.Copy(io.Discard, c)
	var ne net.Error
	switch {
	case errors.As(err, &ne) && ne.Timeout():
		t.Fatalf("%s: the local connection hung after the cut", what)
	case err == nil:
		t.Fatalf("%s: the local connection ended with a clean EOF (%d more bytes): a cut transfer looks complete", what, n)
	case !errors.Is(err, syscall.ECONNRESET):
		t.Fatalf("%s: local read ended with %v, want ECONNRESET", what, err)
	}
	t.Logf("%s: local connection reset %s after the cut", what, time.Since(cutAt).Round(time.Millisecond))
}

// resetServer is a resource that sends floodBytes to each connection and
// then resets it (SO_LINGER 0).
func resetServer(t *testing.T) string {
	t.Helper()
	return loopback.Serve(t, func(c net.Conn) {
		_, _ = c.Write(bytes.Repeat([]byte("x"), floodBytes))
		time.Sleep(200 * time.Millisecond) // let the bytes reach the client first
		_ = c.(*net.TCPConn).SetLinger(0)
	})
}
