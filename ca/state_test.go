package ca

import (
	"context"
	"crypto/sha256"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
)

// snapshot hashes every file of dir (name, mode, content).
func snapshot(t *testing.T, dir string) string {
	t.Helper()
	var lines []string
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		h := ""
		if !d.IsDir() {
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			sum := sha256.Sum256(b)
			h = string(sum[:])
		}
		lines = append(lines, p+" "+info.Mode().String()+" "+h)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	sort.Strings(lines)
	return strings.Join(lines, "\n")
}

func TestRestartSameDataDir(t *testing.T) {
	forEachDB(t, func(t *testing.T, dsn string) {
		dir := t.TempDir()
		e := startEnv(t, dir, dsn, nil)
		fp := e.a.RootFingerprint()
		used := mustToken(t, e.a, RoleAgent, "r")
		mustEnroll(t, used)
		unused := mustToken(t, e.a, RoleAgent, "later")
		e.close()

		e2 := startEnv(t, dir, dsn, nil)
		if e2.a.RootFingerprint() != fp {
			t.Fatal("restart produced a different root")
		}
		// The used token is still refused (its URL changed with the port, so rewrite
		// nothing: the guard checks the used table before anything else).
		err := signCSR(t, e2, used, "r", []string{"spiffe://wicket.local/agent/r"}, nil)
		wantErr(t, err, ErrTokenUsed)
		_ = unused
		// A token minted before the restart for the same URL stays valid: mint one
		// on the new instance to check issuance still works, and one that predates
		// a restart of this very instance.
		pre := mustToken(t, e2.a, RoleAgent, "pre")
		e2.close()
		e3 := startEnvAt(t, dir, dsn, e2.url)
		mustEnroll(t, pre)
		if n := issuedCount(t, e3.a, RoleAgent, "r"); n != 1 {
			t.Fatalf("index lost across restarts: %d", n)
		}
	})
}

// startEnvAt restarts a CA on the same URL (same port) as before.
func startEnvAt(t *testing.T, dir, dsn, url string) *testEnv {
	t.Helper()
	addr := strings.TrimPrefix(url, "https://")
	return startEnvListen(t, dir, dsn, addr, nil)
}

func TestFirstStartFilesAndPassword(t *testing.T) {
	t.Setenv("WICKET_CA_PASSWORD", "")
	dir := filepath.Join(t.TempDir(), "ca")
	e := startEnv(t, dir, "", func(c *Config) { c.Password = nil })
	fp := e.a.RootFingerprint()
	e.close()
	fi, err := os.Stat(dir)
	if err != nil || fi.Mode().Perm() != 0o700 {
		t.Fatalf("data dir mode %v, want 0700 (%v)", fi.Mode().Perm(), err)
	}
	entries, _ := os.ReadDir(dir)
	for _, de := range entries {
		info, _ := de.Info()
		if info.Mode().Perm() != 0o600 {
			t.Errorf("%s has mode %v, want 0600", de.Name(), info.Mode().Perm())
		}
	}
	pw, err := os.ReadFile(filepath.Join(dir, passwordFileName))
	if err != nil || len(strings.TrimSpace(string(pw))) < 32 {
		t.Fatalf("generated password file: %q %v", pw, err)
	}
	for _, f := range []string{rootKeyFile, intermediateKeyFile, agentProvKeyFile} {
		b, _ := os.ReadFile(filepath.Join(dir, f))
		if !strings.Contains(string(b), "ENCRYPTED PRIVATE KEY") {
			t.Fatalf("%s is not encrypted", f)
		}
	}
	// The next start reads the generated password from the file.
	e2 := startEnv(t, dir, "", func(c *Config) { c.Password = nil })
	if e2.a.RootFingerprint() != fp {
		t.Fatal("different root after restart")
	}
	e2.close()
	// A password file given explicitly wins; a wrong one is refused.
	pf := filepath.Join(t.TempDir(), "pw")
	os.WriteFile(pf, []byte("nope\n"), 0o600)
	_, err = New(context.Background(), Config{DataDir: dir, PasswordFile: pf, URL: "https://127.0.0.1:1"})
	wantErr(t, err, ErrWrongPassword)
}

func TestWrongPasswordAndCorruptState(t *testing.T) {
	dir := t.TempDir()
	e := startEnv(t, dir, "", nil)
	e.close()
	before := snapshot(t, dir)
	open := func(pw string) error {
		a, err := New(context.Background(), Config{DataDir: dir, Password: []byte(pw), URL: "https://127.0.0.1:1"})
		if err == nil {
			a.Close()
		}
		return err
	}
	err := open("wrong-password")
	wantErr(t, err, ErrWrongPassword)
	if snapshot(t, dir) != before {
		t.Fatal("a wrong password changed the data dir")
	}

	// Missing key file: one clear error, nothing re-created.
	keyPath := filepath.Join(dir, intermediateKeyFile)
	saved, _ := os.ReadFile(keyPath)
	os.Remove(keyPath)
	missingBefore := snapshot(t, dir)
	err = open("test-password")
	wantErr(t, err, ErrCorruptState)
	if !strings.Contains(err.Error(), intermediateKeyFile) {
		t.Fatalf("error does not name the missing file: %v", err)
	}
	if snapshot(t, dir) != missingBefore {
		t.Fatal("a missing key file changed the data dir")
	}
	if _, err := os.Stat(keyPath); !errors.Is(err, fs.ErrNotExist) {
		t.Fatal("the missing key was re-created")
	}

	// Corrupt key file (not PEM), and a truncated one.
	for _, bad := range [][]byte{[]byte("garbage"), saved[:len(saved)/2]} {
		os.WriteFile(keyPath, bad, 0o600)
		b := snapshot(t, dir)
		err = open("test-password")
		if err == nil {
			t.Fatal("corrupt key accepted")
		}
		if !errors.Is(err, ErrCorruptState) && !errors.Is(err, ErrWrongPassword) {
			t.Fatalf("corrupt key: %v", err)
		}
		if snapshot(t, dir) != b {
			t.Fatal("a corrupt key file changed the data dir")
		}
	}
	// Corrupt certificate.
	os.WriteFile(keyPath, saved, 0o600)
	os.WriteFile(filepath.Join(dir, rootCertFile), []byte("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"), 0o600)
	err = open("test-password")
	wantErr(t, err, ErrCorruptState)
}
