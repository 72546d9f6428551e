package gateway

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/wicketgw/wicket/gateway/audit"
	"github.com/wicketgw/wicket/tunnel"
)

// These tests need the PostgreSQL at 127.0.0.1:5432 (user postgres, trust auth) and fail
// when it is missing. The fake agent relays raw TCP to it, so the resource is pinned with
// PostgresResources: exactly the case of an agent that does not announce the protocol.

const localPG = "127.0.0.1:5432"

func needPG(t *testing.T) {
	t.Helper()
	c, err := net.DialTimeout("tcp", localPG, 5*time.Second)
	if err != nil {
		t.Fatalf("PostgreSQL must run at %s (user postgres, trust auth) for this test: %v", localPG, err)
	}
	c.Close()
}

// pgThrough connects pgx to the resource through user's session: every dial, the
// CancelRequest's included, is a new stream.
func pgThrough(t *testing.T, user *tunnel.Session, resource string) *pgx.Conn {
	t.Helper()
	cfg, err := pgx.ParseConfig("postgres://postgres@" + localPG + "/postgres?sslmode=disable")
	if err != nil {
		t.Fatal(err)
	}
	cfg.DialFunc = func(ctx context.Context, _, _ string) (net.Conn, error) { return openStream(user, resource) }
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		t.Fatalf("connect through the gateway: %v", err)
	}
	return c
}

func startPGGateway(t *testing.T) (*testGateway, *tunnel.Session) {
	t.Helper()
	needPG(t)
	tg := startGateway(t, func(c *Config) { c.PostgresResources = []string{"pg*"} })
	tg.mustAgent("db1", map[string]string{"pg": localPG})
	return tg, tg.dialUser("alice")
}

func TestPostgresSessionRecordsStatements(t *testing.T) {
	checkLeaks(t)
	tg, user := startPGGateway(t)
	conn := pgThrough(t, user, "pg")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var n int
	if err := conn.QueryRow(ctx, "select $1::int + 1", 41).Scan(&n); err != nil || n != 42 {
		t.Fatalf("select through the gateway: %d, %v", n, err)
	}
	if len(tg.Sessions()) != 1 {
		t.Fatalf("sessions list = %+v, want the open PostgreSQL session", tg.Sessions())
	}

	// Cancel: the client's key is the gateway's, not the server's.
	pid := conn.PgConn().PID()
	var serverPID uint32
	if err := conn.QueryRow(ctx, "select pg_backend_pid()").Scan(&serverPID); err != nil {
		t.Fatal(err)
	}
	if pid == serverPID {
		t.Errorf("the client was given the server's process id %d; the gateway must mint its own key", pid)
	}
	done := make(chan error, 1)
	go func() {
		_, err := conn.Exec(ctx, "select pg_sleep(30)")
		done <- err
	}()
	if !eventually(10*time.Second, func() bool { return sleeping(t, serverPID) }) {
		t.Fatal("the backend never started sleeping")
	}
	if err := conn.PgConn().CancelRequest(ctx); err != nil {
		t.Fatal(err)
	}
	var pgErr *pgconn.PgError
	if err := <-done; !errors.As(err, &pgErr) || pgErr.Code != "57014" {
		t.Fatalf("the cancelled statement ended with %v, want 57014", err)
	}
	conn.Close(ctx)

	ended := tg.waitAudit("the session's end", func(r audit.Record) bool {
		return r.Type == audit.TypeSessionEnded && r.Resource == "pg"
	})
	seal, ok := audit.SealOf(ended)
	if !ok || seal.Count != 3 || ended.Extra["protocol"] != "postgres" {
		t.Fatalf("session.ended = %+v, want a seal of 3 statements", ended)
	}
	begin, stmts, err := audit.ReadStatementLog(filepath.Join(tg.dir, filepath.FromSlash(audit.StatementLogName(ended.SessionID))))
	if err != nil {
		t.Fatal(err)
	}
	if begin.User != "alice" || begin.DBUser != "postgres" || begin.Database != "postgres" || begin.Agent != "db1" || begin.RecordsText {
		t.Errorf("begin line = %+v", begin)
	}
	want := []struct{ text, tag, state string }{
		{"select $1::int + 1", "SELECT 1", ""},
		{"select pg_backend_pid()", "SELECT 1", ""},
		{"select pg_sleep(30)", "", "57014"},
	}
	for i, w := range want {
		sum := sha256.Sum256([]byte(w.text))
		if i >= len(stmts) || stmts[i].SHA256 != hex.EncodeToString(sum[:]) || stmts[i].Tag != w.tag || stmts[i].SQLState != w.state || stmts[i].Text != "" {
			t.Errorf("statement %d = %+v, want the hash of %q, tag %q, sqlstate %q and no text", i+1, stmts, w.text, w.tag, w.state)
		}
	}
	if got := tg.Snapshot().Statements; got[[2]string{"pg", "ok"}] != 2 || got[[2]string{"pg", "error"}] != 1 {
		t.Errorf("statements counted = %v, want 2 ok and 1 error on pg", got)
	}
	tg.waitAudit("the forwarded cancel", func(r audit.Record) bool {
		return r.Type == audit.TypeStatementCancel && r.Outcome == audit.OutcomeOK && r.Extra["cancelled_session"] == ended.SessionID
	})
}

