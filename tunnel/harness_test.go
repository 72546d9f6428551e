package tunnel

import (
	"context"
	"crypto/tls"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"
)

// checkLeaks fails t if goroutines are left once the test and all of its
// cleanups are done. Call it first: cleanups run last-registered-first, so
// the check runs after the servers and sessions the test registered later
// have been closed, even when the test stops early with t.Fatal.
func checkLeaks(t *testing.T) {
	t.Helper()
	t.Cleanup(func() { goleak.VerifyNone(t) })
}

// testConfig is DefaultConfig with timeouts short enough for tests.
func testConfig() Config {
	c := DefaultConfig()
	c.HandshakeTimeout = 2 * time.Second
	c.StreamOpenTimeout = 5 * time.Second
	return c
}

// pki is one CA with a server and a client certificate.
type pki struct {
	ca     *testCA
	server *tls.Certificate
	client *tls.Certificate
}

func newPKI(t testing.TB) *pki {
	ca := newTestCA(t, "wicket test root")
	return &pki{ca: ca, server: ca.valid("gateway/test"), client: ca.valid("agent/test")}
}

func (p *pki) serverTLS() *tls.Config {
	return ServerTLSConfig(func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return p.server, nil },
		p.ca.pool, []string{ALPNAgent, ALPNClient}, nil)
}

func (p *pki) clientTLS(alpn string, cert *tls.Certificate) *tls.Config {
	return ClientTLSConfig(alpn, p.ca.pool, "localhost",
		func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return cert, nil })
}

// testServer accepts TCP connections on 127.0.0.1, runs tunnel.Server on each
// and hands every accepted stream to handle in its own goroutine.
type testServer struct {
	t        testing.TB
	ln       net.Listener
	cfg      Config
	tls      *tls.Config
	handle   func(*Stream)
	onSess   func(*Session) // optional: replaces the accept loop
	preShake bool           // handshake before calling Server (like the gateway's router)

	wg       sync.WaitGroup
	mu       sync.Mutex
	sessions []*Session
	conns    map[net.Conn]struct{}
	refused  atomic.Int64
	refusals chan error
	sessCh   chan *Session
}

func startServer(t testing.TB, p *pki, cfg Config, handle func(*Stream)) *testServer {
	t.Helper()
	s := newTestServer(t, p, cfg, handle)
	s.start()
	return s
}

func newTestServer(t testing.TB, p *pki, cfg Config, handle func(*Stream)) *testServer {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return &testServer{t: t, ln: ln, cfg: cfg, tls: p.serverTLS(), handle: handle,
		conns: map[net.Conn]struct{}{}, refusals: make(chan error, 64), sessCh: make(chan *Session, 64)}
}

func (s *testServer) start() {
	s.t.Cleanup(s.close)
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			c, err := s.ln.Accept()
			if err != nil {
				return
			}
			s.mu.Lock()
			s.conns[c] = struct{}{}
			s.mu.Unlock()
			s.wg.Add(1)
			go func() {
				defer s.wg.Done()
				s.serve(c)
			}()
		}
	}()
}

func (s *testServer) addr() string { return s.ln.Addr().String() }

func (s *testServer) serve(c net.Conn) {
	defer func() {
		s.mu.Lock()
		delete(s.conns, c)
		s.mu.Unlock()
	}()
	tc := tls.Server(c, s.tls)
	if s.preShake {
		ctx, cancel := context.WithTimeout(context.Background(), s.cfg.HandshakeTimeout)
		err := tc.HandshakeContext(ctx)
		cancel()
		if err != nil {
			s.refuse(err)
			c.Close()
			return
		}
	}
	sess, err := Server(tc, s.cfg)
	if err != nil {
		s.refuse(err)
		return
	}
	s.mu.Lock()
	s.sessions = append(s.sessions, sess)
	s.mu.Unlock()
	select {
	case s.sessCh <- sess:
	default:
	}
	if s.onSess != nil {
		s.onSess(sess)
		return
	}
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		st, err := sess.AcceptStream(context.Background())
		if err != nil {
			return
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			s.handle(st)
		}()
	}
}

func (s *testServer) refuse(err error) {
	s.refused.Add(1)
	select {
	case s.refusals <- err:
	default:
	}
}

// waitRefusal returns the next handshake/session refusal seen by the server.
func (s *testServer) waitRefusal(t testing.TB, within time.Duration) error {
	t.Helper()
	select {
	case err := <-s.refusals:
		return err
	case <-time.After(within):
		t.Fatalf("server did not refuse the connection within %s", within)
		return nil
	}
}

func (s *testServer) close() {
	s.ln.Close()
	s.mu.Lock()
	for _, sess := range s.sessions {
		sess.Close()
	}
	for c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
	s.wg.Wait()
}

// echo replies OK and copies everything back, propagating the half-close.
func echo(st *Stream) {
	defer st.Close()
	if err := st.Reply(StatusOK, ""); err != nil {
		return
	}
	if _, err := io.Copy(st, st); err != nil {
		return
	}
	st.CloseWrite()
}

func dialTest(t testing.TB, p *pki, addr string, cfg Config) *Session {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := Dial(ctx, DialConfig{Addr: addr, TLS: p.clientTLS(ALPNAgent, p.client), Config: cfg})
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// roundTrip opens a data stream, sends msg, half-closes, and checks the echo.
func roundTrip(t testing.TB, s *Session, msg string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := s.OpenStream(ctx, Header{Kind: KindData, Resource: "echo"})
	if err != nil {
		t.Fatalf("open stream: %v", err)
	}
	defer st.Close()
	st.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := st.Write([]byte(msg)); err != nil {
		t.Fatalf("write: %v", err)
	}
	if err := st.CloseWrite(); err != nil {
		t.Fatalf("close write: %v", err)
	}
	got, err := io.ReadAll(st)
	if err != nil {
		t.Fatalf("read: %v", err)
	}
	if string(got) != msg {
		t.Fatalf("echo: got %q, want %q", got, msg)
	}
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t testing.TB, within time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", within, what)
		}
		time.Sleep(5 * time.Millisecond) // polling interval, not a wait for an event
	}
}
