package pgwire

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"strconv"
	"strings"
	"time"
)

// SSL modes of a [Target], with libpq's meaning for the leg from the agent to the database.
const (
	SSLDisable    = "disable"     // plain TCP; never ask for TLS
	SSLPrefer     = "prefer"      // TLS if the server offers it, unverified; plain if it does not (the default, as libpq)
	SSLRequire    = "require"     // TLS or nothing; the certificate is verified only when sslrootcert is given (as libpq)
	SSLVerifyCA   = "verify-ca"   // TLS with a certificate chaining to sslrootcert (or the system roots)
	SSLVerifyFull = "verify-full" // verify-ca, and the certificate names the URL's host
)

// ErrDatabaseTLS marks a failure of the TLS negotiation with the database: the server
// refused TLS that the resource requires, or its certificate did not verify.
var ErrDatabaseTLS = errors.New("database TLS")

// Target is a PostgreSQL resource as an agent exposes it:
//
//	--expose NAME=postgres://HOST[:PORT][?sslmode=MODE&sslrootcert=FILE&record=statements]
//
// The URL carries no user, password or database: the client authenticates to the database
// itself, end to end, and chooses its database in its StartupMessage. sslmode is one of
// disable, prefer (the default, as libpq), require, verify-ca and verify-full; sslrootcert
// names a PEM file of the CA certificates that verify the server (default: the system
// roots). record=statements asks the gateway to keep the text of each statement in the
// session's statement log, not only its hash.
type Target struct {
	// Addr is HOST:PORT, the address the agent dials.
	Addr string
	// Host is the URL's host, the name verify-full checks and the TLS server name sent.
	Host string
	// SSLMode is one of the SSL* constants.
	SSLMode string
	// RootCertFile is the sslrootcert file, "" for the system roots.
	RootCertFile string
	// RecordText is record=statements: statement texts are kept, not only their hashes.
	RecordText bool

	roots *x509.CertPool
}

// IsURL reports whether an --expose target is a protocol URL rather than HOST:PORT.
func IsURL(s string) bool { return strings.Contains(s, "://") }

// ParseURL parses a postgres:// (or postgresql://) resource URL and loads its sslrootcert,
// so a bad file is found when the agent starts rather than at the first connection.
func ParseURL(s string) (*Target, error) {
	u, err := url.Parse(s)
	if err != nil {
		return nil, fmt.Errorf("resource URL %q does not parse: %v", s, err)
	}
	if u.Scheme != "postgres" && u.Scheme != "postgresql" {
		return nil, fmt.Errorf("resource URL %q: scheme %q is not supported; use postgres://HOST:PORT, or HOST:PORT for a raw TCP resource", s, u.Scheme)
	}
	if u.User != nil {
		return nil, fmt.Errorf("resource URL %s: remove the user and password: the client authenticates to the database itself", u.Redacted())
	}
	if u.Path != "" && u.Path != "/" {
		return nil, fmt.Errorf("resource URL %s: remove the database %q: the client chooses its database", s, strings.TrimPrefix(u.Path, "/"))
	}
	if u.Hostname() == "" {
		return nil, fmt.Errorf("resource URL %q has no host; use postgres://HOST:PORT", s)
	}
	port := u.Port()
	if port == "" {
		port = "5432"
	}
	if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
		return nil, fmt.Errorf("resource URL %q: port %q is not a number from 1 to 65535", s, port)
	}
	t := &Target{Addr: net.JoinHostPort(u.Hostname(), port), Host: u.Hostname(), SSLMode: SSLPrefer}
	q := u.Query()
	for k, vs := range q {
		v := vs[len(vs)-1]
		switch k {
		case "sslmode":
			switch v {
			case SSLDisable, SSLPrefer, SSLRequire, SSLVerifyCA, SSLVerifyFull:
				t.SSLMode = v
			default:
				return nil, fmt.Errorf("resource URL %q: sslmode %q is not one of disable, prefer, require, verify-ca, verify-full", s, v)
			}
		case "sslrootcert":
			t.RootCertFile = v
		case "record":
			switch v {
			case "statements":
				t.RecordText = true
			case "hashes":
			default:
				return nil, fmt.Errorf("resource URL %q: record %q is not statements (keep statement texts) or hashes (the default)", s, v)
			}
		default:
			return nil, fmt.Errorf("resource URL %q: parameter %q is not supported (sslmode, sslrootcert, record)", s, k)
		}
	}
	if t.RootCertFile != "" {
		if t.SSLMode == SSLDisable || t.SSLMode == SSLPrefer {
			return nil, fmt.Errorf("resource URL %q: sslrootcert needs sslmode require, verify-ca or verify-full", s)
		}
		pem, err := os.ReadFile(t.RootCertFile)
		if err != nil {
			return nil, fmt.Errorf("resource URL %q: cannot read sslrootcert: %v", s, err)
		}
		t.roots = x509.NewCertPool()
		if !t.roots.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("resource URL %q: sslrootcert %s holds no PEM certificate", s, t.RootCertFile)
		}
	}
	return t, nil
}

