package pgwire

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

func TestFollowSimpleQuery(t *testing.T) {
	leakCheck(t)
	ctx := testContext(t)
	p := startProxy(t, nil)
	// sslmode=prefer makes the client ask for TLS first: ReadStartup answers 'N'.
	c := p.connect(t, ctx, "&sslmode=prefer")
	p.reset()

	const multi = "select 1; select g from generate_series(1, 3) g"
	if _, err := c.Exec(ctx, multi).ReadAll(); err != nil {
		t.Fatal(err)
	}
	const create = "create temporary table t_simple (n int)"
	if _, err := c.Exec(ctx, create).ReadAll(); err != nil {
		t.Fatal(err)
	}
	const insert = "insert into t_simple select generate_series(1, 5)"
	if _, err := c.Exec(ctx, insert).ReadAll(); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Exec(ctx, "").ReadAll(); err != nil {
		t.Fatal(err)
	}
	const utf8 = "select 'Zürich ☃' as 名前"
	if _, err := c.Exec(ctx, utf8).ReadAll(); err != nil {
		t.Fatal(err)
	}
	got := p.statements()
	if len(got) != 5 {
		t.Fatalf("recorded %d statements, want 5: %+v", len(got), got)
	}
	checkStatement(t, got[4], KindSimple, utf8, "SELECT 1", 1, StatusOK, "")
	checkStatement(t, got[0], KindSimple, multi, "SELECT 1; SELECT 3", 4, StatusOK, "")
	checkStatement(t, got[1], KindSimple, create, "CREATE TABLE", 0, StatusOK, "")
	checkStatement(t, got[2], KindSimple, insert, "INSERT 0 5", 5, StatusOK, "")
	checkStatement(t, got[3], KindSimple, "", "", 0, StatusOK, "")

	c.Close(ctx)
	s := p.waitEnded(t)
	if s.err != nil {
		t.Fatalf("Follow returned %v after a clean end", s.err)
	}
	if s.startup.User != "postgres" || s.startup.Database != "postgres" {
		t.Errorf("startup user %q database %q", s.startup.User, s.startup.Database)
	}
	if s.up == 0 || s.down == 0 {
		t.Errorf("byte counts up %d down %d", s.up, s.down)
	}
}

func TestFollowErrorSQLState(t *testing.T) {
	leakCheck(t)
	ctx := testContext(t)
	p := startProxy(t, nil)
	c := p.connect(t, ctx, "")
	p.reset()

	const missing = "select 1; select * from wicket_missing_table; select 2"
	_, err := c.Exec(ctx, missing).ReadAll()
	if pgState(err) != "42P01" {
		t.Fatalf("error %v, want SQLSTATE 42P01", err)
	}
	const missingExt = "select * from wicket_missing_table where 1 = $1"
	if err := c.ExecParams(ctx, missingExt, [][]byte{[]byte("1")}, nil, nil, nil).Read().Err; pgState(err) != "42P01" {
		t.Fatalf("extended error %v, want SQLSTATE 42P01", err)
	}
	const divide = "select 1 / $1::int"
	if err := c.ExecParams(ctx, divide, [][]byte{[]byte("0")}, nil, nil, nil).Read().Err; pgState(err) != "22012" {
		t.Fatalf("extended error %v, want SQLSTATE 22012", err)
	}
	// A Prepare alone (Parse, Describe, Sync) that fails is its own record.
	const prepareOnly = "select nothing from wicket_missing_table"
	if _, err := c.Prepare(ctx, "bad", prepareOnly, nil); pgState(err) != "42P01" {
		t.Fatalf("prepare error %v, want SQLSTATE 42P01", err)
	}
	got := p.statements()
	if len(got) != 4 {
		t.Fatalf("recorded %d statements, want 4: %+v", len(got), got)
	}
	checkStatement(t, got[3], KindExtended, prepareOnly, "", 0, StatusError, "42P01")
	checkStatement(t, got[0], KindSimple, missing, "SELECT 1", 1, StatusError, "42P01")
	// The Parse failed: the Execute after it carries its error.
	checkStatement(t, got[1], KindExtended, missingExt, "", 0, StatusError, "42P01")
	checkStatement(t, got[2], KindExtended, divide, "", 0, StatusError, "22012")
}

