package identity

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/wicketgw/wicket/agent/internal/fakeclock"
	"github.com/wicketgw/wicket/agent/internal/testpki"
	"github.com/wicketgw/wicket/ca"
)

// fakeCA renews by issuing a new leaf with the same key, valid for life from
// the fake clock's now. fail makes the first calls fail.
type fakeCA struct {
	mu      sync.Mutex
	p       *testpki.PKI
	clk     *fakeclock.Clock
	life    time.Duration
	fail    int   // fail this many calls first
	failErr error // error to fail with; default a network error
	calls   []time.Time
	expired int // calls made with an already expired certificate
}

func (f *fakeCA) renew(ctx context.Context, url string, cur *ca.Credentials) (*ca.Credentials, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	now := f.clk.Now()
	f.calls = append(f.calls, now)
	if !now.Before(cur.Chain[0].NotAfter) {
		f.expired++
	}
	if f.fail > 0 {
		f.fail--
		if f.failErr != nil {
			return nil, f.failErr
		}
		return nil, errors.New("dial tcp 127.0.0.1:8443: connect: connection refused")
	}
	id, err := ca.ParseIdentity(cur.Chain[0])
	if err != nil {
		return nil, err
	}
	return f.p.IssueWithKey(cur.Key, id.Role, id.Name, now, now.Add(f.life)), nil
}

func (f *fakeCA) numCalls() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.calls)
}

type renewFixture struct {
	p     *testpki.PKI
	clk   *fakeclock.Clock
	ca    *fakeCA
	s     *Stored
	dir   string
	r     *Renewer
	start time.Time
}

func newRenewFixture(t *testing.T, life time.Duration, startOffset time.Duration, rnd float64) *renewFixture {
	t.Helper()
	p := testpki.New("example.test")
	start := time.Now().Truncate(time.Second)
	clk := fakeclock.New(start.Add(startOffset))
	creds := p.Issue(ca.RoleAgent, "db1", start, start.Add(life))
	s := &Stored{Meta: Meta{URL: "https://127.0.0.1:8443", Role: ca.RoleAgent, Name: "db1", TrustDomain: p.TrustDomain}, Creds: creds}
	dir := t.TempDir()
	if err := Save(dir, s); err != nil {
		t.Fatal(err)
	}
	f := &fakeCA{p: p, clk: clk, life: life}
	r := NewRenewer(s, RenewerConfig{
		Dir: dir, Renew: f.renew, Now: clk.Now, After: clk.After,
		Rand:         func() float64 { return rnd },
		RetryInitial: time.Second, RetryMax: 8 * time.Second,
	})
	return &renewFixture{p: p, clk: clk, ca: f, s: s, dir: dir, r: r, start: start}
}

type runHandle struct {
	done   chan struct{}
	err    error
	cancel context.CancelFunc
}

// stop cancels Run and returns its error.
func (h *runHandle) stop() error {
	h.cancel()
	<-h.done
	return h.err
}

// run starts Run; h.done closes when it returns.
func (fx *renewFixture) run(t *testing.T) *runHandle {
	ctx, cancel := context.WithCancel(context.Background())
	h := &runHandle{done: make(chan struct{}), cancel: cancel}
	go func() {
		defer close(h.done)
		h.err = fx.r.Run(ctx)
	}()
	return h
}

func (fx *renewFixture) waitPending(t *testing.T, n int) {
	t.Helper()
	if !fx.clk.WaitForWaiters(n, 5*time.Second) {
		t.Fatalf("renewer did not start waiting (pending %v)", fx.clk.Pending())
	}
}

func TestRenewAtBounds(t *testing.T) {
	nb := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	na := nb.Add(time.Hour)
	for _, u := range []float64{0, 0.25, 0.5, 0.999999} {
		at := RenewAt(nb, na, u)
		if at.Before(nb.Add(36*time.Minute)) || at.After(nb.Add(42*time.Minute)) {
			t.Fatalf("u=%v: renew at %v, want within [36m, 42m] of a 1h lifetime", u, at.Sub(nb))
		}
	}
	if RenewAt(nb, na, 0).Equal(RenewAt(nb, na, 0.9)) {
		t.Fatal("no jitter")
	}
	// The default jitter source spreads renewals.
	p := testpki.New("example.test")
	creds := p.Issue(ca.RoleAgent, "db1", nb, na)
	seen := map[time.Time]bool{}
	for range 20 {
		r := NewRenewer(&Stored{Meta: Meta{URL: "u", Role: ca.RoleAgent, Name: "db1"}, Creds: creds}, RenewerConfig{})
		at := r.RenewAtTime()
		if at.Before(nb.Add(36*time.Minute)) || at.After(nb.Add(42*time.Minute)) {
			t.Fatalf("default jitter out of bounds: %v", at.Sub(nb))
		}
		seen[at] = true
	}
	if len(seen) < 10 {
		t.Fatalf("20 renewers picked only %d distinct renewal times", len(seen))
	}
}

