package test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"go.uber.org/goleak"
)

// metricsArgs turns on the metrics listener on a free loopback port.
var metricsArgs = []string{"--metrics-listen", "127.0.0.1:0"}

// MetricsAddr is the address the gateway's metrics listener bound, from its log line.
func (g *Gateway) MetricsAddr() string {
	g.h.t.Helper()
	return g.WaitFor(`msg="metrics listening" addr=(\S+)`)[1]
}

// httpGet fetches url without keeping connections (so no goroutine outlives the call) and
// returns the status and body.
func httpGet(t *testing.T, url string) (int, string) {
	t.Helper()
	c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	defer c.CloseIdleConnections()
	res, err := c.Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer res.Body.Close()
	body, err := io.ReadAll(res.Body)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	return res.StatusCode, string(body)
}

// Scrape is one /metrics exposition: series text ("name{labels}") to value, and the
// metric family names of its # TYPE lines.
type Scrape struct {
	Series   map[string]float64
	Families map[string]bool
}

// scrape fetches and parses /metrics from the gateway's metrics listener.
func scrape(t *testing.T, addr string) Scrape {
	t.Helper()
	status, body := httpGet(t, "http://"+addr+"/metrics")
	if status != http.StatusOK {
		t.Fatalf("/metrics answered %d: %s", status, body)
	}
	s := Scrape{Series: map[string]float64{}, Families: map[string]bool{}}
	for _, line := range strings.Split(body, "\n") {
		if rest, ok := strings.CutPrefix(line, "# TYPE "); ok {
			s.Families[strings.Fields(rest)[0]] = true
			continue
		}
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			t.Fatalf("metrics line %q: %v", line, err)
		}
		s.Series[line[:i]] = v
	}
	return s
}

// value returns a series' value, failing the test if it is absent.
func (s Scrape) value(t *testing.T, series string) float64 {
	t.Helper()
	v, ok := s.Series[series]
	if !ok {
		t.Fatalf("no series %s in the scrape", series)
	}
	return v
}