func TestFollowPrepared(t *testing.T) {
	leakCheck(t)
	ctx := testContext(t)
	p := startProxy(t, nil)
	c := p.connectPgx(t, ctx)
	p.reset()

	// pgx prepares each statement once (named), then binds and executes it.
	const q = "select $1::int + 1"
	for i := range 3 {
		var n int
		if err := c.QueryRow(ctx, q, i).Scan(&n); err != nil {
			t.Fatal(err)
		}
		if n != i+1 {
			t.Fatalf("got %d, want %d", n, i+1)
		}
	}
	if _, err := c.Prepare(ctx, "named_one", "select generate_series(1, $1::int)"); err != nil {
		t.Fatal(err)
	}
	rows, err := c.Query(ctx, "named_one", 7)
	if err != nil {
		t.Fatal(err)
	}
	rows.Close()
	if rows.Err() != nil {
		t.Fatal(rows.Err())
	}
	// The unnamed statement, as QueryExecModeExec uses it.
	const unnamed = "select $1::text"
	var s string
	if err := c.QueryRow(ctx, unnamed, pgx.QueryExecModeExec, "secret-parameter").Scan(&s); err != nil {
		t.Fatal(err)
	}
	got := p.statements()
	if len(got) != 5 {
		t.Fatalf("recorded %d statements, want 5: %+v", len(got), got)
	}
	for i := range 3 {
		checkStatement(t, got[i], KindExtended, q, "SELECT 1", 1, StatusOK, "")
	}
	checkStatement(t, got[3], KindExtended, "select generate_series(1, $1::int)", "SELECT 7", 7, StatusOK, "")
	checkStatement(t, got[4], KindExtended, unnamed, "SELECT 1", 1, StatusOK, "")
	for _, st := range got {
		if strings.Contains(fmt.Sprintf("%+v", st), "secret-parameter") {
			t.Errorf("a statement record holds a parameter value: %+v", st)
		}
	}
}

func TestFollowBatch(t *testing.T) {
	leakCheck(t)
	ctx := testContext(t)
	p := startProxy(t, nil)
	c := p.connectPgx(t, ctx)
	p.reset()

	b := &pgx.Batch{}
	b.Queue("select $1::int", 1)
	b.Queue("select 10 / $1::int", 0)
	b.Queue("select $1::int * 3", 3)
	err := c.SendBatch(ctx, b).Close()
	if pgState(err) != "22012" {
		t.Fatalf("batch error %v, want SQLSTATE 22012", err)
	}
	b = &pgx.Batch{}
	for i := range 50 {
		b.Queue("select $1::int", i)
	}
	if err := c.SendBatch(ctx, b).Close(); err != nil {
		t.Fatal(err)
	}
	got := p.statements()
	if len(got) != 53 {
		t.Fatalf("recorded %d statements, want 53: %+v", len(got), got)
	}
	checkStatement(t, got[0], KindExtended, "select $1::int", "SELECT 1", 1, StatusOK, "")
	checkStatement(t, got[1], KindExtended, "select 10 / $1::int", "", 0, StatusError, "22012")
	checkStatement(t, got[2], KindExtended, "select $1::int * 3", "", 0, StatusSkipped, "")
	for _, st := range got[3:] {
		checkStatement(t, st, KindExtended, "select $1::int", "SELECT 1", 1, StatusOK, "")
	}
}

