package test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestPublicHTTPSInternalCA runs the real binary with a public HTTPS listener
// whose certificate the gateway obtains over ACME from its own built-in CA
// (--acme-ca internal), and a browser-like client that trusts only that CA's
// root: a public host is served through an agent, a users host refuses a
// request without a user certificate and serves alice with hers. The same
// flow against Let's Encrypt's Pebble is tested in gateway/public.
func TestPublicHTTPSInternalCA(t *testing.T) {
	target := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "private wiki page "+r.URL.Path+" for "+r.Header.Get("X-Wicket-User"))
	}))
	defer target.Close()

	h := NewHarness(t)
	gw := h.StartGateway(GatewayOptions{
		Policy: allowAlice,
		Args: []string{
			"--public-listen", "127.0.0.1:0", "--public-http-listen", "off", "--acme-ca", "internal",
			"--publish", "web=web.wicket.test,public", "--publish", "wiki=wiki.wicket.test,users",
		},
	})
	publicAddr := gw.WaitFor(`msg="public HTTPS listening".*addr=(\S+)`)[1]
	h.StartAgent(gw, "web1", "web="+target.URL, "wiki="+target.URL)
	alice := h.Login(gw, "alice")

	rootPEM, err := os.ReadFile(filepath.Join(gw.DataDir, "ca", "root.crt"))
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(rootPEM) {
		t.Fatal("cannot parse the gateway's root certificate")
	}
	client := func(certs ...tls.Certificate) *http.Client {
		tr := &http.Transport{
			DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, network, publicAddr) // stands in for DNS
			},
			TLSClientConfig:   &tls.Config{RootCAs: roots, Certificates: certs},
			ForceAttemptHTTP2: true,
		}
		t.Cleanup(tr.CloseIdleConnections)
		return &http.Client{Transport: tr, Timeout: 20 * time.Second}
	}
	get := func(c *http.Client, url string) (int, string, error) {
		resp, err := c.Get(url)
		if err != nil {
			return 0, "", err
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		return resp.StatusCode, string(body), err
	}

	// The first handshake waits for the ACME order; poll until it is served.
	var status int
	var body string
	eventually(t, "https://web.wicket.test/ served with an ACME certificate", func() bool {
		status, body, err = get(client(), "https://web.wicket.test/hello?secret=1")
		return err == nil && status == http.StatusOK
	})
	if !strings.Contains(body, "private wiki page /hello") {
		t.Fatalf("public host answered %q", body)
	}

	if status, _, err = get(client(), "https://wiki.wicket.test/"); err == nil && status == http.StatusOK {
		t.Fatal("users host served a request without a user certificate")
	}
	aliceCert, err := tls.LoadX509KeyPair(filepath.Join(alice, "chain.pem"), filepath.Join(alice, "key.pem"))
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "https://wiki.wicket.test/ for alice", func() bool {
		status, body, err = get(client(aliceCert), "https://wiki.wicket.test/notes")
		return err == nil && status == http.StatusOK
	})
	if !strings.Contains(body, "for alice") {
		t.Fatalf("users host answered %q, want the verified user passed on", body)
	}
	rec := gw.WaitAudit(map[string]string{"type": "http.request", "resource": "web"})
	if strings.Contains(auditValue(rec["extra"]), "secret=1") {
		t.Errorf("audit record kept the query string: %v", rec)
	}
}
