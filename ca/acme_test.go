package ca

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	stepacme "github.com/smallstep/certificates/acme"
	"golang.org/x/crypto/acme"
)

// http01Responder serves http-01 key authorizations on loopback.
type http01Responder struct {
	mu   sync.Mutex
	resp map[string]string
	srv  *httptest.Server
	port int
}

func newHTTP01Responder(t *testing.T) *http01Responder {
	r := &http01Responder{resp: map[string]string{}}
	r.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		r.mu.Lock()
		v, ok := r.resp[req.URL.Path]
		r.mu.Unlock()
		if !ok {
			http.NotFound(w, req)
			return
		}
		_, _ = w.Write([]byte(v))
	}))
	t.Cleanup(r.srv.Close)
	_, p, _ := net.SplitHostPort(r.srv.Listener.Addr().String())
	r.port, _ = strconv.Atoi(p)
	// step-ca validates http-01 on this port instead of 80.
	old := stepacme.InsecurePortHTTP01
	stepacme.InsecurePortHTTP01 = r.port
	t.Cleanup(func() { stepacme.InsecurePortHTTP01 = old })
	return r
}

// acmeEnv starts a CA with ACME allowed for app.wicket.test and *.apps.wicket.test;
// every validation connection goes to the loopback responder.
func acmeEnv(t *testing.T, requireEAB bool) (*testEnv, *http01Responder) {
	r := newHTTP01Responder(t)
	e := startEnv(t, t.TempDir(), "", func(c *Config) {
		c.ACME = ACMEConfig{
			AllowedNames: []string{"app.wicket.test", "*.apps.wicket.test"},
			RequireEAB:   requireEAB,
			DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, "tcp", r.srv.Listener.Addr().String())
			},
		}
	})
	return e, r
}

func acmeClient(t *testing.T, e *testEnv) *acme.Client {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: e.a.RootPool(), MinVersion: tls.VersionTLS13}}
	t.Cleanup(tr.CloseIdleConnections)
	return &acme.Client{Key: key, DirectoryURL: e.a.ACMEDirectoryURL(), HTTPClient: &http.Client{Transport: tr}}
}

// obtain runs a full http-01 order for name.
func obtain(t *testing.T, ctx context.Context, cl *acme.Client, r *http01Responder, name string) ([][]byte, error) {
	order, err := cl.AuthorizeOrder(ctx, acme.DomainIDs(name))
	if err != nil {
		return nil, err
	}
	for _, zurl := range order.AuthzURLs {
		z, err := cl.GetAuthorization(ctx, zurl)
		if err != nil {
			return nil, err
		}
		var chal *acme.Challenge
		for _, c := range z.Challenges {
			if c.Type == "http-01" {
				chal = c
			}
		}
		if chal == nil {
			t.Fatalf("no http-01 challenge offered: %+v", z.Challenges)
		}
		ka, err := cl.HTTP01ChallengeResponse(chal.Token)
		if err != nil {
			return nil, err
		}
		r.mu.Lock()
		r.resp[cl.HTTP01ChallengePath(chal.Token)] = ka
		r.mu.Unlock()
		if _, err := cl.Accept(ctx, chal); err != nil {
			return nil, err
		}
		if _, err := cl.WaitAuthorization(ctx, z.URI); err != nil {
			return nil, err
		}
	}
	if order, err = cl.WaitOrder(ctx, order.URI); err != nil {
		return nil, err
	}
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{DNSNames: []string{name}}, key)
	if err != nil {
		t.Fatal(err)
	}
	der, _, err := cl.CreateOrderCert(ctx, order.FinalizeURL, csr, true)
	return der, err
}

