package identity

import (
	"bytes"
	"crypto/x509"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/wicketgw/wicket/agent/internal/testpki"
	"github.com/wicketgw/wicket/ca"
)

func TestMain(m *testing.M) {
	// glog (pulled in by step-ca through ca/) starts a flush daemon in its
	// package init: process-wide, not a leak of these tests.
	goleak.VerifyTestMain(m, goleak.IgnoreTopFunction("github.com/golang/glog.(*fileSink).flushDaemon"))
}

func newStored(p *testpki.PKI, name string, life time.Duration) *Stored {
	now := time.Now()
	creds := p.Issue(ca.RoleAgent, name, now.Add(-time.Minute), now.Add(life))
	return &Stored{
		Meta:  Meta{URL: "https://127.0.0.1:8443", Role: ca.RoleAgent, Name: name, TrustDomain: p.TrustDomain, Enrolled: now},
		Creds: creds,
	}
}

// snapshot returns every file of dir with its content, to prove that a
// failing operation changed nothing.
func snapshot(t *testing.T, dir string) map[string]string {
	t.Helper()
	out := map[string]string{}
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		out[e.Name()] = string(b)
	}
	return out
}

func sameFiles(t *testing.T, a, b map[string]string) {
	t.Helper()
	if len(a) != len(b) {
		t.Fatalf("directory changed: %d files before, %d after", len(a), len(b))
	}
	for k, v := range a {
		if b[k] != v {
			t.Fatalf("file %s changed", k)
		}
	}
}

func TestSaveLoadRoundTrip(t *testing.T) {
	p := testpki.New("example.test")
	dir := filepath.Join(t.TempDir(), "agent")
	s := newStored(p, "db1", time.Hour)
	s.TokenSHA256 = TokenHash("tok")
	if err := Save(dir, s); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(dir)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o700 {
		t.Fatalf("dir mode %v, want 0700", fi.Mode().Perm())
	}
	for _, f := range []string{KeyFile, ChainFile, RootFile, IdentityFile} {
		fi, err := os.Stat(filepath.Join(dir, f))
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != 0o600 {
			t.Fatalf("%s mode %v, want 0600", f, fi.Mode().Perm())
		}
	}
	got, err := Load(dir)
	if err != nil {
		t.Fatal(err)
	}
	if got.URL != s.URL || got.Role != s.Role || got.Name != s.Name || got.TrustDomain != s.TrustDomain ||
		got.TokenSHA256 != s.TokenSHA256 || !got.Enrolled.Equal(s.Enrolled) {
		t.Fatalf("meta %+v, want %+v", got.Meta, s.Meta)
	}
	if !bytes.Equal(got.Leaf().Raw, s.Leaf().Raw) || len(got.Creds.Chain) != 2 || !got.Creds.Root.Equal(p.Root) {
		t.Fatal("chain or root differ after a round trip")
	}
	if err := Check(got.Creds, got.Meta); err != nil {
		t.Fatal(err)
	}
	if ok, err := Exists(dir); err != nil || !ok {
		t.Fatalf("Exists = %v, %v", ok, err)
	}
	if strings.Contains(snapshot(t, dir)[IdentityFile], "tok\"") {
		t.Fatal("identity.json holds the token itself")
	}
}

func TestSaveTightensDirMode(t *testing.T) {
	p := testpki.New("example.test")
	dir := t.TempDir()
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := Save(dir, newStored(p, "db1", time.Hour)); err != nil {
		t.Fatal(err)
	}
	fi, _ := os.Stat(dir)
	if fi.Mode().Perm() != 0o700 {
		t.Fatalf("dir mode %v, want 0700", fi.Mode().Perm())
	}
}

