package connect

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/wicketgw/wicket/agent/identity"
	"github.com/wicketgw/wicket/agent/internal/fakeclock"
	"github.com/wicketgw/wicket/agent/internal/testpki"
	"github.com/wicketgw/wicket/ca"
	"github.com/wicketgw/wicket/tunnel"
)

func TestMain(m *testing.M) {
	// glog (pulled in by step-ca through ca/) starts a flush daemon in its
	// package init: process-wide, not a leak of these tests.
	goleak.VerifyTestMain(m, goleak.IgnoreTopFunction("github.com/golang/glog.(*fileSink).flushDaemon"))
}

// fakeGateway serves user sessions: "echo" is echoed, "denied" is refused as
// the policy would, anything else has no agent.
type fakeGateway struct {
	ln       net.Listener
	wg       sync.WaitGroup
	mu       sync.Mutex
	sessions []*tunnel.Session
	conns    []net.Conn
	leaves   []*x509.Certificate // client certificate of each session, in order
	streams  map[*tunnel.Session]int
	newSess  chan *tunnel.Session
	refuse   atomic.Bool // refuse every handshake, as for a revoked certificate
}

func startGateway(t *testing.T, p *testpki.PKI) *fakeGateway {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gw := &fakeGateway{ln: ln, streams: map[*tunnel.Session]int{}, newSess: make(chan *tunnel.Session, 16)}
	now := time.Now()
	sc := p.Issue(ca.RoleGateway, "gw", now.Add(-time.Hour), now.Add(24*time.Hour)).TLSCertificate()
	tc := tunnel.ServerTLSConfig(func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return sc, nil },
		p.ClientCAs(), []string{tunnel.ALPNClient}, func(tls.ConnectionState) error {
			if gw.refuse.Load() {
				return errors.New("certificate revoked")
			}
			return nil
		})
	gw.wg.Add(1)
	go func() {
		defer gw.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			gw.mu.Lock()
			gw.conns = append(gw.conns, c)
			gw.mu.Unlock()
			gw.wg.Add(1)
			go func() {
				defer gw.wg.Done()
				gw.serve(tls.Server(c, tc))
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		gw.mu.Lock()
		for _, s := range gw.sessions {
			s.Close()
		}
		for _, c := range gw.conns {
			c.Close()
		}
		gw.mu.Unlock()
		gw.wg.Wait()
	})
	return gw
}

func (gw *fakeGateway) url() string { return "https://" + gw.ln.Addr().String() }

func (gw *fakeGateway) serve(c *tls.Conn) {
	s, err := tunnel.Server(c, tunnel.DefaultConfig())
	if err != nil {
		return
	}
	gw.mu.Lock()
	gw.sessions = append(gw.sessions, s)
	gw.leaves = append(gw.leaves, s.ConnectionState().PeerCertificates[0])
	gw.mu.Unlock()
	gw.newSess <- s
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		st, err := s.AcceptStream(context.Background())
		if err != nil {
			return
		}
		gw.mu.Lock()
		gw.streams[s]++
		gw.mu.Unlock()
		wg.Add(1)
		go func() {
			defer wg.Done()
			switch st.Header().Resource {
			case "echo":
				st.Reply(tunnel.StatusOK, "")
				io.Copy(st, st)
				st.CloseWrite()
				st.Close()
			case "denied":
				st.Reply(tunnel.StatusRefused, "policy does not allow user alice to reach resource denied")
			default:
				st.Reply(tunnel.StatusUnknownResource, "no connected agent exposes resource "+st.Header().Resource)
			}
		}()
	}
}

func (gw *fakeGateway) streamsOn(s *tunnel.Session) int {
	gw.mu.Lock()
	defer gw.mu.Unlock()
	return gw.streams[s]
}

func (gw *fakeGateway) nextSession(t *testing.T) *tunnel.Session {
	t.Helper()
	select {
	case s := <-gw.newSess:
		return s
	case <-time.After(10 * time.Second):
		t.Fatal("no user session reached the gateway")
		return nil
	}
}

