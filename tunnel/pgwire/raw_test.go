package pgwire

import (
	"errors"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"
)

// rawClient speaks the protocol message by message, for what pgx does not
// send (FunctionCall, row limits, duplicate names) and for hostile input.
type rawClient struct {
	t    *testing.T
	conn net.Conn
	fe   *pgproto3.Frontend
}

func dialRaw(t *testing.T, p *followProxy) *rawClient {
	t.Helper()
	c, err := net.DialTimeout("tcp", p.ln.Addr().String(), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(testTimeout))
	t.Cleanup(func() { c.Close() })
	return &rawClient{t: t, conn: c, fe: pgproto3.NewFrontend(c, c)}
}

func (r *rawClient) send(msgs ...pgproto3.FrontendMessage) {
	r.t.Helper()
	for _, m := range msgs {
		r.fe.Send(m)
	}
	if err := r.fe.Flush(); err != nil {
		r.t.Fatal(err)
	}
}

// untilReady reads messages up to ReadyForQuery and returns them.
func (r *rawClient) untilReady() []pgproto3.BackendMessage {
	r.t.Helper()
	var got []pgproto3.BackendMessage
	for {
		m, err := r.fe.Receive()
		if err != nil {
			r.t.Fatalf("receive after %d messages: %v", len(got), err)
		}
		switch m := m.(type) {
		case *pgproto3.ReadyForQuery:
			return got
		case *pgproto3.ErrorResponse:
			e := *m
			got = append(got, &e)
		default:
			got = append(got, m)
		}
	}
}

// login sends the StartupMessage and reads up to the first ReadyForQuery.
func (r *rawClient) login() {
	r.t.Helper()
	r.send(&pgproto3.StartupMessage{ProtocolVersion: pgproto3.ProtocolVersionNumber,
		Parameters: map[string]string{"user": "postgres", "database": "postgres"}})
	r.untilReady()
}

// closingError reads until the connection ends and returns the last
// ErrorResponse received.
func (r *rawClient) closingError() *pgproto3.ErrorResponse {
	r.t.Helper()
	var last *pgproto3.ErrorResponse
	for {
		m, err := r.fe.Receive()
		if err != nil {
			return last
		}
		if e, ok := m.(*pgproto3.ErrorResponse); ok {
			c := *e
			last = &c
		}
	}
}

func TestFollowFunctionCall(t *testing.T) {
	leakCheck(t)
	p := startProxy(t, nil)
	r := dialRaw(t, p)
	r.login()
	p.reset()
	const int4abs = 1397 // abs(int4)
	r.send(&pgproto3.FunctionCall{Function: int4abs, ArgFormatCodes: []uint16{0}, Arguments: [][]byte{[]byte("-42")}, ResultFormatCode: 0})
	got := r.untilReady()
	if len(got) != 1 || string(got[0].(*pgproto3.FunctionCallResponse).Result) != "42" {
		t.Fatalf("function call answered %+v", got)
	}
	stmts := p.statements()
	if len(stmts) != 1 {
		t.Fatalf("recorded %+v", stmts)
	}
	checkStatement(t, stmts[0], KindFunction, "", "", 0, StatusOK, "")
	if stmts[0].FunctionOID != int4abs {
		t.Errorf("FunctionOID %d, want %d", stmts[0].FunctionOID, int4abs)
	}
}

// TestFollowPortalSuspended: an Execute with a row limit is its own record,
// with the rows it returned; the Execute that finishes the portal has the tag.
func TestFollowPortalSuspended(t *testing.T) {
	leakCheck(t)
	p := startProxy(t, nil)
	r := dialRaw(t, p)
	r.login()
	p.reset()
	const q = "select generate_series(1, 5)"
	r.send(&pgproto3.Query{String: "begin"})
	r.untilReady()
	r.send(&pgproto3.Parse{Name: "s", Query: q}, &pgproto3.Bind{DestinationPortal: "cur", PreparedStatement: "s"},
		&pgproto3.Execute{Portal: "cur", MaxRows: 2}, &pgproto3.Execute{Portal: "cur", MaxRows: 0},
		&pgproto3.Close{ObjectType: 'P', Name: "cur"}, &pgproto3.Sync{})
	r.untilReady()
	stmts := p.statements()
	if len(stmts) != 3 {
		t.Fatalf("recorded %+v", stmts)
	}
	checkStatement(t, stmts[1], KindExtended, q, "", 2, StatusOK, "")
	checkStatement(t, stmts[2], KindExtended, q, "SELECT 3", 3, StatusOK, "")
}

