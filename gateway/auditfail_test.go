package gateway

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/wicketgw/wicket/ca"
	"github.com/wicketgw/wicket/gateway/audit"
	"github.com/wicketgw/wicket/tunnel"
)

// failingDisk makes the gateway's audit log fail as a full disk does, for the writes it
// matches (all of them when match is nil), until it is healed.
type failingDisk struct {
	mu     sync.Mutex
	full   bool
	match  []byte // fail only writes that contain it
	failed int
}

func (d *failingDisk) fill(match string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.full, d.match = true, []byte(match)
}

func (d *failingDisk) heal() {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.full = false
}

func (d *failingDisk) failures() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.failed
}

func (d *failingDisk) open(name string, flag int, perm os.FileMode) (audit.File, error) {
	f, err := os.OpenFile(name, flag, perm)
	if err != nil {
		return nil, err
	}
	return &failingFile{File: f, d: d}, nil
}

type failingFile struct {
	*os.File
	d *failingDisk
}

func (f *failingFile) Write(b []byte) (int, error) {
	f.d.mu.Lock()
	fail := f.d.full && bytes.Contains(b, f.d.match)
	if fail {
		f.d.failed++
	}
	f.d.mu.Unlock()
	if fail {
		return 0, &os.PathError{Op: "write", Path: f.Name(), Err: syscall.ENOSPC}
	}
	return f.File.Write(b)
}

// Allocate succeeds: the disk "fills" at the write, which the test controls.
func (f *failingFile) Allocate(off, n int64) error { return nil }

// withFailingDisk starts a gateway whose audit log writes through d.
func withFailingDisk(t *testing.T, d *failingDisk) *testGateway {
	t.Helper()
	auditFileForTests = d.open
	t.Cleanup(func() { auditFileForTests = nil })
	tg := startGateway(t, nil)
	auditFileForTests = nil // only this gateway's log
	return tg
}

func auditCheck(tg *testGateway) Check {
	for _, c := range tg.Ready(context.Background()) {
		if c.Name == "audit" {
			return c
		}
	}
	return Check{Name: "audit", Error: "no audit check"}
}

