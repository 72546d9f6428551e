package gateway

import (
	"maps"
	"sync"
	"sync/atomic"
)

// Counters are the gateway's running totals since start. They are what the metrics endpoint
// (issue 7) exports; Gateway.Counters returns a snapshot.
type Counters struct {
	// HandshakesOK counts completed TLS handshakes on the gateway port, all ALPNs.
	HandshakesOK int64
	// HandshakesRefused counts refused handshakes by reason ("revoked", "wrong role", ...).
	HandshakesRefused map[string]int64
	// AgentSessions counts agent sessions registered; UserSessions user connections accepted.
	AgentSessions, UserSessions int64
	// Streams counts user streams by outcome ("ok", "denied", "unavailable", "unknown resource",
	// "dial failed", "error").
	Streams map[string]int64
	// BytesUp (user to resource) and BytesDown (resource to user) count relayed payload.
	BytesUp, BytesDown int64
	// SessionsClosedRevoked and SessionsClosedExpired count live sessions the gateway closed
	// because their peer certificate was revoked or expired.
	SessionsClosedRevoked, SessionsClosedExpired int64
}

type counters struct {
	handshakesOK       atomic.Int64
	agentSessions      atomic.Int64
	userSessions       atomic.Int64
	bytesUp, bytesDown atomic.Int64
	closedRevoked      atomic.Int64
	closedExpired      atomic.Int64
	mu                 sync.Mutex
	refused            map[string]int64
	streams            map[string]int64
}

func (c *counters) refusedInc(reason string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.refused == nil {
		c.refused = map[string]int64{}
	}
	c.refused[reason]++
}

func (c *counters) streamInc(outcome string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.streams == nil {
		c.streams = map[string]int64{}
	}
	c.streams[outcome]++
}

func (c *counters) snapshot() Counters {
	c.mu.Lock()
	defer c.mu.Unlock()
	return Counters{
		HandshakesOK:          c.handshakesOK.Load(),
		HandshakesRefused:     maps.Clone(c.refused),
		AgentSessions:         c.agentSessions.Load(),
		UserSessions:          c.userSessions.Load(),
		Streams:               maps.Clone(c.streams),
		BytesUp:               c.bytesUp.Load(),
		BytesDown:             c.bytesDown.Load(),
		SessionsClosedRevoked: c.closedRevoked.Load(),
		SessionsClosedExpired: c.closedExpired.Load(),
	}
}
