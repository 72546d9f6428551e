package gateway

import (
	"maps"
	"sync"
	"sync/atomic"
	"time"
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
	// "dial failed", "error", "audit unavailable").
	Streams map[string]int64
	// BytesUp (user to resource) and BytesDown (resource to user) count relayed payload.
	BytesUp, BytesDown int64
	// SessionsClosedRevoked and SessionsClosedExpired count live sessions the gateway closed
	// because their peer certificate was revoked or expired.
	SessionsClosedRevoked, SessionsClosedExpired int64
	// ClaimsRefused counts resources agents announced that are not granted to their name
	// (once per session and resource).
	ClaimsRefused int64
}

type counters struct {
	handshakesOK       atomic.Int64
	agentSessions      atomic.Int64
	userSessions       atomic.Int64
	bytesUp, bytesDown atomic.Int64
	closedRevoked      atomic.Int64
	closedExpired      atomic.Int64
	claimsRefused      atomic.Int64
	mu                 sync.Mutex
	refused            map[string]int64
	streams            map[string]int64

	resources  resourceCounters
	streamOpen histogram
	certs      labelCounter // (kind, role)
	acme       labelCounter // ACME server: (event, outcome)
	statements labelCounter // PostgreSQL statements recorded: (resource, status)
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
		ClaimsRefused:         c.claimsRefused.Load(),
	}
}

// maxResourceLabels bounds the distinct resource names the byte counters keep apart; bytes
// of further resources are counted under OtherResource. Resource names come from agents'
// hellos, so without a cap a misbehaving agent could grow the metrics without bound.
const maxResourceLabels = 256

// OtherResource is the resource name bytes are counted under once maxResourceLabels
// resources have their own counters (a resource actually named "other" shares it).
const OtherResource = "other"

// StreamOpenBuckets are the upper bounds, in seconds, of the stream-open latency histogram:
// from a loopback agent (well under a millisecond) to an agent across an ocean on a slow link.
var StreamOpenBuckets = []float64{0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10}

// resourceBytes is the live byte count of one resource, both ways. The relay adds to it as
// bytes are read, so a scrape during a long transfer sees the bytes so far and the counters
// only ever grow.
type resourceBytes struct{ up, down atomic.Int64 }

// resourceCounters maps resource names to their byte counters, at most maxResourceLabels
// of them plus OtherResource.
type resourceCounters struct {
	mu sync.Mutex
	m  map[string]*resourceBytes
}

// get returns the counters of resource, or of OtherResource once the cap is reached.
func (r *resourceCounters) get(resource string) *resourceBytes {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.m == nil {
		r.m = map[string]*resourceBytes{}
	}
	if c, ok := r.m[resource]; ok {
		return c
	}
	if len(r.m) >= maxResourceLabels {
		resource = OtherResource
		if c, ok := r.m[resource]; ok {
			return c
		}
	}
	c := &resourceBytes{}
	r.m[resource] = c
	return c
}

func (r *resourceCounters) snapshot() map[string]ResourceBytes {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make(map[string]ResourceBytes, len(r.m))
	for k, c := range r.m {
		out[k] = ResourceBytes{Up: c.up.Load(), Down: c.down.Load()}
	}
	return out
}

// histogram is a fixed-bucket latency histogram (StreamOpenBuckets), cumulative at snapshot.
type histogram struct {
	mu     sync.Mutex
	counts []uint64 // per bucket, not cumulative; last is +Inf
	sum    float64
	n      uint64
}

func (h *histogram) observe(seconds float64) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.counts == nil {
		h.counts = make([]uint64, len(StreamOpenBuckets)+1)
	}
	i := len(StreamOpenBuckets)
	for j, ub := range StreamOpenBuckets {
		if seconds <= ub {
			i = j
			break
		}
	}
	h.counts[i]++
	h.sum += seconds
	h.n++
}

func (h *histogram) snapshot() Histogram {
	h.mu.Lock()
	defer h.mu.Unlock()
	out := Histogram{Count: h.n, Sum: h.sum, Buckets: make(map[float64]uint64, len(StreamOpenBuckets))}
	var cum uint64
	for j, ub := range StreamOpenBuckets {
		if h.counts != nil {
			cum += h.counts[j]
		}
		out.Buckets[ub] = cum
	}
	return out
}

// labelCounter is a counter per label value, for small fixed label sets.
type labelCounter struct {
	mu sync.Mutex
	m  map[[2]string]int64
}