// sleeping reports whether the backend pid runs pg_sleep, asked directly.
func sleeping(t *testing.T, pid uint32) bool {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := pgx.Connect(ctx, "postgres://postgres@"+localPG+"/postgres?sslmode=disable")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close(ctx)
	var n int
	_ = c.QueryRow(ctx, "select count(*) from pg_stat_activity where pid = $1 and query like 'select pg_sleep%' and state = 'active'", int(pid)).Scan(&n)
	return n == 1
}

// TestPostgresCancelWrongKey: a cancel key that matches no live session is refused and
// audited.
func TestPostgresCancelWrongKey(t *testing.T) {
	checkLeaks(t)
	tg, alice := startPGGateway(t)
	conn := pgThrough(t, alice, "pg")
	defer conn.Close(context.Background())
	key := conn.PgConn().SecretKey()
	// A wrong key (a guess): refused, audited, the session untouched. The key would also be
	// refused for another user or resource (cancelStatement compares both).
	st, err := openStream(alice, "pg")
	if err != nil {
		t.Fatal(err)
	}
	msg, _ := (&pgproto3.CancelRequest{ProcessID: conn.PgConn().PID(), SecretKey: key ^ 1}).Encode(nil)
	st.Write(msg)
	st.CloseWrite()
	io.Copy(io.Discard, st)
	st.Close()
	tg.waitAudit("the refused cancel", func(r audit.Record) bool {
		return r.Type == audit.TypeStatementCancel && r.Outcome == audit.OutcomeDenied && r.User == "alice"
	})
	var one int
	if err := conn.QueryRow(context.Background(), "select 1").Scan(&one); err != nil || one != 1 {
		t.Fatalf("the session was disturbed by a wrong cancel key: %v", err)
	}
}

