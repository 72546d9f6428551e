package tunnel

import (
	"math/rand/v2"
	"time"
)

// Backoff computes reconnect delays: exponential growth from Initial up to
// Max, with full jitter (each delay is uniform in [0, ceiling)), so a fleet of
// agents that lost the gateway at the same moment does not reconnect in
// lockstep. The zero value is usable (defaults below). Not safe for
// concurrent use. Whoever keeps a session calls Reset once a new session is
// established (agent/internal/keeper does, as soon as the gateway answers), so
// a gateway restart is rejoined at the Initial delay every time.
type Backoff struct {
	// Initial is the first ceiling. Default 500 ms.
	Initial time.Duration
	// Max caps the ceiling. Default 30 s.
	Max time.Duration
	// Rand returns a float in [0, 1); nil means math/rand/v2. Tests inject it.
	Rand func() float64

	attempt int
}

func (b *Backoff) defaults() (initial, max time.Duration) {
	initial, max = b.Initial, b.Max
	if initial <= 0 {
		initial = 500 * time.Millisecond
	}
	if max <= 0 {
		max = 30 * time.Second
	}
	if max < initial {
		max = initial
	}
	return initial, max
}

// Ceiling is the upper bound of the next delay: min(Max, Initial * 2^attempt).
func (b *Backoff) Ceiling() time.Duration {
	initial, max := b.defaults()
	c := initial
	for i := 0; i < b.attempt && c < max; i++ {
		c *= 2
	}
	return min(c, max)
}

// Next returns the next delay, uniform in [0, Ceiling()), and advances.
func (b *Backoff) Next() time.Duration {
	c := b.Ceiling()
	r := b.Rand
	if r == nil {
		r = rand.Float64
	}
	b.attempt++
	if b.attempt > 62 { // no overflow; the ceiling is capped long before
		b.attempt = 62
	}
	return time.Duration(r() * float64(c))
}

// Reset starts over from Initial.
func (b *Backoff) Reset() { b.attempt = 0 }
