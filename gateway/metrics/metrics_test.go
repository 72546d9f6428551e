package metrics

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/wicketgw/wicket/gateway"
	"go.uber.org/goleak"
)

type fakeSource struct {
	snap   gateway.Snapshot
	checks []gateway.Check
}

func (f *fakeSource) Snapshot() gateway.Snapshot            { return f.snap }
func (f *fakeSource) Ready(context.Context) []gateway.Check { return f.checks }
func quiet() *slog.Logger                                   { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func TestCollectorExportsSnapshot(t *testing.T) {
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	src := &fakeSource{snap: gateway.Snapshot{
		Counters: gateway.Counters{
			HandshakesOK:      7,
			HandshakesRefused: map[string]int64{"certificate revoked": 2},
			Streams:           map[string]int64{"ok": 3, "unknown resource": 1},
		},
		Now:                now,
		AgentsConnected:    1,
		SessionsActive:     2,
		ResourceBytes:      map[string]gateway.ResourceBytes{"pg": {Up: 10, Down: 20}},
		StreamOpen:         gateway.Histogram{Count: 1, Sum: 0.002, Buckets: map[float64]uint64{0.001: 0, 0.0025: 1}},
		Certificates:       map[gateway.CertCount]int64{{Kind: "issued", Role: "agent"}: 4},
		GatewayCertExpires: now.Add(time.Hour),
		AgentCerts:         []gateway.AgentExpiry{{Agent: "db1", Expires: now.Add(10 * time.Minute)}},
		AuditWriteFailures: 5,
		ACMEServer:         map[[2]string]int64{{"validation_agent", "ok"}: 6},
		Statements:         map[[2]string]int64{{"pg", "skipped"}: 7},
	}}
	reg := NewRegistry(src)
	for name, want := range map[string]float64{
		`wicket_sessions_total{outcome="unknown_resource"}`:                      1,
		`wicket_sessions_total{outcome="ok"}`:                                    3,
		`wicket_tls_handshakes_refused_total{reason="certificate_revoked"}`:      2,
		`wicket_stream_bytes_total{direction="down",resource="pg"}`:              20,
		`wicket_certificates_total{kind="issued",role="agent"}`:                  4,
		`wicket_agents_connected`:                                                1,
		`wicket_sessions_active`:                                                 2,
		`wicket_audit_write_failures_total`:                                      5,
		`wicket_audit_writable`:                                                  0,
		`wicket_acme_server_events_total{event="validation_agent",outcome="ok"}`: 6,
		`wicket_statements_total{resource="pg",status="skipped"}`:                7,
	} {
		got, ok := scrapeValue(t, reg, name)
		if !ok || got != want {
			t.Errorf("%s = %v (present %v), want %v", name, got, ok, want)
		}
	}
}

// scrapeValue finds one series in the text exposition of reg.
func scrapeValue(t *testing.T, reg *prometheus.Registry, series string) (float64, bool) {
	t.Helper()
	rec := httptest.NewRecorder()
	promhttp.HandlerFor(reg, promhttp.HandlerOpts{}).ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	for _, line := range strings.Split(rec.Body.String(), "\n") {
		if v, ok := strings.CutPrefix(line, series+" "); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				t.Fatalf("series %s: %v", series, err)
			}
			return f, true
		}
	}
	return 0, false
}

func TestReadyzNamesTheFailedCheck(t *testing.T) {
	t.Cleanup(func() {
		goleak.VerifyNone(t, goleak.IgnoreTopFunction("github.com/golang/glog.(*fileSink).flushDaemon"))
	})
	src := &fakeSource{checks: []gateway.Check{{Name: "ca", OK: true}, {Name: "database", Error: "the CA database does not answer"}}}
	srv := httptest.NewServer(Handler(src, NewRegistry(src), quiet()))
	defer srv.Close()

	res, err := http.Get(srv.URL + "/readyz")
	if err != nil {
		t.Fatal(err)
	}
	var h Health
	err = json.NewDecoder(res.Body).Decode(&h)
	res.Body.Close()
	if err != nil {
		t.Fatal(err)
	}
	if res.StatusCode != http.StatusServiceUnavailable || h.Status != "not ready" || len(h.Failed) != 1 || h.Failed[0] != "database" {
		t.Fatalf("readyz = %d %+v, want 503 naming database", res.StatusCode, h)
	}

	src.checks[1] = gateway.Check{Name: "database", OK: true}
	res, err = http.Get(srv.URL + "/readyz")
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	if res.StatusCode != http.StatusOK {
		t.Fatalf("readyz = %d with every check OK, want 200", res.StatusCode)
	}
	res, err = http.Get(srv.URL + "/healthz")
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	if res.StatusCode != http.StatusOK {
		t.Fatalf("healthz = %d, want 200", res.StatusCode)
	}
	srv.CloseClientConnections()
}
