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

// pgStatement is one line of a statement log, the fields the tests read.
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

// paramValue is a Bind parameter the statement audit must never record.
const paramValue = "wicket-param-value-7f3a9c"

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
	b.Queue("update "+table+" set name = $1 where id = $2", paramValue, 1)
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
	// Nothing the gateway wrote holds a parameter value, though this resource records texts.
	err = filepath.WalkDir(gw.DataDir, func(path string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() || (filepath.Ext(path) != ".log" && filepath.Base(path) != "audit.log") {
			return err
		}
		data, err := os.ReadFile(path)
		if err == nil && bytes.Contains(data, []byte(paramValue)) {
			t.Errorf("%s holds the parameter value of the batched update", path)
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
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

// rssKiB reads a process's resident set (VmRSS) and its peak (VmHWM) in KiB.
func rssKiB(t *testing.T, p *Process) (rss, peak int64) {
	t.Helper()
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", p.cmd.Process.Pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		v, _ := strconv.ParseInt(f[1], 10, 64)
		switch f[0] {
		case "VmRSS:":
			rss = v
		case "VmHWM:":
			peak = v
		}
	}
	return rss, peak
}

// TestPostgresLargeResultBoundedMemory streams a 1,000,000-row result through a raw TCP
// resource and through a postgres:// one: the bytes are those of the direct query, and the
// gateway's and the agent's memory grow by a bounded amount, as much with the protocol
// followed as without.
func TestPostgresLargeResultBoundedMemory(t *testing.T) {
	needPostgres(t)
	h := NewHarness(t)
	gw := h.StartGateway(GatewayOptions{Policy: allowAlice})
	agent, _ := h.StartAgent(gw, "db-agent", "raw=127.0.0.1:5432", "pg=postgres://127.0.0.1:5432?sslmode=require")
	user := h.Login(gw, "alice")
	_, rawAddr := h.Connect(user, "raw")
	_, pgAddr := h.Connect(user, "pg")

	const query = "select g, md5(g::text) from generate_series(1, 1000000) g"
	want := sha(psql(t, "127.0.0.1:5432", "-c", query))
	const boundKiB = 48 << 10 // far under the ~40 MiB result, so buffering it would fail
	for _, c := range []struct{ name, addr string }{{"raw", rawAddr}, {"pg", pgAddr}} {
		gwBefore, _ := rssKiB(t, gw.Process)
		agBefore, _ := rssKiB(t, agent)
		out := psql(t, c.addr, "-c", query)
		if got := sha(out); got != want || strings.Count(out, "\n") != 1000000 {
			t.Fatalf("%s: the 1,000,000 rows differ from the direct query's (%d lines)", c.name, strings.Count(out, "\n"))
		}
		_, gwPeak := rssKiB(t, gw.Process)
		_, agPeak := rssKiB(t, agent)
		t.Logf("%s: peak RSS growth: gateway %d KiB, agent %d KiB", c.name, gwPeak-gwBefore, agPeak-agBefore)
		if gwPeak-gwBefore > boundKiB || agPeak-agBefore > boundKiB {
			t.Errorf("%s: memory grew by more than %d KiB: gateway %d KiB, agent %d KiB", c.name, boundKiB, gwPeak-gwBefore, agPeak-agBefore)
		}
	}
	eventually(t, "the pg session's end", func() bool { return len(endedSessions(gw, "pg")) == 1 })
	stmts := statementsOf(t, gw, endedSessions(gw, "pg")[0]["session_id"].(string))
	if len(stmts) != 1 || stmts[0].Tag != "SELECT 1000000" || stmts[0].Rows != 1000000 {
		t.Fatalf("the big select's record: %+v", stmts)
	}
}

// rawPG dials addr (a `wicket connect` port) and returns the connection.
func rawPG(t *testing.T, addr string) net.Conn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	_ = c.SetDeadline(time.Now().Add(waitTimeout))
	return c
}

// readAll reads what the gateway answers until it closes the connection.
func readAll(c net.Conn) []byte {
	var buf bytes.Buffer
	_, _ = buf.ReadFrom(c)
	return buf.Bytes()
}

// TestPostgresHostileClient sends what a broken or hostile client might: each session ends
// with one clear error and an audit record, and a session open meanwhile is not disturbed.
func TestPostgresHostileClient(t *testing.T) {
	needPostgres(t)
	h := NewHarness(t)
	gw := h.StartGateway(GatewayOptions{Policy: allowAlice})
	h.StartAgent(gw, "db-agent", "pg=postgres://127.0.0.1:5432?sslmode=disable")
	user := h.Login(gw, "alice")
	_, addr := h.Connect(user, "pg")
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	bystander, err := pgx.Connect(ctx, pgURL(addr))
	if err != nil {
		t.Fatal(err)
	}
	defer bystander.Close(ctx)

	startup := func(params ...string) []byte {
		body := []byte{0, 3, 0, 0}
		for _, p := range params {
			body = append(append(body, p...), 0)
		}
		body = append(body, 0)
		return append([]byte{byte((len(body) + 4) >> 24), byte((len(body) + 4) >> 16), byte((len(body) + 4) >> 8), byte(len(body) + 4)}, body...)
	}

	t.Run("startup packet too large", func(t *testing.T) {
		c := rawPG(t, addr)
		c.Write([]byte{0, 1, 0, 0, 0, 3, 0, 0}) // 65536 bytes announced, over 10000
		if got := readAll(c); len(got) == 0 || got[0] != 'E' || !bytes.Contains(got, []byte("wicket: ")) || !bytes.Contains(got, []byte("08P01")) {
			t.Fatalf("answer %q, want an ErrorResponse 08P01 from wicket", got)
		}
		gw.WaitAudit(map[string]string{"type": "session.denied", "resource": "pg", "reason": "the client broke the PostgreSQL protocol in its startup: " + firstReason(t, gw, "too large")})
	})
	t.Run("garbage instead of a startup", func(t *testing.T) {
		c := rawPG(t, addr)
		c.Write([]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
		if got := readAll(c); len(got) == 0 || got[0] != 'E' || !bytes.Contains(got, []byte("08P01")) {
			t.Fatalf("answer %q, want an ErrorResponse 08P01", got)
		}
	})
	t.Run("direct TLS", func(t *testing.T) {
		c := rawPG(t, addr)
		c.Write([]byte{0x16, 3, 1, 0, 0x30}) // a TLS record header: PostgreSQL 17 sslnegotiation=direct
		if got := readAll(c); len(got) == 0 || got[0] != 0x15 {
			t.Fatalf("answer %q, want a TLS alert record", got)
		}
		firstReason(t, gw, "direct TLS")
	})
	t.Run("protocol 3.2", func(t *testing.T) {
		c := rawPG(t, addr)
		s := startup("user", "postgres")
		s[7] = 2
		c.Write(s)
		if got := readAll(c); len(got) == 0 || got[0] != 'E' {
			t.Fatalf("answer %q, want an ErrorResponse", got)
		}
	})
	t.Run("message over the cap after the startup", func(t *testing.T) {
		c := rawPG(t, addr)
		c.Write(startup("user", "postgres", "database", "postgres"))
		// Trust authentication: read up to ReadyForQuery ('Z', length 5, status).
		var seen bytes.Buffer
		buf := make([]byte, 4096)
		for !bytes.Contains(seen.Bytes(), []byte{'Z', 0, 0, 0, 5}) {
			n, err := c.Read(buf)
			if err != nil {
				t.Fatalf("no ReadyForQuery after the startup: %v (%q)", err, seen.Bytes())
			}
			seen.Write(buf[:n])
		}
		c.Write([]byte{'Q', 0x40, 0, 0, 0}) // a 1 GiB query announced
		got := readAll(c)
		if len(got) == 0 || got[0] != 'E' || !bytes.Contains(got, []byte("08P01")) {
			t.Fatalf("answer %q, want an ErrorResponse 08P01", got)
		}
		eventually(t, "the violation's session.ended", func() bool {
			for _, r := range gw.AuditRecords() {
				if r["type"] == "session.ended" && r["outcome"] == "error" && strings.Contains(fmt.Sprint(r["reason"]), "protocol violation") {
					return true
				}
			}
			return false
		})
	})
	var one int
	ctx, cancel = context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	if err := bystander.QueryRow(ctx, "select 1").Scan(&one); err != nil || one != 1 {
		t.Fatalf("the session open meanwhile was disturbed: %v", err)
	}
}

// firstReason waits for a session.denied of resource pg whose reason contains what, and
// returns the part of the reason after the startup prefix.
func firstReason(t *testing.T, gw *Gateway, what string) string {
	t.Helper()
	var reason string
	eventually(t, "a session.denied saying "+what, func() bool {
		for _, r := range gw.AuditRecords() {
			if s := fmt.Sprint(r["reason"]); r["type"] == "session.denied" && strings.Contains(s, what) {
				reason = strings.TrimPrefix(s, "the client broke the PostgreSQL protocol in its startup: ")
				return true
			}
		}
		return false
	})
	return reason
}

// TestPostgresSessionSealedAfterCrash kills the gateway with SIGKILL in the middle of a
// PostgreSQL session: the next start ends the session with outcome gateway_crashed, closes
// its statement log with a recovery line and seals it into that session.ended, and the
// whole audit verifies.
func TestPostgresSessionSealedAfterCrash(t *testing.T) {
	needPostgres(t)
	h := NewHarness(t)
	gw := h.StartGateway(GatewayOptions{Policy: allowAlice})
	h.StartAgent(gw, "db-agent", "pg=postgres://127.0.0.1:5432")
	_, addr := h.Connect(h.Login(gw, "alice"), "pg")
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	conn, err := pgx.Connect(ctx, pgURL(addr))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	for i := 0; i < 5; i++ {
		if _, err := conn.Exec(ctx, fmt.Sprintf("select %d", i)); err != nil {
			t.Fatal(err)
		}
	}
	sid := auditValue(gw.WaitAudit(map[string]string{"type": "session.started", "resource": "pg"})["session_id"])
	eventually(t, "the five statements in the log", func() bool {
		data, _ := os.ReadFile(filepath.Join(gw.DataDir, "statements", sid+".log"))
		return bytes.Count(data, []byte(`"type":"statement"`)) == 5
	})

	gw.kill9()
	gw2 := h.StartGateway(GatewayOptions{DataDir: gw.DataDir, Policy: allowAlice})
	ended := gw2.WaitAudit(map[string]string{"type": "session.ended", "session_id": sid})
	extra, _ := ended["extra"].(map[string]any)
	if ended["outcome"] != "gateway_crashed" || auditValue(extra["statements"]) != "5" || extra["statements_head"] == nil {
		t.Fatalf("the open PostgreSQL session was ended as %v, want gateway_crashed sealing 5 statements", ended)
	}
	if out, errOut, err := h.Run(nil, "audit", "verify", filepath.Join(gw.DataDir, "audit.log")); err != nil {
		t.Fatalf("verify after the crash: %v\n%s%s", err, out, errOut)
	}
}

// TestPostgresPinnedByTheGateway is an agent that announces its PostgreSQL resource as raw
// TCP (an old agent, or a compromised one hiding statements): the gateway's
// --postgres-resources pins it, so every statement is audited anyway.
func TestPostgresPinnedByTheGateway(t *testing.T) {
	needPostgres(t)
	h := NewHarness(t)
	gw := h.StartGateway(GatewayOptions{Policy: allowAlice, Args: []string{"--postgres-resources", "db-*"}})
	h.StartAgent(gw, "db-agent", "db-main=127.0.0.1:5432")
	_, addr := h.Connect(h.Login(gw, "alice"), "db-main")
	if got := psql(t, addr, "-c", "select 'pinned'"); strings.TrimSpace(got) != "pinned" {
		t.Fatalf("psql printed %q", got)
	}
	eventually(t, "the session's end", func() bool { return len(endedSessions(gw, "db-main")) == 1 })
	stmts := statementsOf(t, gw, endedSessions(gw, "db-main")[0]["session_id"].(string))
	if len(stmts) != 1 || stmts[0].SHA256 != sha("select 'pinned'") || stmts[0].Text != "" {
		t.Fatalf("statements of the pinned resource: %+v (want one, hashed, without text: the agent did not opt in)", stmts)
	}
}

// TestPostgresDatabaseTLSVerified exposes the database with sslmode=verify-full: the
// agent's backend is encrypted (pg_stat_ssl), and a URL whose host the server's certificate
// does not name is refused with a reason the client prints, naming no address.
func TestPostgresDatabaseTLSVerified(t *testing.T) {
	needPostgres(t)
	// The local server's certificate: Debian's snakeoil, self-signed for DNS name localhost.
	const root = "/etc/ssl/certs/ssl-cert-snakeoil.pem"
	h := NewHarness(t)
	gw := h.StartGateway(GatewayOptions{Policy: allowAlice})
	h.StartAgent(gw, "db-agent", "pg="+"postgres://localhost:5432?sslmode=verify-full&sslrootcert="+root,
		"wrongname=postgres://127.0.0.1:5432?sslmode=verify-full&sslrootcert="+root)
	user := h.Login(gw, "alice")
	_, addr := h.Connect(user, "pg")
	if got := psql(t, addr, "-c", "select ssl from pg_stat_ssl where pid = pg_backend_pid()"); strings.TrimSpace(got) != "t" {
		t.Fatalf("pg_stat_ssl of the agent's backend says ssl = %q, want t (sslmode=verify-full)", got)
	}
	_, wrong := h.Connect(user, "wrongname")
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, "psql", pgURL(wrong), "-X", "-c", "select 1").CombinedOutput()
	if err == nil || !strings.Contains(string(out), "does not name the resource's host") {
		t.Fatalf("psql through a verify-full resource whose certificate does not match: %v\n%s", err, out)
	}
	gw.WaitAudit(map[string]string{"type": "session.denied", "resource": "wrongname"})
}
