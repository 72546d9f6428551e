package ca

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"net"
	"strconv"
	"sync"
	"testing"

	stepacme "github.com/smallstep/certificates/acme"
	"golang.org/x/crypto/acme"
)

// solve runs an order for name, answering with the challenge type typ via prepare.
func solve(t *testing.T, ctx context.Context, cl *acme.Client, name, typ string, prepare func(*acme.Challenge)) error {
	order, err := cl.AuthorizeOrder(ctx, acme.DomainIDs(name))
	if err != nil {
		return err
	}
	z, err := cl.GetAuthorization(ctx, order.AuthzURLs[0])
	if err != nil {
		return err
	}
	var chal *acme.Challenge
	for _, c := range z.Challenges {
		if c.Type == typ {
			chal = c
		}
	}
	if chal == nil {
		t.Fatalf("no %s challenge offered", typ)
	}
	prepare(chal)
	if _, err := cl.Accept(ctx, chal); err != nil {
		return err
	}
	if _, err := cl.WaitAuthorization(ctx, z.URI); err != nil {
		return err
	}
	if order, err = cl.WaitOrder(ctx, order.URI); err != nil {
		return err
	}
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	csr, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{DNSNames: []string{name}}, key)
	der, _, err := cl.CreateOrderCert(ctx, order.FinalizeURL, csr, true)
	if err != nil {
		return err
	}
	leaf, err := x509.ParseCertificate(der[0])
	if err != nil {
		return err
	}
	if len(leaf.DNSNames) != 1 || leaf.DNSNames[0] != name {
		t.Fatalf("certificate for %v, want %s", leaf.DNSNames, name)
	}
	return nil
}

func TestACMETLSALPN01AndDNS01(t *testing.T) {
	// tls-alpn-01 responder on loopback.
	var mu sync.Mutex
	var alpnCert *tls.Certificate
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	tln := tls.NewListener(ln, &tls.Config{
		NextProtos: []string{acme.ALPNProto},
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
			mu.Lock()
			defer mu.Unlock()
			return alpnCert, nil
		},
	})
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			c, err := tln.Accept()
			if err != nil {
				return
			}
			_ = c.(*tls.Conn).Handshake()
			c.Close()
		}
	})
	defer wg.Wait()
	defer tln.Close()
	_, p, _ := net.SplitHostPort(ln.Addr().String())
	port, _ := strconv.Atoi(p)
	old := stepacme.InsecurePortTLSALPN01
	stepacme.InsecurePortTLSALPN01 = port
	defer func() { stepacme.InsecurePortTLSALPN01 = old }()

	var txtMu sync.Mutex
	txt := map[string][]string{}
	e := startEnv(t, t.TempDir(), "", func(c *Config) {
		c.ACME = ACMEConfig{
			AllowedNames: []string{"*.apps.wicket.test"},
			DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, "tcp", ln.Addr().String())
			},
			LookupTXT: func(ctx context.Context, name string) ([]string, error) {
				txtMu.Lock()
				defer txtMu.Unlock()
				return txt[name], nil
			},
		}
	})
	ctx := ctx10s(t)
	cl := acmeClient(t, e)
	if _, err := cl.Register(ctx, &acme.Account{}, acme.AcceptTOS); err != nil {
		t.Fatal(err)
	}
	err = solve(t, ctx, cl, "alpn.apps.wicket.test", "tls-alpn-01", func(ch *acme.Challenge) {
		c, err := cl.TLSALPN01ChallengeCert(ch.Token, "alpn.apps.wicket.test")
		if err != nil {
			t.Fatal(err)
		}
		mu.Lock()
		alpnCert = &c
		mu.Unlock()
	})
	if err != nil {
		t.Fatalf("tls-alpn-01: %v", err)
	}
	err = solve(t, ctx, cl, "dns.apps.wicket.test", "dns-01", func(ch *acme.Challenge) {
		rec, err := cl.DNS01ChallengeRecord(ch.Token)
		if err != nil {
			t.Fatal(err)
		}
		txtMu.Lock()
		txt["_acme-challenge.dns.apps.wicket.test"] = []string{rec}
		txtMu.Unlock()
	})
	if err != nil {
		t.Fatalf("dns-01: %v", err)
	}
}
