package tunnel

import (
	"context"
	"math/rand/v2"
	"time"
)

// Backoff computes reconnect delays: exponential growth from Initial up to
// Max, with full jitter (each delay is uniform in [0, ceiling)), so a fleet of
// agents that lost the gateway at the same moment does not reconnect in
// lockstep. The zero value is usable (defaults below). Not safe for
// concurrent use.
type Backoff struct {
	// Initial is the first ceiling. Default 500 ms.
	Initial time.Duration
	// Max caps the ceiling. Default 30 s.
	Max time.Duration
	// ResetAfter: a connection that stayed up at least this long resets the
	// backoff (Retry does this), so a blip after a day of uptime reconnects
	// fast. Default 1 min.
	ResetAfter time.Duration
	// Rand returns a float in [0, 1); nil means math/rand/v2. Tests inject it.
	Rand func() float64
	// Now is the clock Retry measures attempts with; nil means time.Now.
	Now func() time.Time

	attempt int
}

func (b *Backoff) defaults() (initial, max, resetAfter time.Duration) {
	initial, max, resetAfter = b.Initial, b.Max, b.ResetAfter
	if initial <= 0 {
		initial = 500 * time.Millisecond
	}
	if max <= 0 {
		max = 30 * time.Second
	}
	if max < initial {
		max = initial
	}
	if resetAfter <= 0 {
		resetAfter = time.Minute
	}
	return initial, max, resetAfter
}

// Ceiling is the upper bound of the next delay: min(Max, Initial * 2^attempt).
func (b *Backoff) Ceiling() time.Duration {
	initial, max, _ := b.defaults()
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

// Retry calls connect until ctx ends. connect should return when its
// connection ends (nil or an error); Retry then waits b.Next() before calling
// it again, after resetting b if that attempt lasted at least ResetAfter.
// onRetry (optional) hears each failure and the wait chosen. after is the
// timer to wait on (nil means time.After); tests inject one that fires at once.
// Durations of attempts are measured with b.Now.
func Retry(ctx context.Context, b *Backoff, after func(time.Duration) <-chan time.Time,
	connect func(ctx context.Context) error, onRetry func(err error, wait time.Duration)) {
	if after == nil {
		after = time.After
	}
	_, _, resetAfter := b.defaults()
	now := b.Now
	if now == nil {
		now = time.Now
	}
	for ctx.Err() == nil {
		start := now()
		err := connect(ctx)
		if ctx.Err() != nil {
			return
		}
		if now().Sub(start) >= resetAfter {
			b.Reset()
		}
		wait := b.Next()
		if onRetry != nil {
			onRetry(err, wait)
		}
		select {
		case <-ctx.Done():
			return
		case <-after(wait):
		}
	}
}
