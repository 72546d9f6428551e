package tunnel

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"strings"
	"sync"
	"testing"
	"time"
)

func TestEcho(t *testing.T) {
	checkLeaks(t)
	p := newPKI(t)
	srv := startServer(t, p, testConfig(), echo)
	s := dialTest(t, p, srv.addr(), testConfig())
	roundTrip(t, s, "hello through the tunnel")
	if got := s.ConnectionState().NegotiatedProtocol; got != ALPNAgent {
		t.Fatalf("ALPN = %q", got)
	}
	srv.close()
	s.Close()
}

func TestServerWithHandshakenConn(t *testing.T) {
	checkLeaks(t)
	p := newPKI(t)
	srv := newTestServer(t, p, testConfig(), echo)
	srv.preShake = true
	srv.start()
	s := dialTest(t, p, srv.addr(), testConfig())
	roundTrip(t, s, "pre-handshaken")
	srv.close()
	s.Close()
}

func TestHalfCloseBothWays(t *testing.T) {
	checkLeaks(t)
	p := newPKI(t)
	// The server sends its whole answer and half-closes FIRST, then keeps
	// reading what the client still sends, and answers with its length.
	handled := make(chan struct{})
	srv := startServer(t, p, testConfig(), func(st *Stream) {
		defer close(handled)
		defer st.Close()
		st.Reply(StatusOK, "")
		st.Write([]byte("server-first"))
		if err := st.CloseWrite(); err != nil {
			t.Errorf("server close write: %v", err)
		}
		got, err := io.ReadAll(st)
		if err != nil || string(got) != "client-after-eof" {
			t.Errorf("server read after its own half-close: %q, %v", got, err)
		}
	})
	s := dialTest(t, p, srv.addr(), testConfig())
	ctx := context.Background()
	st, err := s.OpenStream(ctx, Header{Kind: KindData, Resource: "hc"})
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(st) // EOF from the server's FIN, while our write side is open
	if err != nil || string(got) != "server-first" {
		t.Fatalf("client read: %q, %v", got, err)
	}
	if _, err := st.Write([]byte("client-after-eof")); err != nil {
		t.Fatalf("client write after peer half-close: %v", err)
	}
	st.CloseWrite()
	// A session that dies makes a pending Read fail rather than look like a
	// clean end, so let the server finish reading before anything closes.
	<-handled
	st.Close()

	// And the other way round: the client half-closes first (roundTrip).
	srv2 := startServer(t, p, testConfig(), echo)
	s2 := dialTest(t, p, srv2.addr(), testConfig())
	roundTrip(t, s2, strings.Repeat("x", 100000))
	s.Close()
	s2.Close()
	srv.close()
	srv2.close()
}

