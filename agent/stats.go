package agent

import (
	"sync/atomic"
	"time"
)

// Stats are an agent's running totals and state, for its metrics endpoint (`wicket agent
// --metrics-listen`). Pass one in Config.Stats; the agent only adds to it. All fields are
// safe to read concurrently.
type Stats struct {
	// SessionsUp is the number of sessions registered with the gateway now: 1 while
	// connected, 2 during a make-before-break renewal, 0 while reconnecting.
	SessionsUp atomic.Int64
	// Connects counts sessions established (including those opened after a renewal);
	// Reconnects counts waits before a new connection attempt, after a failure or a drop.
	Connects, Reconnects atomic.Int64
	// RenewalsOK and RenewalsFailed count certificate renewal requests by result.
	RenewalsOK, RenewalsFailed atomic.Int64
	// StreamsOK counts streams relayed to a resource; StreamsRefused those answered with an
	// unknown resource or a non-data stream; StreamsDialFailed those whose resource did not
	// answer.
	StreamsOK, StreamsRefused, StreamsDialFailed atomic.Int64
	// BytesToResource and BytesFromResource count relayed payload, when each stream ends.
	BytesToResource, BytesFromResource atomic.Int64

	certExpires atomic.Int64 // unix nanoseconds
}

// CertExpires is when the agent's current certificate expires (zero before the agent has
// loaded one).
func (s *Stats) CertExpires() time.Time {
	n := s.certExpires.Load()
	if n == 0 {
		return time.Time{}
	}
	return time.Unix(0, n)
}

func (s *Stats) setCertExpires(t time.Time) { s.certExpires.Store(t.UnixNano()) }
