package gateway

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/wicketgw/wicket/ca"
	"github.com/wicketgw/wicket/gateway/audit"
	"github.com/wicketgw/wicket/tunnel"
)

// Goroutines of dependencies that offer no way to stop them (see gateway/public's
// harness_test.go for the certmagic ones):
//   - glog (pulled in by step-ca) starts a flush daemon in its init;
//   - certmagic keeps one rate limiter per ACME CA and account in a package-level map for ever;
//   - certmagic's file storage refreshes a lock file every 5 s in a goroutine that ends at its
//     next wake-up once the lock file is gone.
var leakOpts = []goleak.Option{
	goleak.IgnoreTopFunction("github.com/golang/glog.(*fileSink).flushDaemon"),
	goleak.IgnoreAnyFunction("github.com/caddyserver/certmagic.(*RingBufferRateLimiter).loop"),
	goleak.IgnoreAnyFunction("github.com/caddyserver/certmagic.keepLockfileFresh"),
}

func TestMain(m *testing.M) {
	auditNoSyncForTests = true
	goleak.VerifyTestMain(m, leakOpts...)
}

// checkLeaks fails the test if a goroutine it started is still running once all its
// cleanups (registered later, so run earlier) are done.
func checkLeaks(t *testing.T) {
	t.Cleanup(func() { goleak.VerifyNone(t, leakOpts...) })
}

func jsonUnmarshal(b []byte, v any) error { return json.Unmarshal(b, v) }

func TestAgentRegistersAndUserStreamIsRelayed(t *testing.T) {
	checkLeaks(t)
	tg := startGateway(t, nil)
	echo := echoServer(t)

	agent, err := tg.connectAgent(tg.enroll(ca.RoleAgent, "db1"), "inst-1", map[string]string{"echo": echo})
	if err != nil {
		t.Fatalf("agent connect: %v", err)
	}
	if agent.ack.Name != gatewayID || agent.ack.Instance == "" {
		t.Fatalf("gateway hello = %+v, want name %q and a session id", agent.ack, gatewayID)
	}
	list := tg.Registry().List()
	if len(list) != 1 || list[0].Name != "db1" || list[0].Status != "online" || !slices.Equal(list[0].Resources, []string{"echo"}) {
		t.Fatalf("registry = %+v", list)
	}

	user := tg.dialUser("alice")
	st, err := openStream(user, "echo")
	if err != nil {
		t.Fatalf("open stream: %v", err)
	}
	// The session shows up in the sessions table while it is open.
	if !eventually(5*time.Second, func() bool {
		s := tg.Sessions()
		return len(s) == 1 && s[0].User == "alice" && s[0].Agent == "db1" && s[0].Resource == "echo"
	}) {
		t.Fatalf("sessions = %+v", tg.Sessions())
	}
	payload := make([]byte, 1<<20)
	_, _ = rand.Read(payload)
	writeErr := make(chan error, 1)
	go func() {
		_, err := st.Write(payload)
		if err == nil {
			err = st.CloseWrite()
		}
		writeErr <- err
	}()
	got, err := io.ReadAll(st)
	if err != nil {
		t.Fatalf("read echo: %v", err)
	}
	if err := <-writeErr; err != nil {
		t.Fatalf("write: %v", err)
	}
	st.Close()
	if !bytes.Equal(got, payload) {
		t.Fatalf("echoed %d bytes, want the %d sent, identical", len(got), len(payload))
	}
	ended := tg.waitAudit("session.ended", func(r audit.Record) bool { return r.Type == audit.TypeSessionEnded })
	if ended.User != "alice" || ended.Agent != "db1" || ended.Resource != "echo" ||
		ended.BytesUp != int64(len(payload)) || ended.BytesDown != int64(len(payload)) || ended.Outcome != audit.OutcomeOK {
		t.Fatalf("session.ended = %+v", ended)
	}
	tg.waitAudit("agent.connected", func(r audit.Record) bool {
		return r.Type == audit.TypeAgentConnected && r.Agent == "db1" && r.TLSVersion == "TLS 1.3"
	})
	tg.waitAudit("session.started", func(r audit.Record) bool { return r.Type == audit.TypeSessionStarted && r.SessionID == ended.SessionID })
	if c := tg.Counters(); c.BytesUp != int64(len(payload)) || c.Streams["ok"] != 1 {
		t.Fatalf("counters = %+v", c)
	}
	// The gateway's own server certificate, issued at start, is counted and audited too.
	if n := tg.Snapshot().Certificates[CertCount{Kind: "issued", Role: "gateway"}]; n != 1 {
		t.Fatalf("certificates issued to the gateway = %d, want 1", n)
	}
	tg.waitAudit("cert.issued for the gateway", func(r audit.Record) bool {
		return r.Type == audit.TypeCertIssued && r.Extra["certificate"] == "gateway server certificate" && r.Serial != ""
	})

	agent.close()
	tg.waitAudit("agent.disconnected", func(r audit.Record) bool { return r.Type == audit.TypeAgentDisconnected && r.Agent == "db1" })
	if l := tg.Registry().List(); len(l) != 1 || l[0].Status != "offline" {
		t.Fatalf("after disconnect registry = %+v", l)
	}
	// An offline agent's resource is unavailable, with a reason naming it.
	_, err = openStream(user, "echo")
	if s, reason, ok := replyStatus(err); !ok || s != tunnel.StatusUnavailable || !strings.Contains(reason, "db1") {
		t.Fatalf("stream to offline agent: err = %v", err)
	}
	user.Close()
	tg.stop()
}