func (c *labelCounter) inc(a, b string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.m == nil {
		c.m = map[[2]string]int64{}
	}
	c.m[[2]string{a, b}]++
}

func (c *labelCounter) snapshot() map[[2]string]int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return maps.Clone(c.m)
}

// ResourceBytes is the payload relayed for one resource: Up from users to the resource,
// Down back.
type ResourceBytes struct{ Up, Down int64 }

// Histogram is a snapshot of a latency histogram in Prometheus' shape: Buckets maps each
// upper bound (seconds) to the cumulative count of observations at or below it.
type Histogram struct {
	Count   uint64
	Sum     float64
	Buckets map[float64]uint64
}

// CertCount is one certificates counter: Kind is "issued", "renewed" or "revoked"; Role is
// "agent", "user", "gateway" or "unknown" (a revoked serial the gateway never saw in use).
type CertCount struct{ Kind, Role string }

// AgentExpiry is when the newest certificate of a connected agent expires.
type AgentExpiry struct {
	Agent   string
	Expires time.Time
}

// Snapshot is everything the metrics endpoint exports, read at scrape time. Counters never
// decrease while the process runs; gauges are the state at Now.
type Snapshot struct {
	Counters
	// Now is the gateway clock's time of the snapshot; expiries are relative to it.
	Now time.Time
	// AgentsConnected counts agent names with at least one live session.
	AgentsConnected int
	// SessionsActive counts user streams being relayed now.
	SessionsActive int
	// ResourceBytes is the payload relayed per resource (at most 256 names, then "other").
	ResourceBytes map[string]ResourceBytes
	// StreamOpen is the latency of opening a stream to an agent, up to its OK reply.
	StreamOpen Histogram
	// Certificates counts certificates issued and renewed through the CA API, and revoked.
	Certificates map[CertCount]int64
	// GatewayCertExpires is the expiry of the gateway's own TLS certificate (zero if none).
	GatewayCertExpires time.Time
	// AgentCerts lists the connected agents' certificate expiries, sorted by name.
	AgentCerts []AgentExpiry
	// ACMEServer counts the ACME server's events by (event, outcome): order created|refused|error,
	// validation_agent|validation_public|validation_direct ok|error, revoked ok, eab_key
	// created, acme_host refused (an agent declared a name not granted to it).
	ACMEServer map[[2]string]int64
	// Statements counts the PostgreSQL statements written to statement logs, by (resource,
	// status): ok, error, skipped, incomplete.
	Statements map[[2]string]int64
	// PublicACMEFailures counts failed attempts of the public listener to obtain or renew a
	// certificate (zero without a public listener).
	PublicACMEFailures uint64
	// AuditWritable is false while the audit log cannot be written (access-creating events
	// are refused meanwhile).
	AuditWritable bool
	// AuditWriteFailures counts the audit records that could not be written since start:
	// the write that failed, and every event refused or lost while the log was unavailable.
	AuditWriteFailures uint64
}

// Snapshot reads the counters and the state the metrics endpoint exports. It is cheap (no
// I/O) and safe to call concurrently with everything else.
func (g *Gateway) Snapshot() Snapshot {
	s := Snapshot{
		Counters:       g.counters.snapshot(),
		Now:            g.clock.Now(),
		SessionsActive: g.sessions.len(),
		ResourceBytes:  g.counters.resources.snapshot(),
		StreamOpen:     g.counters.streamOpen.snapshot(),
		Certificates:   map[CertCount]int64{},
	}
	s.ACMEServer = g.counters.acme.snapshot()
	s.Statements = g.counters.statements.snapshot()
	for k, n := range g.counters.certs.snapshot() {
		s.Certificates[CertCount{Kind: k[0], Role: k[1]}] = n
	}
	for _, a := range g.registry.List() {
		if a.Status == "online" {
			s.AgentsConnected++
			s.AgentCerts = append(s.AgentCerts, AgentExpiry{Agent: a.Name, Expires: a.CertExpires})
		}
	}
	if c, err := g.authority.GetCertificate(nil); err == nil && c.Leaf != nil {
		s.GatewayCertExpires = c.Leaf.NotAfter
	}
	if g.public != nil {
		st := g.public.Stats()
		s.PublicACMEFailures = st.ObtainFailures + st.RenewalFailures
	}
	h := g.audit.Health()
	s.AuditWritable, s.AuditWriteFailures = h.OK, h.Failures
	return s
}
