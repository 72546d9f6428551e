package public

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"io"
	"log"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/wicketgw/wicket/ca"
)

// The same flow with ACMECA "internal": the gateway's built-in CA (step-ca's ACME provisioner,
// host allow-listed, validation connections routed to our listeners the way the gateway routes
// them) issues the public certificate by tls-alpn-01 and by http-01; the users-only host is
// guarded by the real ca.Authority.VerifyPeer with RoleUser, so a user certificate from
// `wicket login` is accepted and an agent certificate is refused.
func TestInternalCA(t *testing.T) {
	checkLeaks(t)
	for _, ch := range []string{ChallengeTLSALPN01, ChallengeHTTP01} {
		t.Run(ch, func(t *testing.T) { testInternalCA(t, ch) })
	}
}

func testInternalCA(t *testing.T, challenge string) {
	host := testHost(strings.ReplaceAll(challenge, "-", "") + ".internal")
	ln, httpLn, caLn := listen(t), listen(t), listen(t)
	a, err := ca.New(context.Background(), ca.Config{
		DataDir:  t.TempDir(),
		Password: []byte("test-password"),
		URL:      "https://" + caLn.Addr().String(),
		ACME: ca.ACMEConfig{
			AllowedNames: []string{host},
			// The validator asks for HOST:80 (http-01) and HOST:443 (tls-alpn-01).
			DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
				_, port, _ := net.SplitHostPort(addr)
				to := ln.Addr().String()
				if port == "80" {
					to = httpLn.Addr().String()
				}
				var d net.Dialer
				return d.DialContext(ctx, "tcp", to)
			},
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	caSrv := &http.Server{
		Handler: a.Handler(),
		TLSConfig: &tls.Config{MinVersion: tls.VersionTLS13, GetCertificate: a.GetCertificate,
			ClientAuth: tls.VerifyClientCertIfGiven, ClientCAs: a.RootPool(), NextProtos: []string{"h2", "http/1.1"}},
		ReadHeaderTimeout: 10 * time.Second,
		ErrorLog:          log.New(io.Discard, "", 0),
	}
	served := make(chan struct{})
	go func() { defer close(served); _ = caSrv.ServeTLS(caLn, "", "") }()
	t.Cleanup(func() { caSrv.Close(); <-served; a.Close() })

	e := startEnv(t, envOptions{
		hosts:      map[string]Host{host: {Resource: "web", Access: AccessUsers}},
		challenges: []string{challenge},
		ln:         ln, httpLn: httpLn,
		internal:    &InternalCA{DirectoryURL: a.ACMEDirectoryURL(), Roots: a.RootPool()},
		issuedRoots: a.RootPool(),
		verifyUser: func(chain []*x509.Certificate) (string, error) {
			id, err := a.VerifyPeer(chain, ca.RoleUser)
			return id.Name, err
		},
	}, nil)
	leaf := e.waitCert(host)
	if len(leaf.DNSNames) != 1 || leaf.DNSNames[0] != host || leaf.Issuer.String() != a.Intermediate().Subject.String() {
		t.Fatalf("certificate for %v issued by %s", leaf.DNSNames, leaf.Issuer)
	}
	switch n := e.httpLn.n.Load(); {
	case challenge == ChallengeHTTP01 && n == 0:
		t.Fatal("http-01: the HTTP listener saw no validation")
	case challenge == ChallengeTLSALPN01 && n != 0:
		t.Fatalf("tls-alpn-01: the HTTP listener saw %d connections", n)
	}

	enroll := func(role ca.Role, name string) *tls.Certificate {
		tok, err := a.MintToken(role, name, 5*time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		creds, err := ca.Enroll(ctx, tok)
		if err != nil {
			t.Fatal(err)
		}
		return creds.TLSCertificate()
	}
	status, body, hdr, _, err := get(e.client(enroll(ca.RoleUser, "alice"), false), e.url(host, "/"), nil)
	if err != nil || status != http.StatusOK || hdr.Get("X-Seen-User") != "alice" {
		t.Fatalf("alice: %d %q %v", status, body, err)
	}
	status, body, _, _, err = get(e.client(enroll(ca.RoleAgent, "db1"), false), e.url(host, "/"), nil)
	if err != nil || status != http.StatusForbidden {
		t.Fatalf("an agent certificate on a users host: %d %q %v", status, body, err)
	}
	status, _, _, _, err = get(e.client(nil, false), e.url(host, "/"), nil)
	if err != nil || status != http.StatusUnauthorized {
		t.Fatalf("no certificate: %d %v", status, err)
	}
}
