package gateway

import (
	"context"
	"crypto/tls"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/wicketgw/wicket/ca"
	"github.com/wicketgw/wicket/gateway/audit"
	"github.com/wicketgw/wicket/gateway/public"
)

// End to end with --acme-ca internal: certificates obtained over ACME from the built-in CA,
// requests carried by tunnel streams to an agent, the users host guarded by VerifyPeer and
// the policy, requests in the audit log.
func TestPublicEndToEnd(t *testing.T) {
	checkLeaks(t)
	target := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "target saw user="+r.Header.Get(public.UserHeader)+" path="+r.URL.Path)
	}))
	defer target.Close()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	hln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	tg := startGateway(t, func(c *Config) {
		c.Public = &PublicConfig{Listener: ln, HTTPListener: hln, ACMECA: "internal",
			Publish: []string{"web=web.wicket.test,public", "app=app.wicket.test"}}
	})
	if _, err := tg.connectAgent(tg.enroll(ca.RoleAgent, "web1"), "i1", map[string]string{"web": target.Listener.Addr().String(), "app": target.Listener.Addr().String()}); err != nil {
		t.Fatal(err)
	}
	pub := tg.public
	if !eventually(30*time.Second, func() bool {
		_, a := pub.Certificate("web.wicket.test")
		_, b := pub.Certificate("app.wicket.test")
		return a && b
	}) {
		t.Fatalf("no certificates: %+v", pub.Stats())
	}
	client := func(creds *ca.Credentials) *http.Client {
		cfg := &tls.Config{RootCAs: tg.Authority().RootPool()}
		if creds != nil {
			cfg.Certificates = []tls.Certificate{*creds.TLSCertificate()}
		}
		tr := &http.Transport{TLSClientConfig: cfg, DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "tcp", pub.Addr().String())
		}}
		t.Cleanup(tr.CloseIdleConnections)
		return &http.Client{Transport: tr, Timeout: 10 * time.Second}
	}
	_, port, _ := net.SplitHostPort(pub.Addr().String())
	fetch := func(c *http.Client, host string) (int, string) {
		resp, err := c.Get("https://" + host + ":" + port + "/page?q=1")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if st, body := fetch(client(nil), "web.wicket.test"); st != 200 || body != "target saw user= path=/page" {
		t.Fatalf("public host: %d %q", st, body)
	}
	if st, _ := fetch(client(nil), "app.wicket.test"); st != 401 {
		t.Fatalf("users host without a certificate: %d", st)
	}
	if st, body := fetch(client(tg.enroll(ca.RoleUser, "alice")), "app.wicket.test"); st != 200 || body != "target saw user=alice path=/page" {
		t.Fatalf("alice: %d %q", st, body)
	}
	if st, body := fetch(client(tg.enroll(ca.RoleUser, "carol")), "app.wicket.test"); st != 403 || !strings.Contains(body, "carol is not allowed") {
		t.Fatalf("carol (policy: echo only): %d %q", st, body)
	}
	tg.waitAudit("http.request by alice", func(r audit.Record) bool {
		return r.Type == public.TypeHTTPRequest && r.User == "alice" && r.Extra["path"] == "/page" && r.Outcome == "ok"
	})
}