// TestAgentOpenedStreams covers the streams an agent opens after its hello: a data stream is
// refused, a new control stream with a later Hello replaces the resources (and is audited),
// and neither disturbs the session or a user's stream through it.
func TestAgentOpenedStreams(t *testing.T) {
	checkLeaks(t)
	tg := startGateway(t, nil)
	echo := echoServer(t)
	agent, err := tg.connectAgent(tg.enroll(ca.RoleAgent, "db1"), "inst-1", map[string]string{"echo": echo})
	if err != nil {
		t.Fatalf("agent connect: %v", err)
	}

	_, err = openStream(agent.sess, "echo")
	if s, reason, ok := replyStatus(err); !ok || s != tunnel.StatusRefused || !strings.Contains(reason, "may not open data streams") {
		t.Fatalf("data stream from the agent: err = %v, want refused", err)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, _, err := tg.grants.change("db1", []string{"web"}, true); err != nil {
		t.Fatal(err)
	}
	ctl, err := agent.sess.OpenControl(ctx)
	if err != nil {
		t.Fatalf("second control stream: %v", err)
	}
	if err := ctl.Send(tunnel.Hello{Name: "db1", Instance: "inst-1", Version: "v2", Resources: []string{"web", "echo", "bad name!"}}); err != nil {
		t.Fatal(err)
	}
	ctl.Close()
	upd := tg.waitAudit("agent.updated", func(r audit.Record) bool { return r.Type == audit.TypeAgentUpdated })
	if upd.Agent != "db1" || upd.Extra["resources"] != "[echo web]" || upd.Extra["version"] != "v2" {
		t.Fatalf("agent.updated = %+v", upd)
	}
	if l := tg.Registry().List(); len(l) != 1 || !slices.Equal(l[0].Resources, []string{"echo", "web"}) || l[0].Version != "v2" {
		t.Fatalf("registry after the later hello = %+v", l)
	}
	// Each later hello is audited, so an agent may not open them without limit: after a burst
	// of five streams (two so far) the next is refused.
	for i := range 4 {
		ctl, err := agent.sess.OpenControl(ctx)
		if i == 3 {
			if s, reason, ok := replyStatus(err); !ok || s != tunnel.StatusRefused || !strings.Contains(reason, "too many streams") {
				t.Fatalf("stream beyond the burst: %v", err)
			}
			break
		}
		if err != nil {
			t.Fatalf("later hello %d within the burst: %v", i, err)
		}
		if err := ctl.Send(tunnel.Hello{Name: "db1", Instance: "inst-1", Version: "v2", Resources: []string{"web", "echo"}}); err != nil {
			t.Fatal(err)
		}
		ctl.Close()
	}

	// The session still carries user streams.
	user := tg.dialUser("alice")
	echoOnce(t, user, "echo", "ping")
	user.Close()
	agent.close()
	tg.stop()
}

func TestStreamRefusals(t *testing.T) {
	checkLeaks(t)
	tg := startGateway(t, nil)
	echo := echoServer(t)
	tg.mustAgent("db1", map[string]string{"echo": echo, "down": closedPort(t)})
	bob := tg.dialUser("bob")
	alice := tg.dialUser("alice")

	cases := []struct {
		name   string
		sess   *tunnel.Session
		res    string
		status tunnel.Status
		reason string
	}{
		{"policy deny", bob, "echo", tunnel.StatusRefused, "policy does not allow user bob to reach resource echo"},
		{"no agent", alice, "nope", tunnel.StatusUnknownResource, "no connected agent exposes resource nope"},
		{"agent dial failed", alice, "down", tunnel.StatusDialFailed, "connection refused"},
	}
	for _, c := range cases {
		_, err := openStream(c.sess, c.res)
		s, reason, ok := replyStatus(err)
		if !ok || s != c.status || !strings.Contains(reason, c.reason) {
			t.Errorf("%s: err = %v, want status %v with %q", c.name, err, c.status, c.reason)
		}
	}
	tg.waitAudit("session.denied for bob", func(r audit.Record) bool {
		return r.Type == audit.TypeSessionDenied && r.User == "bob" && r.Outcome == audit.OutcomeDenied && r.Resource == "echo"
	})
	tg.waitAudit("session.denied dial failed", func(r audit.Record) bool {
		return r.Type == audit.TypeSessionDenied && r.Agent == "db1" && strings.Contains(r.Reason, "connection refused")
	})
	// The refusals did not disturb the working path.
	echoOnce(t, alice, "echo", "ping")
	bob.Close()
	alice.Close()
	tg.stop()
}

func TestWrongRoleRefusedInHandshake(t *testing.T) {
	checkLeaks(t)
	tg := startGateway(t, nil)
	userCreds := tg.enroll(ca.RoleUser, "alice")
	agentCreds := tg.enroll(ca.RoleAgent, "db1")

	// A user certificate on the agent ALPN: the session never comes up.
	if a, err := tg.connectAgent(userCreds, "i", map[string]string{"echo": "127.0.0.1:1"}); err == nil {
		a.close()
		t.Fatal("user certificate accepted on the agent ALPN")
	}
	// An agent certificate on the client ALPN: no stream can be opened.
	if sess, err := tg.dial(tunnel.ALPNClient, agentCreds); err == nil {
		_, err = openStream(sess, "echo")
		sess.Close()
		if err == nil {
			t.Fatal("agent certificate accepted on the client ALPN")
		}
	}
	if !eventually(5*time.Second, func() bool { return tg.Counters().HandshakesRefused[refusedWrongRole] == 2 }) {
		t.Fatalf("refused = %v, want 2 %q", tg.Counters().HandshakesRefused, refusedWrongRole)
	}
	r := tg.waitAudit("tls.refused wrong role", func(r audit.Record) bool {
		return r.Type == audit.TypeTLSRefused && r.Reason == refusedWrongRole
	})
	if r.Remote == "" {
		t.Fatalf("tls.refused without remote address: %+v", r)
	}
	if len(tg.Registry().List()) != 0 {
		t.Fatalf("a refused agent was registered: %+v", tg.Registry().List())
	}
	tg.stop()
}

func TestHandshakeRefusals(t *testing.T) {
	checkLeaks(t)
	tg := startGateway(t, func(c *Config) { c.HandshakeTimeout = 300 * time.Millisecond })
	pool := tg.Authority().RootPool()
	host, _, _ := net.SplitHostPort(tg.PublicAddr())
	handshake := func(c *tls.Config) error {
		conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", tg.Addr().String(), c)
		if err != nil {
			return err
		}
		defer conn.Close()
		// TLS 1.3 clients learn about a refused client certificate on their first read.
		_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err = conn.Read(make([]byte, 1))
		return err
	}
	// TLS 1.2 only.
	// The refusals send the alert that names them (issue 10, item 11), not internal_error.
	if err := handshake(&tls.Config{RootCAs: pool, ServerName: host, MaxVersion: tls.VersionTLS12, NextProtos: []string{"h2"}}); err == nil {
		t.Error("TLS 1.2 handshake accepted")
	} else if !strings.Contains(err.Error(), "protocol version") {
		t.Errorf("TLS 1.2 handshake: %v, want the alert protocol_version", err)
	}
	if err := handshake(&tls.Config{RootCAs: pool, ServerName: host, MaxVersion: tls.VersionTLS12, NextProtos: []string{"smtp"}}); err == nil ||
		!strings.Contains(err.Error(), "protocol version") {
		t.Errorf("TLS 1.2 handshake with an unknown ALPN: %v, want the alert protocol_version", err)
	}
	// No client certificate on the agent ALPN.
	_ = handshake(&tls.Config{RootCAs: pool, ServerName: host, NextProtos: []string{tunnel.ALPNAgent}})
	// An ALPN nobody serves.
	if err := handshake(&tls.Config{RootCAs: pool, ServerName: host, NextProtos: []string{"smtp"}}); err == nil {
		t.Error("unknown ALPN accepted")
	} else if !strings.Contains(err.Error(), "no application protocol") {
		t.Errorf("unknown ALPN: %v, want the alert no_application_protocol", err)
	}
	// A peer that connects and says nothing.
	c, err := net.Dial("tcp", tg.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, _ = c.Read(make([]byte, 1)) // returns when the gateway gives up
	c.Close()

	want := []string{refusedVersion, refusedNoCert, refusedBadALPN, refusedTimeout}
	if !eventually(5*time.Second, func() bool {
		got := tg.Counters().HandshakesRefused
		for _, w := range want {
			if got[w] < 1 {
				return false
			}
		}
		return true
	}) {
		t.Fatalf("refused = %v, want each of %q", tg.Counters().HandshakesRefused, want)
	}
	for _, w := range want {
		tg.waitAudit("tls.refused "+w, func(r audit.Record) bool { return r.Type == audit.TypeTLSRefused && r.Reason == w })
	}
	tg.stop()
}

func TestCAAPIOverHTTP2(t *testing.T) {
	checkLeaks(t)
	tg := startGateway(t, nil)
	host, _, _ := net.SplitHostPort(tg.PublicAddr())
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: tg.Authority().RootPool(), ServerName: host}, ForceAttemptHTTP2: true}
	defer tr.CloseIdleConnections()
	resp, err := (&http.Client{Transport: tr, Timeout: 10 * time.Second}).Get("https://" + tg.Addr().String() + "/roots")
	if err != nil {
		t.Fatalf("GET /roots: %v", err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode/100 != 2 || resp.ProtoMajor != 2 || !strings.Contains(string(body), "BEGIN CERTIFICATE") {
		t.Fatalf("GET /roots: %s %s %s", resp.Proto, resp.Status, body)
	}
	tr.CloseIdleConnections()
	tg.stop()
}

func TestRevokeClosesLiveSessionAndRefusesReconnect(t *testing.T) {
	checkLeaks(t)
	tg := startGateway(t, nil)
	echo := echoServer(t)
	creds := tg.enroll(ca.RoleAgent, "db1")
	agent, err := tg.connectAgent(creds, "i", map[string]string{"echo": echo})
	if err != nil {
		t.Fatal(err)
	}
	user := tg.dialUser("alice")
	st, err := openStream(user, "echo")
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()

	admin := NewAdminClient(tg.dir)
	defer admin.Close()
	start := time.Now()
	res, err := admin.RevokeAgent(context.Background(), "db1")
	if err != nil {
		t.Fatalf("revoke: %v", err)
	}
	if len(res.RevokedSerials) != 1 || res.RevokedSerials[0] != creds.Chain[0].SerialNumber.String() || res.ClosedSessions != 1 {
		t.Fatalf("revoke result = %+v", res)
	}
	select {
	case <-agent.sess.Done():
		t.Logf("agent session closed %v after the revoke request was sent", time.Since(start))
	case <-time.After(time.Second - time.Since(start)):
		t.Fatal("agent session still open 1s after revocation")
	}
	select {
	case why := <-agent.closing:
		if why != reasonRevoked {
			t.Fatalf("closing message %q", why)
		}
	case <-time.After(time.Second):
		t.Fatal("the agent was not told why its session closed")
	}
	// The user's in-flight stream through that agent ends too.
	_ = st.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadAll(st); err != nil && errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatal("user stream through the revoked agent still open")
	}
	// Reconnecting with the revoked certificate is refused.
	if a, err := tg.connectAgent(creds, "i", map[string]string{"echo": echo}); err == nil {
		a.close()
		t.Fatal("revoked agent reconnected")
	}
	tg.waitAudit("cert.revoked", func(r audit.Record) bool {
		return r.Type == audit.TypeCertRevoked && r.Agent == "db1" && r.Serial == res.RevokedSerials[0]
	})
	tg.waitAudit("agent.disconnected revoked", func(r audit.Record) bool {
		return r.Type == audit.TypeAgentDisconnected && r.Reason == reasonRevoked
	})
	tg.waitAudit("tls.refused revoked", func(r audit.Record) bool {
		return r.Type == audit.TypeTLSRefused && r.Reason == refusedRevoked
	})
	// Revoking a user closes their session the same way.
	ures, err := admin.RevokeUser(context.Background(), "alice")
	if err != nil || ures.ClosedSessions != 1 {
		t.Fatalf("revoke user: %+v, %v", ures, err)
	}
	select {
	case <-user.Done():
	case <-time.After(time.Second):
		t.Fatal("user session still open 1s after revocation")
	}
	// Nothing to revoke: 404 with a sentence.
	_, err = admin.RevokeAgent(context.Background(), "ghost")
	if !errors.Is(err, ErrNotFound) {
		t.Fatalf("revoke ghost: %v", err)
	}
	tg.stop()
}

func TestRevocationByAnotherPathIsSwept(t *testing.T) {
	checkLeaks(t)
	tg := startGateway(t, nil)
	creds := tg.enroll(ca.RoleAgent, "db1")
	agent, err := tg.connectAgent(creds, "i", map[string]string{"echo": "127.0.0.1:1"})
	if err != nil {
		t.Fatal(err)
	}
	// Authority.Revoke also fires OnRevoke; the sweep is the net under it. Either must close
	// the session within a second.
	if err := tg.Authority().Revoke(context.Background(), creds.Chain[0].SerialNumber.String(), "test"); err != nil {
		t.Fatal(err)
	}
	select {
	case <-agent.sess.Done():
	case <-time.After(time.Second):
		t.Fatal("agent session still open 1s after revocation")
	}
	tg.stop()
}

func TestCertificateExpiryClosesSession(t *testing.T) {
	checkLeaks(t)
	tg := startGateway(t, func(c *Config) { c.AgentLifetime = 5 * time.Minute })
	creds := tg.enroll(ca.RoleAgent, "db1")
	if life := creds.Chain[0].NotAfter.Sub(creds.Chain[0].NotBefore); life > 10*time.Minute {
		t.Fatalf("agent certificate lifetime %v, want about 5m", life)
	}
	agent, err := tg.connectAgent(creds, "i", map[string]string{"echo": "127.0.0.1:1"})
	if err != nil {
		t.Fatal(err)
	}
	tg.clock.Advance(4 * time.Minute)
	select {
	case <-agent.sess.Done():
		t.Fatal("session closed before its certificate expired")
	default:
	}
	tg.clock.Advance(2 * time.Minute)
	select {
	case <-agent.sess.Done():
	case <-time.After(time.Second):
		t.Fatal("session still open after its certificate expired")
	}
	tg.waitAudit("agent.disconnected expired", func(r audit.Record) bool {
		return r.Type == audit.TypeAgentDisconnected && r.Reason == reasonExpired
	})
	if c := tg.Counters(); c.SessionsClosedExpired != 1 {
		t.Fatalf("counters = %+v", c)
	}
	// The expired certificate cannot open a new session.
	if a, err := tg.connectAgent(creds, "i", map[string]string{"echo": "127.0.0.1:1"}); err == nil {
		a.close()
		t.Fatal("expired certificate accepted")
	}
	tg.stop()
}

func TestSameNameInstancesShareAndRenewalDrains(t *testing.T) {
	checkLeaks(t)
	tg := startGateway(t, nil)
	echo := echoServer(t)
	a1, err := tg.connectAgent(tg.enroll(ca.RoleAgent, "db"), "inst-1", map[string]string{"echo": echo})
	if err != nil {
		t.Fatal(err)
	}
	a2, err := tg.connectAgent(tg.enroll(ca.RoleAgent, "db"), "inst-2", map[string]string{"echo": echo})
	if err != nil {
		t.Fatal(err)
	}
	user := tg.dialUser("alice")
	roundTrip := func() {
		t.Helper()
		st, err := openStream(user, "echo")
		if err != nil {
			t.Fatalf("open: %v", err)
		}
		defer st.Close()
		if _, err := st.Write([]byte("x")); err != nil {
			t.Fatal(err)
		}
		b := make([]byte, 1)
		if _, err := io.ReadFull(st, b); err != nil {
			t.Fatal(err)
		}
	}
	for range 4 {
		roundTrip()
	}
	if a1.servedCount() != 2 || a2.servedCount() != 2 {
		t.Fatalf("streams served: %d and %d, want 2 and 2", a1.servedCount(), a2.servedCount())
	}
	if l := tg.Registry().List(); len(l) != 1 || l[0].Instances != 2 || l[0].Sessions != 2 {
		t.Fatalf("registry = %+v", l)
	}

	// Make-before-break: instance 1 renews, opens a new session, then drains the old one.
	old := a1
	st, err := openStream(user, "echo") // lands on a1 (round-robin turn) and stays open
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	if a1.servedCount() != 3 {
		t.Fatalf("expected the held stream on instance 1, counts %d/%d", a1.servedCount(), a2.servedCount())
	}
	a1new, err := tg.connectAgent(tg.enroll(ca.RoleAgent, "db"), "inst-1", map[string]string{"echo": echo})
	if err != nil {
		t.Fatal(err)
	}
	if err := old.sess.GoAway(); err != nil {
		t.Fatal(err)
	}
	for range 4 {
		roundTrip()
	}
	if old.servedCount() != 3 || a1new.servedCount() != 2 || a2.servedCount() != 4 {
		t.Fatalf("after renewal: old %d, new %d, other %d; want 3, 2, 4", old.servedCount(), a1new.servedCount(), a2.servedCount())
	}
	// The stream on the draining session still works.
	if _, err := st.Write([]byte("still")); err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 5)
	if _, err := io.ReadFull(st, b); err != nil || string(b) != "still" {
		t.Fatalf("draining stream: %q %v", b, err)
	}
	st.Close()
	user.Close()
	tg.stop()
}