// While the audit log cannot be written, every access-creating event is refused with one
// sentence (a token, an enrollment, a renewal, a new session); a session already open is
// not cut; /readyz and the metrics say so. Once the log can be written again, all of it
// works, and a log.gap record says what was refused.
func TestAuditOutageFailsClosed(t *testing.T) {
	checkLeaks(t)
	disk := &failingDisk{}
	tg := withFailingDisk(t, disk)
	echo := echoServer(t)
	agent := tg.mustAgent("db1", map[string]string{"echo": echo})
	user := tg.dialUser("alice")
	live, err := openStream(user, "echo")
	if err != nil {
		t.Fatal(err)
	}
	defer live.Close()
	agentCreds := tg.enroll(ca.RoleAgent, "db2")
	userToken, err := tg.Authority().MintToken(ca.RoleUser, "carol", 0)
	if err != nil {
		t.Fatal(err)
	}
	admin := NewAdminClient(tg.dir)
	defer admin.Close()
	ctx := context.Background()
	if c := auditCheck(tg); !c.OK {
		t.Fatalf("audit check before the outage: %+v", c)
	}
	if _, err := admin.AllowResources(ctx, "db1", []string{"spare"}); err != nil {
		t.Fatal(err)
	}

	var ae *AdminError
	disk.fill("")
	// A grant creates access like a token: refused, and the grant file is as it was.
	// Taking access away is never refused.
	if _, err := admin.AllowResources(ctx, "db1", []string{"web"}); !errors.As(err, &ae) || ae.Status != http.StatusServiceUnavailable ||
		ae.Message != "the audit log cannot be written (is the disk of "+tg.dir+" full?): the grant was not changed; retry when it is writable" {
		t.Fatalf("agents allow with the audit log down: %v", err)
	}
	if got := tg.grants.allowed("db1"); slices.Contains(got, "web") {
		t.Fatalf("the refused grant was kept: %v", got)
	}
	if res, err := admin.DisallowResources(ctx, "db1", []string{"spare"}); err != nil || slices.Contains(res.Allowed, "spare") {
		t.Fatalf("agents disallow with the audit log down: %+v, %v", res, err)
	}
	// A token: its record cannot be written, so it is not returned.
	tok, err := admin.CreateToken(ctx, ca.RoleAgent, "db3", 0)
	if !errors.As(err, &ae) || ae.Status != http.StatusServiceUnavailable || tok != "" ||
		ae.Message != "the audit log cannot be written (is the disk of "+tg.dir+" full?): no token was minted; retry when it is writable" {
		t.Fatalf("token create with the audit log down returned a token: %v; error %v", tok != "", err)
	}
	if c := auditCheck(tg); c.OK || !strings.Contains(c.Error, "no space left on device") || !strings.Contains(c.Error, "new sessions are refused") {
		t.Fatalf("audit check during the outage: %+v", c)
	}
	// An enrollment: refused before signing, so the token stays usable.
	_, err = ca.Enroll(ctx, userToken)
	if err == nil || !strings.Contains(err.Error(), "cannot write its audit log") || !strings.Contains(err.Error(), "the token was not used") {
		t.Fatalf("enroll with the audit log down: %v", err)
	}
	// A renewal.
	base := "https://" + tg.PublicAddr()
	if _, err := ca.Renew(ctx, base, agentCreds); err == nil || !strings.Contains(err.Error(), "renews no certificate") {
		t.Fatalf("renew with the audit log down: %v", err)
	}
	// A new session: refused before the agent is asked to dial.
	served := agent.servedCount()
	_, err = openStream(user, "echo")
	if s, reason, ok := replyStatus(err); !ok || s != tunnel.StatusUnavailable || reason != sessionRefusal {
		t.Fatalf("new stream with the audit log down: %v", err)
	}
	if agent.servedCount() != served {
		t.Fatal("the agent was asked to open a stream whose start could not be recorded")
	}
	// The session that was already open carries on.
	if _, err := live.Write([]byte("still here")); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len("still here"))
	if _, err := io.ReadFull(live, got); err != nil || string(got) != "still here" {
		t.Fatalf("the live session during the outage: %q, %v", got, err)
	}
	snap := tg.Snapshot()
	if snap.AuditWritable || snap.AuditWriteFailures < 4 || snap.Streams["audit unavailable"] != 1 {
		t.Fatalf("snapshot during the outage: writable %v, failures %d, streams %v", snap.AuditWritable, snap.AuditWriteFailures, snap.Streams)
	}

	disk.heal()
	if !eventually(20*time.Second, func() bool { return auditCheck(tg).OK }) {
		t.Fatalf("the audit log did not come back: %+v", auditCheck(tg))
	}
	if _, err := admin.CreateToken(ctx, ca.RoleAgent, "db3", 0); err != nil {
		t.Fatalf("token create after the outage: %v", err)
	}
	carol, err := ca.Enroll(ctx, userToken)
	if err != nil {
		t.Fatalf("the token refused during the outage does not enroll after it: %v", err)
	}
	if _, err := ca.Renew(ctx, base, agentCreds); err != nil {
		t.Fatalf("renew after the outage: %v", err)
	}
	echoOnce(t, user, "echo", "after the outage")
	gap := tg.waitAudit("log.gap", func(r audit.Record) bool { return r.Type == audit.TypeLogGap })
	if gap.Extra["refused_types"] != "cert.renewed=1,grant.changed=1,session.started=1,token.created=1,user.enrolled=1" || gap.Extra["refused"] != "5" ||
		!strings.Contains(gap.Extra["lost_types"], "grant.changed=1") {
		t.Fatalf("log.gap = %+v", gap)
	}
	tg.waitAudit("user.enrolled of carol", func(r audit.Record) bool {
		return r.Type == audit.TypeUserEnrolled && r.User == "carol" && r.Serial == carol.Chain[0].SerialNumber.String()
	})
	live.Close()
	user.Close()
	agent.close()
	tg.stop()
}

