package keeper

import (
	"context"
	"crypto/x509"
	"errors"
	"math/big"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/wicketgw/wicket/agent/internal/fakeclock"
	"github.com/wicketgw/wicket/ca"
	"github.com/wicketgw/wicket/tunnel"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m, goleak.IgnoreTopFunction("github.com/golang/glog.(*fileSink).flushDaemon"))
}

// fakeSession is a session the test ends by calling end.
type fakeSession struct {
	cert *x509.Certificate
	done chan struct{}
	once sync.Once
}

func newSession(serial int64) *fakeSession {
	return &fakeSession{cert: &x509.Certificate{SerialNumber: big.NewInt(serial), Raw: []byte{byte(serial)}}, done: make(chan struct{})}
}

func (s *fakeSession) Done() <-chan struct{}   { return s.done }
func (s *fakeSession) Err() error              { return errors.New("gateway went away") }
func (s *fakeSession) Cert() *x509.Certificate { return s.cert }
func (s *fakeSession) end()                    { s.once.Do(func() { close(s.done) }) }

// fakeGateway is the dialer: up says whether a dial succeeds.
type fakeGateway struct {
	mu     sync.Mutex
	up     bool
	serial int64
	dials  int
}

func (g *fakeGateway) set(up bool) {
	g.mu.Lock()
	g.up = up
	g.mu.Unlock()
}

func (g *fakeGateway) dial(context.Context) (*fakeSession, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.dials++
	if !g.up {
		return nil, errors.New("connection refused")
	}
	g.serial++
	return newSession(g.serial), nil
}

// harness runs Run with a fake clock and reports the sessions that came up.
type harness struct {
	t      *testing.T
	clock  *fakeclock.Clock
	gw     *fakeGateway
	ups    chan *fakeSession
	waits  chan time.Duration
	cancel context.CancelFunc
	done   chan error
}

func start(t *testing.T, mod func(*Config[*fakeSession])) *harness {
	h := &harness{t: t, clock: fakeclock.New(time.Unix(1_000_000, 0)), gw: &fakeGateway{},
		ups: make(chan *fakeSession, 10), waits: make(chan time.Duration, 100), done: make(chan error, 1)}
	cfg := Config[*fakeSession]{
		Dial:     h.gw.dial,
		Up:       func(s *fakeSession) { h.ups <- s },
		Retrying: func(_ error, wait time.Duration) { h.waits <- wait },
		// Half of each ceiling: 50 ms, 100 ms, 200 ms, ...
		Backoff: &tunnel.Backoff{Initial: 100 * time.Millisecond, Max: 10 * time.Second, Rand: func() float64 { return 0.5 }},
		After:   h.clock.After,
	}
	if mod != nil {
		mod(&cfg)
	}
	ctx, cancel := context.WithCancel(context.Background())
	h.cancel = cancel
	go func() { h.done <- Run(ctx, cfg) }()
	t.Cleanup(func() { h.stop() })
	return h
}

func (h *harness) stop() error {
	h.cancel()
	select {
	case err, ok := <-h.done:
		if ok {
			close(h.done)
		}
		return err
	case <-time.After(10 * time.Second):
		h.t.Fatal("Run did not return after its context ended")
		return nil
	}
}

// nextWait returns the wait the loop chose after a failure and lets it pass.
func (h *harness) nextWait() time.Duration {
	h.t.Helper()
	w := h.waiting()
	h.clock.Advance(w)
	return w
}

// waiting returns the wait the loop chose after a failure once it waits.
func (h *harness) waiting() time.Duration {
	h.t.Helper()
	select {
	case w := <-h.waits:
		if !h.clock.WaitForWaiters(1, 10*time.Second) {
			h.t.Fatal("the loop did not wait on the clock")
		}
		return w
	case <-time.After(10 * time.Second):
		h.t.Fatal("no retry")
		return 0
	}
}

func (h *harness) up() *fakeSession {
	h.t.Helper()
	select {
	case s := <-h.ups:
		return s
	case <-time.After(10 * time.Second):
		h.t.Fatal("no session came up")
		return nil
	}
}

