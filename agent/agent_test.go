package agent

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/wicketgw/wicket/agent/identity"
	"github.com/wicketgw/wicket/agent/internal/fakeclock"
	"github.com/wicketgw/wicket/agent/internal/testpki"
	"github.com/wicketgw/wicket/ca"
	"github.com/wicketgw/wicket/tunnel"
)

func TestServeStreams(t *testing.T) {
	p := testpki.New("example.test")
	gw := startGateway(t, p)
	now := time.Now()
	dir, _ := storeAgent(t, p, gw.url(), "db1", now.Add(-time.Minute), now.Add(time.Hour))
	down := closedPort(t)
	startAgent(t, Config{DataDir: dir, Expose: map[string]string{"echo": echoServer(t), "down": down}, Version: "v-test"})
	gs := gw.next(t)

	if gs.hello.Name != "db1" || gs.hello.Version != "v-test" || len(gs.hello.Instance) != 16 ||
		strings.Join(gs.hello.Resources, ",") != "down,echo" {
		t.Fatalf("hello = %+v", gs.hello)
	}

	// An exposed resource is reached, both ways.
	st, err := gs.open("echo")
	if err != nil {
		t.Fatal(err)
	}
	roundTrip(t, st, "hello through the agent")
	st.Close()

	// A resource the agent was not started with is refused: the agent dials nothing.
	_, err = gs.open("etc-passwd")
	if !errors.Is(err, tunnel.ErrUnknownResource) {
		t.Fatalf("unknown resource: err = %v, want ErrUnknownResource", err)
	}
	if !strings.Contains(err.Error(), "resource etc-passwd is not exposed by this agent") {
		t.Fatalf("unclear reason: %v", err)
	}

	// A target refusing the connection: dial failed, with the reason, without its address.
	_, err = gs.open("down")
	if !errors.Is(err, tunnel.ErrDialFailed) {
		t.Fatalf("refusing target: err = %v, want ErrDialFailed", err)
	}
	if !strings.Contains(err.Error(), "connection refused") {
		t.Fatalf("reason does not say why: %v", err)
	}
	_, port, _ := strings.Cut(down, ":")
	if strings.Contains(err.Error(), port) {
		t.Fatalf("reason leaks the target address: %v", err)
	}

	// The gateway may not open control streams toward the agent.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := gs.sess.OpenStream(ctx, tunnel.Header{Kind: tunnel.KindControl}); !errors.Is(err, tunnel.ErrRefused) {
		t.Fatalf("control stream from the gateway: err = %v, want ErrRefused", err)
	}

	// The session still serves after the refusals.
	st, err = gs.open("echo")
	if err != nil {
		t.Fatal(err)
	}
	roundTrip(t, st, "still here")
	st.Close()
}

// TestExposeUpdates replaces the exposed resources of a running agent (what SIGHUP does in
// `wicket agent`): new streams follow the new list at once, a stream already open keeps its
// connection, an invalid list is ignored, and the gateway hears each change as a later Hello
// on a new control stream of the same session.
func TestExposeUpdates(t *testing.T) {
	p := testpki.New("example.test")
	gw := startGateway(t, p)
	now := time.Now()
	dir, _ := storeAgent(t, p, gw.url(), "db1", now.Add(-time.Minute), now.Add(time.Hour))
	echo, web := echoServer(t), echoServer(t)
	updates := make(chan map[string]string)
	startAgent(t, Config{DataDir: dir, Expose: map[string]string{"echo": echo}, ExposeUpdates: updates})
	gs := gw.next(t)
	open, err := gs.open("echo")
	if err != nil {
		t.Fatal(err)
	}
	roundTrip(t, open, "before")

	later := func() tunnel.Hello {
		t.Helper()
		select {
		case h := <-gs.later:
			return h
		case <-time.After(10 * time.Second):
			t.Fatal("the agent sent no later hello")
		}
		return tunnel.Hello{}
	}
	updates <- map[string]string{"echo": echo, "web": web}
	if h := later(); strings.Join(h.Resources, ",") != "echo,web" || h.Name != "db1" || h.Instance != gs.hello.Instance {
		t.Fatalf("later hello = %+v", h)
	}
	st, err := gs.open("web")
	if err != nil {
		t.Fatalf("a resource added by the update: %v", err)
	}
	roundTrip(t, st, "web")
	st.Close()

	updates <- map[string]string{"bad name!": web} // refused: the previous list stays
	for _, res := range []string{"echo", "web"} {
		st, err := gs.open(res)
		if err != nil {
			t.Fatalf("%s after an invalid update: %v (the previous list must stay in force)", res, err)
		}
		roundTrip(t, st, "still "+res)
		st.Close()
	}
	updates <- map[string]string{"web": web} // echo removed
	if h := later(); strings.Join(h.Resources, ",") != "web" {
		t.Fatalf("later hello after removing echo = %+v", h)
	}
	if _, err := gs.open("echo"); !errors.Is(err, tunnel.ErrUnknownResource) {
		t.Fatalf("a removed resource: err = %v, want ErrUnknownResource", err)
	}
	roundTrip(t, open, "the stream opened before the update keeps its connection")
	open.Close()
	select {
	case h := <-gs.later:
		t.Fatalf("an extra later hello %+v (the invalid list must not be announced)", h)
	default:
	}
}

