package test

import (
	"encoding/json"
	"errors"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// smallDisk mounts a tmpfs of the given size on a new directory for the test and returns
// it. Not root: the test is skipped, saying why. Root (CI runs as root) and the mount
// fails: the test fails, because skipping would hide that it never ran.
func smallDisk(t *testing.T, size string) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("this test mounts a small tmpfs to fill it up, which needs root; run it as root (CI does)")
	}
	dir := t.TempDir() // removed after the unmount below (cleanups run last-in first-out)
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size="+size+",mode=0700", "tmpfs", dir).CombinedOutput(); err != nil {
		t.Fatalf("running as root but cannot mount a tmpfs on %s: %v: %s", dir, err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("umount", dir).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v: %s", dir, err, out)
		}
	})
	return dir
}

// fillDisk writes path until the file system has no byte left.
func fillDisk(t *testing.T, path string) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, size := range []int{1 << 20, 4096, 1} {
		buf := make([]byte, size)
		for {
			if _, err := f.Write(buf); err != nil {
				if !errors.Is(err, syscall.ENOSPC) {
					t.Fatalf("fill %s: %v", path, err)
				}
				break
			}
		}
	}
}

// readyz returns /readyz's status and the names of the failed checks.
func readyz(t *testing.T, maddr string) (int, []string) {
	t.Helper()
	status, body := httpGet(t, "http://"+maddr+"/readyz")
	var h struct {
		Failed []string `json:"failed"`
	}
	if err := json.Unmarshal([]byte(body), &h); err != nil {
		t.Fatalf("/readyz answered %q: %v", body, err)
	}
	return status, h.Failed
}

// TestAuditFullDiskFailsClosed fills the gateway's data dir, a small tmpfs, with a filler
// file: tokens, enrollments and new sessions are refused with one sentence, /readyz says
// audit, the metrics count; the filler removed, everything works again within seconds, a
// log.gap record states what was refused and when, and `wicket audit verify` passes.
func TestAuditFullDiskFailsClosed(t *testing.T) {
	disk := smallDisk(t, "16m")
	h := NewHarness(t)
	dataDir := filepath.Join(disk, "gateway")
	gw := h.StartGateway(GatewayOptions{DataDir: dataDir, Policy: allowAlice, Args: metricsArgs})
	maddr := gw.MetricsAddr()
	h.StartAgent(gw, "db1", "echo="+echoServer(t))
	alice := h.Login(gw, "alice")
	bobToken := gw.Token("user", "bob") // minted while the disk has room
	conn, local := h.Connect(alice, "echo")
	if err := transfer(local, 64<<10); err != nil {
		t.Fatalf("transfer before the disk is full: %v", err)
	}

	filler := filepath.Join(disk, "filler")
	fillDisk(t, filler)
	// Records already reserved in the log's file still go in (up to 16 KiB of them); the
	// first token whose record does not fit is refused, and no token is printed for it.
	want := "the audit log cannot be written (is the disk of " + dataDir + " full?): no token was minted; retry when it is writable"
	minted := 0
	for {
		out, errOut, err := gw.Admin("token", "create", "agent", "db9")
		if err == nil {
			minted++
			if minted > 200 {
				t.Fatal("200 tokens minted on a full disk")
			}
			continue
		}
		if strings.TrimSpace(out) != "" || !strings.Contains(errOut, want) {
			t.Fatalf("token create on a full disk: stdout %q, stderr %q; want no token and %q", out, errOut, want)
		}
		break
	}
	t.Logf("%d tokens were minted into the log's reserved room before the first refusal", minted)

	// An enrollment is refused, and its token is not spent.
	_, errOut, err := h.Run(nil, "login", "--token", bobToken, "--data-dir", h.Dir("bob"))
	if err == nil || !strings.Contains(errOut, "cannot write its audit log") {
		t.Fatalf("wicket login on a full disk: %v\n%s", err, errOut)
	}
	// A new session is refused, and `wicket connect` says why.
	if err := transfer(local, 1024); err == nil {
		t.Fatal("a transfer went through while the audit log could not be written")
	}
	conn.WaitFor(`the gateway cannot write its audit log, so it opens no new session`)
	if status, failed := readyz(t, maddr); status != http.StatusServiceUnavailable || !strings.Contains(strings.Join(failed, ","), "audit") {
		t.Fatalf("/readyz on a full disk = %d, failed %v; want 503 naming audit", status, failed)
	}
	s := scrape(t, maddr)
	if s.value(t, "wicket_audit_writable") != 0 || s.value(t, "wicket_audit_write_failures_total") < 3 {
		t.Fatalf("audit metrics on a full disk: writable %v, failures %v", s.value(t, "wicket_audit_writable"), s.value(t, "wicket_audit_write_failures_total"))
	}

	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	freed := time.Now()
	for {
		if status, _ := readyz(t, maddr); status == http.StatusOK {
			break
		}
		if time.Since(freed) > 15*time.Second {
			t.Fatalf("/readyz still not ready 15s after the disk had room again\n%s", gw.Output())
		}
		time.Sleep(100 * time.Millisecond) // polling interval
	}
	t.Logf("ready again %s after the filler was removed", time.Since(freed).Round(time.Millisecond))
	gw.Token("agent", "db9")
	minted++
	if _, errOut, err := h.Run(nil, "login", "--token", bobToken, "--data-dir", h.Dir("bob2")); err != nil {
		t.Fatalf("the token refused on a full disk does not log in afterwards: %v\n%s", err, errOut)
	}
	if err := transfer(local, 64<<10); err != nil {
		t.Fatalf("transfer after the disk had room again: %v", err)
	}
	if s := scrape(t, maddr); s.value(t, "wicket_audit_writable") != 1 {
		t.Fatal("wicket_audit_writable is not 1 after the outage")
	}

	gap := gw.WaitAudit(map[string]string{"type": "log.gap"})
	extra, _ := gap["extra"].(map[string]any)
	for _, typ := range []string{"token.created=1", "user.enrolled=1", "session.started=1"} {
		if !strings.Contains(auditValue(extra["refused_types"]), typ) {
			t.Errorf("log.gap refused_types = %v, want it to count %s", extra["refused_types"], typ)
		}
	}
	first, last := auditValue(extra["first_failure"]), auditValue(extra["last_failure"])
	ft, ferr := time.Parse(time.RFC3339Nano, first)
	lt, lerr := time.Parse(time.RFC3339Nano, last)
	if ferr != nil || lerr != nil || lt.Before(ft) || !strings.Contains(auditValue(extra["error"]), "no space left on device") {
		t.Errorf("log.gap = %v", gap)
	}
	tokens := 0
	for _, r := range gw.AuditRecords() {
		if r["type"] == "token.created" && r["agent"] == "db9" {
			tokens++
		}
	}
	if tokens != minted {
		t.Errorf("%d tokens were printed but %d token.created records written", minted, tokens)
	}
	if out, errOut, err := h.Run(nil, "audit", "verify", filepath.Join(dataDir, "audit.log")); err != nil {
		t.Fatalf("audit verify after the outage: %v\n%s%s", err, out, errOut)
	}
}
