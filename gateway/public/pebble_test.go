package public

import (
	"crypto/x509"
	"io"
	"log"
	"net"
	"net/http/httptest"
	"os"
	"strconv"
	"testing"

	"github.com/letsencrypt/pebble/v2/ca"
	"github.com/letsencrypt/pebble/v2/db"
	"github.com/letsencrypt/pebble/v2/va"
	"github.com/letsencrypt/pebble/v2/wfe"
	"github.com/miekg/dns"
)

// pebbleEnv sets Pebble's environment knobs before any VA or WFE is built: validate at once
// (no random 0-5 s sleeps), no injected bad nonces (acmez retries them, but they only slow the
// tests down), and never reuse a valid authorization, so every order (renewals included)
// really validates a challenge against our listeners.
func pebbleEnv() {
	os.Setenv("PEBBLE_VA_NOSLEEP", "1")
	os.Setenv("PEBBLE_WFE_NONCEREJECT", "0")
	os.Setenv("PEBBLE_AUTHZREUSE", "0")
}

// pebbleCA is Let's Encrypt's Pebble ACME server running in-process: its real ca, db, va and
// wfe packages behind an httptest TLS server.
type pebbleCA struct {
	srv *httptest.Server
	// DirectoryURL is the ACME directory.
	DirectoryURL string
	// APIRoots trusts the ACME endpoint's own HTTPS certificate.
	APIRoots *x509.CertPool
	// IssuedRoots trusts the certificates Pebble issues (what a browser would have).
	IssuedRoots *x509.CertPool
}

// startPebble runs Pebble whose VA validates http-01 on httpPort and tls-alpn-01 on tlsPort,
// resolving every name through the DNS server at dnsAddr. validity is the certificate lifetime
// in seconds (0: Pebble's default, 90 days).
func startPebble(t testing.TB, httpPort, tlsPort int, dnsAddr string, validity uint64) *pebbleCA {
	t.Helper()
	logger := log.New(io.Discard, "", 0)
	if os.Getenv("PEBBLE_LOG") != "" {
		logger = log.New(os.Stderr, "pebble ", log.Lmicroseconds)
	}
	store := db.NewMemoryStore()
	authority := ca.New(logger, store, "", "ecdsa", 0, 1, map[string]ca.Profile{
		"default": {Description: "test profile", ValidityPeriod: validity},
	})
	validator := va.New(logger, httpPort, tlsPort, false, dnsAddr, store)
	front := wfe.New(logger, store, validator, authority, []string{"pebble.letsencrypt.org"}, false, false, 0, 0)
	srv := httptest.NewUnstartedServer(front.Handler())
	srv.StartTLS()
	t.Cleanup(srv.Close)

	api := x509.NewCertPool()
	api.AddCert(srv.Certificate())
	issued := x509.NewCertPool()
	issued.AddCert(authority.GetRootCert(0).Cert)
	return &pebbleCA{srv: srv, DirectoryURL: srv.URL + wfe.DirectoryPath, APIRoots: api, IssuedRoots: issued}
}

// Stop makes the ACME server unreachable (connections refused from now on).
func (p *pebbleCA) Stop() { p.srv.Close() }

// startDNS answers every A question with 127.0.0.1 and nothing else (Pebble's VA asks over
// TCP), so test names like web.wicket.test resolve to our loopback listeners.
func startDNS(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &dns.Server{Listener: ln, Handler: dns.HandlerFunc(func(w dns.ResponseWriter, q *dns.Msg) {
		m := new(dns.Msg)
		m.SetReply(q)
		for _, qq := range q.Question {
			if qq.Qtype == dns.TypeA {
				m.Answer = append(m.Answer, &dns.A{
					Hdr: dns.RR_Header{Name: qq.Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 0},
					A:   net.IPv4(127, 0, 0, 1),
				})
			}
		}
		_ = w.WriteMsg(m)
	})}
	started := make(chan struct{})
	srv.NotifyStartedFunc = func() { close(started) }
	done := make(chan struct{})
	go func() { defer close(done); _ = srv.ActivateAndServe() }()
	<-started
	t.Cleanup(func() { _ = srv.Shutdown(); <-done })
	return ln.Addr().String()
}

func portNum(t testing.TB, ln net.Listener) int {
	_, p, _ := net.SplitHostPort(ln.Addr().String())
	n, err := strconv.Atoi(p)
	if err != nil {
		t.Fatal(err)
	}
	return n
}
