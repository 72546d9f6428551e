package test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// The tests of statement-level audit need the PostgreSQL at 127.0.0.1:5432 (user postgres,
// trust authentication, ssl=on), psql, and fail when it is missing.

// needPostgres fails the test loudly when the local PostgreSQL or psql is missing.
func needPostgres(t *testing.T) {
	t.Helper()
	c, err := net.DialTimeout("tcp", "127.0.0.1:5432", 5*time.Second)
	if err != nil {
		t.Fatalf("PostgreSQL must run at 127.0.0.1:5432 (user postgres, trust auth) for this test: %v", err)
	}
	c.Close()
	if _, err := exec.LookPath("psql"); err != nil {
		t.Fatal("psql must be installed for this test (Debian package postgresql-client)")
	}
}

// pgURL is a libpq URL for the PostgreSQL behind addr; the client leg never asks for TLS:
// the tunnel is the encryption, and Wicket answers an SSLRequest with N.
func pgURL(addr string) string {
	return "postgres://postgres@" + addr + "/postgres?sslmode=disable"
}

// psql runs psql against addr with the given arguments and returns its stdout.
func psql(t *testing.T, addr string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "psql", append([]string{pgURL(addr), "-X", "-v", "ON_ERROR_STOP=1", "-At"}, args...)...)
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	if err := cmd.Run(); err != nil {
		t.Fatalf("psql %v: %v\n%s", args, err, errOut.String())
	}
	return out.String()
}

// pgSession is one PostgreSQL session as the audit log has it: its session.ended record and
// its statements from `wicket audit show SESSION --json`.
type pgSession struct {
	Ended      map[string]any
	Statements []pgStatement
}

type pgStatement struct {
	Kind     string `json:"kind"`
	SHA256   string `json:"sha256"`
	Len      int    `json:"len"`
	Text     string `json:"text"`
	Tag      string `json:"tag"`
	Rows     int64  `json:"rows"`
	SQLState string `json:"sqlstate"`
	Status   string `json:"status"`
}