func TestSaveReplacesAtomically(t *testing.T) {
	p := testpki.New("example.test")
	dir := t.TempDir()
	a := newStored(p, "db1", time.Hour)
	b := newStored(p, "db2", 2*time.Hour)
	if err := Save(dir, a); err != nil {
		t.Fatal(err)
	}
	if err := Save(dir, b); err != nil {
		t.Fatal(err)
	}
	got, err := Load(dir)
	if err != nil {
		t.Fatal(err)
	}
	if got.Name != "db2" || !bytes.Equal(got.Leaf().Raw, b.Leaf().Raw) {
		t.Fatal("second Save did not replace the first")
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 4 {
		var names []string
		for _, e := range entries {
			names = append(names, e.Name())
		}
		t.Fatalf("want exactly 4 files (no temporaries left), got %v", names)
	}
}

func TestSaveRefusesInconsistentCredentials(t *testing.T) {
	p := testpki.New("example.test")
	dir := t.TempDir()
	good := newStored(p, "db1", time.Hour)
	if err := Save(dir, good); err != nil {
		t.Fatal(err)
	}
	before := snapshot(t, dir)
	other := newStored(p, "db1", time.Hour)
	bad := &Stored{Meta: good.Meta, Creds: &ca.Credentials{Key: other.Creds.Key, Chain: good.Creds.Chain, Root: p.Root}}
	if err := Save(dir, bad); err == nil {
		t.Fatal("Save accepted a key that does not match the certificate")
	}
	wrongName := &Stored{Meta: Meta{URL: good.URL, Role: ca.RoleAgent, Name: "db9"}, Creds: good.Creds}
	if err := Save(dir, wrongName); err == nil {
		t.Fatal("Save accepted identity.json naming another agent than the certificate")
	}
	sameFiles(t, before, snapshot(t, dir))
}

func TestLoadMissing(t *testing.T) {
	dir := t.TempDir()
	_, err := Load(dir)
	if !errors.Is(err, ErrNotFound) {
		t.Fatalf("err = %v, want ErrNotFound", err)
	}
	want := "no stored identity in " + dir + ": run with --token first"
	if err.Error() != want {
		t.Fatalf("err = %q, want %q", err, want)
	}
	if ok, err := Exists(filepath.Join(dir, "nope")); ok || err != nil {
		t.Fatalf("Exists(missing dir) = %v, %v", ok, err)
	}
}

func TestLoadCorrupt(t *testing.T) {
	p := testpki.New("example.test")
	otherPKI := testpki.New("example.test")
	cases := []struct {
		name   string
		damage func(t *testing.T, dir string)
	}{
		{"garbage key", func(t *testing.T, dir string) { write(t, dir, KeyFile, "not a key") }},
		{"missing chain", func(t *testing.T, dir string) { os.Remove(filepath.Join(dir, ChainFile)) }},
		{"missing key", func(t *testing.T, dir string) { os.Remove(filepath.Join(dir, KeyFile)) }},
		{"truncated chain", func(t *testing.T, dir string) {
			b, _ := os.ReadFile(filepath.Join(dir, ChainFile))
			write(t, dir, ChainFile, string(b[:len(b)/3]))
		}},
		{"bad json", func(t *testing.T, dir string) { write(t, dir, IdentityFile, "{") }},
		{"json without name", func(t *testing.T, dir string) { write(t, dir, IdentityFile, `{"url":"https://x","role":"agent"}`) }},
		{"name mismatch", func(t *testing.T, dir string) {
			write(t, dir, IdentityFile, `{"url":"https://x","role":"agent","name":"db9","trust_domain":"example.test"}`)
		}},
		{"key of another identity", func(t *testing.T, dir string) {
			k, _ := encodeKey(newStored(p, "db1", time.Hour).Creds.Key)
			write(t, dir, KeyFile, string(k))
		}},
		{"root of another PKI", func(t *testing.T, dir string) {
			write(t, dir, RootFile, string(encodeCerts([]*x509.Certificate{otherPKI.Root})))
		}},
		{"two roots", func(t *testing.T, dir string) {
			write(t, dir, RootFile, string(encodeCerts([]*x509.Certificate{p.Root, p.Root})))
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			if err := Save(dir, newStored(p, "db1", time.Hour)); err != nil {
				t.Fatal(err)
			}
			tc.damage(t, dir)
			before := snapshot(t, dir)
			_, err := Load(dir)
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("err = %v, want ErrCorrupt", err)
			}
			if !strings.Contains(err.Error(), dir) || !strings.Contains(err.Error(), "enroll again") {
				t.Fatalf("error does not name the directory and the remedy: %v", err)
			}
			if strings.Contains(err.Error(), "PRIVATE KEY") {
				t.Fatalf("error leaks key material: %v", err)
			}
			sameFiles(t, before, snapshot(t, dir))
		})
	}
}

func write(t *testing.T, dir, name, content string) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
}

func TestLoadExpiredIsNotCorrupt(t *testing.T) {
	p := testpki.New("example.test")
	dir := t.TempDir()
	now := time.Now()
	s := &Stored{
		Meta:  Meta{URL: "https://127.0.0.1:8443", Role: ca.RoleAgent, Name: "db1", TrustDomain: p.TrustDomain},
		Creds: p.Issue(ca.RoleAgent, "db1", now.Add(-2*time.Hour), now.Add(-time.Hour)),
	}
	if err := Save(dir, s); err != nil {
		t.Fatal(err)
	}
	got, err := Load(dir)
	if err != nil {
		t.Fatalf("an expired identity must load (so the caller can say it expired): %v", err)
	}
	err = CheckValid(got, now)
	if !errors.Is(err, ErrExpired) || !errors.Is(err, ca.ErrExpired) {
		t.Fatalf("CheckValid = %v, want ErrExpired", err)
	}
	if !strings.Contains(err.Error(), "cannot be renewed: enroll again with a new token") {
		t.Fatalf("unclear message: %v", err)
	}
}