// The log can break between the check before signing and the record after it: the
// certificate just issued is then revoked and the client gets a 503, so no certificate is
// valid without its record. The same for a session: its start is written before the user
// is told OK, and a start that cannot be written refuses the stream.
func TestRecordFailingAfterTheActionUndoesIt(t *testing.T) {
	checkLeaks(t)
	disk := &failingDisk{}
	tg := withFailingDisk(t, disk)
	ctx := context.Background()

	tok, err := tg.Authority().MintToken(ca.RoleUser, "carol", 0)
	if err != nil {
		t.Fatal(err)
	}
	disk.fill(`"type":"user.enrolled","user":"carol"`)
	_, err = ca.Enroll(ctx, tok)
	if err == nil || !strings.Contains(err.Error(), "so it revoked it") {
		t.Fatalf("enroll whose record fails: %v", err)
	}
	carol := ca.Identity{TrustDomain: tg.Authority().TrustDomain(), Role: ca.RoleUser, Name: "carol"}
	issued, err := tg.Authority().Issued(ctx, carol)
	if err != nil || len(issued) != 1 || !issued[0].Revoked {
		t.Fatalf("certificates of carol after the failed record: %+v, %v; want one, revoked", issued, err)
	}
	disk.heal()
	if !eventually(20*time.Second, func() bool { return auditCheck(tg).OK }) {
		t.Fatal("the audit log did not come back")
	}

	echo := echoServer(t)
	agent := tg.mustAgent("db1", map[string]string{"echo": echo})
	user := tg.dialUser("alice")
	disk.fill(`"type":"session.started"`)
	_, err = openStream(user, "echo")
	if s, reason, ok := replyStatus(err); !ok || s != tunnel.StatusUnavailable || reason != sessionRefusal {
		t.Fatalf("stream whose session.started fails: %v", err)
	}
	disk.heal()
	if !eventually(20*time.Second, func() bool { return auditCheck(tg).OK }) {
		t.Fatal("the audit log did not come back")
	}
	echoOnce(t, user, "echo", "after")
	gap := tg.waitAudit("second log.gap", func(r audit.Record) bool {
		return r.Type == audit.TypeLogGap && r.Extra["refused_types"] == "session.started=1"
	})
	_ = gap
	for _, r := range tg.auditRecords() {
		if r.Type == audit.TypeSessionEnded && r.Outcome != audit.OutcomeOK {
			t.Errorf("unexpected session end %+v", r)
		}
	}
	if disk.failures() < 2 {
		t.Fatalf("the disk failed %d writes, want the two the test aimed at", disk.failures())
	}
	user.Close()
	agent.close()
	tg.stop()
}

// A gateway killed with sessions open left starts without ends; the next start ends them
// (outcome gateway_crashed) and records the unclean stop, once.
func TestPreviousRunEndedAfterCrash(t *testing.T) {
	checkLeaks(t)
	dir := filepath.Join(t.TempDir(), "gw")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	l, err := audit.Open(filepath.Join(dir, AuditLogName), nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range []audit.Record{
		{Type: audit.TypeGatewayStarted, Outcome: audit.OutcomeOK},
		{Type: audit.TypeAgentConnected, Agent: "db1", SessionID: "a1", Remote: "127.0.0.1:1"},
		{Type: audit.TypeUserConnected, User: "alice", SessionID: "u1"},
		{Type: audit.TypeSessionStarted, User: "alice", Agent: "db1", Resource: "echo", SessionID: "s1", Outcome: audit.OutcomeOK},
		{Type: audit.TypeSessionStarted, User: "alice", Agent: "db1", Resource: "echo", SessionID: "s2", Outcome: audit.OutcomeOK},
		{Type: audit.TypeSessionEnded, User: "alice", SessionID: "s2", Outcome: audit.OutcomeOK},
	} {
		if err := l.Write(r); err != nil {
			t.Fatal(err)
		}
	}
	last, _ := l.Head()
	l.Close() // no gateway.stopped: the process died

	tg := startGateway(t, func(c *Config) { c.DataDir = dir })
	tg.waitAudit("gateway.started", func(r audit.Record) bool { return r.Type == audit.TypeGatewayStarted && r.Seq > last })
	tg.stop()
	var ends []audit.Record
	var crashed audit.Record
	for _, r := range tg.auditRecords() {
		switch {
		case r.Outcome == audit.OutcomeGatewayCrashed:
			ends = append(ends, r)
		case r.Type == audit.TypeGatewayCrashed:
			crashed = r
		}
	}
	if len(ends) != 3 || ends[0].Type != audit.TypeAgentDisconnected || ends[0].SessionID != "a1" || ends[0].Agent != "db1" ||
		ends[1].Type != audit.TypeUserDisconnected || ends[1].SessionID != "u1" ||
		ends[2].Type != audit.TypeSessionEnded || ends[2].SessionID != "s1" || ends[2].Resource != "echo" || ends[2].Extra["started_seq"] != "4" {
		t.Fatalf("records ended as gateway_crashed = %+v", ends)
	}
	if crashed.Seq <= ends[2].Seq || crashed.Extra["sessions_ended"] != "1" || crashed.Extra["connections_ended"] != "2" ||
		crashed.Extra["previous_started_seq"] != "1" {
		t.Fatalf("gateway.crashed = %+v, want it after the ends, counting them", crashed)
	}

	// A clean stop followed by a start records nothing more.
	n := len(tg.auditRecords())
	again := startGateway(t, func(c *Config) { c.DataDir = dir })
	again.stop()
	for _, r := range again.auditRecords()[n:] {
		if r.Type == audit.TypeGatewayCrashed || r.Outcome == audit.OutcomeGatewayCrashed {
			t.Fatalf("a clean stop was treated as a crash: %+v", r)
		}
	}
}
