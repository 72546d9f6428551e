package tunnel

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"sync"
	"testing"
	"time"
)

// tcpPair returns both ends of a loopback TCP connection.
func tcpPair(t *testing.T) (*net.TCPConn, *net.TCPConn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	type res struct {
		c   net.Conn
		err error
	}
	ch := make(chan res, 1)
	go func() { c, err := ln.Accept(); ch <- res{c, err} }()
	a, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	r := <-ch
	if r.err != nil {
		t.Fatal(r.err)
	}
	return a.(*net.TCPConn), r.c.(*net.TCPConn)
}

type relayResult struct {
	aToB, bToA int64
	err        error
}

func startRelay(ctx context.Context, a, b net.Conn, stall time.Duration) chan relayResult {
	ch := make(chan relayResult, 1)
	go func() {
		x, y, err := relay(ctx, a, b, stall)
		ch <- relayResult{x, y, err}
	}()
	return ch
}

func waitRelay(t *testing.T, ch chan relayResult) relayResult {
	t.Helper()
	select {
	case r := <-ch:
		return r
	case <-time.After(10 * time.Second):
		t.Fatal("relay did not end")
		return relayResult{}
	}
}

// TestRelayThroughTunnel runs the real path: client TCP -> relay -> stream
// -> relay -> server TCP, with half-close in both orders and byte counts.
func TestRelayThroughTunnel(t *testing.T) {
	checkLeaks(t)
	p := newPKI(t)
	backendA, backendB := tcpPair(t) // backendB is "postgres"
	agentDone := make(chan relayResult, 1)
	srv := startServer(t, p, testConfig(), func(st *Stream) {
		st.Reply(StatusOK, "")
		x, y, err := Relay(context.Background(), st, backendA)
		agentDone <- relayResult{x, y, err}
	})
	s := dialTest(t, p, srv.addr(), testConfig())
	clientA, clientB := tcpPair(t) // clientA is the user's program
	st, err := s.OpenStream(context.Background(), Header{Kind: KindData, Resource: "pg"})
	if err != nil {
		t.Fatal(err)
	}
	gwDone := startRelay(context.Background(), clientB, st, time.Minute)

	up := bytes.Repeat([]byte("u"), 300000)
	down := bytes.Repeat([]byte("d"), 500000)
	// The client uploads and half-closes; the backend reads to EOF, then
	// answers and half-closes.
	go func() {
		clientA.Write(up)
		clientA.CloseWrite()
	}()
	got, err := io.ReadAll(backendB)
	if err != nil || !bytes.Equal(got, up) {
		t.Fatalf("backend got %d bytes, %v", len(got), err)
	}
	backendB.Write(down)
	backendB.CloseWrite()
	got, err = io.ReadAll(clientA)
	if err != nil || !bytes.Equal(got, down) {
		t.Fatalf("client got %d bytes, %v", len(got), err)
	}
	g := waitRelay(t, gwDone)
	a := waitRelay(t, agentDone)
	if g.err != nil || a.err != nil {
		t.Fatalf("relay errors: gateway %v, agent %v", g.err, a.err)
	}
	if g.aToB != int64(len(up)) || g.bToA != int64(len(down)) || a.aToB != int64(len(up)) || a.bToA != int64(len(down)) {
		t.Fatalf("byte counts: gateway %d/%d agent %d/%d", g.aToB, g.bToA, a.aToB, a.bToA)
	}
	clientA.Close()
	backendB.Close()
	s.Close()
	srv.close()
}

func TestRelayContextCancelEndsBoth(t *testing.T) {
	checkLeaks(t)
	a1, a2 := tcpPair(t)
	b1, b2 := tcpPair(t)
	ctx, cancel := context.WithCancel(context.Background())
	ch := startRelay(ctx, a2, b1, time.Minute)
	a1.Write([]byte("x"))
	buf := make([]byte, 1)
	io.ReadFull(b2, buf)
	cancel()
	r := waitRelay(t, ch)
	if !errors.Is(r.err, context.Canceled) {
		t.Fatalf("err = %v", r.err)
	}
	// Both outer ends see the relay's connections go away.
	for _, c := range []net.Conn{a1, b2} {
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Read(buf); err == nil {
			t.Fatal("connection still open after cancel")
		}
		c.Close()
	}
}

func TestRelayPeerResetEndsBoth(t *testing.T) {
	checkLeaks(t)
	a1, a2 := tcpPair(t)
	b1, b2 := tcpPair(t)
	ch := startRelay(context.Background(), a2, b1, time.Minute)
	a1.SetLinger(0)
	a1.Close() // RST
	r := waitRelay(t, ch)
	t.Logf("relay ended with %v", r.err)
	b2.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadAll(b2); err != nil && !errors.Is(err, net.ErrClosed) {
		t.Logf("other side: %v", err)
	}
	b2.Close()
}

// A peer that half-closed and then stops reading must not pin the relay
// forever (yamux #133 on streams, same shape on TCP).
func TestRelayHalfClosedStallBounded(t *testing.T) {
	checkLeaks(t)
	a1, a2 := tcpPair(t)
	b1, b2 := tcpPair(t)
	a2.SetWriteBuffer(4096)
	a1.SetReadBuffer(4096)
	ch := startRelay(context.Background(), a2, b1, 200*time.Millisecond)
	a1.CloseWrite() // a is done sending and will never read again
	go func() {
		big := make([]byte, 1<<20)
		for {
			if _, err := b2.Write(big); err != nil {
				return
			}
		}
	}()
	r := waitRelay(t, ch)
	if r.err == nil || !isTimeout(r.err) {
		t.Fatalf("relay err = %v, want a write timeout", r.err)
	}
	a1.Close()
	b2.Close()
}

func TestCloseWriteFallsBackToClose(t *testing.T) {
	checkLeaks(t)
	x, y := net.Pipe()
	if err := closeWrite(x); err != nil {
		t.Fatal(err)
	}
	if _, err := y.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("read after fallback close = %v", err)
	}
	y.Close()
}

// yamux #133 on a real stream: the peer closes the stream completely (FIN,
// then no more reads); our relay's writes into it must end within the stall
// bound instead of hanging once the window is used up.
func TestRelayStreamPeerClosedBounded(t *testing.T) {
	checkLeaks(t)
	p := newPKI(t)
	release := make(chan struct{})
	srv := startServer(t, p, testConfig(), func(st *Stream) {
		st.Reply(StatusOK, "")
		st.Close()
		<-release
	})
	var once sync.Once
	unblock := func() { once.Do(func() { close(release) }) }
	t.Cleanup(unblock) // before the server's cleanup, even after a t.Fatal
	s := dialTest(t, p, srv.addr(), testConfig())
	st, err := s.OpenStream(context.Background(), Header{Kind: KindData, Resource: "gone"})
	if err != nil {
		t.Fatal(err)
	}
	c1, c2 := tcpPair(t)
	ch := startRelay(context.Background(), c2, st, 200*time.Millisecond)
	go func() {
		big := make([]byte, 1<<20)
		for {
			if _, err := c1.Write(big); err != nil {
				return
			}
		}
	}()
	r := waitRelay(t, ch)
	if !isTimeout(r.err) {
		t.Fatalf("relay err = %v, want a write timeout", r.err)
	}
	t.Logf("relay gave up after writing %d bytes into a stream nobody reads", r.aToB)
	c1.Close()
	unblock()
	s.Close()
	srv.close()
}
