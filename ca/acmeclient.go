package ca

import (
	"bufio"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	"golang.org/x/crypto/acme"
)

// ACMEBindALPN is the ALPN protocol on the gateway's port of an agent's ACME
// validation connection (see the package documentation).
const ACMEBindALPN = "wicket-acme/1"

// acmeCredentialPrefix starts every ACME enrollment credential, so that `wicket agent
// --token` tells it from a JWT bootstrap token.
const acmeCredentialPrefix = "wicket-acme-v1."

// ACMECredential is a one-time enrollment credential for agent enrollment by ACME:
// where to enroll, which root to pin, and the External Account Binding key bound to
// the agent's name. It is a secret until used (HMAC), like a bootstrap token.
type ACMECredential struct {
	URL             string    `json:"url"`  // gateway base URL
	RootFingerprint string    `json:"sha"`  // hex SHA-256 of the root
	KeyID           string    `json:"kid"`  // EAB key id
	HMAC            []byte    `json:"hmac"` // EAB HMAC key
	Name            string    `json:"name"` // agent name
	TrustDomain     string    `json:"td"`   // SPIFFE trust domain
	Expiry          time.Time `json:"exp"`  // after it, the CA refuses the EAB key
}

// String encodes the credential: "wicket-acme-v1." + base64url(JSON).
func (c ACMECredential) String() string {
	b, _ := json.Marshal(c)
	return acmeCredentialPrefix + base64.RawURLEncoding.EncodeToString(b)
}

// IsACMECredential reports whether s looks like an ACME enrollment credential
// (rather than a JWT bootstrap token).
func IsACMECredential(s string) bool {
	return strings.HasPrefix(strings.TrimSpace(s), acmeCredentialPrefix)
}

// ParseACMECredential decodes and checks the shape of an ACME enrollment credential.
func ParseACMECredential(s string) (ACMECredential, error) {
	s = strings.TrimSpace(s)
	rest, ok := strings.CutPrefix(s, acmeCredentialPrefix)
	if !ok {
		return ACMECredential{}, fmt.Errorf("%w: not an ACME enrollment credential", ErrTokenInvalid)
	}
	b, err := base64.RawURLEncoding.DecodeString(rest)
	var c ACMECredential
	if err == nil {
		err = json.Unmarshal(b, &c)
	}
	if err != nil {
		return ACMECredential{}, fmt.Errorf("%w: unreadable ACME enrollment credential (copy the whole string)", ErrTokenInvalid)
	}
	u, err := url.Parse(c.URL)
	if err != nil || u.Scheme != "https" || u.Host == "" {
		return ACMECredential{}, fmt.Errorf("%w: bad gateway URL %q", ErrTokenInvalid, c.URL)
	}
	if len(c.RootFingerprint) != 64 || c.KeyID == "" || len(c.HMAC) == 0 || c.TrustDomain == "" || c.Expiry.IsZero() {
		return ACMECredential{}, fmt.Errorf("%w: incomplete ACME enrollment credential", ErrTokenInvalid)
	}
	if err := ValidName(c.Name); err != nil {
		return ACMECredential{}, fmt.Errorf("%w: %v", ErrTokenInvalid, err)
	}
	return c, nil
}

// NewAgentACMECredential creates an EAB key for agent name (NewAgentEABKey) and
// returns the enrollment credential that carries it.
func (a *Authority) NewAgentACMECredential(ctx context.Context, name string, ttl time.Duration) (ACMECredential, error) {
	kid, hmac, exp, err := a.NewAgentEABKey(ctx, name, ttl)
	if err != nil {
		return ACMECredential{}, err
	}
	return ACMECredential{URL: a.cfg.URL, RootFingerprint: a.rootFP, KeyID: kid, HMAC: hmac,
		Name: name, TrustDomain: a.cfg.TrustDomain, Expiry: exp}, nil
}

// bindLabel is the TLS exporter label (and signature context) of the bind proof.
const bindLabel = "EXPORTER-wicket-acme-bind"