// TestFollowDuplicateName: a Parse the server refuses (the name exists) must
// not change which text an Execute of that name is recorded with.
func TestFollowDuplicateName(t *testing.T) {
	leakCheck(t)
	p := startProxy(t, nil)
	r := dialRaw(t, p)
	r.login()
	p.reset()
	const ran = "select 'the statement that runs'"
	r.send(&pgproto3.Parse{Name: "dup", Query: ran}, &pgproto3.Sync{})
	r.untilReady()
	r.send(&pgproto3.Parse{Name: "dup", Query: "select 'a decoy'"}, &pgproto3.Sync{})
	if got := r.untilReady(); len(got) != 1 || got[0].(*pgproto3.ErrorResponse).Code != "42P05" {
		t.Fatalf("second Parse answered %+v", got)
	}
	r.send(&pgproto3.Bind{PreparedStatement: "dup"}, &pgproto3.Execute{}, &pgproto3.Sync{})
	r.untilReady()
	stmts := p.statements()
	if len(stmts) != 2 {
		t.Fatalf("recorded %+v", stmts)
	}
	checkStatement(t, stmts[0], KindExtended, "select 'a decoy'", "", 0, StatusError, "42P05")
	checkStatement(t, stmts[1], KindExtended, ran, "SELECT 1", 1, StatusOK, "")
}

// TestFollowIncomplete: a statement the session ends under is recorded as such.
func TestFollowIncomplete(t *testing.T) {
	leakCheck(t)
	// Follow reads the clock when it sees a request: that is the signal to cut.
	seen := make(chan struct{}, 1)
	p := startProxy(t, func(p *followProxy) {
		p.opts.Now = func() time.Time {
			select {
			case seen <- struct{}{}:
			default:
			}
			return time.Now()
		}
	})
	r := dialRaw(t, p)
	r.login()
	p.reset()
	for len(seen) > 0 {
		<-seen
	}
	const q = "select pg_sleep(5)"
	r.send(&pgproto3.Query{String: q})
	select {
	case <-seen:
	case <-time.After(5 * time.Second):
		t.Fatal("Follow never saw the Query")
	}
	r.conn.(*net.TCPConn).SetLinger(0)
	r.conn.Close()
	p.waitEnded(t)
	stmts := p.statements()
	if len(stmts) != 1 {
		t.Fatalf("recorded %+v", stmts)
	}
	checkStatement(t, stmts[0], KindSimple, q, "", 0, StatusIncomplete, "")
}

func TestFollowHostileClient(t *testing.T) {
	leakCheck(t)
	for _, tc := range []struct {
		name    string
		garbage []byte
		want    string
	}{
		{"huge length", []byte{'Q', 0x7f, 0xff, 0xff, 0x00}, "over the limit"},
		{"length under 4", []byte{'Q', 0, 0, 0, 2}, "impossible length"},
		{"unknown type", []byte("GET / HTTP/1.1\r\n\r\n"), "unknown type"},
		{"undecodable body", []byte{'E', 0, 0, 0, 6, 'x', 'y'}, "does not decode"},
		{"bind without names", append([]byte{'B', 0, 0, 0x20, 4}, make([]byte, 8192)...), "Bind"},
		{"empty bind", []byte{'B', 0, 0, 0, 4}, "Bind"},
		{"empty function call", []byte{'F', 0, 0, 0, 4}, "FunctionCall"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			leakCheck(t)
			p := startProxy(t, func(p *followProxy) { p.opts.MaxMessage = 1 << 20 })
			r := dialRaw(t, p)
			r.login()
			garbage := tc.garbage
			if tc.name == "bind without names" {
				for i := 5; i < len(garbage); i++ {
					garbage[i] = 'n'
				}
			}
			r.conn.Write(garbage)
			e := r.closingError()
			if e == nil || e.Code != codeProtocolViolation || !strings.HasPrefix(e.Message, "wicket: protocol violation: the client") {
				t.Errorf("client got %+v, want an ErrorResponse 08P01 from wicket", e)
			}
			s := p.waitEnded(t)
			if !errors.Is(s.err, ErrProtocolViolation) || !strings.Contains(s.err.Error(), tc.want) {
				t.Fatalf("Follow returned %v, want a protocol violation saying %q", s.err, tc.want)
			}
		})
	}
	// Garbage right behind the StartupMessage, before authentication.
	t.Run("garbage after startup", func(t *testing.T) {
		leakCheck(t)
		p := startProxy(t, nil)
		r := dialRaw(t, p)
		r.fe.Send(&pgproto3.StartupMessage{ProtocolVersion: pgproto3.ProtocolVersionNumber,
			Parameters: map[string]string{"user": "postgres"}})
		r.fe.Flush()
		r.conn.Write([]byte{0xff, 0xfe, 0xfd, 0xfc, 0xfb, 0xfa})
		e := r.closingError()
		if e == nil || e.Code != codeProtocolViolation {
			t.Errorf("client got %+v, want an ErrorResponse 08P01", e)
		}
		if s := p.waitEnded(t); !errors.Is(s.err, ErrProtocolViolation) {
			t.Fatalf("Follow returned %v", s.err)
		}
	})
}

