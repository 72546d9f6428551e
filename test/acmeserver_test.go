package test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/wicketgw/wicket/tunnel"
	"github.com/wicketgw/wicket/tunnel/loopback"
)

// The ACME server for internal names, end to end with the real binaries and Debian's lego
// as the unmodified ACME client on a "private host": lego's http-01 server listens on a
// loopback port only the agent dials (`--acme-host NAME=127.0.0.1:PORT`); the names do not
// resolve, so a validation that reaches lego came through the agent's tunnel.

// legoBin is the lego client; the test fails (never skips) without it.
func legoBin(t *testing.T) string {
	t.Helper()
	p, err := exec.LookPath("lego")
	if err != nil {
		t.Fatal("lego is not installed: apt-get install -y lego (the ACME server's end-to-end tests run the real client)")
	}
	return p
}

// freeAddr returns a loopback address nothing listens on (for lego's challenge server).
func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

// acmeStatus runs `wicket ca status` and returns the directory URL and the root file.
func acmeStatus(t *testing.T, gw *Gateway) (dirURL, root string) {
	t.Helper()
	out := gw.MustAdmin("ca", "status")
	d := regexp.MustCompile(`(?m)^acme directory:\s+(\S+)$`).FindStringSubmatch(out)
	r := regexp.MustCompile(`(?m)^root:\s+(\S+)$`).FindStringSubmatch(out)
	if d == nil || r == nil {
		t.Fatalf("wicket ca status printed no directory or root:\n%s", out)
	}
	return d[1], r[1]
}

// runLego runs lego with args against dirURL (trusting root) and returns its output.
func runLego(t *testing.T, dirURL, root, path string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	full := append([]string{"--server", dirURL, "--accept-tos", "--email", "ops@example.com", "--path", path}, args...)
	cmd := exec.CommandContext(ctx, legoBin(t), full...)
	cmd.Env = append(os.Environ(), "LEGO_CA_CERTIFICATES="+root)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// legoCert reads the chain lego stored for name and checks it: it chains to the Wicket
// root, names exactly name, and carries no URI (no SPIFFE ID).
func legoCert(t *testing.T, path, name, root string) (*x509.Certificate, tls.Certificate) {
	t.Helper()
	crtFile := filepath.Join(path, "certificates", name+".crt")
	pair, err := tls.LoadX509KeyPair(crtFile, filepath.Join(path, "certificates", name+".key"))
	if err != nil {
		t.Fatalf("lego's certificate for %s: %v", name, err)
	}
	rootPEM, err := os.ReadFile(root)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(rootPEM) {
		t.Fatal("root file holds no certificate")
	}
	inter := x509.NewCertPool()
	var leaf *x509.Certificate
	for i, der := range pair.Certificate {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			t.Fatal(err)
		}
		if i == 0 {
			leaf = c
		} else {
			inter.AddCert(c)
		}
	}
	if _, err := leaf.Verify(x509.VerifyOptions{DNSName: name, Roots: roots, Intermediates: inter}); err != nil {
		t.Fatalf("lego's certificate for %s does not chain to the Wicket root: %v", name, err)
	}
	if len(leaf.URIs) != 0 || len(leaf.DNSNames) != 1 || leaf.DNSNames[0] != name {
		t.Fatalf("certificate names: DNS %v URI %v, want only %s", leaf.DNSNames, leaf.URIs, name)
	}
	return leaf, pair
}

// countingListener accepts and counts connections: a private host that must never be
// reached.
func countingListener(t *testing.T) (string, *atomic.Int64) {
	var n atomic.Int64
	addr := loopback.Serve(t, func(c net.Conn) { n.Add(1); c.Close() })
	return addr, &n
}

