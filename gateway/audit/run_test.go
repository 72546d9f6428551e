package audit

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// craftLog writes records (types and session ids) to a new log and returns its path.
func craftLog(t *testing.T, recs ...Record) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "audit.log")
	l, err := OpenWithOptions(path, Options{Now: fixedClock(), NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range recs {
		if err := l.Write(r); err != nil {
			t.Fatal(err)
		}
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	return path
}

func rec(typ, sid string) Record { return Record{Type: typ, SessionID: sid, User: "alice"} }

// scanned runs ScanLastRun and returns what it reported open, as "type id".
func scanned(t *testing.T, path string) (LastRun, []string) {
	t.Helper()
	var open []string
	run, err := ScanLastRun(path)
	if err != nil {
		t.Fatalf("ScanLastRun: %v", err)
	}
	if err := run.EachOpen(func(r Record) error {
		open = append(open, r.Type+" "+r.SessionID)
		return nil
	}); err != nil {
		t.Fatalf("EachOpen: %v", err)
	}
	return run, open
}

// Only the newest run is read; its starts without an end are reported in log order,
// with their full records.
func TestScanLastRunFindsWhatTheCrashLeftOpen(t *testing.T) {
	path := craftLog(t,
		rec(TypeGatewayStarted, ""),
		rec(TypeSessionStarted, "old"), // the older run left it open too, but it stopped cleanly
		rec(TypeGatewayStopped, ""),
		rec(TypeGatewayStarted, ""),
		rec(TypeAgentConnected, "a1"),
		rec(TypeUserConnected, "u1"),
		rec(TypeSessionStarted, "s1"),
		rec(TypeSessionStarted, "s2"),
		rec(TypeSessionEnded, "s2"),
		rec(TypeUserConnected, "u2"),
		rec(TypeUserDisconnected, "u2"),
		rec(TypeSessionDenied, "s3"),
		Record{Type: TypeSessionStarted, SessionID: "s4", User: "bob", Resource: "postgres", Agent: "db1"},
		rec(TypeTLSRefused, ""),
	)
	run, open := scanned(t, path)
	if want := []string{"agent.connected a1", "user.connected u1", "session.started s1", "session.started s4"}; !slices.Equal(open, want) {
		t.Fatalf("open = %v, want %v", open, want)
	}
	if run.Started.Seq != 4 || run.Last.Seq != 14 || run.Last.Type != TypeTLSRefused || !run.Crashed() || run.Open != 4 || run.Untracked != 0 {
		t.Fatalf("run = %+v", run)
	}
	var full Record
	err := run.EachOpen(func(r Record) error {
		if r.SessionID == "s4" {
			full = r
		}
		return nil
	})
	if err != nil || full.User != "bob" || full.Resource != "postgres" || full.Agent != "db1" || full.Seq != 13 {
		t.Fatalf("the start passed to fn = %+v, %v; want the whole record", full, err)
	}
}

func TestScanLastRunCleanAndRecordedRuns(t *testing.T) {
	clean := craftLog(t, rec(TypeGatewayStarted, ""), rec(TypeSessionStarted, "s1"), rec(TypeSessionEnded, "s1"), rec(TypeGatewayStopped, ""))
	if run, open := scanned(t, clean); run.Crashed() || !run.Stopped || len(open) != 0 {
		t.Fatalf("clean run: %+v, open %v", run, open)
	}
	// A start that ended the crashed run's sessions and then wrote gateway.crashed, but
	// did not get to serve (no gateway.started of its own): not a new crash.
	recorded := craftLog(t, rec(TypeGatewayStarted, ""), rec(TypeSessionStarted, "s1"),
		Record{Type: TypeSessionEnded, SessionID: "s1", Outcome: OutcomeGatewayCrashed}, rec(TypeGatewayCrashed, ""))
	if run, open := scanned(t, recorded); run.Crashed() || !run.Recorded || len(open) != 0 {
		t.Fatalf("recorded run: %+v, open %v", run, open)
	}
	// A recovery interrupted half-way: what it ended stays ended, the rest is reported.
	half := craftLog(t, rec(TypeGatewayStarted, ""), rec(TypeSessionStarted, "s1"), rec(TypeSessionStarted, "s2"),
		Record{Type: TypeSessionEnded, SessionID: "s1", Outcome: OutcomeGatewayCrashed})
	if run, open := scanned(t, half); !run.Crashed() || !slices.Equal(open, []string{"session.started s2"}) {
		t.Fatalf("half-recovered run: %+v, open %v", run, open)
	}
	none := craftLog(t, rec(TypeSessionStarted, "s1"))
	if run, open := scanned(t, none); run.Crashed() || run.Started.Seq != 0 || run.Last.Seq != 1 || len(open) != 0 {
		t.Fatalf("log without gateway.started: %+v, open %v", run, open)
	}
	empty := filepath.Join(t.TempDir(), "audit.log")
	if err := os.WriteFile(empty, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if run, open := scanned(t, empty); run.Crashed() || run.Last.Seq != 0 || len(open) != 0 {
		t.Fatalf("empty log: %+v, open %v", run, open)
	}
}

// A run far larger than the backwards read's block, with lines across block
// boundaries, a sealed torn line and an unsealed torn tail.
func TestScanLastRunLargeLogAndTornLines(t *testing.T) {
	var recs []Record
	for i := range 300 {
		recs = append(recs, rec(TypeSessionStarted, fmt.Sprintf("old-%d", i)))
	}
	recs = append(recs, rec(TypeGatewayStarted, ""))
	for i := range 3000 {
		r := rec(TypeSessionStarted, fmt.Sprintf("s-%d", i))
		r.Reason = strings.Repeat("x", i%97) // vary the line lengths
		recs = append(recs, r)
		if i%1000 != 7 {
			recs = append(recs, rec(TypeSessionEnded, fmt.Sprintf("s-%d", i)))
		}
	}
	path := craftLog(t, recs...)
	// A torn line, sealed by the next Open, then more records, then a torn tail.
	appendBytes(t, path, `{"time":"2026-`)
	l := openLog(t, path)
	if err := l.Write(rec(TypeSessionStarted, "after-seal")); err != nil {
		t.Fatal(err)
	}
	l.Close()
	appendBytes(t, path, `{"time":"2026-11-25T12:00:00Z","seq":99999,"type":"session.ended","session_id":"after-seal"`)

	run, open := scanned(t, path)
	want := []string{"session.started s-7", "session.started s-1007", "session.started s-2007", "session.started after-seal"}
	if !slices.Equal(open, want) || run.Started.Seq != 301 || !run.Crashed() {
		t.Fatalf("open = %v (run %+v), want %v", open, run, want)
	}
	if res, err := VerifyFile(path); err != nil || len(res.Sealed) != 1 || !res.TornTail {
		t.Fatalf("the crafted log is not what the test means: %+v, %v", res, err)
	}
}

func TestScanLastRunBoundsMemory(t *testing.T) {
	defer func(n int) { maxOpenTracked = n }(maxOpenTracked)
	maxOpenTracked = 3
	recs := []Record{rec(TypeGatewayStarted, "")}
	for i := range 5 {
		recs = append(recs, rec(TypeSessionStarted, fmt.Sprint(i)))
	}
	run, open := scanned(t, craftLog(t, recs...))
	if len(open) != 3 || run.Open != 5 || run.Untracked != 2 {
		t.Fatalf("run = %+v, open %v; want 3 reported and 2 counted untracked", run, open)
	}
}

func TestEachOpenStopsOnCallbackError(t *testing.T) {
	path := craftLog(t, rec(TypeGatewayStarted, ""), rec(TypeSessionStarted, "s1"), rec(TypeSessionStarted, "s2"))
	boom := errors.New("boom")
	calls := 0
	run, err := ScanLastRun(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := run.EachOpen(func(Record) error { calls++; return boom }); !errors.Is(err, boom) || calls != 1 {
		t.Fatalf("EachOpen = %v after %d calls, want boom after 1", err, calls)
	}
}

func appendBytes(t *testing.T, path, s string) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteString(s); err != nil {
		t.Fatal(err)
	}
}