// TestMakeBeforeBreak renews the certificate while a stream is in flight:
// the agent opens a new session with the new certificate, new streams go
// there, the old stream completes on the old session, which is then closed.
func TestMakeBeforeBreak(t *testing.T) {
	p := testpki.New("example.test")
	gw := startGateway(t, p)
	start := time.Now()
	dir, stored := storeAgent(t, p, gw.url(), "db1", start.Add(-time.Minute), start.Add(time.Hour))
	clk := fakeclock.New(start)
	renewed := make(chan *ca.Credentials, 1)
	renew := func(ctx context.Context, url string, cur *ca.Credentials) (*ca.Credentials, error) {
		// Valid now in real time (the TLS handshake checks it) and for an hour of fake time.
		c := p.IssueWithKey(cur.Key, ca.RoleAgent, "db1", time.Now().Add(-time.Minute), clk.Now().Add(time.Hour))
		renewed <- c
		return c, nil
	}
	startAgent(t, Config{DataDir: dir, Expose: map[string]string{"echo": echoServer(t)},
		Now: clk.Now, After: clk.After, Renew: renew})
	old := gw.next(t)
	if !old.leaf.Equal(stored.Leaf()) {
		t.Fatal("first session does not use the stored certificate")
	}
	inflight, err := old.open("echo")
	if err != nil {
		t.Fatal(err)
	}
	roundTrip(t, inflight, "before renewal")

	// Reach the renewal time (between 60% and 70% of the hour).
	if !clk.WaitForWaiters(1, 5*time.Second) {
		t.Fatal("renewal was never scheduled")
	}
	clk.Advance(42 * time.Minute)
	var newCreds *ca.Credentials
	select {
	case newCreds = <-renewed:
	case <-time.After(10 * time.Second):
		t.Fatal("the certificate was not renewed")
	}
	next := gw.next(t)
	if !next.leaf.Equal(newCreds.Chain[0]) {
		t.Fatal("the new session does not use the renewed certificate")
	}
	if next.hello.Instance != old.hello.Instance {
		t.Fatal("the instance changed across a renewal")
	}

	// New streams cannot go to the old session any more (go-away); the new one serves them.
	deadline := time.Now().Add(5 * time.Second)
	for {
		st, err := old.open("echo")
		if err != nil {
			break
		}
		st.Close()
		if time.Now().After(deadline) {
			t.Fatal("the old session still accepts new streams after the switch")
		}
	}
	st, err := next.open("echo")
	if err != nil {
		t.Fatal(err)
	}
	roundTrip(t, st, "on the new session")
	st.Close()

	// The in-flight stream on the old session is unharmed.
	select {
	case <-old.sess.Done():
		t.Fatal("the old session closed while a stream was in flight")
	default:
	}
	roundTrip(t, inflight, "after renewal, still on the old session")
	inflight.Close()

	// Once its last stream ended, the agent closes the old session.
	select {
	case <-old.sess.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the drained session was not closed")
	}
	select {
	case <-next.sess.Done():
		t.Fatal("the new session closed")
	default:
	}
	// The renewed certificate was stored.
	disk, err := identity.Load(dir)
	if err != nil {
		t.Fatal(err)
	}
	if !disk.Leaf().Equal(newCreds.Chain[0]) {
		t.Fatal("the renewed certificate was not saved")
	}
}

func TestRevokedIsTerminal(t *testing.T) {
	p := testpki.New("example.test")
	gw := startGateway(t, p)
	gw.refuse.Store(true)
	now := time.Now()
	dir, _ := storeAgent(t, p, gw.url(), "db1", now.Add(-time.Minute), now.Add(time.Hour))
	var calls int
	renew := func(ctx context.Context, url string, cur *ca.Credentials) (*ca.Credentials, error) {
		calls++
		return nil, fmt.Errorf("renew db1: %w (HTTP 401)", ca.ErrRevoked)
	}
	r := startAgent(t, Config{DataDir: dir, Expose: map[string]string{"echo": "127.0.0.1:1"}, Renew: renew,
		Reconnect: &tunnel.Backoff{Initial: time.Millisecond, Max: 10 * time.Millisecond}})
	err := r.wait(t, 10*time.Second)
	if !errors.Is(err, identity.ErrRevoked) {
		t.Fatalf("Run = %v, want ErrRevoked", err)
	}
	want := "the agent certificate was revoked: enroll again with a new token from `wicket token create agent db1`"
	if err.Error() != want {
		t.Fatalf("Run = %q, want %q", err, want)
	}
	if calls != 1 {
		t.Fatalf("%d renewal attempts, want 1", calls)
	}
}