// TestMetricsAfterASession runs the README's path with the metrics listener on and checks
// what a scrape says about it: one agent, one successful session, exactly the bytes sent
// each way, the certificates issued, and the probes answering 200.
func TestMetricsAfterASession(t *testing.T) {
	// Registered first, so it runs after the harness has stopped its processes.
	t.Cleanup(func() { goleak.VerifyNone(t) })
	h := NewHarness(t)
	gw := h.StartGateway(GatewayOptions{Policy: allowAlice, Args: metricsArgs})
	maddr := gw.MetricsAddr()

	before := scrape(t, maddr)
	if v := before.value(t, "wicket_agents_connected"); v != 0 {
		t.Fatalf("wicket_agents_connected = %v before any agent", v)
	}
	h.StartAgent(gw, "db1", "echo="+echoServer(t))
	user := h.Login(gw, "alice")
	_, local := h.Connect(user, "echo")
	const n = 300_000
	if err := transfer(local, n); err != nil {
		t.Fatal(err)
	}

	// The session is counted when the gateway has seen both ends close.
	var s Scrape
	eventually(t, `wicket_sessions_total{outcome="ok"} >= 1`, func() bool {
		s = scrape(t, maddr)
		return s.Series[`wicket_sessions_total{outcome="ok"}`] >= 1
	})
	for series, want := range map[string]float64{
		"wicket_agents_connected":                                     1,
		"wicket_sessions_active":                                      0,
		`wicket_stream_bytes_total{direction="up",resource="echo"}`:   n,
		`wicket_stream_bytes_total{direction="down",resource="echo"}`: n,
		`wicket_certificates_total{kind="issued",role="agent"}`:       1,
		`wicket_certificates_total{kind="issued",role="user"}`:        1,
		"wicket_stream_open_seconds_count":                            1,
		`wicket_sessions_total{outcome="ok"}`:                         1,
	} {
		if got := s.value(t, series); got != want {
			t.Errorf("%s = %v, want %v", series, got, want)
		}
	}
	if v := s.value(t, `wicket_agent_certificate_expiry_seconds{agent="db1"}`); v <= 0 || v > 3600 {
		t.Errorf("agent certificate expiry = %v s, want within the 1 h lifetime", v)
	}
	if v := s.value(t, "wicket_gateway_certificate_expiry_seconds"); v <= 20*3600 || v > 24*3600 {
		t.Errorf("gateway certificate expiry = %v s, want close to 24 h", v)
	}
	if v := s.value(t, "wicket_tls_handshakes_total"); v < 3 {
		t.Errorf("wicket_tls_handshakes_total = %v, want at least the enrollments, agent and user", v)
	}
	if !s.Families["go_goroutines"] || !s.Families["process_open_fds"] {
		t.Error("the Go runtime or process collectors are missing")
	}
	// Bounded labels: Wicket's series use only the documented label names, and no label
	// value is a user name.
	labelName := regexp.MustCompile(`([a-z_]+)="`)
	allowed := []string{"outcome", "resource", "direction", "reason", "kind", "role", "agent", "le"}
	for series := range s.Series {
		if !strings.HasPrefix(series, "wicket_") {
			continue
		}
		for _, m := range labelName.FindAllStringSubmatch(series, -1) {
			if !slices.Contains(allowed, m[1]) {
				t.Errorf("series %s has label %q, not one of %v", series, m[1], allowed)
			}
		}
		if strings.Contains(series, `"alice"`) {
			t.Errorf("series %s is labelled with a user name", series)
		}
	}

	for _, probe := range []string{"/healthz", "/readyz"} {
		if status, body := httpGet(t, "http://"+maddr+probe); status != http.StatusOK {
			t.Errorf("%s answered %d: %s", probe, status, body)
		}
	}
}

// TestReadyzWhenTheDatabaseGoesAway runs a gateway on PostgreSQL, makes its database refuse
// connections, and checks that /readyz turns 503 naming the database check (while /healthz
// stays 200), then 200 again once the database is back.
func TestReadyzWhenTheDatabaseGoesAway(t *testing.T) {
	// Registered first, so it runs after the harness has stopped its processes.
	t.Cleanup(func() { goleak.VerifyNone(t) })
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	admin, err := pgx.Connect(ctx, "postgresql://postgres@127.0.0.1:5432/postgres?sslmode=disable")
	if err != nil {
		t.Fatalf("PostgreSQL at 127.0.0.1:5432 is needed for this test: %v", err)
	}
	defer admin.Close(context.Background())
	db := fmt.Sprintf("wicket_readyz_%d", time.Now().UnixNano())
	exec := func(sql string) {
		t.Helper()
		if _, err := admin.Exec(ctx, sql); err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
	}
	exec("CREATE DATABASE " + db)
	defer func() {
		// The gateway has stopped by now (the harness cleanup ran first is not guaranteed,
		// so FORCE ends any connection left).
		_, _ = admin.Exec(context.Background(), "DROP DATABASE IF EXISTS "+db+" WITH (FORCE)")
	}()

	h := NewHarness(t)
	gw := h.StartGateway(GatewayOptions{Args: append([]string{"--db",
		"postgresql://postgres@127.0.0.1:5432/" + db + "?sslmode=disable"}, metricsArgs...)})
	defer gw.Stop()
	maddr := gw.MetricsAddr()
	ready := func() (int, readyBody) {
		status, body := httpGet(t, "http://"+maddr+"/readyz")
		var rb readyBody
		if err := json.Unmarshal([]byte(body), &rb); err != nil {
			t.Fatalf("/readyz body %q: %v", body, err)
		}
		return status, rb
	}
	if status, rb := ready(); status != http.StatusOK {
		t.Fatalf("/readyz answered %d %+v with the database up", status, rb)
	}

	exec("ALTER DATABASE " + db + " ALLOW_CONNECTIONS false")
	exec("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '" + db + "' AND pid <> pg_backend_pid()")
	var last readyBody
	eventually(t, "/readyz 503 naming the database", func() bool {
		status, rb := ready()
		last = rb
		return status == http.StatusServiceUnavailable && slices.Contains(rb.Failed, "database")
	})
	if slices.Contains(last.Failed, "ca") || slices.Contains(last.Failed, "listener") {
		t.Errorf("/readyz failed more than the database: %+v", last)
	}
	if status, _ := httpGet(t, "http://"+maddr+"/healthz"); status != http.StatusOK {
		t.Errorf("/healthz answered %d while only the database is down", status)
	}

	exec("ALTER DATABASE " + db + " ALLOW_CONNECTIONS true")
	eventually(t, "/readyz 200 once the database is back", func() bool {
		status, _ := ready()
		return status == http.StatusOK
	})
}