// String is the URL in its canonical form.
func (t *Target) String() string {
	q := url.Values{"sslmode": {t.SSLMode}}
	if t.RootCertFile != "" {
		q.Set("sslrootcert", t.RootCertFile)
	}
	if t.RecordText {
		q.Set("record", "statements")
	}
	return (&url.URL{Scheme: "postgres", Host: t.Addr, RawQuery: q.Encode()}).String()
}

// sslRequest is the 8-byte SSLRequest packet: length 8, code 80877103.
var sslRequest = binary.BigEndian.AppendUint32(binary.BigEndian.AppendUint32(nil, 8), 80877103)

// Negotiate runs the SSLRequest exchange on conn, a fresh TCP connection to the database,
// as the target's sslmode asks, and returns the connection to carry the session on: a
// *tls.Conn, or conn itself when the session stays plain (disable, or prefer with a server
// that declined). An error wraps [ErrDatabaseTLS] when the database refused TLS that the
// mode requires or its certificate did not verify; conn is then the caller's to close.
func (t *Target) Negotiate(ctx context.Context, conn net.Conn) (net.Conn, error) {
	if t.SSLMode == SSLDisable {
		return conn, nil
	}
	if dl, ok := ctx.Deadline(); ok {
		conn.SetDeadline(dl)
		defer conn.SetDeadline(time.Time{})
	}
	if _, err := conn.Write(sslRequest); err != nil {
		return nil, fmt.Errorf("send the SSLRequest to the database: %w", err)
	}
	var b [1]byte
	if _, err := io.ReadFull(conn, b[:]); err != nil {
		return nil, fmt.Errorf("read the database's answer to the SSLRequest: %w", err)
	}
	switch b[0] {
	case 'N':
		if t.SSLMode == SSLPrefer {
			return conn, nil
		}
		return nil, fmt.Errorf("%w: the database does not accept TLS, and the resource asks sslmode=%s; enable ssl on the server or change sslmode", ErrDatabaseTLS, t.SSLMode)
	case 'S':
	default:
		return nil, fmt.Errorf("the database answered the SSLRequest with byte %#x, not S or N: is it a PostgreSQL server?", b[0])
	}
	tc := tls.Client(conn, t.tlsConfig())
	if err := tc.HandshakeContext(ctx); err != nil {
		return nil, fmt.Errorf("%w: handshake with the database (sslmode=%s): %w", ErrDatabaseTLS, t.SSLMode, err)
	}
	return tc, nil
}

// tlsConfig is the client configuration for the target's mode. prefer, and require
// without sslrootcert, encrypt without verifying, as libpq does; verify-ca checks the
// chain only; verify-full checks the chain and the host name.
func (t *Target) tlsConfig() *tls.Config {
	cfg := &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: t.roots}
	if net.ParseIP(t.Host) == nil {
		cfg.ServerName = t.Host // SNI, as libpq's sslsni=1
	}
	mode := t.SSLMode
	if mode == SSLRequire && t.roots != nil {
		mode = SSLVerifyCA // libpq: require with a root certificate file verifies like verify-ca
	}
	switch mode {
	case SSLVerifyFull:
		cfg.ServerName = t.Host
	case SSLVerifyCA:
		cfg.InsecureSkipVerify = true // the chain is checked below, without the host name
		roots := t.roots
		cfg.VerifyPeerCertificate = func(raw [][]byte, _ [][]*x509.Certificate) error {
			return verifyChain(raw, roots)
		}
	default:
		cfg.InsecureSkipVerify = true
	}
	return cfg
}

// verifyChain checks the server's certificates against roots (nil: the system roots),
// ignoring the name.
func verifyChain(raw [][]byte, roots *x509.CertPool) error {
	if len(raw) == 0 {
		return errors.New("the database presented no certificate")
	}
	certs := make([]*x509.Certificate, len(raw))
	for i, der := range raw {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return fmt.Errorf("the database's certificate does not parse: %v", err)
		}
		certs[i] = c
	}
	inter := x509.NewCertPool()
	for _, c := range certs[1:] {
		inter.AddCert(c)
	}
	_, err := certs[0].Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter})
	return err
}