type bindHello struct {
	Key []byte `json:"key"` // PKIX public key of the ACME account
	Sig []byte `json:"sig"` // ECDSA (ASN.1) over SHA-256(label || exporter)
}

type bindAnswer struct {
	OK    bool   `json:"ok"`
	Error string `json:"error,omitempty"`
}

func bindDigest(cs tls.ConnectionState) ([]byte, error) {
	ekm, err := cs.ExportKeyingMaterial(bindLabel, nil, 32)
	if err != nil {
		return nil, err
	}
	h := sha256.New()
	h.Write([]byte(bindLabel))
	h.Write(ekm)
	return h.Sum(nil), nil
}

// maxBindHello bounds the bind hello a peer without a certificate may send.
const maxBindHello = 4 << 10

// ReadACMEBind reads an agent's bind hello on a server-side ACMEBindALPN connection
// and returns the ACME account public key whose possession (signature over this TLS
// session's exporter, so it cannot be replayed on another connection) it proves.
func ReadACMEBind(conn *tls.Conn) (crypto.PublicKey, error) {
	line, err := bufio.NewReaderSize(io.LimitReader(conn, maxBindHello), maxBindHello).ReadBytes('\n')
	if err != nil {
		return nil, fmt.Errorf("read bind hello: %w", err)
	}
	var h bindHello
	if err := json.Unmarshal(line, &h); err != nil {
		return nil, errors.New("bind hello: not JSON")
	}
	pub, err := x509.ParsePKIXPublicKey(h.Key)
	if err != nil {
		return nil, errors.New("bind hello: unreadable public key")
	}
	ek, ok := pub.(*ecdsa.PublicKey)
	if !ok {
		return nil, errors.New("bind hello: the account key must be ECDSA")
	}
	d, err := bindDigest(conn.ConnectionState())
	if err != nil {
		return nil, err
	}
	if !ecdsa.VerifyASN1(ek, d, h.Sig) {
		return nil, errors.New("bind hello: the signature does not verify")
	}
	return pub, nil
}

// AnswerACMEBind tells the agent whether its connection is bound (err nil) or not.
func AnswerACMEBind(conn net.Conn, err error) error {
	a := bindAnswer{OK: err == nil}
	if err != nil {
		a.Error = err.Error()
	}
	b, _ := json.Marshal(a)
	_, werr := conn.Write(append(b, '\n'))
	return werr
}

// agentACMEClient is the agent side of enrollment and renewal by ACME.
type agentACMEClient struct {
	cl       *acme.Client
	tr       *http.Transport
	base     string
	addr     string
	host     string
	pool     *x509.CertPool
	root     *x509.Certificate
	identity Identity
	dnsName  string
}

func newAgentACMEClient(base string, root *x509.Certificate, key crypto.Signer, id Identity) (*agentACMEClient, error) {
	u, err := url.Parse(base)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	pool.AddCert(root)
	tr := newTransport(&tls.Config{RootCAs: pool})
	addr := u.Host
	if u.Port() == "" {
		addr = net.JoinHostPort(u.Hostname(), "443")
	}
	return &agentACMEClient{
		cl: &acme.Client{Key: key, DirectoryURL: base + "/acme/" + agentACMEProvisionerName + "/directory",
			HTTPClient: &http.Client{Transport: tr, Timeout: clientTimeout}, UserAgent: "wicket-agent"},
		tr: tr, base: base, addr: addr, host: u.Hostname(), pool: pool, root: root, identity: id,
		dnsName: id.Name + ".agents." + id.TrustDomain,
	}, nil
}

