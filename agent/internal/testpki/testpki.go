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
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net"
	"net/url"
	"sync/atomic"
	"time"

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

// Pool returns a pool holding the root.
func (p *PKI) Pool() *x509.CertPool {
	pool := x509.NewCertPool()
	pool.AddCert(p.Root)
	return pool
}
