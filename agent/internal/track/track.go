// Package track counts the streams in flight on one tunnel session so that a
// session being replaced (make-before-break) can be closed as soon as its
// last stream ends. It must NOT close anything itself.
package track

import "sync"

// Tracker counts active streams. The zero value is ready to use and idle.
type Tracker struct {
	mu     sync.Mutex
	n      int
	sealed bool          // no new streams: the session is draining
	idle   chan struct{} // closed while n == 0; nil means "not created yet"
}

// Add records a stream that started.
func (t *Tracker) Add() {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.n == 0 {
		t.idle = make(chan struct{})
	}
	t.n++
}

// TryAdd records a stream that is about to start, unless Seal was called:
// then it returns false and the caller must use another session. Checking
// and counting under one lock closes the window in which a drain could see
// zero streams and close the session under a stream being opened.
func (t *Tracker) TryAdd() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.sealed {
		return false
	}
	if t.n == 0 {
		t.idle = make(chan struct{})
	}
	t.n++
	return true
}

// Seal makes every later TryAdd fail.
func (t *Tracker) Seal() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.sealed = true
}

// Done records a stream that ended.
func (t *Tracker) Done() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.n--
	if t.n < 0 {
		panic("track: Done without Add")
	}
	if t.n == 0 {
		close(t.idle)
	}
}

// Active returns the number of streams in flight.
func (t *Tracker) Active() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.n
}

// Idle returns a channel that is closed while no stream is in flight (as of
// the call); a stream added later does not reopen it.
func (t *Tracker) Idle() <-chan struct{} {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.n == 0 {
		c := make(chan struct{})
		close(c)
		return c
	}
	return t.idle
}