// bind opens the validation connection: TLS 1.3 to the pinned gateway on
// ACMEBindALPN, proves possession of the account key, and waits for the gateway to
// confirm the binding. The returned conn answers one tls-alpn-01 validation.
func (c *agentACMEClient) bind(ctx context.Context) (*tls.Conn, error) {
	d := &tls.Dialer{Config: &tls.Config{RootCAs: c.pool, ServerName: c.host, MinVersion: tls.VersionTLS13,
		NextProtos: []string{ACMEBindALPN}}}
	raw, err := d.DialContext(ctx, "tcp", c.addr)
	if err != nil {
		return nil, fmt.Errorf("open the ACME validation connection: %w", err)
	}
	conn := raw.(*tls.Conn)
	fail := func(err error) (*tls.Conn, error) { conn.Close(); return nil, err }
	if conn.ConnectionState().NegotiatedProtocol != ACMEBindALPN {
		return fail(errors.New("the gateway does not support agent enrollment by ACME"))
	}
	if dl, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(dl)
	}
	dg, err := bindDigest(conn.ConnectionState())
	if err != nil {
		return fail(err)
	}
	sig, err := c.cl.Key.Sign(rand.Reader, dg, crypto.SHA256)
	if err != nil {
		return fail(err)
	}
	pk, err := x509.MarshalPKIXPublicKey(c.cl.Key.Public())
	if err != nil {
		return fail(err)
	}
	b, _ := json.Marshal(bindHello{Key: pk, Sig: sig})
	if _, err := conn.Write(append(b, '\n')); err != nil {
		return fail(fmt.Errorf("send the bind proof: %w", err))
	}
	line, err := bufio.NewReaderSize(io.LimitReader(conn, maxBindHello), 512).ReadBytes('\n')
	if err != nil {
		return fail(fmt.Errorf("read the bind answer: %w", err))
	}
	var ans bindAnswer
	if json.Unmarshal(line, &ans) != nil || !ans.OK {
		return fail(fmt.Errorf("%w: the gateway refused the ACME validation connection: %s", ErrRequestRefused, ans.Error))
	}
	_ = conn.SetDeadline(time.Time{})
	return conn, nil
}

// obtain orders the agent's name, answers tls-alpn-01 on a bound connection and
// finalizes with a CSR for key.
func (c *agentACMEClient) obtain(ctx context.Context, key crypto.Signer) (*Credentials, error) {
	order, err := c.cl.AuthorizeOrder(ctx, acme.DomainIDs(c.dnsName))
	if err != nil {
		return nil, fmt.Errorf("order %s: %w", c.dnsName, err)
	}
	for _, zurl := range order.AuthzURLs {
		z, err := c.cl.GetAuthorization(ctx, zurl)
		if err != nil {
			return nil, err
		}
		if z.Status == acme.StatusValid {
			continue
		}
		var chal *acme.Challenge
		for _, ch := range z.Challenges {
			if ch.Type == "tls-alpn-01" {
				chal = ch
			}
		}
		if chal == nil {
			return nil, errors.New("the CA offered no tls-alpn-01 challenge")
		}
		cert, err := c.cl.TLSALPN01ChallengeCert(chal.Token, c.dnsName)
		if err != nil {
			return nil, err
		}
		conn, err := c.bind(ctx)
		if err != nil {
			return nil, err
		}
		var wg sync.WaitGroup
		wg.Go(func() {
			defer conn.Close()
			srv := tls.Server(conn, &tls.Config{NextProtos: []string{acme.ALPNProto}, MinVersion: tls.VersionTLS12,
				Certificates: []tls.Certificate{cert}})
			hctx, cancel := context.WithTimeout(ctx, clientTimeout)
			defer cancel()
			_ = srv.HandshakeContext(hctx)
		})
		_, aerr := c.cl.Accept(ctx, chal)
		if aerr == nil {
			_, aerr = c.cl.WaitAuthorization(ctx, z.URI)
		}
		conn.Close()
		wg.Wait()
		if aerr != nil {
			return nil, fmt.Errorf("validate %s: %w", c.dnsName, aerr)
		}
	}
	if order, err = c.cl.WaitOrder(ctx, order.URI); err != nil {
		return nil, fmt.Errorf("order %s: %w", c.dnsName, err)
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{DNSNames: []string{c.dnsName}}, key)
	if err != nil {
		return nil, err
	}
	der, _, err := c.cl.CreateOrderCert(ctx, order.FinalizeURL, csr, true)
	if err != nil {
		return nil, fmt.Errorf("finalize %s: %w", c.dnsName, err)
	}
	var chain []*x509.Certificate
	for _, d := range der {
		x, err := x509.ParseCertificate(d)
		if err != nil {
			return nil, err
		}
		chain = append(chain, x)
	}
	if len(chain) == 0 {
		return nil, errors.New("the CA returned no certificate")
	}
	creds := &Credentials{Key: key, Chain: chain, Root: c.root}
	if err := checkCredentials(creds, c.identity); err != nil {
		return nil, err
	}
	return creds, nil
}