// TestPostgresStatementLogUnavailable: when the session's statement log cannot be
// created, the session is refused with a PostgreSQL error the client prints, and audited.
func TestPostgresStatementLogUnavailable(t *testing.T) {
	checkLeaks(t)
	tg, user := startPGGateway(t)
	// A file where the statements directory must go: the log cannot be created.
	if err := os.WriteFile(filepath.Join(tg.dir, audit.StatementsDir), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, _ := pgx.ParseConfig("postgres://postgres@" + localPG + "/postgres?sslmode=disable")
	cfg.DialFunc = func(ctx context.Context, _, _ string) (net.Conn, error) { return openStream(user, "pg") }
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := pgx.ConnectConfig(ctx, cfg)
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || pgErr.Code != "58030" || !strings.Contains(pgErr.Message, "statement log") {
		t.Fatalf("connect with no statement log possible: %v, want a 58030 error naming the statement log", err)
	}
	tg.waitAudit("the refusal", func(r audit.Record) bool {
		return r.Type == audit.TypeSessionDenied && r.Resource == "pg" && strings.Contains(r.Reason, "statement log")
	})
	for _, r := range tg.auditRecords() {
		if r.Type == audit.TypeSessionStarted {
			t.Fatalf("a session started without its statement log: %+v", r)
		}
	}
}

// TestPostgresProtocolViolationIsAudited: garbage after the startup ends the session with
// an ErrorResponse and an audited reason.
func TestPostgresProtocolViolationIsAudited(t *testing.T) {
	checkLeaks(t)
	tg, user := startPGGateway(t)
	st, err := openStream(user, "pg")
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	_ = st.SetDeadline(time.Now().Add(10 * time.Second))
	st.Write([]byte{0, 0, 0, 8, 0xde, 0xad, 0xbe, 0xef}) // not a protocol version or request code
	var got bytes.Buffer
	io.Copy(&got, st)
	if !bytes.HasPrefix(got.Bytes(), []byte{'E'}) || !bytes.Contains(got.Bytes(), []byte("08P01")) {
		t.Fatalf("answer %q, want an ErrorResponse 08P01", got.Bytes())
	}
	tg.waitAudit("the violation", func(r audit.Record) bool {
		return r.Type == audit.TypeSessionDenied && r.Outcome == audit.OutcomeDenied && strings.Contains(r.Reason, "PostgreSQL protocol")
	})
}

// TestPostgresHostileServerKeys: a server (a compromised agent plays it) that sends a
// thousand BackendKeyData messages leaves one cancel key in the gateway's table, not a
// thousand.
func TestPostgresHostileServerKeys(t *testing.T) {
	checkLeaks(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	served := make(chan struct{})
	go func() {
		defer close(served)
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		var n [4]byte
		if _, err := io.ReadFull(c, n[:]); err != nil {
			return
		}
		if _, err := io.CopyN(io.Discard, c, int64(n[0])<<24|int64(n[1])<<16|int64(n[2])<<8|int64(n[3])-4); err != nil {
			return
		}
		out := []byte{'R', 0, 0, 0, 8, 0, 0, 0, 0} // AuthenticationOk
		for i := 0; i < 1000; i++ {
			out = append(out, 'K', 0, 0, 0, 12, 0, 0, byte(i>>8), byte(i), 1, 2, 3, 4)
		}
		out = append(out, 'Z', 0, 0, 0, 5, 'I')
		c.Write(out)
		io.Copy(io.Discard, c) // until the client goes
	}()
	tg := startGateway(t, func(c *Config) { c.PostgresResources = []string{"pg"} })
	tg.mustAgent("db1", map[string]string{"pg": ln.Addr().String()})
	st, err := openStream(tg.dialUser("alice"), "pg")
	if err != nil {
		t.Fatal(err)
	}
	_ = st.SetDeadline(time.Now().Add(10 * time.Second))
	msg, _ := (&pgproto3.StartupMessage{ProtocolVersion: pgproto3.ProtocolVersionNumber,
		Parameters: map[string]string{"user": "postgres"}}).Encode(nil)
	st.Write(msg)
	var got bytes.Buffer
	buf := make([]byte, 4096)
	for !bytes.HasSuffix(got.Bytes(), []byte{'Z', 0, 0, 0, 5, 'I'}) {
		n, err := st.Read(buf)
		if err != nil {
			t.Fatalf("no ReadyForQuery: %v", err)
		}
		got.Write(buf[:n])
	}
	tg.pgCancels.mu.Lock()
	keys := len(tg.pgCancels.m)
	tg.pgCancels.mu.Unlock()
	if keys != 1 {
		t.Fatalf("%d cancel keys held for one session, want 1", keys)
	}
	st.Close()
	<-served
}