func storeUser(t *testing.T, p *testpki.PKI, url string, role ca.Role, notBefore, notAfter time.Time) string {
	t.Helper()
	dir := t.TempDir()
	s := &identity.Stored{Meta: identity.Meta{URL: url, Role: role, Name: "alice", TrustDomain: p.TrustDomain},
		Creds: p.Issue(role, "alice", notBefore, notAfter)}
	if err := identity.Save(dir, s); err != nil {
		t.Fatal(err)
	}
	return dir
}

// syncBuffer is a goroutine-safe log sink.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

type running struct {
	done   chan struct{}
	err    error
	cancel context.CancelFunc
	addr   chan net.Addr
	log    *syncBuffer
}

func startConnect(t *testing.T, cfg Config) *running {
	t.Helper()
	r := &running{done: make(chan struct{}), addr: make(chan net.Addr, 1), log: &syncBuffer{}}
	cfg.Logger = slog.New(slog.NewTextHandler(r.log, &slog.HandlerOptions{Level: slog.LevelDebug}))
	cfg.OnListen = func(a net.Addr) { r.addr <- a }
	ctx, cancel := context.WithCancel(context.Background())
	r.cancel = cancel
	go func() {
		defer close(r.done)
		r.err = Connect(ctx, cfg)
	}()
	t.Cleanup(func() {
		r.stop()
		if t.Failed() {
			t.Log(r.log.String())
		}
	})
	return r
}

func (r *running) stop() error {
	r.cancel()
	<-r.done
	return r.err
}

func (r *running) listenAddr(t *testing.T) string {
	t.Helper()
	select {
	case a := <-r.addr:
		return a.String()
	case <-r.done:
		t.Fatalf("Connect returned: %v", r.err)
	case <-time.After(10 * time.Second):
		t.Fatal("Connect did not start listening")
	}
	return ""
}

func roundTrip(t *testing.T, c net.Conn, msg string) {
	t.Helper()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	defer c.SetDeadline(time.Time{})
	if _, err := c.Write([]byte(msg)); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(c, buf); err != nil {
		t.Fatal(err)
	}
	if string(buf) != msg {
		t.Fatalf("got %q, want %q", buf, msg)
	}
}