// TestBackoffResetsOnceEstablished: after a session is established the next
// loss waits the shortest time again, however briefly the session lived (the
// fake clock does not move while it is up) -- every gateway restart is
// rejoined as fast as the first.
func TestBackoffResetsOnceEstablished(t *testing.T) {
	h := start(t, nil)
	for restart := 0; restart < 3; restart++ {
		// The gateway is down for four attempts: the waits grow from the
		// shortest, also after the session of the previous round.
		want := []time.Duration{50 * time.Millisecond, 100 * time.Millisecond, 200 * time.Millisecond, 400 * time.Millisecond}
		for i, w := range want {
			got := h.waiting()
			if got != w {
				t.Fatalf("restart %d, wait %d: %s, want %s (the backoff was not reset by the session before)", restart, i, got, w)
			}
			if i == len(want)-1 {
				h.gw.set(true) // back before the last wait ends
			}
			h.clock.Advance(got)
		}
		s := h.up()
		h.gw.set(false)
		s.end() // lived no time at all on the clock
	}
	if err := h.stop(); err != nil {
		t.Fatalf("Run returned %v after its context ended, want nil", err)
	}
}

// TestTerminal: a failed Check or a terminal DialFailed ends Run with that
// error; a plain dial failure does not.
func TestTerminal(t *testing.T) {
	expired := errors.New("the certificate expired")
	h := start(t, func(c *Config[*fakeSession]) { c.Check = func() error { return expired } })
	select {
	case err := <-h.done:
		h.done <- err
		if !errors.Is(err, expired) {
			t.Fatalf("Run returned %v, want the Check error", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Run kept going after Check failed")
	}

	revoked := errors.New("revoked")
	calls := 0
	h = start(t, func(c *Config[*fakeSession]) {
		c.DialFailed = func(context.Context, error) error {
			calls++
			if calls == 3 {
				return revoked
			}
			return nil
		}
	})
	h.nextWait()
	h.nextWait()
	select {
	case err := <-h.done:
		h.done <- err
		if !errors.Is(err, revoked) || calls != 3 {
			t.Fatalf("Run returned %v after %d failures, want revoked after 3", err, calls)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Run kept going after a terminal dial failure")
	}
}

// TestRenewalSwitch: renewed credentials move to a new session
// make-before-break; a failed move keeps the current one and is retried on
// the switch backoff; the same certificate again changes nothing.
func TestRenewalSwitch(t *testing.T) {
	renewed := make(chan *ca.Credentials)
	switched := make(chan [2]*fakeSession, 1)
	failed := make(chan error, 1)
	downs := make(chan *fakeSession, 2)
	h := start(t, func(c *Config[*fakeSession]) {
		c.Renewed = renewed
		c.Switched = func(_ context.Context, old, next *fakeSession) { switched <- [2]*fakeSession{old, next} }
		c.SwitchFailed = func(err error) { failed <- err }
		c.Down = func(s *fakeSession, _ error) { downs <- s }
		c.SwitchBackoff = &tunnel.Backoff{Initial: 2 * time.Second, Rand: func() float64 { return 0.5 }}
	})
	h.gw.set(true)
	first := h.up()
	renewed <- &ca.Credentials{Chain: []*x509.Certificate{first.cert}} // the same certificate: no move
	h.gw.set(false)
	renewed <- &ca.Credentials{Chain: []*x509.Certificate{newSession(99).cert}}
	<-failed
	if !h.clock.WaitForWaiters(1, 10*time.Second) {
		t.Fatal("a failed move is not retried")
	}
	if p := h.clock.Pending(); len(p) != 1 || p[0] != time.Second {
		t.Fatalf("switch retry waits %v, want [1s]", p)
	}
	h.gw.set(true)
	h.clock.Advance(time.Second)
	sw := <-switched
	if sw[0] != first || sw[1] == first {
		t.Fatalf("switched from %v to %v", sw[0], sw[1])
	}
	h.gw.mu.Lock()
	dials := h.gw.dials
	h.gw.mu.Unlock()
	if dials != 3 {
		t.Fatalf("%d dials, want 3 (first, failed move, move)", dials)
	}
	if err := h.stop(); err != nil {
		t.Fatal(err)
	}
	if s := <-downs; s != sw[1] {
		t.Fatal("Down was not told about the current session at stop")
	}
}
