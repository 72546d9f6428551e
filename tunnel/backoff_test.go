package tunnel

import (
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
