package ca

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/wicketgw/wicket/ca/pgtest"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	// glog (pulled in by step-ca) starts a flush daemon in its package init: process-wide, not a leak.
	goleak.VerifyTestMain(m, goleak.IgnoreTopFunction("github.com/golang/glog.(*fileSink).flushDaemon"))
}

// freshPostgres creates a uniquely named database for one test and drops it after.
func freshPostgres(t testing.TB) string { return pgtest.Database(t, "wicket_ca_test") }

// forEachDB runs fn against bbolt and against a fresh PostgreSQL database.
func forEachDB(t *testing.T, fn func(t *testing.T, dsn string)) {
	t.Run("bbolt", func(t *testing.T) { fn(t, "") })
	t.Run("postgresql", func(t *testing.T) { fn(t, freshPostgres(t)) })
}

// testEnv is a CA served the way the gateway serves it: TLS 1.3 on 127.0.0.1, the
// CA's own GetCertificate, client certificates verified if given.
type testEnv struct {
	a   *Authority
	cfg Config
	url string
	srv *http.Server
	ln  net.Listener
}

func testLogger(t testing.TB) *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.DiscardHandler)
}

// startEnv starts a CA on dir/dsn. mod may adjust the config before New.
func startEnv(t testing.TB, dir, dsn string, mod func(*Config)) *testEnv {
	t.Helper()
	return startEnvListen(t, dir, dsn, "127.0.0.1:0", mod)
}

func startEnvListen(t testing.TB, dir, dsn, addr string, mod func(*Config)) *testEnv {
	t.Helper()
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	cfg := Config{
		DataDir:  dir,
		DB:       dsn,
		Password: []byte("test-password"),
		URL:      "https://" + ln.Addr().String(),
		Logger:   testLogger(t),
	}
	if mod != nil {
		mod(&cfg)
	}
	a, err := New(context.Background(), cfg)
	if err != nil {
		ln.Close()
		t.Fatalf("New: %v", err)
	}
	e := &testEnv{a: a, cfg: cfg, url: cfg.URL, ln: ln}
	e.srv = &http.Server{
		Handler: a.Handler(),
		TLSConfig: &tls.Config{
			MinVersion:     tls.VersionTLS13,
			GetCertificate: a.GetCertificate,
			ClientAuth:     tls.VerifyClientCertIfGiven,
			ClientCAs:      a.RootPool(),
			NextProtos:     []string{"h2", "http/1.1"},
		},
		ErrorLog:          nil,
		ReadHeaderTimeout: 10 * time.Second,
	}
	e.srv.ErrorLog = newDiscardLog()
	srv := e.srv
	go func() { _ = srv.ServeTLS(ln, "", "") }()
	t.Cleanup(e.close)
	return e
}

func (e *testEnv) close() {
	if e.srv != nil {
		e.srv.Close()
		e.srv = nil
	}
	if e.a != nil {
		e.a.Close()
		e.a = nil
	}
}

func mustToken(t testing.TB, a *Authority, role Role, name string) string {
	t.Helper()
	tok, err := a.MintToken(role, name, 0)
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

func mustEnroll(t testing.TB, tok string) *Credentials {
	t.Helper()
	c, err := Enroll(context.Background(), tok)
	if err != nil {
		t.Fatalf("Enroll: %v", err)
	}
	return c
}

func wantErr(t testing.TB, err, target error) {
	t.Helper()
	if err == nil {
		t.Fatalf("got no error, want %v", target)
	}
	if !errors.Is(err, target) {
		t.Fatalf("got error %q, want errors.Is %q", err, target)
	}
}

func ctx10s(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

var _ = fmt.Sprintf
var _ = io.Discard

// waitNoGoroutine polls (with a deadline) until no goroutine stack contains fn.
func waitNoGoroutine(t testing.TB, fn string) {
	deadline := time.Now().Add(5 * time.Second)
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if !strings.Contains(string(buf[:n]), fn) {
			return
		}
		if time.Now().After(deadline) {
			t.Errorf("goroutine %s still running", fn)
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
}
