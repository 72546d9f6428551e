package public

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"
	"go.uber.org/goleak"

	"github.com/wicketgw/wicket/gateway/audit"
)

func TestMain(m *testing.M) {
	pebbleEnv()
	m.Run()
}

// leakOptions are the only goroutines allowed to outlive a test; each comes from a dependency
// that offers no way to stop it:
//   - certmagic keeps one rate limiter per ACME CA + account email in a package-level map and
//     never stops it (acmeclient.go: "TODO: stop rate limiter when it is garbage-collected");
//   - certmagic's FileStorage refreshes a lock file every 5 s in a goroutine that ends at its
//     next wake-up once the lock file is gone; checkLeaks asserts that every lock file is
//     gone, so the goroutine is finishing, not leaked;
//   - Pebble's VA starts processTasks in va.New and has no Close (a test-only dependency);
//   - glog, pulled into this test binary by the ca package (internal CA test), starts a flush
//     daemon in its package init: process-wide, not per test.
var leakOptions = []goleak.Option{
	goleak.IgnoreTopFunction("github.com/golang/glog.(*fileSink).flushDaemon"),
	goleak.IgnoreAnyFunction("github.com/caddyserver/certmagic.(*RingBufferRateLimiter).loop"),
	goleak.IgnoreAnyFunction("github.com/caddyserver/certmagic.keepLockfileFresh"),
	goleak.IgnoreTopFunction("github.com/letsencrypt/pebble/v2/va.VAImpl.processTasks"),
}

// checkLeaks must be the first call of a test: cleanups run last-registered first, so the
// check runs after every server of the test is stopped.
func checkLeaks(t testing.TB) {
	t.Cleanup(func() {
		goleak.VerifyNone(t, leakOptions...)
		locks, _ := filepath.Glob(filepath.Join(t.TempDir(), "..", "*", "*", "locks", "*"))
		if len(locks) > 0 {
			t.Errorf("certmagic lock files left behind (a lock was not released): %v", locks)
		}
	})
}

var hostSeq atomic.Int64

// testHost returns a host name used by no other test in this process: certmagic keeps its
// renewal backoff and job de-duplication per name in package-level state, so a name reused
// by a later test (or by -count=N) would inherit an earlier test's backoff.
func testHost(prefix string) string {
	return fmt.Sprintf("%s-%d.wicket.test", prefix, hostSeq.Add(1))
}

// tlog writes log lines to the test log until the test ends (background goroutines of
// dependencies may log a little later; those lines are dropped, not a panic).
type tlog struct {
	t    testing.TB
	mu   sync.Mutex
	done bool
}

func (w *tlog) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.done {
		w.t.Log(strings.TrimRight(string(p), "\n"))
	}
	return len(p), nil
}

func testLogger(t testing.TB) *slog.Logger {
	w := &tlog{t: t}
	t.Cleanup(func() { w.mu.Lock(); w.done = true; w.mu.Unlock() })
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelWarn}))
}

// auditSink collects audit records.
type auditSink struct {
	mu   sync.Mutex
	recs []audit.Record
}

func (a *auditSink) add(r audit.Record) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.recs = append(a.recs, r)
}

func (a *auditSink) ofType(typ string) []audit.Record {
	a.mu.Lock()
	defer a.mu.Unlock()
	var out []audit.Record
	for _, r := range a.recs {
		if r.Type == typ {
			out = append(out, r)
		}
	}
	return out
}

// countingListener counts accepted connections.
type countingListener struct {
	net.Listener
	n atomic.Int64
}

func (l *countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.n.Add(1)
	}
	return c, err
}

// fakeDialer stands in for the gateway's registry: every resource it knows is a local
// address dialed directly (the agent path is wired by the gateway).
type fakeDialer struct {
	targets map[string]string
	mu      sync.Mutex
	metas   []Meta
	dials   atomic.Int64
}

func (d *fakeDialer) DialResource(ctx context.Context, resource string, meta Meta) (net.Conn, error) {
	d.mu.Lock()
	d.metas = append(d.metas, meta)
	addr, ok := d.targets[resource]
	d.mu.Unlock()
	if !ok {
		return nil, fmt.Errorf("no connected agent exposes resource %s", resource)
	}
	d.dials.Add(1)
	var nd net.Dialer
	return nd.DialContext(ctx, "tcp", addr)
}

type envOptions struct {
	hosts      map[string]Host
	challenges []string
	validity   uint64 // Pebble certificate lifetime, seconds
	ratio      float64
	interval   time.Duration
	verifyUser func([]*x509.Certificate) (string, error)
	allow      func(user, resource string) bool
	storage    string
	store      certmagic.Storage // instead of file storage in storage
	pebble     *pebbleCA         // reuse (with its listeners' ports) instead of starting one
	ln, httpLn net.Listener
	// internal, if set, uses the gateway's built-in CA (ACMECA "internal") instead of Pebble;
	// issuedRoots is then what clients trust.
	internal    *InternalCA
	issuedRoots *x509.CertPool
}

type env struct {
	t       testing.TB
	pebble  *pebbleCA
	srv     *Server
	ln      *countingListener
	httpLn  *countingListener
	backend *httptest.Server
	dialer  *fakeDialer
	audits  *auditSink
	storage string
	stop    func()
}

// demoHandler is the demo HTTP target behind the "agent".
func demoHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Seen-User", r.Header.Get(UserHeader))
		w.Header().Set("X-Seen-Host", r.Host)
		fmt.Fprintf(w, "hello from the demo target: %s %s", r.Method, r.URL.Path)
	})
	mux.HandleFunc("/hang", func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.WriteString(w, "started\n")
		http.NewResponseController(w).Flush()
		<-r.Context().Done()
	})
	return mux
}