func TestExpiredStoredIdentity(t *testing.T) {
	p := testpki.New("example.test")
	now := time.Now()
	dir, s := storeAgent(t, p, "https://127.0.0.1:1", "db1", now.Add(-2*time.Hour), now.Add(-time.Hour))
	err := Run(context.Background(), Config{DataDir: dir, Expose: map[string]string{"echo": "127.0.0.1:1"}})
	if !errors.Is(err, identity.ErrExpired) {
		t.Fatalf("Run = %v, want ErrExpired", err)
	}
	want := fmt.Sprintf("the certificate expired at %s and cannot be renewed: enroll again with a new token",
		s.Leaf().NotAfter.UTC().Format(time.RFC3339))
	if err.Error() != want {
		t.Fatalf("Run = %q, want %q", err, want)
	}
}

// TestExpiresWhileCAUnreachable: renewal keeps failing; at expiry the agent
// stops with the expired sentence instead of running on.
func TestExpiresWhileCAUnreachable(t *testing.T) {
	p := testpki.New("example.test")
	gw := startGateway(t, p)
	start := time.Now()
	dir, s := storeAgent(t, p, gw.url(), "db1", start.Add(-time.Minute), start.Add(time.Hour))
	clk := fakeclock.New(start)
	renew := func(ctx context.Context, url string, cur *ca.Credentials) (*ca.Credentials, error) {
		return nil, errors.New("dial tcp: connection refused")
	}
	r := startAgent(t, Config{DataDir: dir, Expose: map[string]string{"echo": echoServer(t)},
		Now: clk.Now, After: clk.After, Renew: renew})
	gw.next(t)
	deadline := time.Now().Add(20 * time.Second)
	for {
		select {
		case <-r.done:
			if !errors.Is(r.err, identity.ErrExpired) {
				t.Fatalf("Run = %v, want ErrExpired", r.err)
			}
			if clk.Now().Before(s.Leaf().NotAfter) {
				t.Fatal("gave up before the certificate expired")
			}
			return
		default:
		}
		if time.Now().After(deadline) {
			t.Fatal("the agent did not stop at expiry")
		}
		if next, ok := clk.NextDeadline(); ok {
			clk.Set(next)
		} else {
			clk.WaitForWaiters(1, 50*time.Millisecond)
		}
	}
}

func TestReconnectsAfterSessionLoss(t *testing.T) {
	p := testpki.New("example.test")
	gw := startGateway(t, p)
	now := time.Now()
	dir, _ := storeAgent(t, p, gw.url(), "db1", now.Add(-time.Minute), now.Add(time.Hour))
	startAgent(t, Config{DataDir: dir, Expose: map[string]string{"echo": echoServer(t)},
		Reconnect: &tunnel.Backoff{Initial: time.Millisecond, Max: 10 * time.Millisecond}})
	first := gw.next(t)
	first.sess.Close()
	second := gw.next(t)
	if second.hello.Instance != first.hello.Instance {
		t.Fatal("a reconnect changed the instance")
	}
	st, err := second.open("echo")
	if err != nil {
		t.Fatal(err)
	}
	roundTrip(t, st, "after reconnect")
	st.Close()
}

func TestConfigErrors(t *testing.T) {
	dir := t.TempDir()
	cases := []struct {
		cfg  Config
		want string
	}{
		{Config{Expose: map[string]string{"a": "h:1"}}, "data directory is required"},
		{Config{DataDir: dir}, "expose at least one resource"},
		{Config{DataDir: dir, Expose: map[string]string{"Bad_Name": "h:1"}}, "resource name"},
		{Config{DataDir: dir, Expose: map[string]string{"pg": "nohost"}}, "is not HOST:PORT"},
		{Config{DataDir: dir, Expose: map[string]string{"pg": "h:1"}}, "no stored identity in " + dir + ": run with --token first"},
	}
	for _, tc := range cases {
		err := Run(context.Background(), tc.cfg)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Run(%+v) = %v, want it to say %q", tc.cfg, err, tc.want)
		}
	}
}

// TestGracefulShutdown: on shutdown the agent refuses new streams (go-away)
// but lets the one in flight finish within GracePeriod, then stops.
func TestGracefulShutdown(t *testing.T) {
	p := testpki.New("example.test")
	gw := startGateway(t, p)
	now := time.Now()
	dir, _ := storeAgent(t, p, gw.url(), "db1", now.Add(-time.Minute), now.Add(time.Hour))
	r := startAgent(t, Config{DataDir: dir, Expose: map[string]string{"echo": echoServer(t)}, GracePeriod: time.Minute})
	gs := gw.next(t)
	inflight, err := gs.open("echo")
	if err != nil {
		t.Fatal(err)
	}
	roundTrip(t, inflight, "before shutdown")
	r.cancel()
	deadline := time.Now().Add(5 * time.Second)
	for {
		st, err := gs.open("echo")
		if err != nil {
			break
		}
		st.Close()
		if time.Now().After(deadline) {
			t.Fatal("a stopping agent still accepts new streams")
		}
	}
	select {
	case <-r.done:
		t.Fatal("the agent stopped with a stream in flight")
	default:
	}
	roundTrip(t, inflight, "during shutdown")
	inflight.Close()
	if err := r.wait(t, 10*time.Second); err != nil {
		t.Fatalf("Run = %v, want nil after a shutdown", err)
	}
}
