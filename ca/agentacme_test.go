package ca

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/crypto/acme"
)

// alpnResponder is a tls-alpn-01 responder standing for one agent's bound connection.
type alpnResponder struct {
	mu   sync.Mutex
	cert *tls.Certificate
	ln   net.Listener
	wg   sync.WaitGroup
}

func newALPNResponder(t *testing.T) *alpnResponder {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	r := &alpnResponder{}
	r.ln = tls.NewListener(ln, &tls.Config{
		NextProtos: []string{acme.ALPNProto},
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
			r.mu.Lock()
			defer r.mu.Unlock()
			if r.cert == nil {
				return nil, errors.New("no challenge certificate")
			}
			return r.cert, nil
		},
	})
	r.wg.Go(func() {
		for {
			c, err := r.ln.Accept()
			if err != nil {
				return
			}
			_ = c.(*tls.Conn).Handshake()
			c.Close()
		}
	})
	t.Cleanup(func() { r.ln.Close(); r.wg.Wait() })
	return r
}

// agentACMEEnv is a CA with agent ACME on; Dial serves only connections bound (in
// the test's table) to the account being validated, as the gateway does.
type agentACMEEnv struct {
	*testEnv
	mu       sync.Mutex
	bound    map[string]*alpnResponder // account ID -> its agent's connection
	dials    []string                  // "name account" per Dial
	refusals []AgentACMERefusal
	offset   atomic.Int64 // clock offset, ns
}

func newAgentACMEEnv(t *testing.T) *agentACMEEnv { return newAgentACMEEnvDB(t, "") }

func newAgentACMEEnvDB(t *testing.T, dsn string) *agentACMEEnv {
	env := &agentACMEEnv{bound: map[string]*alpnResponder{}}
	env.testEnv = startEnv(t, t.TempDir(), dsn, func(c *Config) {
		c.Now = func() time.Time { return time.Now().Add(time.Duration(env.offset.Load())) }
		c.AgentACME = &AgentACMEConfig{
			Dial: func(ctx context.Context, name, accountID string) (net.Conn, error) {
				env.mu.Lock()
				env.dials = append(env.dials, name+" "+accountID)
				r := env.bound[accountID]
				env.mu.Unlock()
				if r == nil {
					return nil, errors.New("no connection bound to this account")
				}
				var d net.Dialer
				return d.DialContext(ctx, "tcp", r.ln.Addr().String())
			},
			OnRefusal: func(r AgentACMERefusal) {
				env.mu.Lock()
				env.refusals = append(env.refusals, r)
				env.mu.Unlock()
			},
		}
	})
	return env
}

func (env *agentACMEEnv) client(t *testing.T) *acme.Client {
	cl := acmeClient(t, env.testEnv)
	cl.DirectoryURL = env.a.AgentACMEDirectoryURL()
	return cl
}

// register creates an account with a fresh EAB key for name.
func (env *agentACMEEnv) register(t *testing.T, ctx context.Context, name string) (*acme.Client, *acme.Account, string, []byte) {
	kid, hmac, _, err := env.a.NewAgentEABKey(ctx, name, 0)
	if err != nil {
		t.Fatal(err)
	}
	cl := env.client(t)
	acc, err := cl.Register(ctx, &acme.Account{ExternalAccountBinding: &acme.ExternalAccountBinding{KID: kid, Key: hmac}}, acme.AcceptTOS)
	if err != nil {
		t.Fatalf("register %s: %v", name, err)
	}
	return cl, acc, kid, hmac
}

func (env *agentACMEEnv) lastRefusal(t *testing.T, action string) AgentACMERefusal {
	t.Helper()
	env.mu.Lock()
	defer env.mu.Unlock()
	for i := len(env.refusals) - 1; i >= 0; i-- {
		if env.refusals[i].Action == action {
			r := env.refusals[i]
			env.refusals = nil
			return r
		}
	}
	t.Fatalf("no %s refusal reported (have %+v)", action, env.refusals)
	return AgentACMERefusal{}
}

func accountID(acc *acme.Account) string { return acc.URI[strings.LastIndexByte(acc.URI, '/')+1:] }

