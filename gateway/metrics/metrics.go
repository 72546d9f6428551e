// Package metrics exports a Wicket gateway's state as Prometheus metrics and answers the
// health probes (/healthz, /readyz), on a listener of its own (`wicket gateway
// --metrics-listen`), never on the gateway's TLS port.
//
// Everything is read at scrape time from the gateway's Snapshot and Ready: the gateway keeps
// plain counters and knows nothing of Prometheus. This package must not register anything in
// Prometheus' global default registry (each Server has its own), must not use a label whose
// values a peer can multiply without bound (no session ids, no user names, no remote
// addresses; resource names are capped by the gateway at 256), and must not export anything
// secret. It serves plain HTTP without authentication: bind it to loopback or to a network
// only the monitoring system reaches.
package metrics

import (
	"context"
	"sort"
	"strings"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/wicketgw/wicket/gateway"
)

// Source is what the metrics and probes read: *gateway.Gateway implements it.
type Source interface {
	// Snapshot returns the counters and state to export; it must be cheap and do no I/O.
	Snapshot() gateway.Snapshot
	// Ready runs the readiness checks.
	Ready(ctx context.Context) []gateway.Check
}

// Metric names, for tests and alert rules.
const (
	AgentsConnected         = "wicket_agents_connected"
	SessionsActive          = "wicket_sessions_active"
	SessionsTotal           = "wicket_sessions_total"
	StreamBytesTotal        = "wicket_stream_bytes_total"
	StreamOpenSeconds       = "wicket_stream_open_seconds"
	TLSHandshakesTotal      = "wicket_tls_handshakes_total"
	TLSHandshakesRefused    = "wicket_tls_handshakes_refused_total"
	CertificatesTotal       = "wicket_certificates_total"
	GatewayCertExpiry       = "wicket_gateway_certificate_expiry_seconds"
	AgentCertExpiry         = "wicket_agent_certificate_expiry_seconds"
	PublicACMEFailuresTotal = "wicket_public_acme_failures_total"
	AgentSessionsTotal      = "wicket_agent_sessions_total"
	UserConnectionsTotal    = "wicket_user_connections_total"
	SessionsClosedTotal     = "wicket_sessions_closed_total"
	AuditWriteFailuresTotal = "wicket_audit_write_failures_total"
	AuditWritable           = "wicket_audit_writable"
	AgentClaimsRefusedTotal = "wicket_agent_claims_refused_total"
	ACMEServerEventsTotal   = "wicket_acme_server_events_total"
	StatementsTotal         = "wicket_statements_total"
)

// collector turns a gateway Snapshot into metrics at each scrape.
type collector struct {
	src Source

	agentsConnected, sessionsActive, sessionsTotal, streamBytes, streamOpen *prometheus.Desc
	handshakes, handshakesRefused, certificates, gatewayExpiry, agentExpiry *prometheus.Desc
	acmeFailures, agentSessions, userConnections, sessionsClosed            *prometheus.Desc
	auditFailures, auditWritable, claimsRefused                             *prometheus.Desc
	acmeServer, statements                                                  *prometheus.Desc
}