func TestGracefulDrain(t *testing.T) {
	checkLeaks(t)
	tg := startGateway(t, func(c *Config) { c.GracePeriod = 10 * time.Second })
	echo := echoServer(t)
	tg.mustAgent("db1", map[string]string{"echo": echo})
	user := tg.dialUser("alice")
	st, err := openStream(user, "echo")
	if err != nil {
		t.Fatal(err)
	}
	tg.cancel()
	// New streams are refused while the open one keeps flowing.
	if !eventually(5*time.Second, func() bool {
		extra, err := openStream(user, "echo")
		if err == nil {
			// Opened before the gateway saw the cancel: it would hold the drain open.
			extra.Close()
			return false
		}
		s, _, ok := replyStatus(err)
		return ok && s == tunnel.StatusUnavailable
	}) {
		t.Fatal("new streams still accepted while draining")
	}
	if _, err := st.Write([]byte("drain")); err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 5)
	if _, err := io.ReadFull(st, b); err != nil || string(b) != "drain" {
		t.Fatalf("stream during drain: %q %v", b, err)
	}
	select {
	case err := <-tg.runErr:
		t.Fatalf("Run returned (%v) while a stream was open", err)
	default:
	}
	// The new listener is closed.
	if c, err := net.DialTimeout("tcp", tg.Addr().String(), time.Second); err == nil {
		c.Close()
		t.Fatal("listener still accepting while draining")
	}
	start := time.Now()
	_ = st.CloseWrite()
	_, _ = io.ReadAll(st)
	st.Close()
	select {
	case err := <-tg.runErr:
		if err != nil {
			t.Fatal(err)
		}
		tg.runErr <- nil // for stop()
	case <-time.After(5 * time.Second):
		t.Fatal("Run did not return after the last stream ended")
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Fatalf("Run took %v after the last stream", d)
	}
	user.Close()
	tg.stop()
}