// obtainAgent runs an order for name; answer sets the challenge certificate on the
// responder that stands for the connection that will answer.
func obtainAgent(ctx context.Context, cl *acme.Client, name string, answer *alpnResponder) ([][]byte, error) {
	order, err := cl.AuthorizeOrder(ctx, acme.DomainIDs(name))
	if err != nil {
		return nil, err
	}
	z, err := cl.GetAuthorization(ctx, order.AuthzURLs[0])
	if err != nil {
		return nil, err
	}
	var chal *acme.Challenge
	for _, c := range z.Challenges {
		if c.Type == "tls-alpn-01" {
			chal = c
		}
	}
	if chal == nil {
		return nil, errors.New("no tls-alpn-01 challenge offered")
	}
	for _, c := range z.Challenges {
		if c.Type != "tls-alpn-01" {
			return nil, errors.New("challenge " + c.Type + " offered to an agent")
		}
	}
	cert, err := cl.TLSALPN01ChallengeCert(chal.Token, name)
	if err != nil {
		return nil, err
	}
	answer.mu.Lock()
	answer.cert = &cert
	answer.mu.Unlock()
	if _, err := cl.Accept(ctx, chal); err != nil {
		return nil, err
	}
	if _, err := cl.WaitAuthorization(ctx, z.URI); err != nil {
		return nil, err
	}
	if order, err = cl.WaitOrder(ctx, order.URI); err != nil {
		return nil, err
	}
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	csr, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{DNSNames: []string{name}}, key)
	der, _, err := cl.CreateOrderCert(ctx, order.FinalizeURL, csr, true)
	return der, err
}

func TestAgentACMEEnrollAndHostile(t *testing.T) {
	forEachDB(t, testAgentACMEEnrollAndHostile)
}