func TestLoginRefusesAgentToken(t *testing.T) {
	p := testpki.New("example.test")
	dir := t.TempDir()
	tok := p.Token(ca.RoleAgent, "db1", "https://127.0.0.1:8443", time.Now().Add(time.Minute))
	enrolled := false
	_, err := login(context.Background(), tok, dir, func(context.Context, string) (*ca.Credentials, error) {
		enrolled = true
		return nil, errors.New("unreachable")
	}, time.Now)
	if err == nil || err.Error() != "this is an agent token; use `wicket agent --token`" {
		t.Fatalf("login = %v", err)
	}
	if enrolled {
		t.Fatal("an agent token was sent to the CA by login")
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 0 {
		t.Fatal("login wrote files for a refused token")
	}
}

func TestLoginStoresUserIdentity(t *testing.T) {
	p := testpki.New("example.test")
	dir := t.TempDir()
	tok := p.Token(ca.RoleUser, "alice", "https://127.0.0.1:8443", time.Now().Add(time.Minute))
	now := time.Now()
	s, err := login(context.Background(), tok, dir, func(ctx context.Context, token string) (*ca.Credentials, error) {
		if token != tok {
			t.Error("enroll got another token")
		}
		return p.Issue(ca.RoleUser, "alice", now.Add(-time.Minute), now.Add(8*time.Hour)), nil
	}, time.Now)
	if err != nil {
		t.Fatal(err)
	}
	got, err := identity.Load(dir)
	if err != nil {
		t.Fatal(err)
	}
	if got.Role != ca.RoleUser || got.Name != "alice" || got.URL != "https://127.0.0.1:8443" || !got.Leaf().Equal(s.Leaf()) {
		t.Fatalf("stored %+v", got.Meta)
	}
	// A failed login leaves the stored identity alone.
	before, _ := os.ReadFile(dir + "/" + identity.ChainFile)
	_, err = login(context.Background(), tok, dir, func(context.Context, string) (*ca.Credentials, error) {
		return nil, ca.ErrTokenUsed
	}, time.Now)
	if !errors.Is(err, ca.ErrTokenUsed) || !strings.Contains(err.Error(), "log in as alice") {
		t.Fatalf("second login = %v", err)
	}
	after, _ := os.ReadFile(dir + "/" + identity.ChainFile)
	if !bytes.Equal(before, after) {
		t.Fatal("a failed login changed the stored identity")
	}
}

func TestConnectRelaysAndReportsRefusals(t *testing.T) {
	p := testpki.New("example.test")
	gw := startGateway(t, p)
	now := time.Now()
	dir := storeUser(t, p, gw.url(), ca.RoleUser, now.Add(-time.Minute), now.Add(8*time.Hour))

	ok := startConnect(t, Config{DataDir: dir, Resource: "echo"})
	addr := ok.listenAddr(t)
	if !strings.HasPrefix(addr, "127.0.0.1:") || strings.HasSuffix(addr, ":0") {
		t.Fatalf("listening on %s", addr)
	}
	var conns []net.Conn
	for i := range 3 {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
		roundTrip(t, c, strings.Repeat("x", 1000*(i+1)))
	}
	for _, c := range conns {
		c.Close()
	}

	for _, tc := range []struct{ resource, want string }{
		{"denied", "access to resource denied was refused: policy does not allow user alice to reach resource denied"},
		{"nothing", "no agent serves resource nothing: no connected agent exposes resource nothing"},
	} {
		r := startConnect(t, Config{DataDir: dir, Resource: tc.resource})
		c, err := net.Dial("tcp", r.listenAddr(t))
		if err != nil {
			t.Fatal(err)
		}
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		if n, err := c.Read(make([]byte, 1)); n != 0 || err == nil {
			t.Fatalf("%s: the local connection was not closed (n=%d, err=%v)", tc.resource, n, err)
		}
		c.Close()
		deadline := time.Now().Add(5 * time.Second)
		for !strings.Contains(r.log.String(), tc.want) {
			if time.Now().After(deadline) {
				t.Fatalf("%s: log lacks %q:\n%s", tc.resource, tc.want, r.log.String())
			}
			time.Sleep(10 * time.Millisecond)
		}
		if err := r.stop(); err != nil {
			t.Fatalf("Connect = %v after a refused stream", err)
		}
	}
	if err := ok.stop(); err != nil {
		t.Fatalf("Connect = %v", err)
	}
}

func TestConnectStdio(t *testing.T) {
	p := testpki.New("example.test")
	gw := startGateway(t, p)
	now := time.Now()
	dir := storeUser(t, p, gw.url(), ca.RoleUser, now.Add(-time.Minute), now.Add(8*time.Hour))
	var out syncBuffer
	msg := strings.Repeat("ssh bytes ", 10000)
	err := Connect(context.Background(), Config{DataDir: dir, Resource: "echo", Stdio: true,
		Stdin: strings.NewReader(msg), Stdout: &out})
	if err != nil {
		t.Fatal(err)
	}
	if out.String() != msg {
		t.Fatalf("stdout got %d bytes, want %d", len(out.String()), len(msg))
	}
	err = Connect(context.Background(), Config{DataDir: dir, Resource: "denied", Stdio: true,
		Stdin: strings.NewReader(""), Stdout: io.Discard})
	if !errors.Is(err, tunnel.ErrRefused) ||
		err.Error() != "access to resource denied was refused: policy does not allow user alice to reach resource denied" {
		t.Fatalf("stdio to a refused resource = %v", err)
	}
}

func TestConnectRefusesWrongIdentity(t *testing.T) {
	p := testpki.New("example.test")
	now := time.Now()
	agentDir := storeUser(t, p, "https://127.0.0.1:1", ca.RoleAgent, now.Add(-time.Minute), now.Add(time.Hour))
	err := Connect(context.Background(), Config{DataDir: agentDir, Resource: "echo"})
	if err == nil || !strings.Contains(err.Error(), "not of a user") {
		t.Fatalf("Connect with an agent identity = %v", err)
	}
	expiredDir := storeUser(t, p, "https://127.0.0.1:1", ca.RoleUser, now.Add(-2*time.Hour), now.Add(-time.Hour))
	err = Connect(context.Background(), Config{DataDir: expiredDir, Resource: "echo"})
	if err == nil || !strings.Contains(err.Error(), "log in again with a new token") {
		t.Fatalf("Connect with an expired identity = %v", err)
	}
	err = Connect(context.Background(), Config{DataDir: t.TempDir(), Resource: "echo"})
	if err == nil || !strings.Contains(err.Error(), "run `wicket login --token TOKEN` first") {
		t.Fatalf("Connect without identity = %v", err)
	}
}

// TestConnectRenewal: after the user certificate renews, new connections go
// over a new session with the new certificate while a connection in flight
// on the old session continues.
func TestConnectRenewal(t *testing.T) {
	p := testpki.New("example.test")
	gw := startGateway(t, p)
	start := time.Now()
	dir := storeUser(t, p, gw.url(), ca.RoleUser, start.Add(-time.Minute), start.Add(8*time.Hour))
	clk := fakeclock.New(start)
	renewed := make(chan *ca.Credentials, 1)
	r := startConnect(t, Config{DataDir: dir, Resource: "echo", Now: clk.Now, After: clk.After,
		Renew: func(ctx context.Context, url string, cur *ca.Credentials) (*ca.Credentials, error) {
			c := p.IssueWithKey(cur.Key, ca.RoleUser, "alice", time.Now().Add(-time.Minute), clk.Now().Add(8*time.Hour))
			renewed <- c
			return c, nil
		}})
	addr := r.listenAddr(t)
	old := gw.nextSession(t)
	inflight, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer inflight.Close()
	roundTrip(t, inflight, "before")

	if !clk.WaitForWaiters(1, 5*time.Second) {
		t.Fatal("renewal never scheduled")
	}
	clk.Advance(6 * time.Hour)
	var nc *ca.Credentials
	select {
	case nc = <-renewed:
	case <-time.After(10 * time.Second):
		t.Fatal("not renewed")
	}
	next := gw.nextSession(t)
	if !next.ConnectionState().PeerCertificates[0].Equal(nc.Chain[0]) {
		t.Fatal("the new session does not use the renewed certificate")
	}
	// New connections go to the new session once the client switched.
	deadline := time.Now().Add(5 * time.Second)
	for gw.streamsOn(next) == 0 {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		roundTrip(t, c, "new")
		c.Close()
		if time.Now().After(deadline) {
			t.Fatal("new connections never used the new session")
		}
	}
	roundTrip(t, inflight, "after renewal")
	inflight.Close()
	select {
	case <-old.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the old session was not closed after its last stream ended")
	}
	if err := r.stop(); err != nil {
		t.Fatal(err)
	}
}

// TestConnectRevoked: the gateway drops the session and refuses the
// certificate; the CA says it was revoked; connect stops with the sentence.
func TestConnectRevoked(t *testing.T) {
	p := testpki.New("example.test")
	gw := startGateway(t, p)
	now := time.Now()
	dir := storeUser(t, p, gw.url(), ca.RoleUser, now.Add(-time.Minute), now.Add(8*time.Hour))
	r := startConnect(t, Config{DataDir: dir, Resource: "echo",
		Reconnect: &tunnel.Backoff{Initial: time.Millisecond, Max: 10 * time.Millisecond},
		Renew: func(ctx context.Context, url string, cur *ca.Credentials) (*ca.Credentials, error) {
			return nil, ca.ErrRevoked
		}})
	r.listenAddr(t)
	s := gw.nextSession(t)
	gw.refuse.Store(true)
	s.Close()
	select {
	case <-r.done:
	case <-time.After(10 * time.Second):
		t.Fatal("connect kept running with a revoked certificate")
	}
	want := "the user certificate was revoked: log in again with a new token from `wicket token create user alice`"
	if r.err == nil || r.err.Error() != want {
		t.Fatalf("Connect = %v, want %q", r.err, want)
	}
}