func TestGracePeriodCutsLongStreams(t *testing.T) {
	checkLeaks(t)
	tg := startGateway(t, func(c *Config) { c.GracePeriod = 300 * time.Millisecond })
	echo := echoServer(t)
	tg.mustAgent("db1", map[string]string{"echo": echo})
	user := tg.dialUser("alice")
	st, err := openStream(user, "echo")
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	tg.stop() // returns within the grace period plus closing time
	tg.waitAudit("session.ended at shutdown", func(r audit.Record) bool {
		return r.Type == audit.TypeSessionEnded && r.Outcome == audit.OutcomeError
	})
}

func TestAdminAPI(t *testing.T) {
	checkLeaks(t)
	tg := startGateway(t, nil)
	fi, err := os.Stat(tg.AdminSocket())
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("admin socket: %v %v", fi.Mode(), err)
	}
	if fi, err := os.Stat(tg.dir); err != nil || fi.Mode().Perm() != 0o700 {
		t.Fatalf("data dir mode: %v", err)
	}
	admin := NewAdminClient(tg.dir)
	defer admin.Close()
	ctx := context.Background()
	tok, err := admin.CreateToken(ctx, ca.RoleAgent, "db1", 5*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	info, err := ca.InspectToken(tok)
	if err != nil || info.Identity.Name != "db1" || info.Identity.Role != ca.RoleAgent || info.URL != "https://"+tg.PublicAddr() {
		t.Fatalf("token: %+v %v", info, err)
	}
	rec := tg.waitAudit("token.created", func(r audit.Record) bool { return r.Type == audit.TypeTokenCreated && r.Agent == "db1" })
	raw, _ := os.ReadFile(filepath.Join(tg.dir, AuditLogName))
	if bytes.Contains(raw, []byte(tok)) {
		t.Fatal("the token was written to the audit log")
	}
	_ = rec
	// The token works once, and both the enrollment and the replay are audited.
	creds, err := ca.Enroll(ctx, tok)
	if err != nil {
		t.Fatal(err)
	}
	tg.waitAudit("agent.enrolled", func(r audit.Record) bool {
		return r.Type == audit.TypeAgentEnrolled && r.Agent == "db1" && r.Outcome == audit.OutcomeOK &&
			r.Serial == creds.Chain[0].SerialNumber.String()
	})
	if _, err := ca.Enroll(ctx, tok); !errors.Is(err, ca.ErrTokenUsed) {
		t.Fatalf("replayed token: %v, want ErrTokenUsed", err)
	}
	tg.waitAudit("agent.enrolled refused", func(r audit.Record) bool {
		return r.Type == audit.TypeAgentEnrolled && r.Agent == "db1" && r.Outcome == audit.OutcomeDenied && r.Reason != ""
	})
	if _, err := tg.connectAgent(creds, "i", map[string]string{"echo": "127.0.0.1:1"}); err != nil {
		t.Fatal(err)
	}
	agents, err := admin.Agents(ctx)
	if err != nil || len(agents) != 1 || agents[0].Name != "db1" || agents[0].Status != "online" ||
		!agents[0].CertExpires.Equal(creds.Chain[0].NotAfter) {
		t.Fatalf("agents = %+v, %v", agents, err)
	}
	sessions, err := admin.Sessions(ctx)
	if err != nil || len(sessions) != 0 {
		t.Fatalf("sessions = %+v, %v", sessions, err)
	}
	for _, bad := range []struct{ role, name string }{{"admin", "x"}, {"agent", "Bad_Name"}} {
		_, err := admin.CreateToken(ctx, ca.Role(bad.role), bad.name, 0)
		var ae *AdminError
		if !errors.As(err, &ae) || ae.Status != http.StatusBadRequest || ae.Message == "" {
			t.Errorf("token %v: %v", bad, err)
		}
	}
	tg.stop()
	// With the gateway gone, the client says how to fix it.
	_, err = admin.Agents(ctx)
	if !errors.Is(err, ErrGatewayUnreachable) || !strings.Contains(err.Error(), "wicket gateway --data-dir "+tg.dir) {
		t.Fatalf("unreachable: %v", err)
	}
}