func testAgentACMEEnrollAndHostile(t *testing.T, dsn string) {
	env := newAgentACMEEnvDB(t, dsn)
	ctx := ctx10s(t)
	td := env.a.cfg.TrustDomain

	// Agent db1 enrolls: the certificate is the same agent identity as the token path.
	cl1, acc1, kid1, hmac1 := env.register(t, ctx, "db1")
	conn1 := newALPNResponder(t)
	env.mu.Lock()
	env.bound[accountID(acc1)] = conn1
	env.mu.Unlock()
	got, err := env.a.AgentACMEAccountByKey(ctx, cl1.Key.Public())
	if err != nil || got.Name != "db1" || got.ID != accountID(acc1) {
		t.Fatalf("AgentACMEAccountByKey = %+v, %v; want db1 %s", got, err, accountID(acc1))
	}
	der, err := obtainAgent(ctx, cl1, env.a.AgentACMEName("db1"), conn1)
	if err != nil {
		t.Fatalf("enroll db1 by ACME: %v", err)
	}
	var chain []*x509.Certificate
	for _, d := range der {
		c, err := x509.ParseCertificate(d)
		if err != nil {
			t.Fatal(err)
		}
		chain = append(chain, c)
	}
	id, err := env.a.VerifyPeer(chain, RoleAgent)
	if err != nil {
		t.Fatalf("ACME agent certificate refused by VerifyPeer: %v", err)
	}
	if id.String() != "spiffe://"+td+"/agent/db1" {
		t.Fatalf("identity %s", id)
	}
	if d := chain[0].NotAfter.Sub(chain[0].NotBefore); d > DefaultAgentLifetime+time.Minute {
		t.Fatalf("lifetime %s, want the agent lifetime", d)
	}
	env.mu.Lock()
	if len(env.dials) != 1 || env.dials[0] != "db1 "+accountID(acc1) {
		t.Fatalf("validation dials %v, want one for db1 through account %s", env.dials, accountID(acc1))
	}
	env.mu.Unlock()

	// A second credential for the same name can be minted (re-enrollment after loss or
	// expiry); it binds its own account.
	if _, _, _, err := env.a.NewAgentEABKey(ctx, "db1", 0); err != nil {
		t.Fatalf("second credential for db1: %v", err)
	}

	// 1. The EAB credential used twice: refused at once (no retry loop), audited.
	{
		cl := env.client(t)
		_, err := cl.Register(ctx, &acme.Account{ExternalAccountBinding: &acme.ExternalAccountBinding{KID: kid1, Key: hmac1}}, acme.AcceptTOS)
		if err == nil || !strings.Contains(err.Error(), "already used") {
			t.Fatalf("EAB reused: %v", err)
		}
		if r := env.lastRefusal(t, "new-account"); r.Name != "db1" || r.Status != 401 {
			t.Fatalf("refusal %+v", r)
		}
	}

	// 2. Account bound to db1 orders db2's name: refused at new-order, audited.
	{
		_, err := cl1.AuthorizeOrder(ctx, acme.DomainIDs(env.a.AgentACMEName("db2")))
		if err == nil {
			t.Fatal("account of db1 ordered db2")
		}
		if r := env.lastRefusal(t, "new-order"); r.Name != "db1" {
			t.Fatalf("refusal %+v", r)
		}
		// Also with both names in one order.
		if _, err := cl1.AuthorizeOrder(ctx, acme.DomainIDs(env.a.AgentACMEName("db1"), env.a.AgentACMEName("db2"))); err == nil {
			t.Fatal("account of db1 ordered db1+db2")
		}
		env.lastRefusal(t, "new-order")
	}

	// 3. Names outside the agents domain: refused, audited.
	for _, name := range []string{"evil.example.com", env.a.AgentACMEDomain(), "db1.agents.other.test", "*." + env.a.AgentACMEDomain()} {
		if _, err := cl1.AuthorizeOrder(ctx, acme.DomainIDs(name)); err == nil {
			t.Fatalf("order for %s accepted", name)
		}
		env.lastRefusal(t, "new-order")
	}

	// 4. A connection not bound to the account answers its challenge: db2's account has
	// no bound connection; db1's connection (which would answer anything) must not be
	// used for it. Validation fails, nothing is issued for db2.
	{
		cl2, acc2, _, _ := env.register(t, ctx, "db2")
		ctx2, cancel := context.WithTimeout(ctx, 5*time.Second)
		_, err := obtainAgent(ctx2, cl2, env.a.AgentACMEName("db2"), conn1)
		cancel()
		if err == nil {
			t.Fatal("db2 obtained a certificate through db1's connection")
		}
		env.mu.Lock()
		last := env.dials[len(env.dials)-1]
		env.mu.Unlock()
		if last != "db2 "+accountID(acc2) {
			t.Fatalf("validation dial %q, want db2 through account %s", last, accountID(acc2))
		}
		env.lastRefusal(t, "challenge")
		certs, err := env.a.Issued(ctx, Identity{Role: RoleAgent, Name: "db2"})
		if err != nil || len(certs) != 0 {
			t.Fatalf("issued for db2: %v %v", certs, err)
		}
	}

	// 6. Revocation reaches the ACME path: once db1 is revoked, its account can order
	// nothing more (an ACME order does not present the revoked certificate).
	{
		if _, err := env.a.RevokeIdentity(ctx, Identity{TrustDomain: td, Role: RoleAgent, Name: "db1"}, "test"); err != nil {
			t.Fatal(err)
		}
		before, _ := env.a.Issued(ctx, Identity{TrustDomain: td, Role: RoleAgent, Name: "db1"})
		ctx6, cancel := context.WithTimeout(ctx, 5*time.Second)
		_, err := obtainAgent(ctx6, cl1, env.a.AgentACMEName("db1"), conn1)
		cancel()
		if err == nil {
			t.Fatal("a revoked agent obtained a new certificate by ACME")
		}
		if _, err := env.a.AgentACMEAccountByKey(ctx, cl1.Key.Public()); err == nil {
			t.Fatal("the revoked agent's ACME account can still bind a validation connection")
		}
		after, _ := env.a.Issued(ctx, Identity{TrustDomain: td, Role: RoleAgent, Name: "db1"})
		if len(after) != len(before) {
			t.Fatalf("issued %d certificates to db1 after its revocation", len(after)-len(before))
		}
	}

	// 5. An expired enrollment credential: refused, audited, and the key stays unbound.
	{
		kid, hmac, exp, err := env.a.NewAgentEABKey(ctx, "db3", time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		env.offset.Store(int64(time.Until(exp) + time.Second))
		cl := env.client(t)
		_, err = cl.Register(ctx, &acme.Account{ExternalAccountBinding: &acme.ExternalAccountBinding{KID: kid, Key: hmac}}, acme.AcceptTOS)
		if err == nil || !strings.Contains(err.Error(), "expired") {
			t.Fatalf("expired EAB: %v", err)
		}
		if r := env.lastRefusal(t, "new-account"); r.Name != "db3" {
			t.Fatalf("refusal %+v", r)
		}
		// An unknown key id is refused too.
		_, err = env.client(t).Register(ctx, &acme.Account{ExternalAccountBinding: &acme.ExternalAccountBinding{KID: "nope", Key: hmac}}, acme.AcceptTOS)
		if err == nil {
			t.Fatal("unknown EAB key accepted")
		}
		env.lastRefusal(t, "new-account")
		certs, err := env.a.Issued(ctx, Identity{Role: RoleAgent, Name: "db3"})
		if err != nil || len(certs) != 0 {
			t.Fatalf("issued for db3: %v %v", certs, err)
		}
	}
}

func TestAgentACMEDisabledByDefault(t *testing.T) {
	e := startEnv(t, t.TempDir(), "", nil)
	if _, _, _, err := e.a.NewAgentEABKey(context.Background(), "db1", 0); err == nil {
		t.Fatal("NewAgentEABKey with agent ACME disabled")
	}
}

// With only agent ACME on, the public-names ACME directory stays off.
func TestAgentACMEOnlyKeepsPublicACMEOff(t *testing.T) {
	env := newAgentACMEEnv(t)
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: env.a.RootPool()}}
	defer tr.CloseIdleConnections()
	for url, want := range map[string]int{env.a.ACMEDirectoryURL(): http.StatusNotFound, env.a.AgentACMEDirectoryURL(): http.StatusOK} {
		resp, err := (&http.Client{Transport: tr}).Get(url)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != want {
			t.Errorf("%s: HTTP %d, want %d", url, resp.StatusCode, want)
		}
	}
	if _, _, err := env.a.NewEABKey(context.Background(), "x"); err == nil {
		t.Error("NewEABKey for public ACME while it is off")
	}
}

