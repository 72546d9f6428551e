package pgwire

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"io"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"
)

// serverCert is the certificate of the PostgreSQL at 127.0.0.1:5432 (Debian's snakeoil
// certificate, self-signed, for DNS name localhost).
const serverCert = "/etc/ssl/certs/ssl-cert-snakeoil.pem"

func TestParseURL(t *testing.T) {
	good := []struct {
		in   string
		want Target
	}{
		{"postgres://127.0.0.1", Target{Addr: "127.0.0.1:5432", Host: "127.0.0.1", SSLMode: SSLPrefer}},
		{"postgresql://db.internal:6432/?sslmode=disable", Target{Addr: "db.internal:6432", Host: "db.internal", SSLMode: SSLDisable}},
		{"postgres://[::1]:5433?sslmode=require&record=statements", Target{Addr: "[::1]:5433", Host: "::1", SSLMode: SSLRequire, RecordText: true}},
		{"postgres://localhost?sslmode=verify-full&sslrootcert=" + serverCert, Target{Addr: "localhost:5432", Host: "localhost", SSLMode: SSLVerifyFull, RootCertFile: serverCert}},
	}
	for _, c := range good {
		got, err := ParseURL(c.in)
		if err != nil {
			t.Errorf("ParseURL(%q): %v", c.in, err)
			continue
		}
		got.roots = nil
		if *got != c.want {
			t.Errorf("ParseURL(%q) = %+v, want %+v", c.in, *got, c.want)
		}
		if again, err := ParseURL(got.String()); err != nil || again.Addr != got.Addr || again.SSLMode != got.SSLMode || again.RecordText != got.RecordText {
			t.Errorf("String() %q does not parse back to the same target: %+v, %v", got.String(), again, err)
		}
	}
	bad := []struct{ in, says string }{
		{"mysql://127.0.0.1", "scheme"},
		{"postgres://bob:secret@127.0.0.1", "remove the user and password"},
		{"postgres://127.0.0.1/app", "the client chooses its database"},
		{"postgres://127.0.0.1?sslmode=allow", "sslmode"},
		{"postgres://127.0.0.1?sslmode=prefer&sslrootcert=" + serverCert, "sslrootcert needs"},
		{"postgres://127.0.0.1?sslmode=verify-ca&sslrootcert=/nonexistent/root.pem", "cannot read sslrootcert"},
		{"postgres://127.0.0.1?connect_timeout=3", "not supported"},
		{"postgres://127.0.0.1?record=everything", "record"},
		{"postgres://127.0.0.1:99999", "port"},
		{"postgres://:5432", "no host"},
	}
	for _, c := range bad {
		_, err := ParseURL(c.in)
		if err == nil || !strings.Contains(err.Error(), c.says) {
			t.Errorf("ParseURL(%q) = %v, want an error saying %q", c.in, err, c.says)
		}
		if err != nil && strings.Contains(err.Error(), "secret") {
			t.Errorf("ParseURL's error repeats the password: %v", err)
		}
	}
}

// dialPG dials the local PostgreSQL; the tests need it and fail when it is missing.
func dialPG(t *testing.T) net.Conn {
	t.Helper()
	c, err := net.DialTimeout("tcp", "127.0.0.1:5432", 5*time.Second)
	if err != nil {
		t.Fatalf("PostgreSQL must run at 127.0.0.1:5432 with ssl=on for this test: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// startupAnswered sends a StartupMessage on c and checks the server answers it with an
// authentication request or ReadyForQuery path, proving the negotiated connection carries
// the protocol.
func startupAnswered(t *testing.T, c net.Conn) {
	t.Helper()
	msg, err := (&pgproto3.StartupMessage{ProtocolVersion: pgproto3.ProtocolVersionNumber,
		Parameters: map[string]string{"user": "postgres", "database": "postgres"}}).Encode(nil)
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write(msg); err != nil {
		t.Fatal(err)
	}
	var b [1]byte
	if _, err := io.ReadFull(c, b[:]); err != nil || b[0] != 'R' {
		t.Fatalf("the server did not answer the startup with an authentication message: %q, %v", b[0], err)
	}
}

func TestNegotiateWithPostgres(t *testing.T) {
	other := writeOtherCA(t)
	cases := []struct {
		url     string
		tls     bool
		failure string // "" when it must succeed
	}{
		{"postgres://127.0.0.1?sslmode=disable", false, ""},
		{"postgres://127.0.0.1", true, ""},
		{"postgres://127.0.0.1?sslmode=require", true, ""},
		{"postgres://127.0.0.1?sslmode=verify-ca&sslrootcert=" + serverCert, true, ""},
		{"postgres://localhost?sslmode=verify-full&sslrootcert=" + serverCert, true, ""},
		// The certificate names localhost, not the address.
		{"postgres://127.0.0.1?sslmode=verify-full&sslrootcert=" + serverCert, false, "127.0.0.1"},
		{"postgres://localhost?sslmode=verify-full&sslrootcert=" + other, false, "unknown authority"},
		{"postgres://localhost?sslmode=require&sslrootcert=" + other, false, "unknown authority"},
		// Without sslrootcert the system roots verify: Go reads every file in /etc/ssl/certs,
		// where Debian keeps the snakeoil certificate too.
		{"postgres://localhost?sslmode=verify-full", true, ""},
	}
	for _, c := range cases {
		t.Run(c.url, func(t *testing.T) {
			tgt, err := ParseURL(c.url)
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			conn, err := tgt.Negotiate(ctx, dialPG(t))
			if c.failure != "" {
				if err == nil || !errors.Is(err, ErrDatabaseTLS) || !strings.Contains(err.Error(), c.failure) {
					t.Fatalf("Negotiate = %v, want an ErrDatabaseTLS saying %q", err, c.failure)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			tc, isTLS := conn.(*tls.Conn)
			if isTLS != c.tls {
				t.Fatalf("TLS = %v, want %v", isTLS, c.tls)
			}
			if isTLS && !tc.ConnectionState().HandshakeComplete {
				t.Fatal("the handshake is not complete")
			}
			startupAnswered(t, conn)
		})
	}
}

// TestNegotiateRefusedTLS is a server that declines TLS: prefer stays plain, require fails
// with a sentence that says what to change.
func TestNegotiateRefusedTLS(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			var req [8]byte
			io.ReadFull(c, req[:])
			c.Write([]byte{'N'})
			c.Close()
		}
	}()
	for _, mode := range []string{SSLPrefer, SSLRequire, SSLVerifyFull} {
		tgt, err := ParseURL("postgres://" + ln.Addr().String() + "?sslmode=" + mode)
		if err != nil {
			t.Fatal(err)
		}
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		got, err := tgt.Negotiate(context.Background(), c)
		c.Close()
		switch {
		case mode == SSLPrefer && (err != nil || got != c):
			t.Errorf("prefer with a server without TLS: %v, %T", err, got)
		case mode != SSLPrefer && (err == nil || !errors.Is(err, ErrDatabaseTLS) || !strings.Contains(err.Error(), "does not accept TLS")):
			t.Errorf("%s with a server without TLS: %v", mode, err)
		}
	}
}

// writeOtherCA writes a throwaway CA certificate that did not sign the server's.
func writeOtherCA(t *testing.T) string {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "not the database's CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IsCA: true,
		BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), "other.pem")
	if err := os.WriteFile(p, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}