// readyBody is the JSON of /readyz.
type readyBody struct {
	Status string   `json:"status"`
	Failed []string `json:"failed"`
	Checks []struct {
		Name  string `json:"name"`
		OK    bool   `json:"ok"`
		Error string `json:"error"`
	} `json:"checks"`
}

// TestAgentMetrics runs an agent with its own metrics listener through one session and
// checks its scrape and probes, then stops the gateway and sees the agent turn not ready.
func TestAgentMetrics(t *testing.T) {
	t.Cleanup(func() { goleak.VerifyNone(t) })
	h := NewHarness(t)
	gw := h.StartGateway(GatewayOptions{Policy: allowAlice})
	ag := h.StartAgentWith(gw.AgentToken("db1", []string{"echo"}), h.Dir("agent-db1"), metricsArgs, "echo="+echoServer(t))
	gw.WaitAgentOnline("db1", "echo")
	maddr := ag.WaitFor(`msg="metrics listening" addr=(\S+)`)[1]

	user := h.Login(gw, "alice")
	_, local := h.Connect(user, "echo")
	const n = 123_456
	if err := transfer(local, n); err != nil {
		t.Fatal(err)
	}
	var s Scrape
	eventually(t, `wicket_agent_streams_total{outcome="ok"} 1`, func() bool {
		s = scrape(t, maddr)
		return s.Series[`wicket_agent_streams_total{outcome="ok"}`] == 1
	})
	for series, want := range map[string]float64{
		"wicket_agent_sessions_up":                                   1,
		"wicket_agent_connects_total":                                1,
		`wicket_agent_stream_bytes_total{direction="to_resource"}`:   n,
		`wicket_agent_stream_bytes_total{direction="from_resource"}`: n,
		`wicket_agent_renewals_total{result="failed"}`:               0,
	} {
		if got := s.value(t, series); got != want {
			t.Errorf("%s = %v, want %v", series, got, want)
		}
	}
	if v := s.value(t, "wicket_agent_own_certificate_expiry_seconds"); v <= 0 || v > 3600 {
		t.Errorf("agent certificate expiry = %v s, want within the 1 h lifetime", v)
	}
	if status, body := httpGet(t, "http://"+maddr+"/readyz"); status != http.StatusOK {
		t.Fatalf("agent /readyz answered %d: %s", status, body)
	}

	if err := gw.Stop(); err != nil {
		t.Fatalf("gateway stop: %v", err)
	}
	eventually(t, "agent /readyz 503 without a gateway", func() bool {
		status, body := httpGet(t, "http://"+maddr+"/readyz")
		return status == http.StatusServiceUnavailable && strings.Contains(body, "gateway_session")
	})
	if v := scrape(t, maddr).value(t, "wicket_agent_sessions_up"); v != 0 {
		t.Errorf("wicket_agent_sessions_up = %v after the gateway stopped", v)
	}
}
