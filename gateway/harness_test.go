package gateway

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
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/wicketgw/wicket/ca"
	"github.com/wicketgw/wicket/gateway/audit"
	"github.com/wicketgw/wicket/tunnel"
	"github.com/wicketgw/wicket/tunnel/loopback"
)

// fakeClock is real time plus an offset that tests advance; timers registered through
// AfterFunc fire when an Advance reaches them, so a 5-minute certificate can expire at once.
type fakeClock struct {
	mu     sync.Mutex
	offset time.Duration
	timers map[*fakeTimer]struct{}
}

type fakeTimer struct {
	at time.Time
	f  func()
}

func newFakeClock() *fakeClock { return &fakeClock{timers: map[*fakeTimer]struct{}{}} }

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return time.Now().Add(c.offset)
}

func (c *fakeClock) AfterFunc(d time.Duration, f func()) func() bool {
	if d <= 0 {
		go f()
		return func() bool { return false }
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	t := &fakeTimer{at: time.Now().Add(c.offset + d), f: f}
	c.timers[t] = struct{}{}
	return func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		_, ok := c.timers[t]
		delete(c.timers, t)
		return ok
	}
}

// Advance moves the clock and runs the timers that became due, each in its own goroutine,
// waiting for them to return.
func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.offset += d
	now := time.Now().Add(c.offset)
	var due []*fakeTimer
	for t := range c.timers {
		if !t.at.After(now) {
			due = append(due, t)
			delete(c.timers, t)
		}
	}
	c.mu.Unlock()
	var wg sync.WaitGroup
	for _, t := range due {
		wg.Add(1)
		go func() { defer wg.Done(); t.f() }()
	}
	wg.Wait()
}

// testGateway is a real gateway on 127.0.0.1:0 in a temp data dir.
type testGateway struct {
	*Gateway
	t       testing.TB
	dir     string
	clock   *fakeClock
	cancel  context.CancelFunc
	runErr  chan error
	stopped bool
}

const testPolicy = `rules:
  - users: ["alice"]
    resources: ["*"]
  - users: ["carol"]
    resources: ["echo"]
`