// fakeServer is a loopback "database" that reads the StartupMessage and
// answers with script, then reads until the connection ends.
func fakeServer(t *testing.T, script []byte) func() (net.Conn, error) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.SetDeadline(time.Now().Add(testTimeout))
			if _, err := ReadStartup(c); err == nil {
				c.Write(script)
				buf := make([]byte, 4096)
				for {
					if _, err := c.Read(buf); err != nil {
						break
					}
				}
			}
			c.Close()
		}
	}()
	t.Cleanup(func() { ln.Close(); <-done })
	return func() (net.Conn, error) { return net.Dial("tcp", ln.Addr().String()) }
}

func backendBytes(t *testing.T, msgs ...pgproto3.BackendMessage) []byte {
	t.Helper()
	var b []byte
	for _, m := range msgs {
		var err error
		if b, err = m.Encode(b); err != nil {
			t.Fatal(err)
		}
	}
	return b
}

func TestFollowHostileServer(t *testing.T) {
	leakCheck(t)
	ready := backendBytes(t, &pgproto3.AuthenticationOk{}, &pgproto3.ReadyForQuery{TxStatus: 'I'})
	for _, tc := range []struct {
		name   string
		script []byte
		want   string
		max    int // Options.MaxMessage; 0: 1 MiB
	}{
		// With the default MaxMessage of 64 MiB, the server's decoded messages stay capped
		// at 1 MiB: a compromised agent cannot make the gateway hold 64 MiB per session.
		{"error response over 1 MiB", append(append([]byte{}, ready...), 'E', 0, 0x20, 0, 5), "over the limit of 1048576", DefaultMaxMessage},
		{"unknown type", append(append([]byte{}, ready...), 'q', 0, 0, 0, 4), "unknown type", 0},
		{"decoded message over the cap", append(append([]byte{}, ready...), 'C', 0x40, 0, 0, 0), "over the limit", 0},
		{"impossible length", append(append([]byte{}, ready...), 'D', 0xff, 0xff, 0xff, 0xff), "impossible length", 0},
		{"undecodable key", append(append([]byte{}, ready...), 'K', 0, 0, 0, 8, 1, 2, 3, 4), "does not decode", 0},
		{"undecodable ready", append(append([]byte{}, ready...), 'Z', 0, 0, 0, 7, 'I', 'I', 'I'), "does not decode", 0},
		{"garbage", append(append([]byte{}, ready...), []byte("\x00\x01garbage from a compromised agent")...), "database server", 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			leakCheck(t)
			dial := fakeServer(t, tc.script)
			p := startProxy(t, func(p *followProxy) {
				p.dial = dial
				p.opts.MaxMessage = 1 << 20
				if tc.max != 0 {
					p.opts.MaxMessage = tc.max
				}
			})
			r := dialRaw(t, p)
			r.login()
			e := r.closingError()
			if e == nil || e.Code != codeProtocolViolation || !strings.Contains(e.Message, "the database server") {
				t.Errorf("client got %+v, want an ErrorResponse 08P01 about the server", e)
			}
			s := p.waitEnded(t)
			if !errors.Is(s.err, ErrProtocolViolation) || !strings.Contains(s.err.Error(), tc.want) {
				t.Fatalf("Follow returned %v, want a protocol violation saying %q", s.err, tc.want)
			}
		})
	}
}

func startupMessage() *pgproto3.StartupMessage {
	return &pgproto3.StartupMessage{ProtocolVersion: pgproto3.ProtocolVersionNumber,
		Parameters: map[string]string{"user": "postgres", "database": "postgres"}}
}