// statementsOf reads a session's statement log line by line (the begin line skipped).
func statementsOf(t *testing.T, gw *Gateway, session string) []pgStatement {
	t.Helper()
	f, err := os.Open(filepath.Join(gw.DataDir, "statements", session+".log"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []pgStatement
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var probe struct {
			Type string `json:"type"`
		}
		if err := json.Unmarshal(sc.Bytes(), &probe); err != nil {
			t.Fatalf("statement log line %q: %v", sc.Bytes(), err)
		}
		if probe.Type != "statement" {
			continue
		}
		var s pgStatement
		if err := json.Unmarshal(sc.Bytes(), &s); err != nil {
			t.Fatal(err)
		}
		out = append(out, s)
	}
	return out
}

// endedSessions returns the session.ended records of resource with a statements seal.
func endedSessions(gw *Gateway, resource string) []map[string]any {
	var out []map[string]any
	for _, r := range gw.AuditRecords() {
		if r["type"] == "session.ended" && r["resource"] == resource {
			if x, ok := r["extra"].(map[string]any); ok && x["statements"] != nil {
				out = append(out, r)
			}
		}
	}
	return out
}

func sha(s string) string {
	sum := sha256.Sum256([]byte(s))
	return hex.EncodeToString(sum[:])
}

// findStatement returns the first statement with that text hash, or fails.
func findStatement(t *testing.T, stmts []pgStatement, text string) pgStatement {
	t.Helper()
	for _, s := range stmts {
		if s.SHA256 == sha(text) {
			if s.Len != len(text) {
				t.Errorf("statement %q: len %d, want %d", text, s.Len, len(text))
			}
			return s
		}
	}
	t.Fatalf("no statement with the hash of %q among %d: %+v", text, len(stmts), stmts)
	return pgStatement{}
}

// TestPostgresStatementAudit runs psql and pgx through `wicket connect` to a postgres://
// resource whose agent speaks TLS to the database, and checks each statement's record, the
// cancel path, the seal and `wicket audit verify` finding an edited statement line.
func TestPostgresStatementAudit(t *testing.T) {
	needPostgres(t)
	h := NewHarness(t)
	gw := h.StartGateway(GatewayOptions{Policy: allowAlice})
	h.StartAgent(gw, "db-agent", "pg=postgres://127.0.0.1:5432?sslmode=require&record=statements")
	out := gw.MustAdmin("agents", "list")
	if !strings.Contains(out, "pg (postgres)") {
		t.Fatalf("agents list does not show the protocol:\n%s", out)
	}
	user := h.Login(gw, "alice")
	_, addr := h.Connect(user, "pg")

	// psql: simple queries, a multi-statement query, \copy both ways, an error.
	table := fmt.Sprintf("wicket_e2e_%d", time.Now().UnixNano())
	t.Cleanup(func() { exec.Command("psql", pgURL("127.0.0.1:5432"), "-Xqc", "drop table if exists "+table).Run() })
	if got := psql(t, addr, "-c", "select 40 + 2"); strings.TrimSpace(got) != "42" {
		t.Fatalf("select through the tunnel printed %q", got)
	}
	// The agent's backend is encrypted: the database says so itself.
	if got := psql(t, addr, "-c", "select ssl from pg_stat_ssl where pid = pg_backend_pid()"); strings.TrimSpace(got) != "t" {
		t.Fatalf("pg_stat_ssl of the agent's backend says ssl = %q, want t (sslmode=require)", got)
	}
	psql(t, addr, "-c", "create table "+table+" (id int, name text); insert into "+table+" values (1, 'a'), (2, 'b')")
	csv := filepath.Join(t.TempDir(), "rows.csv")
	if err := os.WriteFile(csv, []byte("3,c\n4,d\n5,e\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	psql(t, addr, "-c", `\copy `+table+` from '`+csv+`' with (format csv)`)
	copied := psql(t, addr, "-c", `\copy (select * from `+table+` order by id) to stdout with (format csv)`)
	if copied != "1,a\n2,b\n3,c\n4,d\n5,e\n" {
		t.Fatalf("copy out printed %q", copied)
	}

	// pgx: prepared statements (extended protocol), a pipelined batch with an error in it.
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	conn, err := pgx.Connect(ctx, pgURL(addr))
	if err != nil {
		t.Fatal(err)
	}
	var n int
	if err := conn.QueryRow(ctx, "select count(*) from "+table+" where id > $1", 1).Scan(&n); err != nil || n != 4 {
		t.Fatalf("prepared select: %d, %v", n, err)
	}
	b := &pgx.Batch{}
	b.Queue("update "+table+" set name = $1 where id = $2", "z", 1)
	b.Queue("select 1 / $1::int", 0)
	b.Queue("delete from "+table+" where id = $1", 5)
	br := conn.SendBatch(ctx, b)
	if _, err := br.Exec(); err != nil {
		t.Fatalf("batch update: %v", err)
	}
	_, err = br.Exec()
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || pgErr.Code != "22012" {
		t.Fatalf("batched division by zero: %v", err)
	}
	br.Close()
	_, err = conn.Exec(ctx, "select * from wicket_no_such_table", pgx.QueryExecModeSimpleProtocol)
	if !errors.As(err, &pgErr) || pgErr.Code != "42P01" {
		t.Fatalf("select of a missing table: %v", err)
	}

	// A cancelled query: pgx sends a CancelRequest to the same host and port, through
	// `wicket connect` and the gateway, which must reach the backend through the agent.
	cancelled := make(chan error, 1)
	go func() {
		// Once the backend runs the sleep, cancel it the way libpq and pgx do.
		for {
			out, _ := exec.Command("psql", pgURL("127.0.0.1:5432"), "-XAtc",
				"select count(*) from pg_stat_activity where query = 'select pg_sleep(60)' and state = 'active'").Output()
			if strings.TrimSpace(string(out)) == "1" || ctx.Err() != nil {
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
		cancelled <- conn.PgConn().CancelRequest(ctx)
	}()
	_, err = conn.Exec(ctx, "select pg_sleep(60)")
	if err := <-cancelled; err != nil {
		t.Fatalf("cancel request: %v", err)
	}
	if !errors.As(err, &pgErr) || pgErr.Code != "57014" {
		t.Fatalf("the cancelled pg_sleep ended with %v, want SQLSTATE 57014 (query_canceled)", err)
	}
	if got := psql(t, "127.0.0.1:5432", "-c", "select count(*) from pg_stat_activity where query = 'select pg_sleep(60)' and state = 'active'"); strings.TrimSpace(got) != "0" {
		t.Fatalf("the cancelled backend still runs pg_sleep: %s", got)
	}
	gw.WaitAudit(map[string]string{"type": "statement.cancel", "outcome": "ok", "resource": "pg"})
	psql(t, addr, "-c", "drop table "+table)
	conn.Close(ctx)

	// Every session's statements, by hash.
	eventually(t, "the sessions' ends", func() bool { return len(endedSessions(gw, "pg")) >= 7 })
	var all []pgStatement
	for _, r := range endedSessions(gw, "pg") {
		stmts := statementsOf(t, gw, r["session_id"].(string))
		x := r["extra"].(map[string]any)
		if x["statements"] != strconv.Itoa(len(stmts)) {
			t.Errorf("session %s is sealed with %v statements, its log has %d", r["session_id"], x["statements"], len(stmts))
		}
		all = append(all, stmts...)
	}
	if s := findStatement(t, all, "select 40 + 2"); s.Kind != "simple" || s.Tag != "SELECT 1" || s.Rows != 1 || s.Status != "ok" || s.Text != "select 40 + 2" {
		t.Errorf("simple select: %+v", s)
	}
	if s := findStatement(t, all, "create table "+table+" (id int, name text); insert into "+table+" values (1, 'a'), (2, 'b')"); s.Tag != "CREATE TABLE; INSERT 0 2" || s.Rows != 2 {
		t.Errorf("multi-statement query: %+v", s)
	}
	var copies []pgStatement
	for _, s := range all {
		if s.Kind == "copy" {
			copies = append(copies, s)
		}
	}
	if len(copies) != 2 || copies[0].Tag != "COPY 3" || copies[1].Tag != "COPY 5" {
		t.Errorf("copy statements: %+v", copies)
	}
	if s := findStatement(t, all, "select count(*) from "+table+" where id > $1"); s.Kind != "extended" || s.Tag != "SELECT 1" {
		t.Errorf("prepared select: %+v", s)
	}
	if s := findStatement(t, all, "update "+table+" set name = $1 where id = $2"); s.Tag != "UPDATE 1" || s.Rows != 1 {
		t.Errorf("batched update: %+v", s)
	}
	if s := findStatement(t, all, "select 1 / $1::int"); s.Status != "error" || s.SQLState != "22012" {
		t.Errorf("batched error statement: %+v", s)
	}
	if s := findStatement(t, all, "select * from wicket_no_such_table"); s.Status != "error" || s.SQLState != "42P01" {
		t.Errorf("error statement: %+v", s)
	}
	if s := findStatement(t, all, "delete from "+table+" where id = $1"); s.Status != "skipped" {
		t.Errorf("statement pipelined after the error: %+v", s)
	}
	if s := findStatement(t, all, "select pg_sleep(60)"); s.SQLState != "57014" {
		t.Errorf("cancelled statement: %+v", s)
	}
	for _, s := range all {
		if strings.Contains(s.Text, `"z"`) || strings.Contains(fmt.Sprint(s), "{z}") {
			t.Errorf("a parameter value was recorded: %+v", s)
		}
	}

	// show prints a session's statements; verify checks the logs and finds an edit.
	first := endedSessions(gw, "pg")[0]["session_id"].(string)
	shown := gw.MustAdmin("audit", "show", first)
	if !strings.Contains(shown, "select 40 + 2") && !strings.Contains(shown, sha("select 40 + 2")[:16]) {
		t.Errorf("audit show %s does not show its statement:\n%s", first, shown)
	}
	auditLog := filepath.Join(gw.DataDir, "audit.log")
	if out, errOut, err := h.Run(nil, "audit", "verify", auditLog); err != nil || !strings.Contains(out, "statement") {
		t.Fatalf("verify of an intact log: %v\n%s%s", err, out, errOut)
	}
	logFile := filepath.Join(gw.DataDir, "statements", first+".log")
	data, err := os.ReadFile(logFile)
	if err != nil {
		t.Fatal(err)
	}
	edited := bytes.Replace(data, []byte(`"SELECT 1"`), []byte(`"SELECT 0"`), 1)
	if bytes.Equal(edited, data) {
		t.Fatalf("the statement log of %s has no SELECT 1 tag to edit:\n%s", first, data)
	}
	if err := os.WriteFile(logFile, edited, 0o600); err != nil {
		t.Fatal(err)
	}
	out, errOut, err := h.Run(nil, "audit", "verify", auditLog)
	if err == nil || !strings.Contains(errOut+out, first) {
		t.Fatalf("verify did not find the edited statement line: %v\n%s%s", err, out, errOut)
	}
}
