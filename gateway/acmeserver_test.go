package gateway

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/wicketgw/wicket/ca"
	"github.com/wicketgw/wicket/gateway/audit"
	"github.com/wicketgw/wicket/tunnel"
	"golang.org/x/crypto/acme"
)

// acmeHostAgent is an agent's side of ACME validation streams: it declares hosts in its
// Hello and relays each validation stream to its own responder, counting what it got.
type acmeHostAgent struct {
	sess    *tunnel.Session
	ack     tunnel.Hello
	targets map[string]string // port ("80", "443") -> address
	streams atomic.Int64
	wg      sync.WaitGroup
}

func (tg *testGateway) connectACMEHostAgent(name string, hosts []string, targets map[string]string) *acmeHostAgent {
	tg.t.Helper()
	sess, err := tg.dial(tunnel.ALPNAgent, tg.enroll(ca.RoleAgent, name))
	if err != nil {
		tg.t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ctl, err := sess.OpenControl(ctx)
	if err != nil {
		tg.t.Fatal(err)
	}
	if err := ctl.Send(tunnel.Hello{Name: name, Instance: "i", Version: "test", ACMEHosts: hosts}); err != nil {
		tg.t.Fatal(err)
	}
	a := &acmeHostAgent{sess: sess, targets: targets}
	if err := ctl.Recv(&a.ack); err != nil {
		tg.t.Fatal(err)
	}
	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		for {
			st, err := sess.AcceptStream(context.Background())
			if err != nil {
				return
			}
			a.streams.Add(1)
			a.wg.Add(1)
			go func() {
				defer a.wg.Done()
				defer st.Close()
				to, ok := a.targets[st.Header().Fields[tunnel.FieldACMEPort]]
				if !ok || st.Header().Fields[tunnel.FieldACMEHost] == "" {
					_ = st.Reply(tunnel.StatusUnknownResource, "no")
					return
				}
				c, err := net.Dial("tcp", to)
				if err != nil {
					_ = st.Reply(tunnel.StatusDialFailed, err.Error())
					return
				}
				if st.Reply(tunnel.StatusOK, "") != nil {
					c.Close()
					return
				}
				_, _, _ = tunnel.Relay(context.Background(), st, c)
			}()
		}
	}()
	tg.t.Cleanup(func() { sess.Close(); a.wg.Wait() })
	return a
}

// keyAuthServer answers every http-01 request with the key authorization it holds.
type keyAuthServer struct {
	mu   sync.Mutex
	m    map[string]string
	hits atomic.Int64
	srv  *httptest.Server
}

func newKeyAuthServer(t *testing.T) *keyAuthServer {
	s := &keyAuthServer{m: map[string]string{}}
	s.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.hits.Add(1)
		s.mu.Lock()
		v, ok := s.m[r.URL.Path]
		s.mu.Unlock()
		if !ok {
			http.NotFound(w, r)
			return
		}
		_, _ = w.Write([]byte(v))
	}))
	t.Cleanup(s.srv.Close)
	return s
}

func (s *keyAuthServer) set(path, v string) { s.mu.Lock(); s.m[path] = v; s.mu.Unlock() }

func acmeTestClient(t *testing.T, tg *testGateway) *acme.Client {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: tg.Authority().RootPool(), MinVersion: tls.VersionTLS13}}
	t.Cleanup(tr.CloseIdleConnections)
	return &acme.Client{Key: key, DirectoryURL: tg.Authority().ACMEDirectoryURL(), HTTPClient: &http.Client{Transport: tr}}
}

// orderHTTP01 runs an http-01 order for name with every responder in rs answering the
// key authorization, and returns the chain and key, or the error.
func orderHTTP01(ctx context.Context, cl *acme.Client, name string, rs ...*keyAuthServer) ([][]byte, crypto.Signer, error) {
	order, err := cl.AuthorizeOrder(ctx, acme.DomainIDs(name))
	if err != nil {
		return nil, nil, err
	}
	z, err := cl.GetAuthorization(ctx, order.AuthzURLs[0])
	if err != nil {
		return nil, nil, err
	}
	var chal *acme.Challenge
	for _, c := range z.Challenges {
		if c.Type == "http-01" {
			chal = c
		}
	}
	if chal == nil {
		return nil, nil, errors.New("no http-01 challenge offered")
	}
	ka, _ := cl.HTTP01ChallengeResponse(chal.Token)
	for _, r := range rs {
		r.set(cl.HTTP01ChallengePath(chal.Token), ka)
	}
	if _, err := cl.Accept(ctx, chal); err != nil {
		return nil, nil, err
	}
	if _, err := cl.WaitAuthorization(ctx, z.URI); err != nil {
		return nil, nil, err
	}
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	csr, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{DNSNames: []string{name}}, key)
	der, _, err := cl.CreateOrderCert(ctx, order.FinalizeURL, csr, true)
	return der, key, err
}

