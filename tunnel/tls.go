package tunnel

import (
	"crypto/tls"
	"crypto/x509"
)

// curves are the key exchanges Wicket allows: X25519 first (fast, constant
// time), P-256 for FIPS-minded peers. The post-quantum hybrid
// X25519MLKEM768 that Go enables by default is deliberately left out to keep
// the ClientHello small and to match DESIGN.md; adding it is a one-line change
// here once every peer runs Go >= 1.24.
var curves = []tls.CurveID{tls.X25519, tls.CurveP256}

// ClientTLSConfig returns the TLS configuration for the side that dials out
// (agents and users): TLS 1.3 only, X25519/P-256, the gateway verified against
// roots under serverName, and exactly one ALPN protocol, alpn, which Dial then
// requires the server to select.
//
// getCert is called on every handshake, so a certificate renewed on disk (or
// in memory) is used by the next connection without rebuilding this config.
func ClientTLSConfig(alpn string, roots *x509.CertPool, serverName string,
	getCert func(*tls.CertificateRequestInfo) (*tls.Certificate, error)) *tls.Config {
	return &tls.Config{
		MinVersion:           tls.VersionTLS13,
		MaxVersion:           tls.VersionTLS13,
		CurvePreferences:     curves,
		RootCAs:              roots,
		ServerName:           serverName,
		NextProtos:           []string{alpn},
		GetClientCertificate: getCert,
	}
}

// HardenServerTLS pins a server configuration to Wicket's rules: TLS 1.3
// only, X25519/P-256. It does not touch certificates, client auth or ALPN:
// those belong to the caller (the gateway requires client certificates on the
// tunnel ALPNs and only requests them on the CA API).
func HardenServerTLS(c *tls.Config) {
	c.MinVersion = tls.VersionTLS13
	c.MaxVersion = tls.VersionTLS13
	c.CurvePreferences = curves
}

// ServerTLSConfig is a complete mTLS server configuration for a listener that
// serves only tunnel ALPNs (tests, benchmarks, single-purpose servers): the
// client must present a certificate chaining to clientRoots, and verify (if
// not nil) is called after chain verification, e.g. to check role and
// revocation. The gateway, which multiplexes more ALPNs on one port, builds
// its own config and calls HardenServerTLS.
func ServerTLSConfig(getCert func(*tls.ClientHelloInfo) (*tls.Certificate, error),
	clientRoots *x509.CertPool, alpns []string, verify func(tls.ConnectionState) error) *tls.Config {
	c := &tls.Config{
		GetCertificate:   getCert,
		ClientAuth:       tls.RequireAndVerifyClientCert,
		ClientCAs:        clientRoots,
		NextProtos:       alpns,
		VerifyConnection: verify,
	}
	HardenServerTLS(c)
	return c
}