func testLogger(t testing.TB) *slog.Logger {
	if os.Getenv("WICKET_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.DiscardHandler)
}

func startGateway(t testing.TB, mod func(*Config)) *testGateway {
	t.Helper()
	dir := t.TempDir()
	pol := filepath.Join(dir, "policy.yaml")
	if err := os.WriteFile(pol, []byte(testPolicy), 0o600); err != nil {
		t.Fatal(err)
	}
	clock := newFakeClock()
	cfg := Config{
		DataDir:         filepath.Join(dir, "gw"),
		Listen:          "127.0.0.1:0",
		PolicyFile:      pol,
		CAPassword:      []byte("test-ca-password"),
		GracePeriod:     5 * time.Second,
		RevocationSweep: 100 * time.Millisecond,
		Clock:           clock,
		Logger:          testLogger(t),
	}
	if mod != nil {
		mod(&cfg)
	}
	ctx, cancel := context.WithCancel(context.Background())
	g, err := New(ctx, cfg)
	if err != nil {
		cancel()
		t.Fatalf("New: %v", err)
	}
	tg := &testGateway{Gateway: g, t: t, dir: cfg.DataDir, clock: clock, cancel: cancel, runErr: make(chan error, 1)}
	go func() { tg.runErr <- g.Run(ctx) }()
	t.Cleanup(tg.stop)
	return tg
}

// stop ends Run and checks it returned nil and that the audit chain verifies.
func (tg *testGateway) stop() {
	if tg.stopped {
		return
	}
	tg.stopped = true
	tg.cancel()
	select {
	case err := <-tg.runErr:
		if err != nil {
			tg.t.Errorf("Run returned %v", err)
		}
	case <-time.After(20 * time.Second):
		tg.t.Fatal("Run did not return within 20s of cancel")
	}
	res, err := audit.VerifyFile(filepath.Join(tg.dir, AuditLogName))
	if err != nil {
		tg.t.Errorf("audit log does not verify: %v", err)
	} else if res.Records == 0 {
		tg.t.Error("audit log is empty")
	}
}

// auditRecords reads the audit log.
func (tg *testGateway) auditRecords() []audit.Record {
	tg.t.Helper()
	data, err := os.ReadFile(filepath.Join(tg.dir, AuditLogName))
	if err != nil {
		tg.t.Fatal(err)
	}
	var out []audit.Record
	for _, line := range bytes.Split(bytes.TrimSpace(data), []byte("\n")) {
		var r audit.Record
		if err := jsonUnmarshal(line, &r); err != nil {
			tg.t.Fatalf("audit line %q: %v", line, err)
		}
		out = append(out, r)
	}
	return out
}

// waitAudit polls the audit log until a record matches.
func (tg *testGateway) waitAudit(what string, match func(audit.Record) bool) audit.Record {
	tg.t.Helper()
	var last []audit.Record
	ok := eventually(10*time.Second, func() bool {
		last = tg.auditRecords()
		for _, r := range last {
			if match(r) {
				return true
			}
		}
		return false
	})
	if !ok {
		var types []string
		for _, r := range last {
			types = append(types, r.Type+"("+r.Reason+")")
		}
		tg.t.Fatalf("no audit record %s; have %s", what, strings.Join(types, ", "))
	}
	for _, r := range last {
		if match(r) {
			return r
		}
	}
	panic("unreachable")
}

// eventually polls cond every 10ms until it holds or d passes.
func eventually(d time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(d)
	for {
		if cond() {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		<-time.After(10 * time.Millisecond)
	}
}

// enroll mints a token and enrolls, the way `wicket agent --token` and `wicket login` do.
func (tg *testGateway) enroll(role ca.Role, name string) *ca.Credentials {
	tg.t.Helper()
	tok, err := tg.Authority().MintToken(role, name, 0)
	if err != nil {
		tg.t.Fatalf("MintToken: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	creds, err := ca.Enroll(ctx, tok)
	if err != nil {
		tg.t.Fatalf("Enroll %s %s: %v", role, name, err)
	}
	return creds
}

// dialUser enrolls user name and opens its session, failing the test if either fails.
func (tg *testGateway) dialUser(name string) *tunnel.Session {
	tg.t.Helper()
	s, err := tg.dial(tunnel.ALPNClient, tg.enroll(ca.RoleUser, name))
	if err != nil {
		tg.t.Fatalf("user %s dial: %v", name, err)
	}
	tg.t.Cleanup(func() { s.Close() })
	return s
}

// mustAgent enrolls agent name and connects it exposing expose, failing the test if it cannot.
func (tg *testGateway) mustAgent(name string, expose map[string]string) *fakeAgent {
	tg.t.Helper()
	a, err := tg.connectAgent(tg.enroll(ca.RoleAgent, name), "i", expose)
	if err != nil {
		tg.t.Fatalf("agent %s connect: %v", name, err)
	}
	return a
}

func (tg *testGateway) dial(alpn string, creds *ca.Credentials) (*tunnel.Session, error) {
	pool := x509.NewCertPool()
	pool.AddCert(creds.Root)
	host, _, _ := net.SplitHostPort(tg.PublicAddr())
	tc := tunnel.ClientTLSConfig(alpn, pool, host, func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
		return creds.TLSCertificate(), nil
	})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return tunnel.Dial(ctx, tunnel.DialConfig{Addr: tg.Addr().String(), TLS: tc, Config: tunnel.DefaultConfig()})
}

// fakeAgent is the agent's side of the protocol, enough to exercise the gateway.
type fakeAgent struct {
	t        testing.TB
	sess     *tunnel.Session
	ack      tunnel.Hello
	expose   map[string]string // resource -> host:port ("" answers dial failed)
	mu       sync.Mutex
	served   int
	wg       sync.WaitGroup
	ctl      *tunnel.Control
	closing  chan string // the gateway's Closing reason
	relayCtx context.Context
	cancel   context.CancelFunc
}

// connectAgent grants the agent's name the resources it exposes (as `wicket token create
// agent NAME --resources` would) and connects it (connectAgentAs).
func (tg *testGateway) connectAgent(creds *ca.Credentials, instance string, expose map[string]string) (*fakeAgent, error) {
	id, _ := creds.Identity()
	var res []string
	for r := range expose {
		if ca.ValidName(r) == nil {
			res = append(res, r)
		}
	}
	if len(res) > 0 {
		if _, _, err := tg.grants.change(id.Name, res, true); err != nil {
			return nil, err
		}
	}
	return tg.connectAgentAs(creds, instance, expose)
}

// connectAgentAs dials on the agent ALPN, sends the hello and waits for the gateway's,
// without granting anything.
func (tg *testGateway) connectAgentAs(creds *ca.Credentials, instance string, expose map[string]string) (*fakeAgent, error) {
	sess, err := tg.dial(tunnel.ALPNAgent, creds)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ctl, err := sess.OpenControl(ctx)
	if err != nil {
		sess.Close()
		return nil, err
	}
	id, _ := creds.Identity()
	var res []string
	for r := range expose {
		res = append(res, r)
	}
	if err := ctl.Send(tunnel.Hello{Name: id.Name, Instance: instance, Version: "test", Resources: res}); err != nil {
		sess.Close()
		return nil, err
	}
	var ack tunnel.Hello
	if err := ctl.Recv(&ack); err != nil {
		sess.Close()
		return nil, err
	}
	a := &fakeAgent{t: tg.t, sess: sess, ack: ack, expose: expose, ctl: ctl, closing: make(chan string, 1)}
	a.relayCtx, a.cancel = context.WithCancel(context.Background())
	a.wg.Add(2)
	go a.serve()
	go func() {
		defer a.wg.Done()
		for {
			var m Closing
			if err := ctl.Recv(&m); err != nil {
				return
			}
			if m.Closing != "" {
				a.closing <- m.Closing
			}
		}
	}()
	tg.t.Cleanup(a.close)
	return a, nil
}

func (a *fakeAgent) serve() {
	defer a.wg.Done()
	for {
		st, err := a.sess.AcceptStream(context.Background())
		if err != nil {
			return
		}
		a.mu.Lock()
		a.served++
		a.mu.Unlock()
		a.wg.Add(1)
		go func() {
			defer a.wg.Done()
			target, ok := a.expose[st.Header().Resource]
			if !ok {
				_ = st.Reply(tunnel.StatusUnknownResource, "not exposed by this agent")
				return
			}
			c, err := net.DialTimeout("tcp", target, 5*time.Second)
			if err != nil {
				_ = st.Reply(tunnel.StatusDialFailed, err.Error())
				return
			}
			if err := st.Reply(tunnel.StatusOK, ""); err != nil {
				c.Close()
				st.Close()
				return
			}
			_, _, _ = tunnel.Relay(a.relayCtx, st, c)
		}()
	}
}

func (a *fakeAgent) servedCount() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.served
}

func (a *fakeAgent) close() {
	a.cancel()
	a.sess.Close()
	a.wg.Wait()
}

func openStream(sess *tunnel.Session, resource string) (*tunnel.Stream, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return sess.OpenStream(ctx, tunnel.Header{Kind: tunnel.KindData, Resource: resource})
}

// echoOnce opens a stream to resource over user, sends msg, half-closes and checks that msg
// comes back: the path through the gateway to an echo server still works.
func echoOnce(t testing.TB, user *tunnel.Session, resource, msg string) {
	t.Helper()
	st, err := openStream(user, resource)
	if err != nil {
		t.Fatalf("open a stream to %s: %v", resource, err)
	}
	defer st.Close()
	if _, err := st.Write([]byte(msg)); err != nil {
		t.Fatal(err)
	}
	if err := st.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	if got, err := io.ReadAll(st); err != nil || string(got) != msg {
		t.Fatalf("echo through %s = %q, %v; want %q", resource, got, err, msg)
	}
}

func replyStatus(err error) (tunnel.Status, string, bool) {
	var re *tunnel.ReplyError
	if errors.As(err, &re) {
		return re.Status, re.Reason, true
	}
	return 0, "", false
}

// echoServer and closedPort are the shared loopback targets.
func echoServer(t testing.TB) string { return loopback.EchoServer(t) }
func closedPort(t testing.TB) string { return loopback.ClosedPort(t) }