func TestRenewerRenewsAtTwoThirds(t *testing.T) {
	fx := newRenewFixture(t, time.Hour, 0, 0.5) // renew at 0.65h = 39m
	h := fx.run(t)
	defer h.stop()
	fx.waitPending(t, 1)
	if got := fx.clk.Pending(); len(got) != 1 || got[0] != 39*time.Minute {
		t.Fatalf("scheduled waits %v, want [39m]", got)
	}
	old := fx.r.Current()
	fx.clk.Advance(39*time.Minute - time.Second)
	if fx.ca.numCalls() != 0 {
		t.Fatal("renewed before the scheduled time")
	}
	fx.clk.Advance(time.Second)
	var got *ca.Credentials
	select {
	case got = <-fx.r.Updates():
	case <-time.After(5 * time.Second):
		t.Fatal("no renewal notification")
	}
	if fx.ca.numCalls() != 1 {
		t.Fatalf("%d renew calls, want 1", fx.ca.numCalls())
	}
	if bytes.Equal(got.Chain[0].Raw, old.Chain[0].Raw) {
		t.Fatal("notified with the old certificate")
	}
	if fx.r.Current() != got {
		t.Fatal("Current does not return the renewed credentials")
	}
	tc, _ := fx.r.GetClientCertificate(nil)
	if !bytes.Equal(tc.Certificate[0], got.Chain[0].Raw) || tc.PrivateKey != old.Key {
		t.Fatal("GetClientCertificate does not present the renewed certificate with the same key")
	}
	disk, err := Load(fx.dir)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(disk.Leaf().Raw, got.Chain[0].Raw) {
		t.Fatal("the renewed certificate was not saved")
	}
	// The next renewal is scheduled from the new certificate: 39m after now.
	fx.waitPending(t, 1)
	if got := fx.clk.Pending(); len(got) != 1 || got[0] != 39*time.Minute {
		t.Fatalf("next scheduled waits %v, want [39m]", got)
	}
	if err := h.stop(); !errors.Is(err, context.Canceled) {
		t.Fatalf("Run = %v, want context.Canceled", err)
	}
}

func TestRenewerStartedLateRenewsAtOnce(t *testing.T) {
	fx := newRenewFixture(t, time.Hour, 50*time.Minute, 0.5)
	h := fx.run(t)
	defer h.stop()
	select {
	case <-fx.r.Updates():
	case <-time.After(5 * time.Second):
		t.Fatal("a certificate past its renewal time was not renewed at once")
	}
}

func TestRenewerRetriesWithBackoff(t *testing.T) {
	fx := newRenewFixture(t, time.Hour, 0, 0.5)
	fx.ca.fail = 5
	h := fx.run(t)
	defer h.stop()
	fx.waitPending(t, 1)
	fx.clk.Advance(39 * time.Minute)
	// With Rand = 0.5 each wait is 3/4 of the current delay: 1s, 2s, 4s, 8s, 8s (capped).
	for i, want := range []time.Duration{750 * time.Millisecond, 1500 * time.Millisecond, 3 * time.Second, 6 * time.Second, 6 * time.Second} {
		fx.waitPending(t, 1)
		got := fx.clk.Pending()
		if len(got) != 1 || got[0] != want {
			t.Fatalf("retry %d: waits %v, want [%v]", i+1, got, want)
		}
		fx.clk.Advance(want)
	}
	select {
	case <-fx.r.Updates():
	case <-time.After(5 * time.Second):
		t.Fatal("no renewal after the CA came back")
	}
	if n := fx.ca.numCalls(); n != 6 {
		t.Fatalf("%d renew calls, want 6", n)
	}
}

func TestRenewerExpiresWhileCAUnreachable(t *testing.T) {
	fx := newRenewFixture(t, time.Hour, 0, 0.5)
	fx.ca.fail = 1 << 30
	h := fx.run(t)
	defer h.stop()
	notAfter := fx.s.Leaf().NotAfter
	for {
		select {
		case <-h.done:
			err := h.err
			if !errors.Is(err, ErrExpired) || !errors.Is(err, ca.ErrExpired) {
				t.Fatalf("Run = %v, want ErrExpired", err)
			}
			want := fmt.Sprintf("the certificate expired at %s and cannot be renewed: enroll again with a new token", notAfter.UTC().Format(time.RFC3339))
			if err.Error() != want {
				t.Fatalf("Run = %q, want %q", err, want)
			}
			if fx.clk.Now().Before(notAfter) {
				t.Fatalf("gave up at %v, before expiry %v", fx.clk.Now(), notAfter)
			}
			fx.ca.mu.Lock()
			defer fx.ca.mu.Unlock()
			if fx.ca.expired != 0 {
				t.Fatalf("%d renewals were attempted with an expired certificate", fx.ca.expired)
			}
			// Retries never waited longer than RetryMax: at least (21m / 8s) attempts.
			if len(fx.ca.calls) < 150 {
				t.Fatalf("only %d renewal attempts in the last third of the lifetime", len(fx.ca.calls))
			}
			return
		default:
		}
		next, ok := fx.clk.NextDeadline()
		if !ok {
			fx.clk.WaitForWaiters(1, 100*time.Millisecond)
			continue
		}
		fx.clk.Set(next)
	}
}

