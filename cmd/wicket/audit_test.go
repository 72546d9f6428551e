package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/wicketgw/wicket/gateway"
	"github.com/wicketgw/wicket/gateway/audit"
)

// auditFixture is a data directory whose audit log and statement logs were written by
// the audit package as the gateway writes them.
type auditFixture struct {
	dir, log string
	queries  map[string][]string // session -> statement texts, in order
}

func clockFrom(t0 time.Time) func() time.Time {
	n := 0
	return func() time.Time { n++; return t0.Add(time.Duration(n) * time.Millisecond) }
}

// newAuditFixture writes sessions s1 (5 statements, text recorded, sealed), s2 (2,
// hashes only, sealed) and s3 (3, still open: no session.ended).
func newAuditFixture(t *testing.T) *auditFixture {
	t.Helper()
	t.Setenv("WICKET_DATA_DIR", "")
	fx := &auditFixture{dir: t.TempDir(), queries: map[string][]string{}}
	fx.log = filepath.Join(fx.dir, gateway.AuditLogName)
	clock := clockFrom(time.Date(2026, 12, 4, 10, 0, 0, 0, time.UTC))
	main, err := audit.OpenWithOptions(fx.log, audit.Options{Now: clock, NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	defer main.Close()
	for _, s := range []struct {
		id     string
		n      int
		text   bool
		sealed bool
	}{{"s1", 5, true, true}, {"s2", 2, false, true}, {"s3", 3, false, false}} {
		sl, err := audit.OpenStatementLog(fx.dir, audit.StatementBegin{Session: s.id, User: "alice", Resource: "pg",
			Agent: "db-agent", DBUser: "app", Database: "shop", RecordsText: s.text}, audit.StatementLogOptions{Now: clock, NoSync: true})
		if err != nil {
			t.Fatal(err)
		}
		if err := main.Write(audit.Record{Type: audit.TypeSessionStarted, SessionID: s.id, User: "alice", Resource: "pg",
			Agent: "db-agent", Extra: map[string]string{audit.ExtraStatementsLog: audit.StatementLogName(s.id)}}); err != nil {
			t.Fatal(err)
		}
		for i := 1; i <= s.n; i++ {
			q := fmt.Sprintf("SELECT name FROM items WHERE id = %d", i)
			st := audit.Statement{Kind: audit.KindSimple, Text: q, Tag: "SELECT 1", Rows: 1, Status: audit.StatusOK, Duration: 250 * time.Microsecond}
			if i == s.n {
				st = audit.Statement{Kind: audit.KindExtended, Text: q, SQLState: "42P01", Status: audit.StatusError}
			}
			if err := sl.Append(st); err != nil {
				t.Fatal(err)
			}
			fx.queries[s.id] = append(fx.queries[s.id], q)
		}
		seal, err := sl.Close()
		if err != nil {
			t.Fatal(err)
		}
		if s.sealed {
			end := audit.Record{Type: audit.TypeSessionEnded, SessionID: s.id, User: "alice", Resource: "pg", Outcome: audit.OutcomeOK, DurationMS: 1200}
			seal.Put(&end)
			if err := main.Write(end); err != nil {
				t.Fatal(err)
			}
		}
	}
	return fx
}

func (fx *auditFixture) statementLog(id string) string {
	return filepath.Join(fx.dir, "statements", id+".log")
}

// cliLeakOpts ignores the goroutine glog (imported by the CA) starts at init.
var cliLeakOpts = []goleak.Option{goleak.IgnoreTopFunction("github.com/golang/glog.(*fileSink).flushDaemon")}

func runAuditCmd(args ...string) (string, error) {
	var out bytes.Buffer
	err := runAuditTo(context.Background(), args, &out)
	return out.String(), err
}

// editLines rewrites a file line by line (lines keep their newlines).
func editLines(t *testing.T, path string, edit func([]string) []string) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.SplitAfter(string(b), "\n")
	if lines[len(lines)-1] == "" {
		lines = lines[:len(lines)-1]
	}
	if err := os.WriteFile(path, []byte(strings.Join(edit(lines), "")), 0o600); err != nil {
		t.Fatal(err)
	}
}

func TestAuditVerifyStatementLogs(t *testing.T) {
	t.Cleanup(func() { goleak.VerifyNone(t, cliLeakOpts...) })
	fx := newAuditFixture(t)
	out, err := runAuditCmd("verify", fx.log)
	if err != nil {
		t.Fatalf("verify of intact logs: %v\n%s", err, out)
	}
	for _, want := range []string{
		"ok: 5 records (last seq 5, head ",
		"ok: 3 statement logs, 10 statements\n",
		"note: 1 statement log(s) not sealed yet",
		"statements/s3.log",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("verify output lacks %q:\n%s", want, out)
		}
	}
	if !regexp.MustCompile(`(?m)^anchor: 5:[0-9a-f]{64}$`).MatchString(out) {
		t.Errorf("verify no longer prints the anchor line:\n%s", out)
	}
}

