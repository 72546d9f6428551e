package audit

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

func hashOf(s string) string {
	sum := sha256.Sum256([]byte(s))
	return hex.EncodeToString(sum[:])
}

func sampleBegin(id string, text bool) StatementBegin {
	return StatementBegin{Session: id, User: "alice", Identity: "spiffe://wicket.local/user/alice",
		Resource: "pg", Agent: "db-agent", DBUser: "app", Database: "shop", RecordsText: text}
}

func sampleStatement(i int) Statement {
	q := fmt.Sprintf("SELECT %d FROM items WHERE id = $1", i)
	return Statement{Kind: KindExtended, Text: q, Tag: "SELECT 1", Rows: 1, Status: StatusOK,
		Duration: time.Duration(i) * time.Microsecond}
}

// writeSession writes, in dir, a statement log of n statements and the main log's
// session.started and (if sealed) session.ended records for it, as the gateway does.
func writeSession(t *testing.T, main *Log, dir, id string, n int, sealed bool) string {
	t.Helper()
	sl, err := OpenStatementLog(dir, sampleBegin(id, true), StatementLogOptions{Now: fixedClock(), NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	if err := main.Write(Record{Type: TypeSessionStarted, SessionID: id, User: "alice",
		Extra: map[string]string{ExtraStatementsLog: StatementLogName(id)}}); err != nil {
		t.Fatal(err)
	}
	for i := 1; i <= n; i++ {
		if err := sl.Append(sampleStatement(i)); err != nil {
			t.Fatal(err)
		}
	}
	seal, err := sl.Close()
	if err != nil {
		t.Fatal(err)
	}
	if sealed {
		end := Record{Type: TypeSessionEnded, SessionID: id, Outcome: OutcomeOK}
		seal.Put(&end)
		if err := main.Write(end); err != nil {
			t.Fatal(err)
		}
	}
	return filepath.Join(dir, filepath.FromSlash(StatementLogName(id)))
}

func TestStatementLogRoundTrip(t *testing.T) {
	dir := t.TempDir()
	clock := fixedClock()
	sl, err := OpenStatementLog(dir, sampleBegin("abc123", true), StatementLogOptions{Now: clock, SyncEvery: time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	want := []Statement{
		{Kind: KindSimple, Text: "SELECT 1", Tag: "SELECT 1", Rows: 1, Status: StatusOK, Duration: 1500 * time.Microsecond},
		{Kind: KindExtended, SHA256: hashOf("UPDATE t SET a = $1"), Len: 19, Text: "UPDATE t SET a = $1", Tag: "UPDATE 3", Rows: 3, Status: StatusOK},
		{Kind: KindSimple, Text: "SELEC 1", SQLState: "42601", Status: StatusError},
		{Kind: KindCopy, Text: "COPY t FROM STDIN", Tag: "COPY 10", Rows: 10, Status: StatusOK},
		{Kind: KindFunction, SHA256: hashOf("lo_open"), Len: 7, Status: StatusIncomplete},
	}
	for _, s := range want {
		if err := sl.Append(s); err != nil {
			t.Fatalf("Append: %v", err)
		}
	}
	seal, err := sl.Close()
	if err != nil {
		t.Fatal(err)
	}
	if again, err := sl.Close(); err != nil || again != seal {
		t.Errorf("second Close = %v, %v; want the same seal and no error", again, err)
	}
	if err := sl.Append(want[0]); err == nil {
		t.Error("Append after Close succeeded")
	}
	path := filepath.Join(dir, "statements", "abc123.log")
	if sl.Path() != path {
		t.Errorf("Path = %s, want %s", sl.Path(), path)
	}
	for p, mode := range map[string]os.FileMode{path: 0o600, filepath.Dir(path): 0o700} {
		fi, err := os.Stat(p)
		if err != nil || fi.Mode().Perm() != mode {
			t.Errorf("%s: mode %v (%v), want %v", p, fi.Mode().Perm(), err, mode)
		}
	}
	begin, got, err := ReadStatementLog(path)
	if err != nil {
		t.Fatal(err)
	}
	if begin.Session != "abc123" || begin.User != "alice" || begin.DBUser != "app" || begin.Database != "shop" ||
		!begin.RecordsText || begin.Time.IsZero() {
		t.Errorf("begin = %+v", begin)
	}
	if len(got) != len(want) {
		t.Fatalf("read %d statements, wrote %d", len(got), len(want))
	}
	for i, g := range got {
		w := want[i]
		if g.Seq != uint64(i+1) || g.Kind != w.Kind || g.Tag != w.Tag || g.Rows != w.Rows || g.Status != w.Status ||
			g.SQLState != w.SQLState || g.Duration != w.Duration || g.Text != w.Text || g.Time.IsZero() {
			t.Errorf("statement %d = %+v, want %+v", i+1, g, w)
		}
		wantHash := w.SHA256
		if wantHash == "" {
			wantHash = hashOf(w.Text)
		}
		if g.SHA256 != wantHash {
			t.Errorf("statement %d sha256 %s, want %s", i+1, g.SHA256, wantHash)
		}
	}
	info, err := CheckStatementLog(path)
	if err != nil {
		t.Fatal(err)
	}
	if info.Seal() != seal || seal.Count != uint64(len(want)) {
		t.Errorf("seal from reading %+v, from Close %+v", info.Seal(), seal)
	}
	// The head is the hash of the last line: checkable by hand with sha256sum.
	b, _ := os.ReadFile(path)
	lines := splitLines(b)
	if lineHash(lines[len(lines)-1]) != seal.Head {
		t.Error("seal head is not the SHA-256 of the last line")
	}
	if _, err := OpenStatementLog(dir, sampleBegin("abc123", true), StatementLogOptions{NoSync: true}); err == nil {
		t.Error("a second OpenStatementLog of the same session succeeded: it must not overwrite evidence")
	}
}

func TestStatementLogEmptySeal(t *testing.T) {
	dir := t.TempDir()
	sl, err := OpenStatementLog(dir, sampleBegin("empty", false), StatementLogOptions{NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	seal, err := sl.Close()
	if err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(sl.Path())
	if seal.Count != 0 || seal.Head != lineHash(b) || bytes.Count(b, []byte{'\n'}) != 1 {
		t.Errorf("seal of an empty log = %+v, want count 0 and the begin line's hash", seal)
	}
	var r Record
	seal.Put(&r)
	if got, ok := SealOf(r); !ok || got != seal {
		t.Errorf("SealOf(Put) = %+v %v", got, ok)
	}
	if _, ok := SealOf(Record{Extra: map[string]string{ExtraStatements: "x", ExtraStatementsHead: seal.Head}}); ok {
		t.Error("SealOf accepted a non-numeric count")
	}
}

func TestStatementLogText(t *testing.T) {
	dir := t.TempDir()
	secret := "SELECT * FROM users WHERE password = 'hunter2'"
	noText, err := OpenStatementLog(dir, sampleBegin("notext", false), StatementLogOptions{NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	if err := noText.Append(Statement{Kind: KindSimple, Text: secret, Status: StatusOK}); err != nil {
		t.Fatal(err)
	}
	noText.Close()
	b, _ := os.ReadFile(noText.Path())
	if bytes.Contains(b, []byte("hunter2")) {
		t.Fatal("a log that does not record text holds the statement text")
	}
	_, got, err := ReadStatementLog(noText.Path())
	if err != nil || len(got) != 1 || got[0].SHA256 != hashOf(secret) || got[0].Len != len(secret) || got[0].Text != "" {
		t.Fatalf("read %+v, %v: want the hash and length of the text and no text", got, err)
	}

	withText, err := OpenStatementLog(dir, sampleBegin("text", true), StatementLogOptions{NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	long := strings.Repeat("é", MaxStatementText) // 2 bytes each: the cut must not split one
	if err := withText.Append(Statement{Kind: KindSimple, Text: long, Status: StatusOK}); err != nil {
		t.Fatal(err)
	}
	if err := withText.Append(Statement{Kind: KindSimple, SHA256: hashOf("SELECT 12345"), Len: 12, Text: "SELECT", Status: StatusOK}); err != nil {
		t.Fatal(err)
	}
	for _, bad := range []Statement{
		{Kind: "query", Text: "x", Status: StatusOK},
		{Kind: KindSimple, Text: "x", Status: "done"},
		{Kind: KindSimple, SHA256: "ABC", Len: 1, Status: StatusOK},
		{Kind: KindSimple, SHA256: hashOf("SELECT 2"), Len: 8, Text: "SELECT 1", Status: StatusOK},
		{Kind: KindSimple, SHA256: hashOf("SELECT 2"), Len: 2, Text: "SELECT 2", Status: StatusOK},
		{Kind: KindSimple, Text: "x", Status: StatusOK, Rows: -1},
	} {
		if err := withText.Append(bad); err == nil {
			t.Errorf("Append(%+v) accepted", bad)
		}
	}
	withText.Close()
	_, got, err = ReadStatementLog(withText.Path())
	if err != nil || len(got) != 2 {
		t.Fatalf("read %d statements, %v; want 2 (rejected records leave no line)", len(got), err)
	}
	if g := got[0]; !g.TextTruncated || len(g.Text) != MaxStatementText || g.Len != len(long) || g.SHA256 != hashOf(long) {
		t.Errorf("long text: truncated %v, kept %d bytes, len %d", g.TextTruncated, len(g.Text), g.Len)
	}
	if g := got[1]; !g.TextTruncated || g.Text != "SELECT" || g.Len != 12 {
		t.Errorf("a prefix of the text was not flagged as truncated: %+v", g)
	}
}

func TestOpenStatementLogRefusesBadSessionID(t *testing.T) {
	dir := t.TempDir()
	for _, id := range []string{"", "../x", "a/b", ".hidden", strings.Repeat("a", 129)} {
		if _, err := OpenStatementLog(dir, sampleBegin(id, false), StatementLogOptions{NoSync: true}); err == nil {
			t.Errorf("session id %q accepted as a file name", id)
		}
	}
}

// Concurrent appenders get one gapless chain (run with -race).
func TestStatementLogConcurrentAppend(t *testing.T) {
	sl, err := OpenStatementLog(t.TempDir(), sampleBegin("conc", true), StatementLogOptions{SyncEvery: time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for w := range 8 {
		wg.Go(func() {
			for i := range 200 {
				if err := sl.Append(sampleStatement(w*1000 + i)); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	seal, err := sl.Close()
	if err != nil {
		t.Fatal(err)
	}
	info, err := CheckStatementLog(sl.Path())
	if err != nil || info.Statements != 1600 || info.Seal() != seal {
		t.Fatalf("after concurrent appends: %+v, %v; seal %+v", info, err, seal)
	}
}

// mainLog opens audit.log in a new directory.
func mainLog(t *testing.T) (*Log, string) {
	t.Helper()
	dir := t.TempDir()
	l, err := OpenWithOptions(filepath.Join(dir, "audit.log"), Options{Now: fixedClock(), NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return l, dir
}

func rewrite(t *testing.T, path string, edit func(lines [][]byte) [][]byte) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, bytes.Join(edit(splitLines(b)), nil), 0o600); err != nil {
		t.Fatal(err)
	}
}

func TestVerifyStatementLogs(t *testing.T) {
	editTag := func(l []byte) []byte { return bytes.Replace(l, []byte(`"SELECT 1"`), []byte(`"SELECT 9"`), 1) }
	cases := []struct {
		name   string
		damage func(t *testing.T, dir, path string)
		kind   error
		line   int    // expected line of the problem, 0 for the whole file
		detail string // part of the expected detail
	}{
		{"valid", func(*testing.T, string, string) {}, nil, 0, ""},
		{"edited line", func(t *testing.T, _, p string) {
			rewrite(t, p, func(ls [][]byte) [][]byte { ls[2] = editTag(ls[2]); return ls })
		}, ErrModified, 4, "line 3"},
		{"edited last line", func(t *testing.T, _, p string) {
			rewrite(t, p, func(ls [][]byte) [][]byte { ls[len(ls)-1] = editTag(ls[len(ls)-1]); return ls })
		}, ErrSealMismatch, 6, "modified or replaced"},
		{"edited text", func(t *testing.T, _, p string) {
			rewrite(t, p, func(ls [][]byte) [][]byte {
				ls[1] = bytes.Replace(ls[1], []byte("FROM items"), []byte("FROM users"), 1)
				return ls
			})
		}, ErrModified, 2, "recorded text"},
		{"not JSON", func(t *testing.T, _, p string) {
			rewrite(t, p, func(ls [][]byte) [][]byte { ls[3] = []byte("garbage\n"); return ls })
		}, ErrMalformed, 4, "not a valid JSON"},
		{"deleted line", func(t *testing.T, _, p string) {
			rewrite(t, p, func(ls [][]byte) [][]byte { return append(ls[:2], ls[3:]...) })
		}, ErrDeleted, 3, "statement 2 is missing"},
		{"duplicated line", func(t *testing.T, _, p string) {
			rewrite(t, p, func(ls [][]byte) [][]byte { return append(ls[:3], append([][]byte{ls[2]}, ls[3:]...)...) })
		}, ErrReordered, 4, "repeats"},
		{"truncated", func(t *testing.T, _, p string) {
			rewrite(t, p, func(ls [][]byte) [][]byte { return ls[:4] })
		}, ErrSealMismatch, 4, "cut off the end"},
		{"appended line", func(t *testing.T, _, p string) {
			rewrite(t, p, func(ls [][]byte) [][]byte {
				last := ls[len(ls)-1]
				next := bytes.Replace(last, []byte(`"seq":5`), []byte(`"seq":6`), 1)
				i := bytes.Index(next, []byte(`"prev":"`))
				next = append(append(next[:i:i], []byte(`"prev":"`+lineHash(last)+`"}`)...), '\n')
				return append(ls, next)
			})
		}, ErrSealMismatch, 7, "appended after"},
		{"torn bytes after the seal", func(t *testing.T, _, p string) {
			f, _ := os.OpenFile(p, os.O_WRONLY|os.O_APPEND, 0)
			f.WriteString(`{"type":"statement","seq":6`)
			f.Close()
		}, ErrSealMismatch, 7, "appended after the session ended"},
		{"missing file", func(t *testing.T, _, p string) { os.Remove(p) }, ErrMissingLog, 0, "does not exist"},
		{"another session's log", func(t *testing.T, dir, p string) {
			b, _ := os.ReadFile(p)
			os.WriteFile(filepath.Join(dir, "statements", "s2.log"), b, 0o600)
		}, ErrWrongSession, 1, `names session "s1"`},
		{"first prev", func(t *testing.T, _, p string) {
			rewrite(t, p, func(ls [][]byte) [][]byte {
				ls[0] = bytes.Replace(ls[0], []byte(Genesis), []byte(strings.Repeat("1", 64)), 1)
				return ls
			})
		}, ErrModified, 1, "genesis"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			main, dir := mainLog(t)
			p := writeSession(t, main, dir, "s1", 5, true)
			writeSession(t, main, dir, "s2", 3, true)
			tc.damage(t, dir, p)
			res, err := VerifyStatementLogs(main.Path())
			if tc.kind == nil {
				if err != nil || res.Logs != 2 || res.Statements != 8 || res.Sealed != 2 || len(res.Problems) != 0 {
					t.Fatalf("valid logs: %+v, %v", res, err)
				}
				return
			}
			var le *StatementLogError
			if !errors.As(err, &le) || !errors.Is(err, tc.kind) {
				t.Fatalf("error %v, want a *StatementLogError of kind %v", err, tc.kind)
			}
			if le.Line != tc.line || !strings.Contains(le.Detail, tc.detail) || !strings.HasPrefix(le.File, "statements/s") {
				t.Errorf("problem %q (file %s line %d), want line %d mentioning %q", le.Error(), le.File, le.Line, tc.line, tc.detail)
			}
			if len(res.Problems) != 1 {
				t.Errorf("%d problems, want exactly the one damaged log: %v", len(res.Problems), res.Problems)
			}
		})
	}
}

func TestVerifyStatementLogsUnsealedAndTorn(t *testing.T) {
	main, dir := mainLog(t)
	writeSession(t, main, dir, "done", 2, true)
	open := writeSession(t, main, dir, "open", 3, false)
	f, err := os.OpenFile(open, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteString(`{"type":"statement","seq":4,"ti`) // a crash mid-write
	f.Close()
	// A log with no session.started: a session refused because its start could not be recorded.
	if _, err := OpenStatementLog(dir, sampleBegin("refused", false), StatementLogOptions{NoSync: true}); err != nil {
		t.Fatal(err)
	}
	res, err := VerifyStatementLogs(main.Path())
	if err != nil {
		t.Fatalf("unsealed and torn logs reported as damage: %v", err)
	}
	if res.Logs != 3 || res.Sealed != 1 || res.Statements != 5 ||
		strings.Join(res.Unsealed, ",") != "statements/open.log,statements/refused.log" ||
		strings.Join(res.Torn, ",") != "statements/open.log" || strings.Join(res.Unnamed, ",") != "statements/refused.log" {
		t.Errorf("result %+v", res)
	}

	// The next start of the gateway closes the log and seals it into session.ended.
	seal, err := RecoverStatementLog(dir, "open", fixedClock())
	if err != nil {
		t.Fatal(err)
	}
	if seal.Count != 3 {
		t.Errorf("recovered seal counts %d statements, want 3", seal.Count)
	}
	if again, err := RecoverStatementLog(dir, "open", fixedClock()); err != nil || again != seal {
		t.Errorf("second recovery = %+v, %v; want the same seal", again, err)
	}
	end := Record{Type: TypeSessionEnded, SessionID: "open", Outcome: OutcomeGatewayCrashed}
	seal.Put(&end)
	if err := main.Write(end); err != nil {
		t.Fatal(err)
	}
	res, err = VerifyStatementLogs(main.Path())
	if err != nil || res.Sealed != 2 || len(res.Torn) != 0 || strings.Join(res.Recovered, ",") != "statements/open.log" {
		t.Fatalf("after recovery: %+v, %v", res, err)
	}
	b, _ := os.ReadFile(open)
	if !bytes.Contains(b, []byte(`{"type":"statement","seq":4,"ti`+"\n")) {
		t.Error("recovery removed the torn bytes: they must stay as evidence")
	}
	// A line after the recovery line cannot come from the gateway.
	rewrite(t, open, func(ls [][]byte) [][]byte { return append(ls, ls[1]) })
	if _, err := VerifyStatementLogs(main.Path()); !errors.Is(err, ErrSealMismatch) {
		t.Errorf("a line after the recovery line: %v, want ErrSealMismatch", err)
	}
}

// The main log's statements_log must name the session's own file: verification never
// follows another path.
func TestVerifyStatementLogsWrongName(t *testing.T) {
	main, dir := mainLog(t)
	writeSession(t, main, dir, "s1", 1, true)
	if err := main.Write(Record{Type: TypeSessionStarted, SessionID: "s2",
		Extra: map[string]string{ExtraStatementsLog: "statements/s1.log"}}); err != nil {
		t.Fatal(err)
	}
	_, err := VerifyStatementLogs(main.Path())
	if !errors.Is(err, ErrWrongSession) || !strings.Contains(err.Error(), "line 3") {
		t.Errorf("err = %v, want ErrWrongSession naming audit log line 3", err)
	}
}

// BenchmarkStatementAppend is the cost of one statement record on the data path, with
// the production fsync schedule (one per SyncEvery) and with none.
func BenchmarkStatementAppend(b *testing.B) {
	for _, bc := range []struct {
		name   string
		noSync bool
		text   bool
	}{{"sync1s", false, false}, {"sync1s-text", false, true}, {"nosync", true, false}} {
		b.Run(bc.name, func(b *testing.B) {
			sl, err := OpenStatementLog(b.TempDir(), sampleBegin("bench", bc.text), StatementLogOptions{NoSync: bc.noSync})
			if err != nil {
				b.Fatal(err)
			}
			s := sampleStatement(1)
			s.SHA256, s.Len = hashOf(s.Text), len(s.Text)
			b.ReportAllocs()
			b.ResetTimer()
			for b.Loop() {
				if err := sl.Append(s); err != nil {
					b.Fatal(err)
				}
			}
			b.StopTimer()
			if _, err := sl.Close(); err != nil {
				b.Fatal(err)
			}
			fi, _ := os.Stat(sl.Path())
			b.ReportMetric(float64(fi.Size())/float64(b.N), "bytes/stmt")
		})
	}
}

// A gateway killed while it created a log, before anything named it, leaves an empty
// file or a torn begin line: a session that never started, not damage.
func TestVerifyStatementLogsTornBegin(t *testing.T) {
	main, dir := mainLog(t)
	writeSession(t, main, dir, "s1", 1, true)
	for id, b := range map[string]string{"empty": "", "cut": `{"type":"statements.begin","seq":0,"ti`} {
		if err := os.WriteFile(filepath.Join(dir, "statements", id+".log"), []byte(b), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	res, err := VerifyStatementLogs(main.Path())
	if err != nil || strings.Join(res.Torn, ",") != "statements/cut.log,statements/empty.log" || res.Sealed != 1 {
		t.Fatalf("torn begin lines: %+v, %v", res, err)
	}
	// The same file named by a session.started is a log that lost its begin line: damage.
	if err := main.Write(Record{Type: TypeSessionStarted, SessionID: "cut",
		Extra: map[string]string{ExtraStatementsLog: StatementLogName("cut")}}); err != nil {
		t.Fatal(err)
	}
	if _, err := VerifyStatementLogs(main.Path()); !errors.Is(err, ErrMalformed) || !strings.Contains(err.Error(), "cut.log line 1") {
		t.Errorf("a named log without its begin line: %v, want ErrMalformed on line 1", err)
	}
}

const stmtHelperEnv = "WICKET_STATEMENTS_KILL_HELPER"

// TestStatementKillHelper is the child process of TestKilledStatementWriter: it appends
// statements (production fsync schedule) until it is killed. Run directly it does nothing.
func TestStatementKillHelper(t *testing.T) {
	dir := os.Getenv(stmtHelperEnv)
	if dir == "" {
		return
	}
	sl, err := OpenStatementLog(dir, sampleBegin("killed", true), StatementLogOptions{SyncEvery: 10 * time.Millisecond})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	for i := 0; ; i++ {
		if err := sl.Append(sampleStatement(i)); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(3)
		}
	}
}

// A writer killed mid-session (SIGKILL) leaves a log that verifies as unsealed, and that
// RecoverStatementLog closes with a seal that then verifies.
func TestKilledStatementWriter(t *testing.T) {
	main, dir := mainLog(t)
	if err := main.Write(Record{Type: TypeSessionStarted, SessionID: "killed",
		Extra: map[string]string{ExtraStatementsLog: StatementLogName("killed")}}); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "statements", "killed.log")
	cmd := exec.Command(os.Args[0], "-test.run=^TestStatementKillHelper$", "-test.count=1")
	cmd.Env = append(os.Environ(), stmtHelperEnv+"="+dir)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(20 * time.Second)
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		b, _ := os.ReadFile(path)
		if bytes.Count(b, []byte{'\n'}) >= 2000 {
			break
		}
		if time.Now().After(deadline) {
			cmd.Process.Kill()
			cmd.Wait()
			t.Fatalf("helper wrote fewer than 2000 statements in 20s; stderr: %s", stderr.String())
		}
		<-tick.C
	}
	if err := cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	cmd.Wait()

	res, err := VerifyStatementLogs(main.Path())
	if err != nil || strings.Join(res.Unsealed, ",") != "statements/killed.log" || res.Statements < 1999 {
		t.Fatalf("a killed writer's log: %+v, %v; want it unsealed, not damaged", res, err)
	}
	seal, err := RecoverStatementLog(dir, "killed", nil)
	if err != nil {
		t.Fatal(err)
	}
	end := Record{Type: TypeSessionEnded, SessionID: "killed", Outcome: OutcomeGatewayCrashed}
	seal.Put(&end)
	if err := main.Write(end); err != nil {
		t.Fatal(err)
	}
	res, err = VerifyStatementLogs(main.Path())
	if err != nil || res.Sealed != 1 || res.Statements != seal.Count || len(res.Recovered) != 1 {
		t.Fatalf("after recovery: %+v, %v (seal %+v)", res, err, seal)
	}
}

// BenchmarkCheckStatementLog is the cost of verifying a 10,000-statement log.
func BenchmarkCheckStatementLog(b *testing.B) {
	sl, err := OpenStatementLog(b.TempDir(), sampleBegin("bench", true), StatementLogOptions{NoSync: true})
	if err != nil {
		b.Fatal(err)
	}
	for i := range 10000 {
		if err := sl.Append(sampleStatement(i)); err != nil {
			b.Fatal(err)
		}
	}
	if _, err := sl.Close(); err != nil {
		b.Fatal(err)
	}
	for b.Loop() {
		if info, err := CheckStatementLog(sl.Path()); err != nil || info.Statements != 10000 {
			b.Fatal(info, err)
		}
	}
}