func startACMEGateway(t *testing.T, eab bool) *testGateway {
	return startGateway(t, func(c *Config) {
		c.ACMEServer = &ACMEServerConfig{Names: []string{"grafana.corp", "*.svc.wicket.test"}, RequireEAB: eab,
			CertLifetime: time.Hour}
	})
}

func TestACMEServerValidatesThroughTheAllowedAgentOnly(t *testing.T) {
	checkLeaks(t)
	tg := startACMEGateway(t, false)
	if _, _, err := tg.acmeHostGrants.change("vouch", []string{"grafana.corp", "*.svc.wicket.test"}, true); err != nil {
		t.Fatal(err)
	}
	good, evil := newKeyAuthServer(t), newKeyAuthServer(t)
	// The allowed agent, and one that declares the same name without being allowed to.
	a := tg.connectACMEHostAgent("vouch", []string{"grafana.corp"}, map[string]string{"80": good.srv.Listener.Addr().String()})
	b := tg.connectACMEHostAgent("intruder", []string{"grafana.corp"}, map[string]string{"80": evil.srv.Listener.Addr().String()})
	if len(a.ack.Refused) != 0 {
		t.Fatalf("allowed agent refused: %+v", a.ack.Refused)
	}
	if len(b.ack.Refused) != 1 || b.ack.Refused[0].Resource != "grafana.corp" ||
		!strings.Contains(b.ack.Refused[0].Reason, "wicket agents allow intruder --acme-hosts grafana.corp") {
		t.Fatalf("intruder's claim: %+v", b.ack.Refused)
	}
	tg.waitAudit("claim refused", func(r audit.Record) bool {
		return r.Type == audit.TypeAgentClaimRefused && r.Agent == "intruder" && r.Resource == "grafana.corp"
	})

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cl := acmeTestClient(t, tg)
	if _, err := cl.Register(ctx, &acme.Account{}, acme.AcceptTOS); err != nil {
		t.Fatal(err)
	}
	der, key, err := orderHTTP01(ctx, cl, "grafana.corp", good, evil)
	if err != nil {
		t.Fatalf("order through the agent: %v", err)
	}
	if good.hits.Load() == 0 || evil.hits.Load() != 0 || b.streams.Load() != 0 {
		t.Fatalf("validation hits: allowed agent %d, intruder %d (streams %d); want only the allowed agent",
			good.hits.Load(), evil.hits.Load(), b.streams.Load())
	}
	tg.waitAudit("validation through the agent", func(r audit.Record) bool {
		return r.Type == audit.TypeACMEValidation && r.Agent == "vouch" && r.Extra["path"] == "agent" &&
			r.Extra["dns_name"] == "grafana.corp" && r.Outcome == audit.OutcomeOK
	})
	tg.waitAudit("order", func(r audit.Record) bool {
		return r.Type == audit.TypeACMEOrder && r.Outcome == audit.OutcomeOK && r.Extra["dns_names"] == "grafana.corp"
	})

	// The certificate chains to the Wicket root, carries no SPIFFE ID, and is no identity.
	leaf, _ := x509.ParseCertificate(der[0])
	inter := x509.NewCertPool()
	var chain []*x509.Certificate
	for _, d := range der {
		c, _ := x509.ParseCertificate(d)
		chain = append(chain, c)
		inter.AddCert(c)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{DNSName: "grafana.corp", Roots: tg.Authority().RootPool(), Intermediates: inter}); err != nil {
		t.Fatalf("ACME certificate does not chain to the Wicket root: %v", err)
	}
	if len(leaf.URIs) != 0 {
		t.Fatalf("ACME certificate carries URI SANs %v", leaf.URIs)
	}
	if got := leaf.NotAfter.Sub(leaf.NotBefore); got > time.Hour+2*time.Minute {
		t.Fatalf("lifetime %v, want about --acme-cert-lifetime 1h", got)
	}
	creds := &ca.Credentials{Key: key, Chain: chain, Root: tg.Authority().Root()}
	refusedBefore := tg.Counters().HandshakesRefused
	if ag, err := tg.connectAgentAs(creds, "i", map[string]string{"echo": "127.0.0.1:1"}); err == nil {
		ag.close()
		t.Fatal("an ACME certificate opened an agent session on the gateway")
	}
	tg.mustAgent("db1", map[string]string{"echo": echoServer(t)})
	if sess, err := tg.dial(tunnel.ALPNClient, creds); err == nil {
		_, err = openStream(sess, "echo")
		sess.Close()
		if err == nil {
			t.Fatal("an ACME certificate opened a user stream on the gateway")
		}
	}
	if !eventually(5*time.Second, func() bool {
		n, m := int64(0), int64(0)
		for _, v := range tg.Counters().HandshakesRefused {
			n += v
		}
		for _, v := range refusedBefore {
			m += v
		}
		return n-m == 2
	}) {
		t.Fatalf("handshakes refused: %v, want 2 more than %v", tg.Counters().HandshakesRefused, refusedBefore)
	}

	// Outside the allow-list.
	_, err = cl.AuthorizeOrder(ctx, acme.DomainIDs("grafana.example.com"))
	var ae *acme.Error
	if !errors.As(err, &ae) || !strings.Contains(ae.Detail, "not in --acme-names") {
		t.Fatalf("order outside --acme-names: %v", err)
	}

	// Revocation by the account is audited and counted.
	if err := cl.RevokeCert(ctx, nil, der[0], acme.CRLReasonUnspecified); err != nil {
		t.Fatal(err)
	}
	tg.waitAudit("revoked", func(r audit.Record) bool {
		return r.Type == audit.TypeACMERevoked && r.Serial == leaf.SerialNumber.String()
	})
	snap := tg.Snapshot()
	for _, k := range [][2]string{{"order", "created"}, {"order", "refused"}, {"validation_agent", "ok"}, {"revoked", "ok"}, {"acme_host", "refused"}} {
		if snap.ACMEServer[k] == 0 {
			t.Errorf("counter %v is 0: %v", k, snap.ACMEServer)
		}
	}

	// Withdrawn from the allowed agent, the name is declared by no allowed agent: it is
	// validated directly (grafana.corp does not resolve here, so it fails), and neither
	// agent is asked.
	if _, err := tg.changeACMEHostGrant("test", "disallow", "vouch", []string{"grafana.corp"}, false); err != nil {
		t.Fatal(err)
	}
	before := a.streams.Load()
	order, err := cl.AuthorizeOrder(ctx, acme.DomainIDs("grafana.corp"))
	if err != nil {
		t.Fatal(err)
	}
	z, err := cl.GetAuthorization(ctx, order.AuthzURLs[0])
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range z.Challenges {
		if c.Type == "http-01" {
			ka, _ := cl.HTTP01ChallengeResponse(c.Token)
			good.set(cl.HTTP01ChallengePath(c.Token), ka)
			evil.set(cl.HTTP01ChallengePath(c.Token), ka)
			if _, err := cl.Accept(ctx, c); err != nil {
				t.Fatal(err)
			}
		}
	}
	// step-ca keeps retrying a validation that could not connect; its first attempt is
	// enough to see where it went.
	tg.waitAudit("direct validation", func(r audit.Record) bool {
		return r.Type == audit.TypeACMEValidation && r.Extra["path"] == "direct" && r.Extra["dns_name"] == "grafana.corp"
	})
	if z, err := cl.GetAuthorization(ctx, z.URI); err != nil || z.Status == acme.StatusValid {
		t.Fatalf("authorization after the grant was withdrawn: %v %v", z, err)
	}
	if a.streams.Load() != before || b.streams.Load() != 0 {
		t.Fatalf("an agent was asked after the grant was withdrawn (allowed %d->%d, intruder %d)", before, a.streams.Load(), b.streams.Load())
	}
}