// TestAgentEABSingleUseConcurrent: one credential sent by 10 clients at once binds
// exactly one account that can order; every other client ends up refused.
func TestAgentEABSingleUseConcurrent(t *testing.T) {
	forEachDB(t, testAgentEABSingleUseConcurrent)
}

func testAgentEABSingleUseConcurrent(t *testing.T, dsn string) {
	env := newAgentACMEEnvDB(t, dsn)
	ctx := ctx10s(t)
	kid, hmac, _, err := env.a.NewAgentEABKey(ctx, "race", 0)
	if err != nil {
		t.Fatal(err)
	}
	const n = 10
	clients := make([]*acme.Client, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range clients {
		clients[i] = env.client(t)
		wg.Go(func() {
			c, cancel := context.WithTimeout(ctx, 5*time.Second)
			defer cancel()
			_, errs[i] = clients[i].Register(c, &acme.Account{ExternalAccountBinding: &acme.ExternalAccountBinding{KID: kid, Key: hmac}}, acme.AcceptTOS)
		})
	}
	wg.Wait()
	bound := 0
	for i, cl := range clients {
		if _, err := env.a.AgentACMEAccountByKey(ctx, cl.Key.Public()); err == nil {
			bound++
			if errs[i] != nil {
				t.Errorf("client %d is bound but was told %v", i, errs[i])
			}
		} else if errs[i] == nil {
			// An account created while losing the binding race: it may exist, but it
			// must not be able to order.
			c, cancel := context.WithTimeout(ctx, 3*time.Second)
			if _, err := cl.AuthorizeOrder(c, acme.DomainIDs(env.a.AgentACMEName("race"))); err == nil {
				t.Errorf("client %d has an unbound account that can order", i)
			}
			cancel()
		}
	}
	if bound != 1 {
		t.Fatalf("%d accounts bound with one credential, want exactly 1 (errors %v)", bound, errs)
	}
}
