package agent

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/wicketgw/wicket/agent/identity"
	"github.com/wicketgw/wicket/agent/internal/testpki"
	"github.com/wicketgw/wicket/ca"
	"github.com/wicketgw/wicket/tunnel"
	"github.com/wicketgw/wicket/tunnel/loopback"
)

func TestMain(m *testing.M) {
	// glog (pulled in by step-ca through ca/) starts a flush daemon in its
	// package init: process-wide, not a leak of these tests.
	goleak.VerifyTestMain(m, goleak.IgnoreTopFunction("github.com/golang/glog.(*fileSink).flushDaemon"))
}

// fakeGateway plays the gateway's side of the agent protocol: it requires an
// agent certificate from the test PKI, accepts the control stream, reads the
// agent's hello and answers with its own, then hands the session to the test.
type fakeGateway struct {
	t      testing.TB
	p      *testpki.PKI
	ln     net.Listener
	tcfg   tunnel.Config
	refuse atomic.Bool // refuse every handshake (a revoked certificate, say)

	sessions chan *gwSession
	mu       sync.Mutex
	all      []*gwSession
	conns    []net.Conn
	wg       sync.WaitGroup
	n        atomic.Int64
}

type gwSession struct {
	id    string
	sess  *tunnel.Session
	hello tunnel.Hello
	leaf  *x509.Certificate
	ctl   *tunnel.Control
	// later receives each later Hello the agent sends on a new control stream.
	later chan tunnel.Hello
}

func startGateway(t testing.TB, p *testpki.PKI) *fakeGateway {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gw := &fakeGateway{t: t, p: p, ln: ln, tcfg: tunnel.DefaultConfig(), sessions: make(chan *gwSession, 16)}
	now := time.Now()
	serverCreds := p.Issue(ca.RoleGateway, "gw", now.Add(-time.Hour), now.Add(24*time.Hour))
	serverCert := serverCreds.TLSCertificate()
	tc := tunnel.ServerTLSConfig(func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return serverCert, nil },
		p.ClientCAs(), []string{tunnel.ALPNAgent}, func(cs tls.ConnectionState) error {
			if gw.refuse.Load() {
				return errors.New("certificate revoked")
			}
			id, err := ca.ParseIdentity(cs.PeerCertificates[0])
			if err != nil || id.Role != ca.RoleAgent {
				return fmt.Errorf("not an agent: %v", err)
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
	t.Cleanup(gw.close)
	return gw
}

func (gw *fakeGateway) url() string { return "https://" + gw.ln.Addr().String() }

func (gw *fakeGateway) serve(c *tls.Conn) {
	s, err := tunnel.Server(c, gw.tcfg)
	if err != nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	st, err := s.AcceptStream(ctx)
	if err != nil || st.Header().Kind != tunnel.KindControl {
		s.Close()
		return
	}
	if err := st.Reply(tunnel.StatusOK, ""); err != nil {
		s.Close()
		return
	}
	gs := &gwSession{id: fmt.Sprintf("gs-%d", gw.n.Add(1)), sess: s, ctl: st.Control(),
		leaf: s.ConnectionState().PeerCertificates[0]}
	if err := gs.ctl.Recv(&gs.hello); err != nil {
		s.Close()
		return
	}
	if err := gs.ctl.Send(tunnel.Hello{Name: "gw", Instance: gs.id, Version: "test"}); err != nil {
		s.Close()
		return
	}
	gs.later = make(chan tunnel.Hello, 8)
	gw.mu.Lock()
	gw.all = append(gw.all, gs)
	gw.mu.Unlock()
	// Later control streams, as the real gateway serves them.
	gw.wg.Add(1)
	go func() {
		defer gw.wg.Done()
		for {
			st, err := s.AcceptStream(context.Background())
			if err != nil {
				return
			}
			var h tunnel.Hello
			if st.Header().Kind == tunnel.KindControl && st.Reply(tunnel.StatusOK, "") == nil && st.Control().Recv(&h) == nil {
				gs.later <- h
			}
			st.Close()
		}
	}()
	gw.sessions <- gs
}

// next waits for the next agent session.
func (gw *fakeGateway) next(t testing.TB) *gwSession {
	t.Helper()
	select {
	case gs := <-gw.sessions:
		return gs
	case <-time.After(10 * time.Second):
		t.Fatal("no agent session reached the gateway")
		return nil
	}
}

func (gw *fakeGateway) close() {
	gw.ln.Close()
	gw.mu.Lock()
	for _, gs := range gw.all {
		gs.sess.Close()
	}
	for _, c := range gw.conns {
		c.Close()
	}
	gw.mu.Unlock()
	gw.wg.Wait()
}

// open opens a data stream for resource on gs.
func (gs *gwSession) open(resource string) (*tunnel.Stream, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return gs.sess.OpenStream(ctx, tunnel.Header{Kind: tunnel.KindData, Resource: resource, SessionID: "s1"})
}

// roundTrip writes msg and expects it back.
func roundTrip(t testing.TB, c net.Conn, msg string) {
	t.Helper()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	defer c.SetDeadline(time.Time{})
	if _, err := c.Write([]byte(msg)); err != nil {
		t.Fatalf("write: %v", err)
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(c, buf); err != nil {
		t.Fatalf("read: %v", err)
	}
	if !bytes.Equal(buf, []byte(msg)) {
		t.Fatalf("got %q, want %q", buf, msg)
	}
}

// storeAgent stores an agent identity for gw in a fresh data dir.
func storeAgent(t testing.TB, p *testpki.PKI, gwURL, name string, notBefore, notAfter time.Time) (string, *identity.Stored) {
	t.Helper()
	dir := t.TempDir()
	s := &identity.Stored{
		Meta:  identity.Meta{URL: gwURL, Role: ca.RoleAgent, Name: name, TrustDomain: p.TrustDomain},
		Creds: p.Issue(ca.RoleAgent, name, notBefore, notAfter),
	}
	if err := identity.Save(dir, s); err != nil {
		t.Fatal(err)
	}
	return dir, s
}

// runAgent starts Run and returns a function that stops it and returns its error.
type agentRun struct {
	done   chan struct{}
	err    error
	cancel context.CancelFunc
}

func startAgent(t testing.TB, cfg Config) *agentRun {
	t.Helper()
	if cfg.Logger == nil {
		cfg.Logger = testLogger(t)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &agentRun{done: make(chan struct{}), cancel: cancel}
	go func() {
		defer close(r.done)
		r.err = Run(ctx, cfg)
	}()
	t.Cleanup(func() { r.stop() })
	return r
}

func (r *agentRun) stop() error {
	r.cancel()
	<-r.done
	return r.err
}

// wait waits for Run to return on its own.
func (r *agentRun) wait(t testing.TB, within time.Duration) error {
	t.Helper()
	select {
	case <-r.done:
		return r.err
	case <-time.After(within):
		t.Fatalf("the agent did not stop within %s", within)
		return nil
	}
}

// testLogger writes the agent's log lines into the test log.
func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type tWriter struct{ t testing.TB }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Log(string(bytes.TrimRight(p, "\n")))
	return len(p), nil
}

// echoServer and closedPort are the shared loopback targets.
func echoServer(t testing.TB) string { return loopback.EchoServer(t) }
func closedPort(t testing.TB) string { return loopback.ClosedPort(t) }
