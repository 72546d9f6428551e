package tunnel

import (
	"testing"
	"time"
)

// TestStalledHeaderDoesNotHoldUpNextStream opens a stream whose header never arrives, then a
// good one on the same session: the good one is served at once, not after the stalled
// header's deadline (issue 10, item 3).
func TestStalledHeaderDoesNotHoldUpNextStream(t *testing.T) {
	checkLeaks(t)
	p := newPKI(t)
	cfg := testConfig()
	cfg.HandshakeTimeout = 10 * time.Second
	srv := startServer(t, p, cfg, echo)
	s := rawSession(t, p, srv.addr(), cfg)
	roundTrip(t, s, "warm-up")

	// Two stalled streams: nothing written, held open.
	for range 2 {
		ys, err := s.ys.OpenStream()
		if err != nil {
			t.Fatal(err)
		}
		defer ys.Close()
		// yamux sends the stream's SYN with its first write or window update; an empty
		// write is enough to make the server accept it.
		if _, err := ys.Write(nil); err != nil {
			t.Fatal(err)
		}
	}
	time.Sleep(50 * time.Millisecond) // let the server accept the stalled streams first
	t0 := time.Now()
	roundTrip(t, s, "after a stalled header")
	took := time.Since(t0)
	t.Logf("the stream after two stalled headers was served in %s (header deadline %s)", took.Round(time.Millisecond), cfg.HandshakeTimeout)
	if took > cfg.HandshakeTimeout/2 {
		t.Fatalf("the next stream waited %s behind a stalled header", took)
	}
	s.Close()
	srv.close()
}
