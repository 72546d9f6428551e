package ca

import (
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestTwoGatewaysSharePostgres: two CA instances with the same PKI and the same
// PostgreSQL database (the multi-gateway setup). A token is single-use across both,
// and a revocation on one reaches the other's IsRevoked and OnRevoke.
func TestTwoGatewaysSharePostgres(t *testing.T) {
	dsn := freshPostgres(t)
	dir1 := t.TempDir()
	gotB := make(chan []string, 4)
	a := startEnv(t, dir1, dsn, func(c *Config) { c.RevocationSync = 50 * time.Millisecond })
	dir2 := t.TempDir()
	for _, f := range stateFiles {
		b, err := os.ReadFile(filepath.Join(dir1, f))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir2, f), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	b := startEnv(t, dir2, dsn, func(c *Config) {
		c.RevocationSync = 50 * time.Millisecond
		c.OnRevoke = func(s []string) { gotB <- s }
	})
	if a.a.RootFingerprint() != b.a.RootFingerprint() {
		t.Fatal("not the same PKI")
	}
	// Single use across gateways: enroll through A, then replay at B.
	tok := mustToken(t, a.a, RoleAgent, "shared")
	creds := mustEnroll(t, tok)
	err := signCSR(t, b, tok, "shared", []string{"spiffe://wicket.local/agent/shared"}, nil)
	wantErr(t, err, ErrTokenUsed)

	serial := creds.Chain[0].SerialNumber.String()
	if _, err := b.a.VerifyPeer(creds.Chain, RoleAgent); err != nil {
		t.Fatal(err)
	}
	if err := a.a.Revoke(ctx10s(t), serial, "test"); err != nil {
		t.Fatal(err)
	}
	select {
	case s := <-gotB:
		if len(s) != 1 || s[0] != serial {
			t.Fatalf("B's OnRevoke(%v), want [%s]", s, serial)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("B never saw A's revocation")
	}
	_, err = b.a.VerifyPeer(creds.Chain, RoleAgent)
	wantErr(t, err, ErrRevoked)
}