func TestRestartReusesState(t *testing.T) {
	checkLeaks(t)
	dir := t.TempDir()
	var root []byte
	for i := range 2 {
		tg := startGateway(t, func(c *Config) { c.DataDir = dir; c.PolicyFile = "" })
		if i == 0 {
			root = tg.Authority().Root().Raw
		} else if !bytes.Equal(root, tg.Authority().Root().Raw) {
			t.Fatal("restart created a new root")
		}
		// Without a policy every user is denied.
		echo := echoServer(t)
		tg.mustAgent("db1", map[string]string{"echo": echo})
		user := tg.dialUser("alice")
		_, err := openStream(user, "echo")
		if s, _, ok := replyStatus(err); !ok || s != tunnel.StatusRefused {
			t.Fatalf("no policy: %v", err)
		}
		user.Close()
		tg.stop()
	}
	res, err := audit.VerifyFile(filepath.Join(dir, AuditLogName))
	if err != nil || res.Records < 10 {
		t.Fatalf("audit over two runs: %+v %v", res, err)
	}
}

// The gateway remembers the agents it has seen across a restart (AgentsFileName): they are
// listed offline with their last known resources, and a stream to one of those resources is
// answered "unavailable, agent db1 is offline" rather than "unknown resource". A file it cannot
// read is moved aside, not overwritten, and the gateway starts without it.
func TestAgentsRememberedAcrossRestart(t *testing.T) {
	checkLeaks(t)
	dir := t.TempDir()
	tg := startGateway(t, func(c *Config) { c.DataDir = dir })
	echo := echoServer(t)
	agent, err := tg.connectAgent(tg.enroll(ca.RoleAgent, "db1"), "i", map[string]string{"echo": echo})
	if err != nil {
		t.Fatal(err)
	}
	expires := tg.Registry().List()[0].CertExpires
	agent.close()
	tg.stop()
	if fi, err := os.Stat(filepath.Join(dir, AgentsFileName)); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("agents file after stop: %v %v", fi, err)
	}

	tg = startGateway(t, func(c *Config) { c.DataDir = dir })
	l := tg.Registry().List()
	if len(l) != 1 || l[0].Name != "db1" || l[0].Status != "offline" || !slices.Equal(l[0].Resources, []string{"echo"}) ||
		!l[0].CertExpires.Equal(expires) || l[0].Since.IsZero() {
		t.Fatalf("after restart the registry = %+v", l)
	}
	user := tg.dialUser("alice")
	_, err = openStream(user, "echo")
	if s, reason, ok := replyStatus(err); !ok || s != tunnel.StatusUnavailable || !strings.Contains(reason, "db1") {
		t.Fatalf("stream to the remembered agent's resource: %v", err)
	}
	// `wicket agents forget`: an online agent is refused, an offline one removed for good.
	admin := NewAdminClient(dir)
	defer admin.Close()
	ctx := context.Background()
	db2, err := tg.connectAgent(tg.enroll(ca.RoleAgent, "db2"), "i", map[string]string{"web": echo})
	if err != nil {
		t.Fatal(err)
	}
	var ae *AdminError
	if err := admin.ForgetAgent(ctx, "db2"); !errors.As(err, &ae) || ae.Status != http.StatusConflict || !strings.Contains(ae.Message, "online") {
		t.Fatalf("forget an online agent: %v", err)
	}
	db2.close()
	if err := admin.ForgetAgent(ctx, "db1"); err != nil {
		t.Fatalf("forget the offline db1: %v", err)
	}
	tg.waitAudit("admin.request forget db1", func(r audit.Record) bool {
		return r.Type == audit.TypeAdminRequest && r.Agent == "db1" && r.Extra["action"] == "forget agent"
	})
	if err := admin.ForgetAgent(ctx, "db1"); !errors.As(err, &ae) || ae.Status != http.StatusNotFound {
		t.Fatalf("forget db1 twice: %v", err)
	}
	_, err = openStream(user, "echo")
	if s, _, ok := replyStatus(err); !ok || s != tunnel.StatusUnknownResource {
		t.Fatalf("stream to a forgotten agent's resource: %v, want unknown resource", err)
	}
	user.Close()
	tg.stop()
	if b, err := os.ReadFile(filepath.Join(dir, AgentsFileName)); err != nil || strings.Contains(string(b), `"db1"`) || !strings.Contains(string(b), `"db2"`) {
		t.Fatalf("agents file after forgetting db1: %s %v", b, err)
	}

	bad := filepath.Join(dir, AgentsFileName)
	if err := os.WriteFile(bad, []byte("{not json"), 0o600); err != nil {
		t.Fatal(err)
	}
	tg = startGateway(t, func(c *Config) { c.DataDir = dir })
	if l := tg.Registry().List(); len(l) != 0 {
		t.Fatalf("registry from an unreadable file = %+v", l)
	}
	aside, _ := filepath.Glob(bad + ".unreadable-*")
	if len(aside) != 1 {
		t.Fatalf("the unreadable file was not kept aside: %v", aside)
	}
	if b, _ := os.ReadFile(aside[0]); string(b) != "{not json" {
		t.Fatalf("the file kept aside was altered: %q", b)
	}
	tg.stop()
}