func TestAuditVerifyFindsDamage(t *testing.T) {
	t.Cleanup(func() { goleak.VerifyNone(t, cliLeakOpts...) })
	cases := []struct {
		name   string
		damage func(t *testing.T, fx *auditFixture)
		want   string // in the error, after the file name
	}{
		{"edited line", func(t *testing.T, fx *auditFixture) {
			editLines(t, fx.statementLog("s2"), func(ls []string) []string {
				ls[1] = strings.Replace(ls[1], `"rows":1`, `"rows":7`, 1)
				return ls
			})
		}, "s2.log line 3 was edited or damaged: prev does not match the SHA-256 of line 2"},
		{"deleted line", func(t *testing.T, fx *auditFixture) {
			editLines(t, fx.statementLog("s1"), func(ls []string) []string { return append(ls[:3], ls[4:]...) })
		}, "s1.log line 4 was edited or damaged: seq jumps from 2 to 4"},
		{"truncated", func(t *testing.T, fx *auditFixture) {
			editLines(t, fx.statementLog("s1"), func(ls []string) []string { return ls[:len(ls)-2] })
		}, "s1.log line 4 was edited or damaged: the file has 3 statements but the session.ended record on audit log line 2 sealed 5"},
		{"appended line", func(t *testing.T, fx *auditFixture) {
			editLines(t, fx.statementLog("s2"), func(ls []string) []string {
				last := ls[len(ls)-1]
				sum := sha256.Sum256([]byte(last))
				next := strings.Replace(last, `"seq":2`, `"seq":3`, 1)
				next = next[:strings.Index(next, `"prev":"`)] + `"prev":"` + hex.EncodeToString(sum[:]) + "\"}\n"
				return append(ls, next)
			})
		}, "s2.log line 4 was edited or damaged: the file has 3 statements but the session.ended record on audit log line 4 sealed 2"},
		{"edited last line", func(t *testing.T, fx *auditFixture) {
			editLines(t, fx.statementLog("s1"), func(ls []string) []string {
				ls[len(ls)-1] = strings.Replace(ls[len(ls)-1], `"42P01"`, `"00000"`, 1)
				return ls
			})
		}, "s1.log line 6 was edited or damaged: the last line's SHA-256 is not the head sealed"},
		{"missing file", func(t *testing.T, fx *auditFixture) {
			if err := os.Remove(fx.statementLog("s3")); err != nil {
				t.Fatal(err)
			}
		}, "s3.log was edited or damaged: the session.started record on audit log line 5 names this file, but it does not exist"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			fx := newAuditFixture(t)
			tc.damage(t, fx)
			out, err := runAuditCmd("verify", fx.log)
			if err == nil {
				t.Fatalf("verify passed a damaged statement log:\n%s", out)
			}
			msg := err.Error()
			if !strings.Contains(msg, filepath.Join(fx.dir, "statements")) || !strings.Contains(msg, tc.want) {
				t.Errorf("error %q, want it to name the file and say %q", msg, tc.want)
			}
			if strings.Contains(out, "statement logs,") {
				t.Errorf("verify printed an ok line for the statement logs:\n%s", out)
			}
			if !strings.HasPrefix(out, "ok: 5 records") {
				t.Errorf("the main log's ok line is missing although the main log is intact:\n%s", out)
			}
		})
	}
}