func TestACMEServerTLSALPN01ThroughTheAgent(t *testing.T) {
	checkLeaks(t)
	tg := startACMEGateway(t, false)
	if _, _, err := tg.acmeHostGrants.change("vouch", []string{"*.svc.wicket.test"}, true); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cl := acmeTestClient(t, tg)
	if _, err := cl.Register(ctx, &acme.Account{}, acme.AcceptTOS); err != nil {
		t.Fatal(err)
	}
	const name = "db.svc.wicket.test"
	order, err := cl.AuthorizeOrder(ctx, acme.DomainIDs(name))
	if err != nil {
		t.Fatal(err)
	}
	z, _ := cl.GetAuthorization(ctx, order.AuthzURLs[0])
	var chal *acme.Challenge
	for _, c := range z.Challenges {
		if c.Type == "tls-alpn-01" {
			chal = c
		}
	}
	if chal == nil {
		t.Fatal("no tls-alpn-01 challenge")
	}
	cert, err := cl.TLSALPN01ChallengeCert(chal.Token, name)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: []string{acme.ALPNProto}})
	if err != nil {
		t.Fatal(err)
	}
	var lwg sync.WaitGroup
	lwg.Add(1)
	go func() {
		defer lwg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			_ = c.(*tls.Conn).Handshake()
			c.Close()
		}
	}()
	defer func() { ln.Close(); lwg.Wait() }()
	a := tg.connectACMEHostAgent("vouch", []string{name}, map[string]string{"443": ln.Addr().String()})
	if _, err := cl.Accept(ctx, chal); err != nil {
		t.Fatal(err)
	}
	if _, err := cl.WaitAuthorization(ctx, z.URI); err != nil {
		t.Fatalf("tls-alpn-01 through the agent: %v", err)
	}
	if a.streams.Load() == 0 {
		t.Fatal("the agent relayed no validation")
	}
	tg.waitAudit("validation on 443", func(r audit.Record) bool {
		return r.Type == audit.TypeACMEValidation && r.Agent == "vouch" && r.Extra["port"] == "443"
	})
}