// A certificate from another CA is refused as unknown.
func TestUnknownCARefused(t *testing.T) {
	checkLeaks(t)
	tg := startGateway(t, nil)
	other := startGateway(t, nil)
	creds := other.enroll(ca.RoleAgent, "db1")
	other.stop()
	// Trust tg's root so the handshake reaches client verification.
	creds.Root = tg.Authority().Root()
	if a, err := tg.connectAgent(creds, "i", nil); err == nil {
		a.close()
		t.Fatal("foreign certificate accepted")
	}
	tg.waitAudit("tls.refused unknown CA", func(r audit.Record) bool {
		return r.Type == audit.TypeTLSRefused && r.Reason == refusedUnknownCA
	})
	_ = x509.NewCertPool
	tg.stop()
}

func TestPolicyReload(t *testing.T) {
	checkLeaks(t)
	var polPath string
	tg := startGateway(t, func(c *Config) { c.PolicyInterval = 20 * time.Millisecond; polPath = c.PolicyFile })
	echo := echoServer(t)
	tg.mustAgent("db1", map[string]string{"echo": echo})
	bob := tg.dialUser("bob")
	if _, err := openStream(bob, "echo"); !errors.Is(err, tunnel.ErrRefused) {
		t.Fatalf("bob before reload: %v", err)
	}
	if err := os.WriteFile(polPath, []byte("rules:\n  - users: [\"bob\"]\n    resources: [\"echo\"]\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if !eventually(5*time.Second, func() bool {
		st, err := openStream(bob, "echo")
		if err == nil {
			st.Close()
		}
		return err == nil
	}) {
		t.Fatal("bob still refused after the policy allowed him")
	}
	tg.waitAudit("policy.reloaded", func(r audit.Record) bool {
		return r.Type == audit.TypePolicyReloaded && r.Outcome == audit.OutcomeOK
	})
	// An invalid policy is rejected and the previous one stays.
	if err := os.WriteFile(polPath, []byte("rules:\n  - users: [\"bob\"]\n    resourcez: [\"echo\"]\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	tg.waitAudit("policy.reloaded rejected", func(r audit.Record) bool {
		return r.Type == audit.TypePolicyReloaded && r.Outcome == audit.OutcomeError
	})
	st, err := openStream(bob, "echo")
	if err != nil {
		t.Fatalf("previous policy not kept: %v", err)
	}
	st.Close()
	bob.Close()
	tg.stop()
}