func TestAuditShow(t *testing.T) {
	t.Cleanup(func() { goleak.VerifyNone(t, cliLeakOpts...) })
	fx := newAuditFixture(t)
	out, err := runAuditCmd("show", "s1", "--file", fx.log)
	if err != nil {
		t.Fatalf("show: %v\n%s", err, out)
	}
	hash := sha256.Sum256([]byte(fx.queries["s1"][0]))
	for _, want := range []string{
		"session s1\n", "session.started", "session.ended", "user alice", "resource pg", "agent db-agent",
		"statements 5 (sealed", "database shop as app (text recorded)", "\n5 statements\n",
		hex.EncodeToString(hash[:])[:16], "SELECT 1", "42P01", "error", "250µs",
		"SELECT name FROM items WHERE id = 1",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("show output lacks %q:\n%s", want, out)
		}
	}
	if n := strings.Count(out, "\n"); n != 1+2+1+1+5+1 {
		t.Errorf("show printed %d lines, want 11 (title, 2 records, database, header, 5 statements, count):\n%s", n, out)
	}

	// --data-dir finds the audit log the way other commands find the gateway's state.
	out, err = runAuditCmd("show", "s2", "--data-dir", fx.dir, "--json")
	if err != nil {
		t.Fatalf("show --json: %v\n%s", err, out)
	}
	var js struct {
		Session    string         `json:"session_id"`
		Records    []audit.Record `json:"records"`
		Begin      map[string]any `json:"begin"`
		Statements []map[string]any
	}
	if err := json.Unmarshal([]byte(out), &js); err != nil {
		t.Fatalf("show --json is not JSON: %v\n%s", err, out)
	}
	if js.Session != "s2" || len(js.Records) != 2 || js.Begin["db_user"] != "app" || len(js.Statements) != 2 {
		t.Fatalf("show --json = %+v", js)
	}
	for i, s := range js.Statements {
		sum := sha256.Sum256([]byte(fx.queries["s2"][i]))
		if s["sha256"] != hex.EncodeToString(sum[:]) || s["text"] != nil || s["prev"] == nil {
			t.Errorf("statement %d as JSON = %v: want the full record, its hash, and no text (not recorded)", i+1, s)
		}
	}

	// A raw TCP session has records and no statement log.
	l, err := audit.OpenWithOptions(fx.log, audit.Options{NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	err = l.Write(audit.Record{Type: audit.TypeSessionStarted, SessionID: "raw1", User: "bob", Resource: "ssh"})
	if cerr := l.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		t.Fatal(err)
	}
	if out, err := runAuditCmd("show", "raw1", "--file", fx.log); err != nil || !strings.Contains(out, "user bob") || !strings.Contains(out, "no statement log") {
		t.Errorf("show of a raw session: %v\n%s", err, out)
	}
	out, err = runAuditCmd("show", "raw1", "--file", fx.log, "--json")
	var raw struct {
		Records    []audit.Record    `json:"records"`
		Statements []json.RawMessage `json:"statements"`
	}
	if err != nil || json.Unmarshal([]byte(out), &raw) != nil || len(raw.Records) != 1 || raw.Statements == nil || len(raw.Statements) != 0 {
		t.Errorf("show --json of a raw session: %v\n%s", err, out)
	}

	if _, err := runAuditCmd("show", "nosuch", "--file", fx.log); err == nil || !strings.Contains(err.Error(), "nosuch is not in audit log") {
		t.Errorf("show of an unknown session: %v", err)
	}
	if _, err := runAuditCmd("show", "../s1", "--file", fx.log); err == nil {
		t.Error("show accepted a session id that is a path")
	}
	if _, err := runAuditCmd("show", "s1"); err == nil || !strings.Contains(err.Error(), "--data-dir") {
		t.Errorf("show without --file or --data-dir: %v", err)
	}
}

func TestAuditShowDamaged(t *testing.T) {
	t.Cleanup(func() { goleak.VerifyNone(t, cliLeakOpts...) })
	fx := newAuditFixture(t)
	editLines(t, fx.statementLog("s1"), func(ls []string) []string { return ls[:len(ls)-1] })
	out, err := runAuditCmd("show", "s1", "--file", fx.log)
	if err == nil || !strings.Contains(err.Error(), "does not end where session.ended sealed it") {
		t.Errorf("show of a truncated log: %v", err)
	}
	if !strings.Contains(out, "4 statements") {
		t.Errorf("show of a damaged log did not print what is there:\n%s", out)
	}
	editLines(t, fx.statementLog("s1"), func(ls []string) []string { return append(ls[:1], ls[2:]...) })
	if _, err := runAuditCmd("show", "s1", "--file", fx.log); err == nil || !strings.Contains(err.Error(), "s1.log line 2") {
		t.Errorf("show of a log with a deleted line: %v", err)
	}
	os.Remove(fx.statementLog("s2"))
	if _, err := runAuditCmd("show", "s2", "--file", fx.log); err == nil || !strings.Contains(err.Error(), "missing") {
		t.Errorf("show of a session whose log was deleted: %v", err)
	}
}

func TestAuditUsage(t *testing.T) {
	t.Cleanup(func() { goleak.VerifyNone(t, cliLeakOpts...) })
	for _, args := range [][]string{{}, {"verify"}, {"show"}, {"list", "x"}, {"verify", "f", "--json"}, {"show", "s", "--anchor", "1:" + strings.Repeat("0", 64)}} {
		if _, err := runAuditCmd(args...); err == nil || !strings.Contains(err.Error(), "usage") {
			t.Errorf("audit %v: %v, want a usage error", args, err)
		}
	}
}
