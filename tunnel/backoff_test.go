package tunnel

import (
	"context"
	"errors"
	"testing"
	"time"
)

func TestBackoffFullJitterAndCap(t *testing.T) {
	r := 0.999999
	b := &Backoff{Initial: 100 * time.Millisecond, Max: time.Second, Rand: func() float64 { return r }}
	want := []time.Duration{100, 200, 400, 800, 1000, 1000}
	for i, w := range want {
		if c := b.Ceiling(); c != w*time.Millisecond {
			t.Fatalf("attempt %d: ceiling %s, want %s", i, c, w*time.Millisecond)
		}
		d := b.Next()
		if d < 0 || d >= w*time.Millisecond {
			t.Fatalf("attempt %d: delay %s outside [0, %s)", i, d, w*time.Millisecond)
		}
	}
	r = 0
	if d := b.Next(); d != 0 {
		t.Fatalf("full jitter must reach 0, got %s", d)
	}
	b.Reset()
	if c := b.Ceiling(); c != 100*time.Millisecond {
		t.Fatalf("after reset: %s", c)
	}
	for range 200 { // no overflow after many attempts
		b.Next()
	}
	if c := b.Ceiling(); c != time.Second {
		t.Fatalf("ceiling after many attempts: %s", c)
	}
	var z Backoff
	if c := z.Ceiling(); c != 500*time.Millisecond {
		t.Fatalf("zero value initial: %s", c)
	}
	for range 20 {
		z.Next()
	}
	if c := z.Ceiling(); c != 30*time.Second {
		t.Fatalf("zero value cap: %s", c)
	}
}

func TestRetryBacksOffAndResets(t *testing.T) {
	checkLeaks(t)
	now := time.Unix(1000, 0)
	b := &Backoff{Initial: time.Second, Max: 8 * time.Second, ResetAfter: time.Minute,
		Rand: func() float64 { return 0.5 }, Now: func() time.Time { return now }}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var waits []time.Duration
	fired := make(chan time.Time)
	close(fired) // every wait ends at once: no sleeping in tests
	after := func(d time.Duration) <-chan time.Time { waits = append(waits, d); return fired }
	attempt := 0
	errFail := errors.New("refused")
	connect := func(ctx context.Context) error {
		attempt++
		switch attempt {
		case 5: // this connection stays up 2 minutes: the next wait starts over
			now = now.Add(2 * time.Minute)
		case 7:
			cancel()
		}
		return errFail
	}
	var seen []error
	Retry(ctx, b, after, connect, func(err error, _ time.Duration) { seen = append(seen, err) })
	want := []time.Duration{500 * time.Millisecond, time.Second, 2 * time.Second, 4 * time.Second,
		500 * time.Millisecond, time.Second}
	if len(waits) != len(want) {
		t.Fatalf("waits %v, want %v", waits, want)
	}
	for i := range want {
		if waits[i] != want[i] {
			t.Fatalf("waits %v, want %v", waits, want)
		}
	}
	if len(seen) != 6 || !errors.Is(seen[0], errFail) {
		t.Fatalf("onRetry saw %v", seen)
	}
}

func TestRetryStopsWhileWaiting(t *testing.T) {
	checkLeaks(t)
	ctx, cancel := context.WithCancel(context.Background())
	never := make(chan time.Time)
	done := make(chan struct{})
	go func() {
		defer close(done)
		Retry(ctx, &Backoff{}, func(time.Duration) <-chan time.Time { return never },
			func(context.Context) error { return errors.New("x") }, nil)
	}()
	cancel()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Retry ignored ctx while waiting")
	}
}