// EnrollACME enrolls the agent of cred by ACME: it pins the root, registers an
// account with the EAB key, orders <name>.agents.<td>, answers tls-alpn-01 through
// its own bound connection to the gateway, and returns the agent's credentials and
// the ACME account key (keep it, 0600, to renew by ACME).
func EnrollACME(ctx context.Context, cred ACMECredential) (*Credentials, crypto.Signer, error) {
	id := Identity{TrustDomain: cred.TrustDomain, Role: RoleAgent, Name: cred.Name}
	if time.Now().After(cred.Expiry) {
		return nil, nil, fmt.Errorf("enroll %s by ACME: %w", cred.Name, ErrEABExpired)
	}
	root, err := fetchPinnedRoot(ctx, cred.URL, cred.RootFingerprint)
	if err != nil {
		return nil, nil, fmt.Errorf("enroll %s by ACME: %w", cred.Name, err)
	}
	accKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	c, err := newAgentACMEClient(cred.URL, root, accKey, id)
	if err != nil {
		return nil, nil, err
	}
	defer c.tr.CloseIdleConnections()
	_, err = c.cl.Register(ctx, &acme.Account{ExternalAccountBinding: &acme.ExternalAccountBinding{
		KID: cred.KeyID, Key: cred.HMAC}}, acme.AcceptTOS)
	if err != nil {
		return nil, nil, fmt.Errorf("enroll %s by ACME: register the account: %w", cred.Name, acmeReason(err))
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	creds, err := c.obtain(ctx, key)
	if err != nil {
		return nil, nil, fmt.Errorf("enroll %s by ACME: %w", cred.Name, err)
	}
	return creds, accKey, nil
}

// RenewACME renews cur by a new ACME order of the same account (accountKey), with
// the same certificate key, validated through a new bound connection.
func RenewACME(ctx context.Context, baseURL string, accountKey crypto.Signer, cur *Credentials) (*Credentials, error) {
	if cur == nil || cur.Root == nil || len(cur.Chain) == 0 || cur.Key == nil || accountKey == nil {
		return nil, errors.New("renew by ACME: incomplete credentials")
	}
	id, err := ParseIdentity(cur.Chain[0])
	if err != nil {
		return nil, fmt.Errorf("renew by ACME: %w", err)
	}
	if time.Now().After(cur.Chain[0].NotAfter) {
		return nil, fmt.Errorf("renew %s by ACME: %w", id.Name, ErrExpired)
	}
	c, err := newAgentACMEClient(strings.TrimSuffix(baseURL, "/"), cur.Root, accountKey, id)
	if err != nil {
		return nil, err
	}
	defer c.tr.CloseIdleConnections()
	creds, err := c.obtain(ctx, cur.Key)
	if err != nil {
		return nil, fmt.Errorf("renew %s by ACME: %w", id.Name, acmeReason(err))
	}
	return creds, nil
}

// acmeReason maps the CA's problem details for enrollment credentials to our sentinels.
func acmeReason(err error) error {
	var ae *acme.Error
	if !errors.As(err, &ae) {
		return err
	}
	switch {
	case strings.Contains(ae.Detail, ErrEABUsed.Error()):
		return fmt.Errorf("%w (%v)", ErrEABUsed, err)
	case strings.Contains(ae.Detail, ErrEABExpired.Error()):
		return fmt.Errorf("%w (%v)", ErrEABExpired, err)
	case strings.Contains(ae.Detail, ErrEABUnknown.Error()):
		return fmt.Errorf("%w (%v)", ErrEABUnknown, err)
	}
	return err
}
