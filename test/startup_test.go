package test

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"go.uber.org/goleak"
)

// dirState describes a directory tree: every path with its mode and a hash of its content.
// A missing directory is the empty description "absent".
func dirState(t *testing.T, dir string) string {
	t.Helper()
	if _, err := os.Lstat(dir); errors.Is(err, fs.ErrNotExist) {
		return "absent"
	}
	var b strings.Builder
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		b.WriteString(rel + " " + fi.Mode().String())
		if fi.Mode().IsRegular() {
			data, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			sum := sha256.Sum256(data)
			b.WriteString(" " + hex.EncodeToString(sum[:8]))
		}
		b.WriteString("\n")
		return nil
	})
	if err != nil {
		t.Fatalf("read %s: %v", dir, err)
	}
	return b.String()
}

// readOnlyDir returns an empty directory the gateway cannot write to: a read-only tmpfs
// when running as root (root ignores file modes), else a directory with mode 0500.
func readOnlyDir(t *testing.T) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "ro")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if os.Geteuid() == 0 {
		if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "ro,size=1m,mode=0700", "tmpfs", dir).CombinedOutput(); err != nil {
			t.Fatalf("running as root but cannot mount a read-only tmpfs on %s: %v: %s", dir, err, out)
		}
		t.Cleanup(func() {
			if out, err := exec.Command("umount", dir).CombinedOutput(); err != nil {
				t.Errorf("umount %s: %v: %s", dir, err, out)
			}
		})
		return dir
	}
	if err := os.Chmod(dir, 0o500); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.Chmod(dir, 0o700) })
	return dir
}

// TestStartupErrors starts the gateway in each way it must refuse to start and checks that it
// prints one sentence naming what failed and what to do, exits non-zero without a panic, and
// leaves the data directory as it was (issue 10, item 5).
func TestStartupErrors(t *testing.T) {
	t.Cleanup(func() { goleak.VerifyNone(t) })
	h := NewHarness(t)

	// A data directory of a gateway that ran once and stopped cleanly.
	existing := h.Dir("existing")
	g := h.StartGateway(GatewayOptions{DataDir: existing})
	if err := g.Stop(); err != nil {
		t.Fatalf("first gateway: %v\n%s", err, g.Output())
	}

	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()

	badPolicy := filepath.Join(h.Dir("policies"), "bad.yaml")
	if err := os.WriteFile(badPolicy, []byte("rules: [[[\n"), 0o600); err != nil {
		t.Fatal(err)
	}

	cases := []struct {
		name    string
		setup   func(t *testing.T) (dataDir string, args []string)
		keyword []string
	}{
		{"port in use", func(t *testing.T) (string, []string) {
			return filepath.Join(t.TempDir(), "new"), []string{"--listen", busy.Addr().String()}
		}, []string{busy.Addr().String(), "already in use", "--listen"}},
		{"bad listen address", func(t *testing.T) (string, []string) {
			return filepath.Join(t.TempDir(), "new"), []string{"--listen", "127.0.0.1:99999"}
		}, []string{"invalid listen address", "99999", "--listen HOST:PORT"}},
		{"listen address without port", func(t *testing.T) (string, []string) {
			return filepath.Join(t.TempDir(), "new"), []string{"--listen", "nonsense"}
		}, []string{"invalid listen address", "missing port", "--listen HOST:PORT"}},
		{"missing policy file", func(t *testing.T) (string, []string) {
			return filepath.Join(t.TempDir(), "new"), []string{"--policy", filepath.Join(t.TempDir(), "nope.yaml")}
		}, []string{"nope.yaml does not exist", "create it"}},
		{"invalid policy file", func(t *testing.T) (string, []string) {
			return filepath.Join(t.TempDir(), "new"), []string{"--policy", badPolicy}
		}, []string{"bad.yaml", "line 1", "fix it"}},
		{"read-only data dir", func(t *testing.T) (string, []string) {
			return readOnlyDir(t), nil
		}, []string{"cannot write to the data directory", "--data-dir"}},
		{"unreachable db", func(t *testing.T) (string, []string) {
			return existing, []string{"--db", "postgresql://wicket:s3cretpw@" + closedPort(t) + "/wicket?connect_timeout=5"}
		}, []string{"cannot reach the CA database", "--db"}},
		{"data dir in use", func(t *testing.T) (string, []string) {
			started := func() int {
				b, _ := os.ReadFile(filepath.Join(existing, "audit.log"))
				return strings.Count(string(b), `"type":"gateway.started"`)
			}
			before := started()
			running := h.StartGateway(GatewayOptions{DataDir: existing})
			t.Cleanup(func() { _ = running.Stop() })
			// The running gateway writes gateway.started just after it logs that it
			// listens: the snapshot is taken after that, so only the second start could
			// change the directory.
			eventually(t, "the running gateway's gateway.started record", func() bool { return started() > before })
			return existing, nil
		}, []string{"in use by another gateway", "--data-dir"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dataDir, extra := tc.setup(t)
			before := dirState(t, dataDir)
			args := append([]string{"gateway", "--data-dir", dataDir, "--listen", "127.0.0.1:0"}, extra...)
			_, stderr, err := h.Run([]string{"WICKET_CA_PASSWORD=e2e-test-password"}, args...)
			var exit *exec.ExitError
			if !errors.As(err, &exit) || exit.ExitCode() == 0 {
				t.Fatalf("wicket gateway: %v, want a non-zero exit\nstderr:\n%s", err, stderr)
			}
			for _, bad := range []string{"panic", "goroutine ", "s3cretpw"} {
				if strings.Contains(stderr, bad) {
					t.Errorf("stderr contains %q:\n%s", bad, stderr)
				}
			}
			var last string
			for _, l := range strings.Split(strings.TrimSpace(stderr), "\n") {
				if strings.HasPrefix(l, "wicket gateway: ") {
					if last != "" {
						t.Errorf("more than one error line:\n%s", stderr)
					}
					last = l
				}
			}
			if last == "" {
				t.Fatalf("no error line on stderr:\n%s", stderr)
			}
			for _, k := range tc.keyword {
				if !strings.Contains(last, k) {
					t.Errorf("error line lacks %q: %s", k, last)
				}
			}
			if after := dirState(t, dataDir); after != before {
				t.Errorf("the data directory changed:\nbefore:\n%s\nafter:\n%s", before, after)
			}
			t.Logf("stderr: %s", last)
		})
	}
}