func listen(t testing.TB) net.Listener {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return ln
}

// startEnv starts DNS, Pebble (validating on our two listeners), a demo target behind a fake
// dialer, and a Server managing the given hosts.
func startEnv(t testing.TB, o envOptions, handler http.Handler) *env {
	t.Helper()
	e := &env{t: t, audits: &auditSink{}}
	if o.ln == nil {
		o.ln, o.httpLn = listen(t), listen(t)
	}
	e.ln, e.httpLn = &countingListener{Listener: o.ln}, &countingListener{Listener: o.httpLn}
	e.pebble = o.pebble
	acmeCA := ""
	var apiRoots *x509.CertPool
	if o.internal != nil {
		e.pebble = &pebbleCA{IssuedRoots: o.issuedRoots}
		acmeCA = ACMECAInternal
	} else if e.pebble == nil {
		e.pebble = startPebble(t, portNum(t, o.httpLn), portNum(t, o.ln), startDNS(t), o.validity)
	}
	if acmeCA == "" {
		acmeCA, apiRoots = e.pebble.DirectoryURL, e.pebble.APIRoots
	}
	var internal InternalCA
	if o.internal != nil {
		internal = *o.internal
	}
	if handler == nil {
		handler = demoHandler()
	}
	e.backend = httptest.NewServer(handler)
	t.Cleanup(e.backend.Close)
	e.dialer = &fakeDialer{targets: map[string]string{"web": e.backend.Listener.Addr().String()}}
	e.storage = o.storage
	if e.storage == "" {
		e.storage = filepath.Join(t.TempDir(), "certmagic")
	}
	srv, err := New(Config{
		Listener:           e.ln,
		HTTPListener:       e.httpLn,
		ACMECA:             acmeCA,
		ACMERoots:          apiRoots,
		Internal:           internal,
		Email:              "ops@wicket.test",
		Challenges:         o.challenges,
		StorageDir:         e.storage,
		Storage:            o.store,
		RenewCheckInterval: o.interval,
		RenewalWindowRatio: o.ratio,
		Hosts:              o.hosts,
		Dialer:             e.dialer,
		VerifyUser:         o.verifyUser,
		Allow:              o.allow,
		Audit:              e.audits.add,
		ShutdownGrace:      2 * time.Second,
		Logger:             testLogger(t),
	})
	if err != nil {
		t.Fatal(err)
	}
	e.srv = srv
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx) }()
	var once sync.Once
	e.stop = func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("Serve: %v", err)
			}
		})
	}
	t.Cleanup(e.stop)
	return e
}

// waitCert waits until the server holds a certificate for host.
func (e *env) waitCert(host string) *x509.Certificate {
	e.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if c, ok := e.srv.Certificate(host); ok {
			return c
		}
		time.Sleep(20 * time.Millisecond) // polling with a deadline
	}
	e.t.Fatalf("no certificate for %s after 30s (stats %+v)", host, e.srv.Stats())
	return nil
}

// client is a browser-like client: it trusts only Pebble's root, verifies the host name, and
// reaches every name at our listener (as DNS would).
func (e *env) client(cert *tls.Certificate, keepAlive bool) *http.Client {
	cfg := &tls.Config{RootCAs: e.pebble.IssuedRoots}
	if cert != nil {
		cfg.Certificates = []tls.Certificate{*cert}
	}
	addr := e.ln.Addr().String()
	tr := &http.Transport{
		TLSClientConfig:   cfg,
		DisableKeepAlives: !keepAlive,
		ForceAttemptHTTP2: true,
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, network, addr)
		},
	}
	e.t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, Timeout: 30 * time.Second,
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
}

func (e *env) url(host, path string) string {
	_, port, _ := net.SplitHostPort(e.ln.Addr().String())
	return "https://" + host + ":" + port + path
}

// get fetches a page and returns status, body and the server's leaf certificate.
func get(c *http.Client, url string, hdr map[string]string) (int, string, http.Header, *x509.Certificate, error) {
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		return 0, "", nil, nil, err
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := c.Do(req)
	if err != nil {
		return 0, "", nil, nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, "", nil, nil, err
	}
	var leaf *x509.Certificate
	if resp.TLS != nil && len(resp.TLS.PeerCertificates) > 0 {
		leaf = resp.TLS.PeerCertificates[0]
	}
	return resp.StatusCode, string(b), resp.Header, leaf, nil
}

// testUserCA is a stand-in for the gateway's CA: it issues client certificates and verifies
// them the way the VerifyUser hook would (chain, EKU client auth), returning the CN.
type testUserCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pool *x509.CertPool
}

func newTestUserCA(t testing.TB) *testUserCA {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test user CA"},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	pool := x509.NewCertPool()
	pool.AddCert(c)
	return &testUserCA{cert: c, key: key, pool: pool}
}

func (u *testUserCA) issue(t testing.TB, name string) *tls.Certificate {
	return u.issueUntil(t, name, time.Now().Add(time.Hour))
}

func (u *testUserCA) issueUntil(t testing.TB, name string, notAfter time.Time) *tls.Certificate {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: notAfter,
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, u.cert, &key.PublicKey, u.key)
	if err != nil {
		t.Fatal(err)
	}
	return &tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

func (u *testUserCA) verify(chain []*x509.Certificate) (string, error) {
	inter := x509.NewCertPool()
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	if _, err := chain[0].Verify(x509.VerifyOptions{Roots: u.pool, Intermediates: inter,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		var ua x509.UnknownAuthorityError
		if errors.As(err, &ua) {
			return "", errors.New("not issued by this gateway's CA")
		}
		return "", err
	}
	return chain[0].Subject.CommonName, nil
}
