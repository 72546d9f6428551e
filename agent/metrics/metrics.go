// Package metrics exports a Wicket agent's state as Prometheus metrics and answers the
// health probes, on the listener of `wicket agent --metrics-listen` (gateway/metrics
// serves them). Values are read from agent.Stats at scrape time.
//
// It must not register in Prometheus' global default registry, must not label anything by
// stream, user or address, and must not export anything secret.
package metrics

import (
	"context"
	"log/slog"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/wicketgw/wicket/agent"
	"github.com/wicketgw/wicket/gateway"
	gwmetrics "github.com/wicketgw/wicket/gateway/metrics"
)

// Metric names, for tests and alert rules.
const (
	SessionsUp        = "wicket_agent_sessions_up"
	ConnectsTotal     = "wicket_agent_connects_total"
	ReconnectsTotal   = "wicket_agent_reconnects_total"
	RenewalsTotal     = "wicket_agent_renewals_total"
	CertExpirySeconds = "wicket_agent_own_certificate_expiry_seconds"
	StreamsTotal      = "wicket_agent_streams_total"
	StreamBytesTotal  = "wicket_agent_stream_bytes_total"
)

type collector struct {
	s   *agent.Stats
	now func() time.Time

	up, connects, reconnects, renewals, expiry, streams, bytes *prometheus.Desc
}

// NewCollector exports s; now is the clock for the expiry gauge (nil: time.Now).
func NewCollector(s *agent.Stats, now func() time.Time) prometheus.Collector {
	if now == nil {
		now = time.Now
	}
	d := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc(name, help, labels, nil)
	}
	return &collector{
		s: s, now: now,
		up:         d(SessionsUp, "Sessions registered with the gateway now: 1 connected, 2 during a renewal, 0 reconnecting."),
		connects:   d(ConnectsTotal, "Sessions established with the gateway, including those opened after a renewal."),
		reconnects: d(ReconnectsTotal, "Waits before a new connection attempt, after a failure or a dropped session."),
		renewals:   d(RenewalsTotal, "Certificate renewal requests, by result (ok, failed).", "result"),
		expiry:     d(CertExpirySeconds, "Seconds until the agent's current certificate expires (negative once expired)."),
		streams:    d(StreamsTotal, "Streams the gateway opened, by outcome (ok, refused, dial_failed).", "outcome"),
		bytes:      d(StreamBytesTotal, "Payload relayed, by direction (to_resource, from_resource), when each stream ends.", "direction"),
	}
}

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.up, c.connects, c.reconnects, c.renewals, c.expiry, c.streams, c.bytes} {
		ch <- d
	}
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	m := func(d *prometheus.Desc, t prometheus.ValueType, v int64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, t, float64(v), labels...)
	}
	s := c.s
	m(c.up, prometheus.GaugeValue, s.SessionsUp.Load())
	m(c.connects, prometheus.CounterValue, s.Connects.Load())
	m(c.reconnects, prometheus.CounterValue, s.Reconnects.Load())
	m(c.renewals, prometheus.CounterValue, s.RenewalsOK.Load(), "ok")
	m(c.renewals, prometheus.CounterValue, s.RenewalsFailed.Load(), "failed")
	if exp := s.CertExpires(); !exp.IsZero() {
		ch <- prometheus.MustNewConstMetric(c.expiry, prometheus.GaugeValue, exp.Sub(c.now()).Seconds())
	}
	m(c.streams, prometheus.CounterValue, s.StreamsOK.Load(), "ok")
	m(c.streams, prometheus.CounterValue, s.StreamsRefused.Load(), "refused")
	m(c.streams, prometheus.CounterValue, s.StreamsDialFailed.Load(), "dial_failed")
	m(c.bytes, prometheus.CounterValue, s.BytesToResource.Load(), "to_resource")
	m(c.bytes, prometheus.CounterValue, s.BytesFromResource.Load(), "from_resource")
}

// Ready reports the agent ready when it has a session with the gateway and a certificate
// that has not expired.
func Ready(s *agent.Stats, now func() time.Time) gwmetrics.ReadyFunc {
	if now == nil {
		now = time.Now
	}
	return func(context.Context) []gateway.Check {
		conn := gateway.Check{Name: "gateway_session", OK: s.SessionsUp.Load() > 0}
		if !conn.OK {
			conn.Error = "no session to the gateway; the agent is reconnecting"
		}
		cert := gateway.Check{Name: "certificate", OK: true}
		if exp := s.CertExpires(); exp.IsZero() || !now().Before(exp) {
			cert.OK, cert.Error = false, "the agent certificate has expired: enroll again with a new token"
		}
		return []gateway.Check{conn, cert}
	}
}

// Listen binds addr for the agent's /metrics, /healthz and /readyz.
func Listen(addr string, s *agent.Stats, logger *slog.Logger) (*gwmetrics.Server, error) {
	return gwmetrics.NewServer(addr, gwmetrics.NewRuntimeRegistry(NewCollector(s, nil)), Ready(s, nil), logger)
}