func TestFollowPipeline(t *testing.T) {
	leakCheck(t)
	ctx := testContext(t)
	p := startProxy(t, nil)
	c := p.connect(t, ctx, "")
	p.reset()

	pl := c.StartPipeline(ctx)
	pl.SendPrepare("ps", "select $1::int * 2", nil)
	pl.SendQueryPrepared("ps", [][]byte{[]byte("21")}, nil, nil)
	pl.SendQueryParams("select 'x'", nil, nil, nil, nil)
	pl.SendPipelineSync()
	pl.SendQueryParams("select 1/0", nil, nil, nil, nil)
	pl.SendQueryParams("select 'never'", nil, nil, nil, nil)
	pl.SendPipelineSync()
	pl.SendQueryPrepared("ps", [][]byte{[]byte("5")}, nil, nil)
	pl.SendPipelineSync()
	if err := pl.Flush(); err != nil {
		t.Fatal(err)
	}
	var errs []string
	for {
		res, err := pl.GetResults()
		if err != nil {
			errs = append(errs, pgState(err))
			continue
		}
		if res == nil {
			break
		}
		if rr, ok := res.(*pgconn.ResultReader); ok {
			rr.Close()
		}
	}
	if err := pl.Close(); err != nil && pgState(err) == "" {
		t.Fatal(err)
	}
	got := p.statements()
	if len(got) != 5 {
		t.Fatalf("recorded %d statements, want 5 (errors seen %v): %+v", len(got), errs, got)
	}
	checkStatement(t, got[0], KindExtended, "select $1::int * 2", "SELECT 1", 1, StatusOK, "")
	checkStatement(t, got[1], KindExtended, "select 'x'", "SELECT 1", 1, StatusOK, "")
	checkStatement(t, got[2], KindExtended, "select 1/0", "", 0, StatusError, "22012")
	checkStatement(t, got[3], KindExtended, "select 'never'", "", 0, StatusSkipped, "")
	checkStatement(t, got[4], KindExtended, "select $1::int * 2", "SELECT 1", 1, StatusOK, "")
}

func TestFollowCopy(t *testing.T) {
	leakCheck(t)
	ctx := testContext(t)
	p := startProxy(t, nil)
	c := p.connect(t, ctx, "")
	if _, err := c.Exec(ctx, "create temporary table t_copy (n int, s text)").ReadAll(); err != nil {
		t.Fatal(err)
	}
	p.reset()

	var in bytes.Buffer
	for i := range 1000 {
		fmt.Fprintf(&in, "%d\trow %d\n", i, i)
	}
	const from = "copy t_copy from stdin"
	tag, err := c.CopyFrom(ctx, bytes.NewReader(in.Bytes()), from)
	if err != nil || tag.RowsAffected() != 1000 {
		t.Fatalf("copy from: %v, %v", tag, err)
	}
	const to = "copy (select * from t_copy order by n) to stdout"
	var out bytes.Buffer
	if _, err := c.CopyTo(ctx, &out, to); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(out.Bytes(), in.Bytes()) {
		t.Fatalf("copy to returned %d bytes, not the %d copied in", out.Len(), in.Len())
	}
	// A client that gives up mid-copy: CopyFail ends it with 57014.
	const failed = "copy t_copy from stdin"
	if _, err := c.CopyFrom(ctx, io.MultiReader(strings.NewReader("1\ta\n"), errReader{}), failed); err == nil {
		t.Fatal("copy from a failing reader succeeded")
	}
	got := p.statements()
	if len(got) != 3 {
		t.Fatalf("recorded %d statements, want 3: %+v", len(got), got)
	}
	checkStatement(t, got[0], KindCopy, from, "COPY 1000", 1000, StatusOK, "")
	checkStatement(t, got[1], KindCopy, to, "COPY 1000", 1000, StatusOK, "")
	checkStatement(t, got[2], KindCopy, failed, "", 0, StatusError, "57014")
}

type errReader struct{}

func (errReader) Read([]byte) (int, error) { return 0, errors.New("the test's reader fails") }

