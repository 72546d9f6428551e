package agent

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/wicketgw/wicket/agent/identity"
	"github.com/wicketgw/wicket/agent/internal/testpki"
	"github.com/wicketgw/wicket/ca"
)

// fakeACME stands for ca.EnrollACME: issues for the credential's name.
type fakeACME struct {
	p     *testpki.PKI
	calls int
	err   error
}

func (f *fakeACME) enroll(ctx context.Context, cred ca.ACMECredential) (*ca.Credentials, crypto.Signer, error) {
	f.calls++
	if f.err != nil {
		return nil, nil, f.err
	}
	now := time.Now()
	acc, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	return f.p.Issue(ca.RoleAgent, cred.Name, now.Add(-time.Minute), now.Add(time.Hour)), acc, nil
}

func acmeCred(name string, exp time.Time) string {
	return ca.ACMECredential{URL: gwURL, RootFingerprint: strings.Repeat("a", 64), KeyID: "kid-" + name,
		HMAC: []byte("secret"), Name: name, TrustDomain: "example.test", Expiry: exp}.String()
}

func acmeConfig(t *testing.T, dir, cred string, f *fakeACME) *Config {
	t.Helper()
	cfg := &Config{DataDir: dir, Token: cred, Expose: map[string]string{"pg": "127.0.0.1:5432"},
		EnrollACME: f.enroll, Logger: testLogger(t)}
	if err := cfg.setDefaults(); err != nil {
		t.Fatal(err)
	}
	return cfg
}

func TestEnrollmentByACMERules(t *testing.T) {
	p := testpki.New("example.test")
	ctx := context.Background()
	dir := t.TempDir()
	cred := acmeCred("db1", time.Now().Add(15*time.Minute))
	f := &fakeACME{p: p}

	// The agent notices the kind of credential and enrolls by ACME; the account key
	// is stored (0600) and loaded back.
	s, err := obtainIdentity(ctx, acmeConfig(t, dir, cred, f))
	if err != nil {
		t.Fatal(err)
	}
	if f.calls != 1 || !s.ACME || s.ACMEAccountKey == nil || s.Name != "db1" {
		t.Fatalf("calls %d, stored %+v", f.calls, s.Meta)
	}
	fi, err := os.Stat(filepath.Join(dir, identity.ACMEAccountKeyFile))
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("account key file: %v %v", fi, err)
	}
	loaded, err := identity.Load(dir)
	if err != nil || !loaded.ACME || loaded.ACMEAccountKey == nil {
		t.Fatalf("load: %v %+v", err, loaded)
	}

	// The same credential again (a unit file that still passes it): the stored identity.
	if _, err := obtainIdentity(ctx, acmeConfig(t, dir, cred, f)); err != nil || f.calls != 1 {
		t.Fatalf("restart with the same credential: %v, calls %d", err, f.calls)
	}

	// A credential for another agent: refused, nothing touched, nothing sent.
	if _, err := obtainIdentity(ctx, acmeConfig(t, dir, acmeCred("db2", time.Now().Add(time.Hour)), f)); err == nil || f.calls != 1 {
		t.Fatalf("credential for another agent: %v, calls %d", err, f.calls)
	}

	// A new credential for the same agent that turns out spent, while the stored
	// certificate is valid: the stored identity is used.
	f.err = ca.ErrEABUsed
	if got, err := obtainIdentity(ctx, acmeConfig(t, dir, acmeCred("db1", time.Now().Add(time.Hour)), f)); err != nil || got.Name != "db1" {
		t.Fatalf("spent credential with a valid stored identity: %v", err)
	}

	// A garbled credential.
	if _, err := obtainIdentity(ctx, acmeConfig(t, t.TempDir(), "wicket-acme-v1.!!!", f)); err == nil {
		t.Fatal("garbled credential accepted")
	}

	// A stored ACME identity whose account key is missing is reported, not used.
	if err := os.Remove(filepath.Join(dir, identity.ACMEAccountKeyFile)); err != nil {
		t.Fatal(err)
	}
	if _, err := identity.Load(dir); err == nil {
		t.Fatal("ACME identity without its account key loaded")
	}
}