func TestThousandConcurrentStreams(t *testing.T) {
	checkLeaks(t)
	p := newPKI(t)
	srv := startServer(t, p, testConfig(), echo)
	s := dialTest(t, p, srv.addr(), testConfig())
	const streams = 1000
	const size = 8 << 10
	var wg sync.WaitGroup
	errs := make(chan error, streams)
	for i := range streams {
		wg.Add(1)
		go func() {
			defer wg.Done()
			msg := make([]byte, size+i) // distinct lengths and contents
			rng := rand.New(rand.NewPCG(uint64(i), 42))
			for j := range msg {
				msg[j] = byte(rng.Uint32())
			}
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			st, err := s.OpenStream(ctx, Header{Kind: KindData, Resource: "echo", SessionID: fmt.Sprint(i)})
			if err != nil {
				errs <- fmt.Errorf("stream %d open: %w", i, err)
				return
			}
			defer st.Close()
			st.SetDeadline(time.Now().Add(30 * time.Second))
			werr := make(chan error, 1)
			go func() {
				_, err := st.Write(msg)
				if err == nil {
					err = st.CloseWrite()
				}
				werr <- err
			}()
			got, err := io.ReadAll(st)
			if err := <-werr; err != nil {
				errs <- fmt.Errorf("stream %d write: %w", i, err)
				return
			}
			if err != nil {
				errs <- fmt.Errorf("stream %d read: %w", i, err)
				return
			}
			if sha256.Sum256(got) != sha256.Sum256(msg) {
				errs <- fmt.Errorf("stream %d: %d bytes back, content differs", i, len(got))
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	s.Close()
	srv.close()
}

func TestReplyStatuses(t *testing.T) {
	checkLeaks(t)
	p := newPKI(t)
	srv := startServer(t, p, testConfig(), func(st *Stream) {
		switch st.Header().Resource {
		case "nope":
			st.Reply(StatusUnknownResource, "no resource named nope")
		case "down":
			st.Reply(StatusDialFailed, "dial tcp 127.0.0.1:1: connection refused\n")
		default:
			echo(st)
		}
	})
	s := dialTest(t, p, srv.addr(), testConfig())
	_, err := s.OpenStream(context.Background(), Header{Kind: KindData, Resource: "nope"})
	var re *ReplyError
	if !errors.As(err, &re) || !errors.Is(err, ErrUnknownResource) || re.Reason != "no resource named nope" {
		t.Fatalf("unknown resource: %v", err)
	}
	_, err = s.OpenStream(context.Background(), Header{Kind: KindData, Resource: "down"})
	if !errors.Is(err, ErrDialFailed) || !strings.Contains(err.Error(), "connection refused") {
		t.Fatalf("dial failed: %v", err)
	}
	roundTrip(t, s, "still fine")
	s.Close()
	srv.close()
}

func TestWriteBeforeReplyRefused(t *testing.T) {
	checkLeaks(t)
	p := newPKI(t)
	got := make(chan error, 1)
	srv := startServer(t, p, testConfig(), func(st *Stream) {
		_, err := st.Write([]byte("too early"))
		got <- err
		st.Reply(StatusOK, "")
		if err := st.Reply(StatusOK, ""); !errors.Is(err, ErrAlreadyReplied) {
			t.Errorf("second reply: %v", err)
		}
		st.Close()
	})
	s := dialTest(t, p, srv.addr(), testConfig())
	st, err := s.OpenStream(context.Background(), Header{Kind: KindData, Resource: "x"})
	if err != nil {
		t.Fatal(err)
	}
	if err := <-got; !errors.Is(err, ErrNotReplied) {
		t.Fatalf("write before reply: %v", err)
	}
	if err := st.Reply(StatusOK, ""); !errors.Is(err, ErrAlreadyReplied) {
		t.Fatalf("opener reply: %v", err)
	}
	st.Close()
	s.Close()
	srv.close()
}

func TestGoAwayDrain(t *testing.T) {
	checkLeaks(t)
	p := newPKI(t)
	srv := startServer(t, p, testConfig(), echo)
	s := dialTest(t, p, srv.addr(), testConfig())
	ctx := context.Background()
	// A stream open before the go-away keeps working after it.
	old, err := s.OpenStream(ctx, Header{Kind: KindData, Resource: "echo"})
	if err != nil {
		t.Fatal(err)
	}
	var srvSess *Session
	select {
	case srvSess = <-srv.sessCh:
	case <-time.After(5 * time.Second):
		t.Fatal("no server session")
	}
	if err := srvSess.GoAway(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "go-away to reach the client", func() bool {
		_, err := s.OpenStream(ctx, Header{Kind: KindData, Resource: "echo"})
		return errors.Is(err, ErrGoAway)
	})
	old.Write([]byte("drain"))
	old.CloseWrite()
	got, err := io.ReadAll(old)
	if err != nil || string(got) != "drain" {
		t.Fatalf("old stream after go-away: %q %v", got, err)
	}
	old.Close()
	s.Close()
	srv.close()
}

func TestControlHello(t *testing.T) {
	checkLeaks(t)
	p := newPKI(t)
	hellos := make(chan Hello, 2)
	big := make(chan error, 1)
	srv := startServer(t, p, testConfig(), func(st *Stream) {
		if st.Header().Kind != KindControl {
			st.Reply(StatusRefused, "control only")
			return
		}
		st.Reply(StatusOK, "")
		c := st.Control()
		defer c.Close()
		for range 2 {
			var h Hello
			if err := c.Recv(&h); err != nil {
				t.Errorf("recv: %v", err)
				return
			}
			hellos <- h
		}
		var h Hello
		big <- c.Recv(&h)
	})
	s := dialTest(t, p, srv.addr(), testConfig())
	c, err := s.OpenControl(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	want := Hello{Name: "db-agent", Instance: "i-1", Version: "v0", Resources: []string{"postgres"}}
	if err := c.Send(want); err != nil {
		t.Fatal(err)
	}
	want.Resources = append(want.Resources, "web")
	if err := c.Send(want); err != nil {
		t.Fatal(err)
	}
	<-hellos
	if got := <-hellos; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("hello = %+v", got)
	}
	// A message over the limit is refused by the sender...
	huge := Hello{Name: strings.Repeat("a", DefaultConfig().MaxControlMessageSize)}
	if err := c.Send(huge); !errors.Is(err, ErrControlTooLarge) {
		t.Fatalf("oversized send: %v", err)
	}
	// ...and by the receiver, from a peer that does not check.
	var frame [4]byte
	binary.BigEndian.PutUint32(frame[:], 1<<30)
	c.Stream().Write(frame[:])
	if err := <-big; !errors.Is(err, ErrControlTooLarge) {
		t.Fatalf("oversized recv: %v", err)
	}
	c.Close()
	s.Close()
	srv.close()
}

func TestSessionCloseEndsStreams(t *testing.T) {
	checkLeaks(t)
	p := newPKI(t)
	srv := startServer(t, p, testConfig(), func(st *Stream) {
		st.Reply(StatusOK, "")
		st.Session().Close() // the whole session dies under the reader
	})
	s := dialTest(t, p, srv.addr(), testConfig())
	// The server closes right after its reply, so the client may see the
	// session die before or after the reply arrives (a close with unread
	// bytes becomes a TCP reset, which can discard the reply). Either way the
	// error must say the session closed, never look like a clean end.
	st, err := s.OpenStream(context.Background(), Header{Kind: KindData, Resource: "x"})
	if err == nil {
		_, err = io.ReadAll(st)
	}
	if !errors.Is(err, ErrSessionClosed) {
		t.Fatalf("stream on a dead session = %v, want ErrSessionClosed (not a clean EOF)", err)
	}
	select {
	case <-s.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("client session did not end")
	}
	if !errors.Is(s.Err(), ErrSessionClosed) {
		t.Fatalf("Err = %v", s.Err())
	}
	srv.close()
}

// TestCloseFlushesQueuedBytes: the connection writes behind yamux (frameConn), so a Close
// right after a Write must still let the queued bytes leave before the connection closes.
// The payload stays under the initial stream window, so the client sends nothing back that
// the server could leave unread (which would turn its close into a TCP reset).
func TestCloseFlushesQueuedBytes(t *testing.T) {
	checkLeaks(t)
	p := newPKI(t)
	cfg := testConfig()
	cfg.KeepAliveInterval = time.Hour
	payload := make([]byte, 200<<10)
	for i := range payload {
		payload[i] = byte(rand.Uint32())
	}
	// The server writes and closes only once the client's OpenStream has returned: a session
	// closed while the client's own header write is still being confirmed fails that write
	// (yamux reports the shutdown, not the sent frame), which is not what this test is about.
	opened := make(chan struct{})
	srv := startServer(t, p, cfg, func(st *Stream) {
		st.Reply(StatusOK, "")
		<-opened
		st.Write(payload)
		st.Session().Close()
	})
	s := dialTest(t, p, srv.addr(), cfg)
	st, err := s.OpenStream(context.Background(), Header{Kind: KindData, Resource: "x"})
	close(opened)
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(payload))
	if _, err := io.ReadFull(st, got); err != nil {
		t.Fatalf("read what the server wrote before closing: %v", err)
	}
	if !bytes.Equal(got, payload) {
		t.Fatal("bytes written before Close arrived altered")
	}
	select {
	case <-s.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("client session did not end")
	}
	srv.close()
}

func TestStreamCloseUnblocksRead(t *testing.T) {
	checkLeaks(t)
	p := newPKI(t)
	srv := startServer(t, p, testConfig(), echo)
	s := dialTest(t, p, srv.addr(), testConfig())
	st, err := s.OpenStream(context.Background(), Header{Kind: KindData, Resource: "x"})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error)
	go func() {
		_, err := st.Read(make([]byte, 10))
		done <- err
	}()
	st.Close()
	select {
	case err := <-done:
		if !errors.Is(err, net.ErrClosed) {
			t.Fatalf("read after close = %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Close did not unblock Read")
	}
	s.Close()
	srv.close()
}

func TestOpenStreamContextCancel(t *testing.T) {
	checkLeaks(t)
	p := newPKI(t)
	release := make(chan struct{})
	srv := startServer(t, p, testConfig(), func(st *Stream) {
		<-release // never replies in time
		st.Close()
	})
	var once sync.Once
	unblock := func() { once.Do(func() { close(release) }) }
	t.Cleanup(unblock) // runs before the server's cleanup, even after a t.Fatal
	s := dialTest(t, p, srv.addr(), testConfig())
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := s.OpenStream(ctx, Header{Kind: KindData, Resource: "slow"})
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("open with expired ctx = %v", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("open took %s after its context ended", d)
	}
	unblock()
	s.Close()
	srv.close()
}

func TestConfigVerify(t *testing.T) {
	if err := DefaultConfig().Verify(); err != nil {
		t.Fatal(err)
	}
	bad := DefaultConfig()
	bad.MaxStreamWindowSize = 1024
	bad.AcceptBacklog = 0
	err := bad.Verify()
	if err == nil || !strings.Contains(err.Error(), "MaxStreamWindowSize") || !strings.Contains(err.Error(), "AcceptBacklog") {
		t.Fatalf("Verify = %v", err)
	}
}

var _ = bytes.Equal

// The client certificate comes from the hook on every handshake, so a
// renewed certificate is presented by the next connection with nothing
// rebuilt.
func TestRenewedCertUsedOnNextDial(t *testing.T) {
	checkLeaks(t)
	p := newPKI(t)
	srv := startServer(t, p, testConfig(), echo)
	var mu sync.Mutex
	cur := p.ca.valid("agent/renewing")
	tc := ClientTLSConfig(ALPNAgent, p.ca.pool, "localhost", func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
		mu.Lock()
		defer mu.Unlock()
		return cur, nil
	})
	dial := func() *Session {
		s, err := Dial(context.Background(), DialConfig{Addr: srv.addr(), TLS: tc, Config: testConfig()})
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	serverSerial := func() string {
		select {
		case ss := <-srv.sessCh:
			return ss.ConnectionState().PeerCertificates[0].SerialNumber.String()
		case <-time.After(5 * time.Second):
			t.Fatal("no server session")
			return ""
		}
	}
	s1 := dial()
	first := serverSerial()
	mu.Lock()
	renewed := p.ca.valid("agent/renewing")
	cur = renewed
	mu.Unlock()
	s2 := dial()
	second := serverSerial()
	if first == second || second != renewed.Leaf.SerialNumber.String() {
		t.Fatalf("second connection presented serial %s, want the renewed %s (first was %s)", second, renewed.Leaf.SerialNumber, first)
	}
	roundTrip(t, s1, "old session still works")
	roundTrip(t, s2, "new session works")
	s1.Close()
	s2.Close()
	srv.close()
}
