package gateway

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/acme"

	"github.com/wicketgw/wicket/ca"
	"github.com/wicketgw/wicket/gateway/audit"
)

// TestAgentACMEEnrollment: an agent enrolls by ACME through the gateway (credential
// from the admin API, account with the EAB, tls-alpn-01 answered on its own bound
// connection), gets the same agent identity as the token path, connects, renews by
// ACME; the hostile cases are refused and audited.
func TestAgentACMEEnrollment(t *testing.T) {
	checkLeaks(t)
	tg := startGateway(t, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	admin := NewAdminClient(tg.dir)
	defer admin.Close()

	str, err := admin.CreateACMECredential(ctx, "db1", 0)
	if err != nil {
		t.Fatal(err)
	}
	if !ca.IsACMECredential(str) {
		t.Fatalf("credential %q has no ACME prefix", str)
	}
	cred, err := ca.ParseACMECredential(str)
	if err != nil {
		t.Fatal(err)
	}
	if cred.Name != "db1" || cred.RootFingerprint != tg.Authority().RootFingerprint() || cred.URL != "https://"+tg.PublicAddr() {
		t.Fatalf("credential = %+v", cred)
	}
	created := tg.waitAudit("token.created", func(r audit.Record) bool {
		return r.Type == audit.TypeTokenCreated && r.Extra["kind"] == "acme"
	})
	if created.Agent != "db1" || created.Extra["eab_kid"] != cred.KeyID {
		t.Fatalf("token.created = %+v", created)
	}
	line, _ := json.Marshal(tg.auditRecords())
	if strings.Contains(string(line), strings.TrimPrefix(str, "wicket-acme-v1.")) {
		t.Fatal("the credential was written to the audit log")
	}

	creds, accountKey, err := ca.EnrollACME(ctx, cred)
	if err != nil {
		t.Fatalf("enroll by ACME: %v", err)
	}
	id, err := tg.Authority().VerifyPeer(creds.Chain, ca.RoleAgent)
	if err != nil || id.Name != "db1" {
		t.Fatalf("VerifyPeer = %v, %v", id, err)
	}
	tg.waitAudit("acme.bind ok", func(r audit.Record) bool {
		return r.Type == audit.TypeACMEBind && r.Outcome == audit.OutcomeOK && r.Agent == "db1"
	})
	tg.waitAudit("cert.issued via acme", func(r audit.Record) bool {
		return r.Type == audit.TypeCertIssued && r.Extra["via"] == "acme" && r.Agent == "db1" &&
			r.Serial == creds.Chain[0].SerialNumber.String()
	})

	// The ACME-enrolled agent is an agent like any other.
	a, err := tg.connectAgent(creds, "i1", map[string]string{"echo": echoServer(t)})
	if err != nil {
		t.Fatalf("connect with the ACME certificate: %v", err)
	}
	a.close()

	// Renewal by ACME: a new order of the same account, same key, new serial.
	renewed, err := ca.RenewACME(ctx, cred.URL, accountKey, creds)
	if err != nil {
		t.Fatalf("renew by ACME: %v", err)
	}
	if renewed.Chain[0].SerialNumber.Cmp(creds.Chain[0].SerialNumber) == 0 {
		t.Fatal("renewal returned the same certificate")
	}
	if _, err := tg.Authority().VerifyPeer(renewed.Chain, ca.RoleAgent); err != nil {
		t.Fatal(err)
	}

	// The credential used twice: refused, audited.
	if _, _, err := ca.EnrollACME(ctx, cred); !errors.Is(err, ca.ErrEABUsed) {
		t.Fatalf("second use of the credential: %v, want ErrEABUsed", err)
	}
	tg.waitAudit("refused reuse", func(r audit.Record) bool {
		return r.Type == audit.TypeAgentEnrolled && r.Outcome == audit.OutcomeDenied && r.Agent == "db1" &&
			r.Extra["via"] == "acme" && r.Extra["acme_action"] == "new-account"
	})

	// An expired credential: refused by the CA (not only by the client), audited.
	str3, err := admin.CreateACMECredential(ctx, "db3", time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	cred3, _ := ca.ParseACMECredential(str3)
	tg.clock.Advance(2 * time.Minute)
	cred3.Expiry = time.Now().Add(time.Hour) // a client that ignores exp
	if _, _, err := ca.EnrollACME(ctx, cred3); !errors.Is(err, ca.ErrEABExpired) {
		t.Fatalf("expired credential: %v, want ErrEABExpired", err)
	}
	tg.waitAudit("refused expired", func(r audit.Record) bool {
		return r.Type == audit.TypeAgentEnrolled && r.Outcome == audit.OutcomeDenied && r.Agent == "db3"
	})
	if got, _ := tg.Authority().Issued(ctx, ca.Identity{TrustDomain: tg.Authority().TrustDomain(), Role: ca.RoleAgent, Name: "db3"}); len(got) != 0 {
		t.Fatalf("issued for db3: %v", got)
	}

	// A validation connection proving a key that is no agent's ACME account: refused.
	conn := dialACMEBind(t, tg)
	defer conn.Close()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err := sendBindHello(conn, key); err != nil {
		t.Fatal(err)
	}
	var ans struct {
		OK    bool   `json:"ok"`
		Error string `json:"error"`
	}
	if err := json.NewDecoder(conn).Decode(&ans); err != nil || ans.OK {
		t.Fatalf("bind with an unknown key: %+v %v", ans, err)
	}
	tg.waitAudit("acme.bind denied", func(r audit.Record) bool {
		return r.Type == audit.TypeACMEBind && r.Outcome == audit.OutcomeDenied
	})

}

func dialACMEBind(t *testing.T, tg *testGateway) *tls.Conn {
	pool := x509.NewCertPool()
	pool.AddCert(tg.Authority().Root())
	host, _, _ := net.SplitHostPort(tg.PublicAddr())
	c, err := tls.Dial("tcp", tg.Addr().String(), &tls.Config{RootCAs: pool, ServerName: host,
		MinVersion: tls.VersionTLS13, NextProtos: []string{ca.ACMEBindALPN}})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// sendBindHello proves possession of key the way ca's agent client does.
func sendBindHello(c *tls.Conn, key *ecdsa.PrivateKey) error {
	cs := c.ConnectionState()
	ekm, err := cs.ExportKeyingMaterial("EXPORTER-wicket-acme-bind", nil, 32)
	if err != nil {
		return err
	}
	h := append([]byte("EXPORTER-wicket-acme-bind"), ekm...)
	d := sha256Sum(h)
	sig, err := ecdsa.SignASN1(rand.Reader, key, d)
	if err != nil {
		return err
	}
	pk, _ := x509.MarshalPKIXPublicKey(&key.PublicKey)
	b, _ := json.Marshal(map[string][]byte{"key": pk, "sig": sig})
	_, err = c.Write(append(b, '\n'))
	return err
}

// TestACMEBindsOnlyForTheirAccountAndName: the validation dialer hands out a
// connection only for the exact account and name it was bound to.
func TestACMEBindsOnlyForTheirAccountAndName(t *testing.T) {
	var b acmeBinds
	c1, c2 := net.Pipe()
	defer c2.Close()
	stopped := false
	bc := &boundConn{name: "db1", conn: tls.Server(c1, &tls.Config{}), stop: func() bool { stopped = true; return true }}
	if err := b.add("accA", bc); err != nil {
		t.Fatal(err)
	}
	if b.take("accB", "db1") != nil {
		t.Fatal("another account got db1's connection")
	}
	if b.take("accA", "db2") != nil {
		t.Fatal("account A's connection answered for another name")
	}
	if b.take("accA", "db1") != bc || !stopped {
		t.Fatal("the bound connection was not handed out to its own account and name")
	}
	if b.take("accA", "db1") != nil {
		t.Fatal("a bound connection was handed out twice")
	}
	b.closeAll()
	if err := b.add("accA", bc); err == nil {
		t.Fatal("bound after shutdown")
	}
	c1.Close()
}

func sha256Sum(b []byte) []byte {
	s := sha256.Sum256(b)
	return s[:]
}

// TestACMEChallengeNotAnsweredByAnotherAccountsConnection: accounts A and B were both
// registered with credentials for db1 (two credentials minted for the same name). A has
// a bound validation connection waiting; B accepts its challenge without one. The CA
// must not validate B through A's connection, even for the same name: B's validation
// fails, is audited, nothing is issued, and A's connection is still waiting for A.
func TestACMEChallengeNotAnsweredByAnotherAccountsConnection(t *testing.T) {
	checkLeaks(t)
	tg := startGateway(t, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	register := func(name string) (*acme.Client, *ecdsa.PrivateKey) {
		cred, err := tg.Authority().NewAgentACMECredential(ctx, name, 0)
		if err != nil {
			t.Fatal(err)
		}
		key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		pool := x509.NewCertPool()
		pool.AddCert(tg.Authority().Root())
		tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS13}}
		t.Cleanup(tr.CloseIdleConnections)
		cl := &acme.Client{Key: key, DirectoryURL: tg.Authority().AgentACMEDirectoryURL(), HTTPClient: &http.Client{Transport: tr}}
		if _, err := cl.Register(ctx, &acme.Account{ExternalAccountBinding: &acme.ExternalAccountBinding{KID: cred.KeyID, Key: cred.HMAC}}, acme.AcceptTOS); err != nil {
			t.Fatalf("register %s: %v", name, err)
		}
		return cl, key
	}
	_, keyA := register("db1")
	clB, _ := register("db1")

	// A's validation connection, bound, answering any tls-alpn-01 handshake with a
	// certificate for B's challenge (the worst case: A knows B's token).
	connA := dialACMEBind(t, tg)
	defer connA.Close()
	if err := sendBindHello(connA, keyA); err != nil {
		t.Fatal(err)
	}
	var ans struct {
		OK bool `json:"ok"`
	}
	if err := json.NewDecoder(connA).Decode(&ans); err != nil || !ans.OK {
		t.Fatalf("bind A: %+v %v", ans, err)
	}

	nameB := tg.Authority().AgentACMEName("db1")
	order, err := clB.AuthorizeOrder(ctx, acme.DomainIDs(nameB))
	if err != nil {
		t.Fatal(err)
	}
	z, err := clB.GetAuthorization(ctx, order.AuthzURLs[0])
	if err != nil {
		t.Fatal(err)
	}
	var chal *acme.Challenge
	for _, c := range z.Challenges {
		if c.Type == "tls-alpn-01" {
			chal = c
		}
	}
	if chal == nil {
		t.Fatal("no tls-alpn-01 challenge")
	}
	cert, err := clB.TLSALPN01ChallengeCert(chal.Token, nameB)
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() {
		srv := tls.Server(connA, &tls.Config{NextProtos: []string{acme.ALPNProto}, Certificates: []tls.Certificate{cert}})
		_ = srv.SetDeadline(time.Now().Add(20 * time.Second))
		served <- srv.Handshake()
	}()
	got, err := clB.Accept(ctx, chal)
	if err == nil && got.Error == nil && got.Status == acme.StatusValid {
		t.Fatal("B's challenge was validated")
	}
	tg.waitAudit("refused validation for B", func(r audit.Record) bool {
		return r.Type == audit.TypeAgentEnrolled && r.Outcome == audit.OutcomeDenied && r.Agent == "db1" &&
			r.Extra["acme_action"] == "challenge"
	})
	if n := func() int { tg.acmeBinds.mu.Lock(); defer tg.acmeBinds.mu.Unlock(); return tg.acmeBinds.n }(); n != 1 {
		t.Fatalf("%d bound connections waiting, want A's still there", n)
	}
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	csr, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{DNSNames: []string{nameB}}, key)
	ctx2, cancel2 := context.WithTimeout(ctx, 3*time.Second)
	defer cancel2()
	if _, _, err := clB.CreateOrderCert(ctx2, order.FinalizeURL, csr, false); err == nil {
		t.Fatal("certificate issued to B without a validation")
	}
	if got, _ := tg.Authority().Issued(ctx, ca.Identity{TrustDomain: tg.Authority().TrustDomain(), Role: ca.RoleAgent, Name: "db1"}); len(got) != 0 {
		t.Fatalf("issued for db1: %v", got)
	}
	connA.Close()
	<-served
}