func TestRateLimit(t *testing.T) {
	l := newRateLimit(10, 3)
	now := time.Unix(1000, 0)
	for i := range 3 {
		if ok, _ := l.allow(now); !ok {
			t.Fatalf("event %d of the burst refused", i)
		}
	}
	for range 5 {
		if ok, _ := l.allow(now); ok {
			t.Fatal("event beyond the burst allowed")
		}
	}
	ok, suppressed := l.allow(now.Add(100 * time.Millisecond))
	if !ok || suppressed != 5 {
		t.Fatalf("after refill: ok=%v suppressed=%d, want true 5", ok, suppressed)
	}
}

// The CA API on the gateway port authenticates renewals by the client certificate: a valid
// one renews, a revoked one is refused with the reason (not a TLS alert), and a certificate
// from another CA never gets past the handshake.
func TestRenewThroughGatewayPort(t *testing.T) {
	checkLeaks(t)
	tg := startGateway(t, nil)
	ctx := context.Background()
	base := "https://" + tg.PublicAddr()
	creds := tg.enroll(ca.RoleAgent, "db1")
	renewed, err := ca.Renew(ctx, base, creds)
	if err != nil {
		t.Fatalf("renew: %v", err)
	}
	if renewed.Chain[0].SerialNumber.Cmp(creds.Chain[0].SerialNumber) == 0 {
		t.Fatal("renewal returned the same certificate")
	}
	if err := tg.Authority().Revoke(ctx, renewed.Chain[0].SerialNumber.String(), "test"); err != nil {
		t.Fatal(err)
	}
	if _, err := ca.Renew(ctx, base, renewed); !errors.Is(err, ca.ErrRevoked) {
		t.Fatalf("renew a revoked certificate: %v, want ErrRevoked", err)
	}
	tg.waitAudit("cert.renewed", func(r audit.Record) bool {
		return r.Type == audit.TypeCertRenewed && r.Outcome == audit.OutcomeOK && r.Agent == "db1" &&
			r.Serial == renewed.Chain[0].SerialNumber.String() && r.Extra["previous_serial"] == creds.Chain[0].SerialNumber.String()
	})
	tg.waitAudit("cert.renewed refused", func(r audit.Record) bool {
		return r.Type == audit.TypeCertRenewed && r.Outcome == audit.OutcomeDenied && r.Agent == "db1"
	})

	other := startGateway(t, nil)
	foreign := other.enroll(ca.RoleAgent, "db1")
	other.stop()
	foreign.Root = tg.Authority().Root()
	if _, err := ca.Renew(ctx, base, foreign); err == nil {
		t.Fatal("a certificate from another CA renewed")
	}
	tg.waitAudit("tls.refused unknown CA on the CA API", func(r audit.Record) bool {
		return r.Type == audit.TypeTLSRefused && r.Reason == refusedUnknownCA
	})
	tg.stop()
}

func TestStreamsPerUserCapped(t *testing.T) {
	checkLeaks(t)
	tg := startGateway(t, func(c *Config) { c.MaxStreamsPerUser = 2 })
	echo := echoServer(t)
	tg.mustAgent("db1", map[string]string{"echo": echo})
	user := tg.dialUser("alice")
	var open []*tunnel.Stream
	for range 2 {
		st, err := openStream(user, "echo")
		if err != nil {
			t.Fatal(err)
		}
		open = append(open, st)
	}
	_, err := openStream(user, "echo")
	if s, reason, ok := replyStatus(err); !ok || s != tunnel.StatusUnavailable || !strings.Contains(reason, "more than 2 streams") {
		t.Fatalf("third stream: %v", err)
	}
	open[0].Close()
	if !eventually(5*time.Second, func() bool {
		st, err := openStream(user, "echo")
		if err == nil {
			open = append(open, st)
		}
		return err == nil
	}) {
		t.Fatal("a slot did not free up after a stream closed")
	}
	for _, st := range open {
		st.Close()
	}
	user.Close()
	tg.stop()
}