// hostPort returns the port of addr.
func hostPort(t *testing.T, addr string) string {
	_, p, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// TestACMEServerLego: lego issues, renews and revokes a certificate for grafana.corp,
// validated (http-01) through the agent allowed to vouch for it; an agent that declares
// the same name without being allowed is refused and never reached; a name outside
// --acme-names is refused with that reason; the certificate is no Wicket identity.
func TestACMEServerLego(t *testing.T) {
	h := NewHarness(t)
	gw := h.StartGateway(GatewayOptions{Args: []string{"--acme-server",
		"--acme-names", "grafana.corp,*.svc.wicket.test", "--acme-cert-lifetime", "1h"}})
	gw.MustAdmin("agents", "allow", "vouch", "--acme-hosts", "grafana.corp")
	legoAddr := freeAddr(t)
	h.StartAgentWith(gw.AgentToken("vouch", []string{"echo"}), h.Dir("agent-vouch"),
		[]string{"--acme-host", "grafana.corp=127.0.0.1:" + hostPort(t, legoAddr)}, "echo="+echoServer(t))
	gw.WaitAgentOnline("vouch", "echo")
	intruderAddr, intruderHits := countingListener(t)
	intruder := h.StartAgentWith(gw.AgentToken("intruder", []string{"echo2"}), h.Dir("agent-intruder"),
		[]string{"--acme-host", "grafana.corp=127.0.0.1:" + hostPort(t, intruderAddr)}, "echo2="+echoServer(t))
	gw.WaitAgentOnline("intruder", "echo2")
	intruder.WaitFor(`ACME host grafana.corp is not granted to agent intruder`)
	gw.WaitAudit(map[string]string{"type": "agent.claim_refused", "agent": "intruder", "resource": "grafana.corp"})

	dirURL, root := acmeStatus(t, gw)
	path := h.Dir("lego")
	out, err := runLego(t, dirURL, root, path, "--domains", "grafana.corp", "--http", "--http.port", legoAddr, "run")
	if err != nil {
		t.Fatalf("lego run: %v\n%s", err, out)
	}
	leaf, pair := legoCert(t, path, "grafana.corp", root)
	if d := leaf.NotAfter.Sub(leaf.NotBefore); d > time.Hour+2*time.Minute {
		t.Fatalf("lifetime %s, want --acme-cert-lifetime 1h", d)
	}
	waitAuditExtra(t, gw, map[string]string{"type": "acme.validation", "agent": "vouch", "outcome": "ok"},
		map[string]string{"dns_name": "grafana.corp", "path": "agent", "port": "80"})
	gw.WaitAudit(map[string]string{"type": "acme.order", "outcome": "ok"})
	gw.WaitAudit(map[string]string{"type": "cert.issued", "serial": leaf.SerialNumber.String()})
	if n := intruderHits.Load(); n != 0 {
		t.Fatalf("the intruder agent's address was reached %d times", n)
	}

	// Not a Wicket identity: a TLS client with it is refused on the gateway's port.
	rootPEM, _ := os.ReadFile(root)
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(rootPEM)
	host, _, _ := net.SplitHostPort(gw.Addr)
	for _, alpn := range []string{tunnel.ALPNClient, tunnel.ALPNAgent} {
		c, err := tls.Dial("tcp", gw.Addr, &tls.Config{RootCAs: roots, ServerName: host, NextProtos: []string{alpn},
			Certificates: []tls.Certificate{pair}, MinVersion: tls.VersionTLS13})
		if err == nil {
			_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
			_, err = c.Read(make([]byte, 1))
			c.Close()
		}
		if err == nil || strings.Contains(err.Error(), "timeout") {
			t.Fatalf("%s with the ACME certificate: %v, want the handshake refused", alpn, err)
		}
	}
	gw.WaitAudit(map[string]string{"type": "tls.refused"})

	// Renewal: a new certificate, validated through the agent again.
	out, err = runLego(t, dirURL, root, path, "--domains", "grafana.corp", "--http", "--http.port", legoAddr,
		"renew", "--days", "45", "--no-random-sleep")
	if err != nil {
		t.Fatalf("lego renew: %v\n%s", err, out)
	}
	renewed, _ := legoCert(t, path, "grafana.corp", root)
	if renewed.SerialNumber.Cmp(leaf.SerialNumber) == 0 {
		t.Fatal("lego renew kept the same certificate")
	}
	gw.WaitAudit(map[string]string{"type": "cert.issued", "serial": renewed.SerialNumber.String()})

	// Revocation by the ACME account.
	out, err = runLego(t, dirURL, root, path, "--domains", "grafana.corp", "revoke")
	if err != nil {
		t.Fatalf("lego revoke: %v\n%s", err, out)
	}
	gw.WaitAudit(map[string]string{"type": "acme.revoked", "serial": renewed.SerialNumber.String()})

	// Outside the allow-list.
	out, err = runLego(t, dirURL, root, h.Dir("lego-outside"), "--domains", "grafana.example.com", "--http",
		"--http.port", freeAddr(t), "run")
	if err == nil || !strings.Contains(out, "not in --acme-names") {
		t.Fatalf("lego for a name outside --acme-names: %v\n%s", err, out)
	}
	gw.WaitAudit(map[string]string{"type": "acme.order", "outcome": "denied"})
	if n := intruderHits.Load(); n != 0 {
		t.Fatalf("the intruder agent's address was reached %d times", n)
	}
}

// TestACMEServerLegoEAB: with --acme-eab, lego without a key is refused; with a key from
// `wicket token create acme '*.svc.wicket.test'` it gets a certificate for a name under it,
// validated through the agent allowed for *.svc.wicket.test, and cannot order another name.
func TestACMEServerLegoEAB(t *testing.T) {
	h := NewHarness(t)
	gw := h.StartGateway(GatewayOptions{Args: []string{"--acme-server", "--acme-eab",
		"--acme-names", "grafana.corp,*.svc.wicket.test", "--acme-challenges", "http-01"}})
	gw.MustAdmin("agents", "allow", "vouch", "--acme-hosts", "*.svc.wicket.test")
	legoAddr := freeAddr(t)
	h.StartAgentWith(gw.AgentToken("vouch", []string{"echo"}), h.Dir("agent-vouch"),
		[]string{"--acme-host", "db.svc.wicket.test=127.0.0.1:" + hostPort(t, legoAddr)}, "echo="+echoServer(t))
	gw.WaitAgentOnline("vouch", "echo")
	dirURL, root := acmeStatus(t, gw)
	var st struct {
		ACME struct {
			Enabled      bool                `json:"enabled"`
			DirectoryURL string              `json:"directory_url"`
			RootFile     string              `json:"root_file"`
			RequireEAB   bool                `json:"require_eab"`
			Challenges   []string            `json:"challenges"`
			ACMEHosts    map[string][]string `json:"acme_hosts"`
		} `json:"acme"`
	}
	if err := json.Unmarshal([]byte(gw.MustAdmin("ca", "status", "--json")), &st); err != nil {
		t.Fatal(err)
	}
	if a := st.ACME; !a.Enabled || !a.RequireEAB || a.DirectoryURL != dirURL || a.RootFile != root ||
		strings.Join(a.Challenges, ",") != "http-01" || strings.Join(a.ACMEHosts["vouch"], ",") != "*.svc.wicket.test" {
		t.Fatalf("ca status --json: %+v", a)
	}

	out, err := runLego(t, dirURL, root, h.Dir("lego-noeab"), "--domains", "db.svc.wicket.test", "--http", "--http.port", legoAddr, "run")
	if err == nil {
		t.Fatalf("lego without EAB got a certificate:\n%s", out)
	}

	keyOut := gw.MustAdmin("token", "create", "acme", "*.svc.wicket.test")
	kid := regexp.MustCompile(`(?m)^eab-kid: (\S+)$`).FindStringSubmatch(keyOut)
	hmac := regexp.MustCompile(`(?m)^eab-hmac-key: (\S+)$`).FindStringSubmatch(keyOut)
	if kid == nil || hmac == nil {
		t.Fatalf("token create acme printed %q", keyOut)
	}
	waitAuditExtra(t, gw, map[string]string{"type": "token.created"}, map[string]string{"eab_kid": kid[1]})
	if b, _ := os.ReadFile(filepath.Join(gw.DataDir, "audit.log")); strings.Contains(string(b), hmac[1]) {
		t.Fatal("the EAB HMAC key is in the audit log")
	}
	path := h.Dir("lego-eab")
	eab := []string{"--eab", "--kid", kid[1], "--hmac", hmac[1]}
	out, err = runLego(t, dirURL, root, path, append(eab, "--domains", "db.svc.wicket.test", "--http", "--http.port", legoAddr, "run")...)
	if err != nil {
		t.Fatalf("lego with EAB: %v\n%s", err, out)
	}
	leaf, _ := legoCert(t, path, "db.svc.wicket.test", root)
	waitAuditExtra(t, gw, map[string]string{"type": "acme.validation", "agent": "vouch", "outcome": "ok"},
		map[string]string{"dns_name": "db.svc.wicket.test", "path": "agent"})

	// The same account may not order a name its key does not cover.
	out, err = runLego(t, dirURL, root, path, append(eab, "--domains", "grafana.corp", "--http", "--http.port", legoAddr, "run")...)
	if err == nil || !strings.Contains(out, "EAB key may order") {
		t.Fatalf("lego for a name outside the EAB key's: %v\n%s", err, out)
	}

	out, err = runLego(t, dirURL, root, path, append(eab, "--domains", "db.svc.wicket.test", "--http", "--http.port", legoAddr,
		"renew", "--days", "45", "--no-random-sleep")...)
	if err != nil {
		t.Fatalf("lego renew with EAB: %v\n%s", err, out)
	}
	renewed, _ := legoCert(t, path, "db.svc.wicket.test", root)
	if renewed.SerialNumber.Cmp(leaf.SerialNumber) == 0 {
		t.Fatal("lego renew kept the same certificate")
	}
	out, err = runLego(t, dirURL, root, path, append(eab, "--domains", "db.svc.wicket.test", "revoke")...)
	if err != nil {
		t.Fatalf("lego revoke with EAB: %v\n%s", err, out)
	}
	gw.WaitAudit(map[string]string{"type": "acme.revoked", "serial": renewed.SerialNumber.String()})
}

// waitAuditExtra waits for a record matching kv and, in its extra object, extra.
func waitAuditExtra(t *testing.T, gw *Gateway, kv, extra map[string]string) {
	t.Helper()
	eventually(t, "audit record "+fmt.Sprint(kv, extra), func() bool {
		for _, r := range gw.AuditRecords() {
			ok := true
			for k, v := range kv {
				ok = ok && auditValue(r[k]) == v
			}
			ex, _ := r["extra"].(map[string]any)
			for k, v := range extra {
				ok = ok && auditValue(ex[k]) == v
			}
			if ok {
				return true
			}
		}
		return false
	})
}

// certbotBin is the certbot client; the test fails (never skips) without it.
func certbotBin(t *testing.T) string {
	t.Helper()
	p, err := exec.LookPath("certbot")
	if err != nil {
		t.Fatal("certbot is not installed: apt-get install -y certbot (the ACME server's end-to-end tests run the real client)")
	}
	return p
}

// runCertbot runs certbot with its state in dir, trusting root.
func runCertbot(t *testing.T, root, dir string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	full := append(args, "--non-interactive", "--config-dir", filepath.Join(dir, "config"),
		"--work-dir", filepath.Join(dir, "work"), "--logs-dir", filepath.Join(dir, "logs"))
	cmd := exec.CommandContext(ctx, certbotBin(t), full...)
	cmd.Env = append(os.Environ(), "REQUESTS_CA_BUNDLE="+root)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// TestACMEServerCertbot: certbot (standalone http-01 on a loopback port only the agent
// dials) issues, renews and revokes a certificate, with and without EAB.
func TestACMEServerCertbot(t *testing.T) {
	for _, eab := range []bool{false, true} {
		t.Run(map[bool]string{false: "without EAB", true: "with EAB"}[eab], func(t *testing.T) {
			h := NewHarness(t)
			args := []string{"--acme-server", "--acme-names", "*.svc.wicket.test"}
			if eab {
				args = append(args, "--acme-eab")
			}
			gw := h.StartGateway(GatewayOptions{Args: args})
			gw.MustAdmin("agents", "allow", "vouch", "--acme-hosts", "web.svc.wicket.test")
			challenge := freeAddr(t)
			h.StartAgentWith(gw.AgentToken("vouch", []string{"echo"}), h.Dir("agent-vouch"),
				[]string{"--acme-host", "web.svc.wicket.test=127.0.0.1:" + hostPort(t, challenge)}, "echo="+echoServer(t))
			gw.WaitAgentOnline("vouch", "echo")
			dirURL, root := acmeStatus(t, gw)
			dir := h.Dir("certbot")
			issue := []string{"certonly", "--standalone", "--preferred-challenges", "http",
				"--http-01-address", "127.0.0.1", "--http-01-port", hostPort(t, challenge),
				"--server", dirURL, "--agree-tos", "--register-unsafely-without-email", "-d", "web.svc.wicket.test"}
			if eab {
				keyOut := gw.MustAdmin("token", "create", "acme", "web.svc.wicket.test")
				kid := regexp.MustCompile(`(?m)^eab-kid: (\S+)$`).FindStringSubmatch(keyOut)
				hmac := regexp.MustCompile(`(?m)^eab-hmac-key: (\S+)$`).FindStringSubmatch(keyOut)
				if kid == nil || hmac == nil {
					t.Fatalf("token create acme printed %q", keyOut)
				}
				issue = append(issue, "--eab-kid", kid[1], "--eab-hmac-key", hmac[1])
			}
			out, err := runCertbot(t, root, dir, issue...)
			if err != nil {
				t.Fatalf("certbot certonly: %v\n%s", err, out)
			}
			live := filepath.Join(dir, "config", "live", "web.svc.wicket.test")
			leaf := certbotLeaf(t, live, "web.svc.wicket.test", root)
			waitAuditExtra(t, gw, map[string]string{"type": "acme.validation", "agent": "vouch", "outcome": "ok"},
				map[string]string{"dns_name": "web.svc.wicket.test", "path": "agent"})

			out, err = runCertbot(t, root, dir, "renew", "--force-renewal", "--no-random-sleep-on-renew")
			if err != nil {
				t.Fatalf("certbot renew: %v\n%s", err, out)
			}
			renewed := certbotLeaf(t, live, "web.svc.wicket.test", root)
			if renewed.SerialNumber.Cmp(leaf.SerialNumber) == 0 {
				t.Fatal("certbot renew kept the same certificate")
			}
			gw.WaitAudit(map[string]string{"type": "cert.issued", "serial": renewed.SerialNumber.String()})

			out, err = runCertbot(t, root, dir, "revoke", "--cert-name", "web.svc.wicket.test", "--no-delete-after-revoke",
				"--server", dirURL)
			if err != nil {
				t.Fatalf("certbot revoke: %v\n%s", err, out)
			}
			gw.WaitAudit(map[string]string{"type": "acme.revoked", "serial": renewed.SerialNumber.String()})
		})
	}
}

// certbotLeaf reads and checks (legoCert's checks) the certificate certbot keeps in live.
func certbotLeaf(t *testing.T, live, name, root string) *x509.Certificate {
	t.Helper()
	tmp := t.TempDir()
	if err := os.MkdirAll(filepath.Join(tmp, "certificates"), 0o700); err != nil {
		t.Fatal(err)
	}
	for src, dst := range map[string]string{"fullchain.pem": name + ".crt", "privkey.pem": name + ".key"} {
		b, err := os.ReadFile(filepath.Join(live, src))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(tmp, "certificates", dst), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	leaf, _ := legoCert(t, tmp, name, root)
	return leaf
}