func TestRenewerNeverRenewsExpired(t *testing.T) {
	fx := newRenewFixture(t, time.Hour, time.Hour, 0.5) // clock at NotAfter exactly
	h := fx.run(t)
	defer h.stop()
	select {
	case <-h.done:
		err := h.err
		if !errors.Is(err, ErrExpired) {
			t.Fatalf("Run = %v, want ErrExpired", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Run kept going with an expired certificate")
	}
	if err := fx.r.RenewNow(context.Background()); !errors.Is(err, ErrExpired) {
		t.Fatalf("RenewNow = %v, want ErrExpired", err)
	}
	if n := fx.ca.numCalls(); n != 0 {
		t.Fatalf("the CA was asked %d times to renew an expired certificate", n)
	}
}

func TestRenewerRevokedIsTerminal(t *testing.T) {
	fx := newRenewFixture(t, time.Hour, 0, 0.5)
	fx.ca.fail = 1 << 30
	fx.ca.failErr = fmt.Errorf("renew: %w", ca.ErrRevoked)
	h := fx.run(t)
	defer h.stop()
	fx.waitPending(t, 1)
	fx.clk.Advance(39 * time.Minute)
	select {
	case <-h.done:
		err := h.err
		if !errors.Is(err, ErrRevoked) || !errors.Is(err, ca.ErrRevoked) {
			t.Fatalf("Run = %v, want ErrRevoked", err)
		}
		want := "the agent certificate was revoked: enroll again with a new token from `wicket token create agent db1`"
		if err.Error() != want {
			t.Fatalf("Run = %q, want %q", err, want)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Run did not stop on a revoked certificate")
	}
	if n := fx.ca.numCalls(); n != 1 {
		t.Fatalf("%d renew calls after revocation, want 1 (no retry)", n)
	}
}

func TestRenewNowReschedules(t *testing.T) {
	fx := newRenewFixture(t, time.Hour, 10*time.Minute, 0.5)
	h := fx.run(t)
	defer h.stop()
	fx.waitPending(t, 1)
	if err := fx.r.RenewNow(context.Background()); err != nil {
		t.Fatal(err)
	}
	<-fx.r.Updates()
	// The renewer drops its old wait and schedules 39m from the new certificate.
	want := fx.clk.Now().Add(39 * time.Minute)
	deadline := time.Now().Add(5 * time.Second)
	for !slices.ContainsFunc(fx.clk.Deadlines(), want.Equal) {
		if time.Now().After(deadline) {
			t.Fatalf("not rescheduled from the new certificate: deadlines %v, want %v", fx.clk.Deadlines(), want)
		}
		fx.clk.WaitForWaiters(len(fx.clk.Pending())+1, 100*time.Millisecond)
	}
	if !strings.Contains(fx.r.Current().Chain[0].URIs[0].String(), "/agent/db1") {
		t.Fatal("renewed identity changed")
	}
}

func TestRenewerPeriod(t *testing.T) {
	fx := newRenewFixture(t, time.Hour, 0, 0.5)
	fx.r = NewRenewer(fx.s, RenewerConfig{Dir: fx.dir, Renew: fx.ca.renew, Now: fx.clk.Now, After: fx.clk.After,
		Rand: func() float64 { return 0.5 }, Period: 2 * time.Second})
	h := fx.run(t)
	defer h.stop()
	for i := range 3 {
		fx.waitPending(t, 1)
		if got := fx.clk.Pending(); len(got) != 1 || got[0] != 2*time.Second {
			t.Fatalf("renewal %d: waits %v, want [2s]", i+1, got)
		}
		fx.clk.Advance(2 * time.Second)
		select {
		case <-fx.r.Updates():
		case <-time.After(5 * time.Second):
			t.Fatalf("renewal %d did not happen", i+1)
		}
	}
	if n := fx.ca.numCalls(); n != 3 {
		t.Fatalf("%d renewals, want 3", n)
	}
}