func TestFollowNoticeAndNotify(t *testing.T) {
	leakCheck(t)
	ctx := testContext(t)
	var mu sync.Mutex
	var notices []string
	var notes []string
	p := startProxy(t, nil)
	cfg, err := pgconn.ParseConfig(p.url(""))
	if err != nil {
		t.Fatal(err)
	}
	cfg.OnNotice = func(_ *pgconn.PgConn, n *pgconn.Notice) {
		mu.Lock()
		notices = append(notices, n.Message)
		mu.Unlock()
	}
	cfg.OnNotification = func(_ *pgconn.PgConn, n *pgconn.Notification) {
		mu.Lock()
		notes = append(notes, n.Channel+":"+n.Payload)
		mu.Unlock()
	}
	listener, err := pgconn.ConnectConfig(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer listener.Close(context.Background())
	if _, err := listener.Exec(ctx, "listen wicket_chan; do $$ begin raise notice 'hello from plpgsql'; end $$").ReadAll(); err != nil {
		t.Fatal(err)
	}
	notifier := p.connect(t, ctx, "")
	if _, err := notifier.Exec(ctx, "notify wicket_chan, 'payload 1'").ReadAll(); err != nil {
		t.Fatal(err)
	}
	if err := listener.WaitForNotification(ctx); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(notices) != 1 || notices[0] != "hello from plpgsql" {
		t.Errorf("notices %q", notices)
	}
	if len(notes) != 1 || notes[0] != "wicket_chan:payload 1" {
		t.Errorf("notifications %q", notes)
	}
}

func TestFollowBackendKeyRewrite(t *testing.T) {
	leakCheck(t)
	ctx := testContext(t)
	var mu sync.Mutex
	var realPID uint32
	p := startProxy(t, func(p *followProxy) {
		p.opts.OnBackendKey = func(pid, secret uint32) (uint32, uint32) {
			mu.Lock()
			realPID = pid
			mu.Unlock()
			return pid ^ 0x5a5a, 0x12345678
		}
	})
	c := p.connect(t, ctx, "")
	res, err := c.Exec(ctx, "select pg_backend_pid()").ReadAll()
	if err != nil {
		t.Fatal(err)
	}
	backend := string(res[0].Rows[0][0])
	mu.Lock()
	defer mu.Unlock()
	if fmt.Sprint(realPID) != backend {
		t.Fatalf("OnBackendKey saw pid %d, the backend is %s", realPID, backend)
	}
	if c.PID() != realPID^0x5a5a || c.SecretKey() != 0x12345678 {
		t.Fatalf("client sees key (%d, %#x), want (%d, 0x12345678)", c.PID(), c.SecretKey(), realPID^0x5a5a)
	}
}

func TestFollowFailClosed(t *testing.T) {
	leakCheck(t)
	ctx := testContext(t)
	p := startProxy(t, func(p *followProxy) {
		record := p.opts.OnStatement
		p.opts.OnStatement = func(s Statement) error {
			if strings.Contains(s.Text, "refused") {
				return errors.New("disk full")
			}
			return record(s)
		}
	})
	c := p.connect(t, ctx, "")
	_, err := c.Exec(ctx, "select 'refused'").ReadAll()
	if pgState(err) != codeNotRecorded {
		t.Fatalf("client got %v, want the ErrorResponse %s", err, codeNotRecorded)
	}
	s := p.waitEnded(t)
	if !errors.Is(s.err, ErrStatementNotRecorded) {
		t.Fatalf("Follow returned %v, want ErrStatementNotRecorded", s.err)
	}
}

// TestFollowBigResult streams a 1,000,000-row result through Follow and
// compares it with the same result read directly.
func TestFollowBigResult(t *testing.T) {
	leakCheck(t)
	ctx := testContext(t)
	p := startProxy(t, nil)
	const q = "select g, md5(g::text) from generate_series(1, 1000000) g"
	sum := func(url string) ([32]byte, int) {
		c, err := pgconn.Connect(ctx, url)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close(context.Background())
		h := sha256.New()
		rr := c.ExecParams(ctx, q, nil, nil, nil, nil)
		n := 0
		for rr.NextRow() {
			for _, v := range rr.Values() {
				h.Write(v)
				h.Write([]byte{0})
			}
			n++
		}
		if _, err := rr.Close(); err != nil {
			t.Fatal(err)
		}
		var out [32]byte
		h.Sum(out[:0])
		return out, n
	}
	viaFollow, n := sum(p.url(""))
	direct, _ := sum("postgres://postgres@" + pgAddr + "/postgres?sslmode=disable")
	if n != 1000000 {
		t.Fatalf("got %d rows through Follow", n)
	}
	if viaFollow != direct {
		t.Fatal("the result through Follow differs from the result read directly")
	}
	got := p.statements()
	if len(got) != 1 {
		t.Fatalf("recorded %d statements: %+v", len(got), got)
	}
	checkStatement(t, got[0], KindExtended, q, "SELECT 1000000", 1000000, StatusOK, "")
}
