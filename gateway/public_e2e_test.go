package gateway

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"io/fs"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/wicketgw/wicket/ca/pgtest"

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
		if r.URL.Path == "/hang" { // a stream that runs until somebody cuts it
			io.WriteString(w, "started\n")
			http.NewResponseController(w).Flush()
			<-r.Context().Done()
			return
		}
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
	alice := client(tg.enroll(ca.RoleUser, "alice"))
	if st, body := fetch(alice, "app.wicket.test"); st != 200 || body != "target saw user=alice path=/page" {
		t.Fatalf("alice: %d %q", st, body)
	}
	if st, body := fetch(client(tg.enroll(ca.RoleUser, "carol")), "app.wicket.test"); st != 403 || !strings.Contains(body, "carol is not allowed") {
		t.Fatalf("carol (policy: echo only): %d %q", st, body)
	}
	// The public listener's certificates came from the built-in CA's ACME provisioner: counted
	// and audited like every other certificate it issues.
	tg.waitAudit("cert.issued by ACME for web.wicket.test", func(r audit.Record) bool {
		return r.Type == audit.TypeCertIssued && r.Extra["via"] == "acme" && r.Extra["dns_names"] == "web.wicket.test"
	})
	if n := tg.Snapshot().Certificates[CertCount{Kind: "issued", Role: "server"}]; n < 2 {
		t.Fatalf("wicket_certificates_total{kind=issued,role=server} = %d, want at least the 2 public hosts", n)
	}
	tg.waitAudit("http.request by alice", func(r audit.Record) bool {
		return r.Type == public.TypeHTTPRequest && r.User == "alice" && r.Extra["path"] == "/page" && r.Outcome == "ok"
	})

	// Revoking alice cuts her open stream on the users host at once, like her tunnel sessions.
	resp, err := alice.Get("https://app.wicket.test:" + port + "/hang")
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("alice's stream: %v %v", resp, err)
	}
	defer resp.Body.Close()
	first := make([]byte, len("started\n"))
	if _, err := io.ReadFull(resp.Body, first); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	id := ca.Identity{TrustDomain: tg.Authority().TrustDomain(), Role: ca.RoleUser, Name: "alice"}
	if _, err := tg.Authority().RevokeIdentity(context.Background(), id, "test"); err != nil {
		t.Fatal(err)
	}
	rest, _ := io.ReadAll(resp.Body)
	if d := time.Since(start); d > time.Second || len(rest) != 0 {
		t.Fatalf("alice's stream ended %v after the revocation, having read %q more; want under a second", d, rest)
	}
	t.Logf("alice's stream on the users host ended %v after RevokeIdentity was called", time.Since(start))
	tg.waitAudit("alice's stream cut by the revocation", func(r audit.Record) bool {
		return r.Type == public.TypeHTTPRequest && r.User == "alice" && r.Extra["path"] == "/hang" &&
			r.Reason == "the response was cut off: "+public.ErrCertificateRevoked.Error()
	})
	if st, _ := fetch(alice, "app.wicket.test"); st != 403 {
		t.Fatalf("alice after revocation: %d, want 403", st)
	}
}

// With a PostgreSQL database the public listener keeps its certificates there (so gateways
// sharing the database share them), not in <data-dir>/certmagic.
func TestPublicCertificatesInPostgreSQL(t *testing.T) {
	checkLeaks(t)
	dsn := pgtest.Database(t, "wicket_gateway_test")
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	tg := startGateway(t, func(c *Config) {
		c.DB = dsn
		c.Public = &PublicConfig{Listener: ln, ACMECA: "internal", Publish: []string{"web=web.wicket.test,public"}}
	})
	if !eventually(30*time.Second, func() bool { _, ok := tg.public.Certificate("web.wicket.test"); return ok }) {
		t.Fatalf("no certificate: %+v", tg.public.Stats())
	}
	conn, err := pgx.Connect(context.Background(), dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	var n int
	err = conn.QueryRow(context.Background(),
		`SELECT count(*) FROM wicket_certmagic_data WHERE key LIKE '%web.wicket.test%'`).Scan(&n)
	if err != nil || n < 2 {
		t.Fatalf("certificate rows in PostgreSQL: %d, %v; want the certificate and its key at least", n, err)
	}
	if _, err := os.Stat(filepath.Join(tg.dir, "certmagic")); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("file storage was created too: %v", err)
	}
	tg.stop()
}