func TestACMEHTTP01(t *testing.T) {
	e, r := acmeEnv(t, false)
	ctx := ctx10s(t)
	cl := acmeClient(t, e)
	if _, err := cl.Register(ctx, &acme.Account{}, acme.AcceptTOS); err != nil {
		t.Fatalf("register: %v", err)
	}
	for _, name := range []string{"app.wicket.test", "web.apps.wicket.test"} {
		der, err := obtain(t, ctx, cl, r, name)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		leaf, err := x509.ParseCertificate(der[0])
		if err != nil {
			t.Fatal(err)
		}
		inter := x509.NewCertPool()
		for _, d := range der[1:] {
			c, _ := x509.ParseCertificate(d)
			inter.AddCert(c)
		}
		if _, err := leaf.Verify(x509.VerifyOptions{DNSName: name, Roots: e.a.RootPool(), Intermediates: inter}); err != nil {
			t.Fatalf("%s: ACME certificate does not verify: %v", name, err)
		}
	}
	// A CSR that smuggles a SPIFFE ID into an allowed order is refused: ACME must
	// never mint a Wicket identity.
	{
		order, err := cl.AuthorizeOrder(ctx, acme.DomainIDs("smuggle.apps.wicket.test"))
		if err != nil {
			t.Fatal(err)
		}
		z, _ := cl.GetAuthorization(ctx, order.AuthzURLs[0])
		for _, c := range z.Challenges {
			if c.Type == "http-01" {
				ka, _ := cl.HTTP01ChallengeResponse(c.Token)
				r.mu.Lock()
				r.resp[cl.HTTP01ChallengePath(c.Token)] = ka
				r.mu.Unlock()
				if _, err := cl.Accept(ctx, c); err != nil {
					t.Fatal(err)
				}
			}
		}
		if _, err := cl.WaitAuthorization(ctx, z.URI); err != nil {
			t.Fatal(err)
		}
		key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		u, _ := url.Parse("spiffe://wicket.local/agent/smuggle")
		csr, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
			DNSNames: []string{"smuggle.apps.wicket.test"}, URIs: []*url.URL{u}}, key)
		der, _, err := cl.CreateOrderCert(ctx, order.FinalizeURL, csr, false)
		if err == nil {
			leaf, _ := x509.ParseCertificate(der[0])
			if len(leaf.URIs) != 0 {
				t.Fatalf("ACME issued a certificate with URI SANs %v", leaf.URIs)
			}
			if _, err := e.a.VerifyPeer([]*x509.Certificate{leaf}, RoleAgent); err == nil {
				t.Fatal("an ACME certificate passed VerifyPeer as an agent")
			}
		}
	}
	// Outside the allow-list: refused at order time, nothing issued.
	for _, name := range []string{"evil.example.com", "apps.wicket.test", "wicket.test"} {
		if _, err := cl.AuthorizeOrder(ctx, acme.DomainIDs(name)); err == nil {
			t.Fatalf("order for %s outside the allow-list accepted", name)
		} else if !strings.Contains(err.Error(), "rejected") && !strings.Contains(err.Error(), "not allowed") {
			t.Logf("refused %s: %v", name, err)
		}
	}
	// A failed validation (responder does not know the token) yields no certificate.
	r.mu.Lock()
	r.resp = map[string]string{}
	r.mu.Unlock()
	order, err := cl.AuthorizeOrder(ctx, acme.DomainIDs("x.apps.wicket.test"))
	if err != nil {
		t.Fatal(err)
	}
	z, _ := cl.GetAuthorization(ctx, order.AuthzURLs[0])
	for _, c := range z.Challenges {
		if c.Type == "http-01" {
			_, _ = cl.Accept(ctx, c) // nothing served: validation fails
		}
	}
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	csr, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{DNSNames: []string{"x.apps.wicket.test"}}, key)
	if _, _, err := cl.CreateOrderCert(ctx, order.FinalizeURL, csr, false); err == nil {
		t.Fatal("certificate issued without a successful validation")
	}
}

func TestACMEExternalAccountBinding(t *testing.T) {
	e, r := acmeEnv(t, true)
	ctx := ctx10s(t)
	cl := acmeClient(t, e)
	if _, err := cl.Register(ctx, &acme.Account{}, acme.AcceptTOS); err == nil {
		t.Fatal("account created without EAB while EAB is required")
	}
	kid, hmac, err := e.a.NewEABKey(ctx, "agent-7")
	if err != nil {
		t.Fatal(err)
	}
	cl2 := acmeClient(t, e)
	if _, err := cl2.Register(ctx, &acme.Account{ExternalAccountBinding: &acme.ExternalAccountBinding{KID: kid, Key: hmac}}, acme.AcceptTOS); err != nil {
		t.Fatalf("register with EAB: %v", err)
	}
	if _, err := obtain(t, ctx, cl2, r, "app.wicket.test"); err != nil {
		t.Fatal(err)
	}
	// The EAB key is single use.
	cl3 := acmeClient(t, e)
	// step-ca answers a reused key with a 5xx (it wiped the key's secret when binding
	// it), which golang.org/x/crypto/acme retries until the context ends.
	ctx3, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	_, err = cl3.Register(ctx3, &acme.Account{ExternalAccountBinding: &acme.ExternalAccountBinding{KID: kid, Key: hmac}}, acme.AcceptTOS)
	if err == nil {
		t.Fatal("EAB key used twice")
	}
}

func TestACMEDisabledByDefault(t *testing.T) {
	e := startEnv(t, t.TempDir(), "", nil)
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: e.a.RootPool()}}
	defer tr.CloseIdleConnections()
	resp, err := (&http.Client{Transport: tr}).Get(e.a.ACMEDirectoryURL())
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNotFound {
		t.Fatalf("ACME directory with no allow-list: HTTP %d, want 404", resp.StatusCode)
	}
	if _, _, err := e.a.NewEABKey(context.Background(), "x"); err == nil {
		t.Fatal("NewEABKey with ACME disabled")
	}
}
