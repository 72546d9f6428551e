// Package testpki builds small certificate hierarchies for the agent's tests:
// a root, an intermediate and SPIFFE leaf certificates, made with crypto/x509
// directly so that the tests do not depend on a running CA. It must NOT be
// imported by non-test code.
package testpki

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"math/big"
	"net"
	"net/url"
	"sync/atomic"
	"time"

	"go.step.sm/crypto/jose"

	"github.com/wicketgw/wicket/ca"
)

// PKI is a root and an intermediate that issue leaves.
type PKI struct {
	TrustDomain string
	Root        *x509.Certificate
	Inter       *x509.Certificate
	rootKey     crypto.Signer
	interKey    crypto.Signer
}

var serial atomic.Int64

func nextSerial() *big.Int { return big.NewInt(1000 + serial.Add(1)) }

func key() *ecdsa.PrivateKey {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		panic(err)
	}
	return k
}

func sign(tmpl, parent *x509.Certificate, pub crypto.PublicKey, signer crypto.Signer) *x509.Certificate {
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, signer)
	if err != nil {
		panic(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		panic(err)
	}
	return c
}

// New returns a PKI for trust domain td, valid around now.
func New(td string) *PKI {
	now := time.Now()
	rk, ik := key(), key()
	rt := &x509.Certificate{
		SerialNumber: nextSerial(), Subject: pkix.Name{CommonName: "test root"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(10 * 24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	root := sign(rt, rt, rk.Public(), rk)
	it := &x509.Certificate{
		SerialNumber: nextSerial(), Subject: pkix.Name{CommonName: "test intermediate"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(10 * 24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign, MaxPathLenZero: true,
	}
	inter := sign(it, root, ik.Public(), rk)
	return &PKI{TrustDomain: td, Root: root, Inter: inter, rootKey: rk, interKey: ik}
}

// Issue returns credentials for role/name valid from notBefore to notAfter.
// A gateway role also gets DNS name "localhost" and IP 127.0.0.1 for serving.
func (p *PKI) Issue(role ca.Role, name string, notBefore, notAfter time.Time) *ca.Credentials {
	return p.IssueWithKey(key(), role, name, notBefore, notAfter)
}

// IssueWithKey is Issue with a given key (a renewal keeps the key).
func (p *PKI) IssueWithKey(k crypto.Signer, role ca.Role, name string, notBefore, notAfter time.Time) *ca.Credentials {
	id := &url.URL{Scheme: "spiffe", Host: p.TrustDomain, Path: "/" + string(role) + "/" + name}
	t := &x509.Certificate{
		SerialNumber: nextSerial(), Subject: pkix.Name{CommonName: name},
		NotBefore: notBefore, NotAfter: notAfter,
		URIs:        []*url.URL{id},
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth},
	}
	if role == ca.RoleGateway {
		t.DNSNames = []string{"localhost"}
		t.IPAddresses = []net.IP{net.IPv4(127, 0, 0, 1)}
	}
	leaf := sign(t, p.Inter, k.Public(), p.interKey)
	return &ca.Credentials{Key: k, Chain: []*x509.Certificate{leaf, p.Inter}, Root: p.Root}
}

// ClientCAs is what a test gateway verifies client certificates against:
// the root and the intermediate. Like the real gateway, which is the CA and
// holds its intermediate, it must accept the bare leaf that agents and users
// present (identity.Renewer sends no chain).
func (p *PKI) ClientCAs() *x509.CertPool {
	pool := x509.NewCertPool()
	pool.AddCert(p.Root)
	pool.AddCert(p.Inter)
	return pool
}

// Token returns a token shaped like the CA's one-time tokens (sub, sans,
// aud = url+"/1.0/sign", sha, exp), signed by a throwaway key: enough for
// ca.InspectToken, which does not verify signatures (the CA does).
func (p *PKI) Token(role ca.Role, name, gatewayURL string, exp time.Time) string {
	k := key()
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.ES256, Key: k}, new(jose.SignerOptions).WithType("JWT"))
	if err != nil {
		panic(err)
	}
	sum := sha256.Sum256(p.Root.Raw)
	claims := struct {
		jose.Claims
		SANs []string `json:"sans"`
		SHA  string   `json:"sha"`
	}{
		Claims: jose.Claims{
			Subject: name, Audience: jose.Audience{gatewayURL + "/1.0/sign"},
			ID: nextSerial().String(), IssuedAt: jose.NewNumericDate(time.Now()), Expiry: jose.NewNumericDate(exp),
		},
		SANs: []string{(&url.URL{Scheme: "spiffe", Host: p.TrustDomain, Path: "/" + string(role) + "/" + name}).String()},
		SHA:  hex.EncodeToString(sum[:]),
	}
	tok, err := jose.Signed(signer).Claims(claims).CompactSerialize()
	if err != nil {
		panic(err)
	}
	return tok
}