// NewCollector returns a prometheus.Collector exporting src's Snapshot.
func NewCollector(src Source) prometheus.Collector {
	d := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc(name, help, labels, nil)
	}
	return &collector{
		src:             src,
		agentsConnected: d(AgentsConnected, "Agent names with at least one live session."),
		sessionsActive:  d(SessionsActive, "User streams being relayed to a resource now."),
		sessionsTotal: d(SessionsTotal, "User streams ended or refused, by outcome (ok, denied, unavailable, "+
			"unknown_resource, dial_failed, refused, closed, error, too_many_streams, audit_unavailable).", "outcome"),
		streamBytes: d(StreamBytesTotal, "Payload bytes relayed, by resource (at most 256 names, then \"other\") and "+
			"direction (up: user to resource, down: resource to user). Counted as they flow.", "resource", "direction"),
		streamOpen: d(StreamOpenSeconds, "Time to open a stream to an agent, until the agent's OK reply "+
			"(successful opens only)."),
		handshakes: d(TLSHandshakesTotal, "TLS handshakes completed on the gateway port, all ALPNs."),
		handshakesRefused: d(TLSHandshakesRefused, "TLS handshakes refused on the gateway port, by reason "+
			"(unsupported_tls_version, unknown_ca, certificate_expired, certificate_revoked, wrong_role, "+
			"no_client_certificate, ...).", "reason"),
		certificates: d(CertificatesTotal, "Certificates issued (token or ACME enrollment, the gateway's own, "+
			"DNS-name certificates by ACME), renewed, and revoked, by role (agent, user, gateway, server).", "kind", "role"),
		gatewayExpiry: d(GatewayCertExpiry, "Seconds until the gateway's own TLS certificate expires "+
			"(negative once expired)."),
		agentExpiry: d(AgentCertExpiry, "Seconds until the newest certificate of each connected agent "+
			"expires; only connected agents have a series.", "agent"),
		acmeFailures: d(PublicACMEFailuresTotal, "Failed attempts of the public HTTPS listener to obtain or "+
			"renew a certificate by ACME (each retry counts)."),
		agentSessions:   d(AgentSessionsTotal, "Agent sessions registered (a renewal opens a new one)."),
		userConnections: d(UserConnectionsTotal, "User connections accepted (each may carry many streams)."),
		sessionsClosed: d(SessionsClosedTotal, "Live agent or user connections the gateway closed because "+
			"their certificate was revoked or expired.", "reason"),
		auditFailures: d(AuditWriteFailuresTotal, "Audit records that could not be written: the write or fsync "+
			"that failed, and every event refused (tokens, enrollments, renewals, new sessions) or lost while "+
			"the audit log was unavailable."),
		claimsRefused: d(AgentClaimsRefusedTotal, "Resources agents announced that are not granted to their "+
			"name, so not routed to them (once per agent session and resource; the audit log has agent.claim_refused)."),
		acmeServer: d(ACMEServerEventsTotal, "Events of the ACME server for internal names, by event (order, "+
			"validation_agent, validation_public, validation_direct, revoked, eab_key, acme_host) and outcome "+
			"(created, refused, error, ok); issuances are in "+CertificatesTotal+"{role=\"server\"}.", "event", "outcome"),
		statements: d(StatementsTotal, "PostgreSQL statements written to the sessions' statement logs, by "+
			"resource and status (ok, error, skipped: not run after an earlier error in its pipeline, "+
			"incomplete: the session ended first).", "resource", "status"),
		auditWritable: d(AuditWritable, "1 while the audit log can be written, 0 while it cannot (access-creating "+
			"events are refused meanwhile, and /readyz reports the audit check)."),
	}
}

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.agentsConnected, c.sessionsActive, c.sessionsTotal, c.streamBytes,
		c.streamOpen, c.handshakes, c.handshakesRefused, c.certificates, c.gatewayExpiry, c.agentExpiry,
		c.acmeFailures, c.agentSessions, c.userConnections, c.sessionsClosed, c.auditFailures, c.auditWritable, c.claimsRefused, c.acmeServer, c.statements} {
		ch <- d
	}
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	s := c.src.Snapshot()
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	counter := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, v, labels...)
	}
	gauge(c.agentsConnected, float64(s.AgentsConnected))
	gauge(c.sessionsActive, float64(s.SessionsActive))
	for _, k := range sortedKeys(s.Streams) {
		counter(c.sessionsTotal, float64(s.Streams[k]), labelValue(k))
	}
	for _, r := range sortedKeys(s.ResourceBytes) {
		b := s.ResourceBytes[r]
		counter(c.streamBytes, float64(b.Up), r, "up")
		counter(c.streamBytes, float64(b.Down), r, "down")
	}
	buckets := make(map[float64]uint64, len(s.StreamOpen.Buckets))
	for ub, n := range s.StreamOpen.Buckets {
		buckets[ub] = n
	}
	ch <- prometheus.MustNewConstHistogram(c.streamOpen, s.StreamOpen.Count, s.StreamOpen.Sum, buckets)
	counter(c.handshakes, float64(s.HandshakesOK))
	refused := map[string]int64{}
	for _, k := range gateway.RefusalReasons() {
		refused[k] = 0
	}
	for k, n := range s.HandshakesRefused {
		refused[k] += n
	}
	for _, k := range sortedKeys(refused) {
		counter(c.handshakesRefused, float64(refused[k]), labelValue(k))
	}
	for k, n := range s.Certificates {
		counter(c.certificates, float64(n), k.Kind, k.Role)
	}
	if !s.GatewayCertExpires.IsZero() {
		gauge(c.gatewayExpiry, s.GatewayCertExpires.Sub(s.Now).Seconds())
	}
	for _, a := range s.AgentCerts {
		gauge(c.agentExpiry, a.Expires.Sub(s.Now).Seconds(), a.Agent)
	}
	counter(c.acmeFailures, float64(s.PublicACMEFailures))
	counter(c.agentSessions, float64(s.AgentSessions))
	counter(c.userConnections, float64(s.UserSessions))
	counter(c.sessionsClosed, float64(s.SessionsClosedRevoked), "revoked")
	counter(c.sessionsClosed, float64(s.SessionsClosedExpired), "expired")
	counter(c.auditFailures, float64(s.AuditWriteFailures))
	counter(c.claimsRefused, float64(s.ClaimsRefused))
	for k, n := range s.ACMEServer {
		counter(c.acmeServer, float64(n), k[0], k[1])
	}
	for k, n := range s.Statements {
		counter(c.statements, float64(n), k[0], k[1])
	}
	writable := 0.0
	if s.AuditWritable {
		writable = 1
	}
	gauge(c.auditWritable, writable)
}

// labelValue turns the gateway's reason texts ("unknown resource") into label values in
// Prometheus' usual style ("unknown_resource").
func labelValue(s string) string {
	return strings.ReplaceAll(strings.TrimSpace(s), " ", "_")
}

func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// NewRegistry returns a registry of its own (never the global default) holding the gateway
// collector and the Go runtime and process collectors.
func NewRegistry(src Source) *prometheus.Registry {
	return NewRuntimeRegistry(NewCollector(src))
}

// NewRuntimeRegistry returns a registry of its own holding cs and the Go runtime and
// process collectors.
func NewRuntimeRegistry(cs ...prometheus.Collector) *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(cs...)
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return reg
}