func TestACMEServerEABFromTheAdminSocket(t *testing.T) {
	checkLeaks(t)
	tg := startACMEGateway(t, true)
	c := NewAdminClient(tg.dir)
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := c.CreateACMEEAB(ctx, []string{"other.example.com"}); err == nil || !strings.Contains(err.Error(), "not in --acme-names") {
		t.Fatalf("EAB key for a name outside --acme-names: %v", err)
	}
	k, err := c.CreateACMEEAB(ctx, []string{"*.svc.wicket.test"})
	if err != nil {
		t.Fatal(err)
	}
	tg.waitAudit("eab token", func(r audit.Record) bool {
		return r.Type == audit.TypeTokenCreated && r.Extra["kind"] == "acme_eab" && r.Extra["eab_kid"] == k.KeyID
	})
	st, err := c.ACMEStatus(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !st.Enabled || !st.RequireEAB || st.DirectoryURL != tg.Authority().ACMEDirectoryURL() || st.CertLifetime != "1h0m0s" {
		t.Fatalf("status: %+v", st)
	}
	cl := acmeTestClient(t, tg)
	if _, err := cl.Register(ctx, &acme.Account{}, acme.AcceptTOS); err == nil {
		t.Fatal("account without EAB while --acme-eab")
	}
	hmac, err := decodeB64URL(k.HMACKey)
	if err != nil {
		t.Fatal(err)
	}
	cl = acmeTestClient(t, tg)
	if _, err := cl.Register(ctx, &acme.Account{ExternalAccountBinding: &acme.ExternalAccountBinding{KID: k.KeyID, Key: hmac}}, acme.AcceptTOS); err != nil {
		t.Fatalf("register with the EAB key: %v", err)
	}
	_, err = cl.AuthorizeOrder(ctx, acme.DomainIDs("grafana.corp"))
	var ae *acme.Error
	if !errors.As(err, &ae) || !strings.Contains(ae.Detail, "EAB key may order") {
		t.Fatalf("order outside the key's names: %v", err)
	}
	if _, err := cl.AuthorizeOrder(ctx, acme.DomainIDs("x.svc.wicket.test")); err != nil {
		t.Fatalf("order inside the key's names: %v", err)
	}
}

func decodeB64URL(s string) ([]byte, error) { return base64.RawURLEncoding.DecodeString(s) }
