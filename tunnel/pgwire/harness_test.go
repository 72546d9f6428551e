package pgwire

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"go.uber.org/goleak"
)

// pgAddr is the real PostgreSQL the tests follow (trust auth, ssl=on).
const pgAddr = "127.0.0.1:5432"

// testTimeout bounds every test's conversation.
const testTimeout = 30 * time.Second

// leakCheck fails t if goroutines remain once the test and its cleanups are
// done; register it first, so it runs last.
func leakCheck(t *testing.T) {
	t.Helper()
	t.Cleanup(func() { goleak.VerifyNone(t) })
}

func testContext(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	t.Cleanup(cancel)
	return ctx
}

// session is the outcome of one Followed connection.
type session struct {
	startup  *Startup
	up, down int64
	err      error
}

// follower is a loopback listener whose connections are Followed to a
// server (the real PostgreSQL unless dial says otherwise), recording every
// statement.
type followProxy struct {
	t    *testing.T
	ln   net.Listener
	opts Options
	dial func() (net.Conn, error)
	wg   sync.WaitGroup

	mu       sync.Mutex
	stmts    []Statement
	sessions []session
	ended    chan session
}

// startProxy starts a followProxy to PostgreSQL; mod may change its options
// before it accepts.
func startProxy(t *testing.T, mod func(*followProxy)) *followProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &followProxy{t: t, ln: ln, ended: make(chan session, 16)}
	p.dial = func() (net.Conn, error) { return net.DialTimeout("tcp", pgAddr, 5*time.Second) }
	p.opts.OnStatement = func(s Statement) error {
		p.mu.Lock()
		p.stmts = append(p.stmts, s)
		p.mu.Unlock()
		return nil
	}
	if mod != nil {
		mod(p)
	}
	ctx, cancel := context.WithCancel(context.Background())
	p.wg.Add(1)
	go p.serve(ctx)
	t.Cleanup(func() {
		cancel()
		ln.Close()
		p.wg.Wait()
	})
	return p
}

func (p *followProxy) serve(ctx context.Context) {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			s := p.follow(ctx, c)
			p.mu.Lock()
			p.sessions = append(p.sessions, s)
			p.mu.Unlock()
			select {
			case p.ended <- s:
			default:
			}
		}()
	}
}

func (p *followProxy) follow(ctx context.Context, c net.Conn) session {
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	st, err := ReadStartup(c)
	if err != nil {
		c.Close()
		return session{err: err}
	}
	c.SetReadDeadline(time.Time{})
	srv, err := p.dial()
	if err != nil {
		c.Close()
		return session{startup: st, err: err}
	}
	up, down, err := Follow(ctx, c, srv, st, p.opts)
	return session{startup: st, up: up, down: down, err: err}
}

// waitEnded returns the next session to end.
func (p *followProxy) waitEnded(t *testing.T) session {
	t.Helper()
	select {
	case s := <-p.ended:
		return s
	case <-time.After(testTimeout):
		t.Fatal("no Followed session ended in time")
		return session{}
	}
}

func (p *followProxy) url(extra string) string {
	return fmt.Sprintf("postgres://postgres@%s/postgres?sslmode=disable%s", p.ln.Addr(), extra)
}

// statements returns a copy of the statements recorded so far.
func (p *followProxy) statements() []Statement {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]Statement(nil), p.stmts...)
}

// reset forgets the statements recorded so far (those of connection setup).
func (p *followProxy) reset() {
	p.mu.Lock()
	p.stmts = nil
	p.mu.Unlock()
}

func (p *followProxy) connect(t *testing.T, ctx context.Context, extra string) *pgconn.PgConn {
	t.Helper()
	c, err := pgconn.Connect(ctx, p.url(extra))
	if err != nil {
		t.Fatalf("connect through Follow: %v", err)
	}
	t.Cleanup(func() { c.Close(context.Background()) })
	return c
}

func (p *followProxy) connectPgx(t *testing.T, ctx context.Context) *pgx.Conn {
	t.Helper()
	c, err := pgx.Connect(ctx, p.url(""))
	if err != nil {
		t.Fatalf("connect pgx through Follow: %v", err)
	}
	t.Cleanup(func() { c.Close(context.Background()) })
	return c
}

// checkStatement compares a recorded statement with what the test sent.
func checkStatement(t *testing.T, got Statement, kind, text, tag string, rows int64, status, sqlstate string) {
	t.Helper()
	if got.Kind != kind || got.Text != text || got.Tag != tag || got.Rows != rows || got.Status != status || got.SQLState != sqlstate {
		t.Errorf("statement = {Kind %q Text %q Tag %q Rows %d Status %q SQLState %q}, want {%q %q %q %d %q %q}",
			got.Kind, got.Text, got.Tag, got.Rows, got.Status, got.SQLState, kind, text, tag, rows, status, sqlstate)
	}
	if got.Hash != sha256.Sum256([]byte(text)) {
		t.Errorf("statement %q: hash %x is not the SHA-256 of the text sent", text, got.Hash)
	}
	if got.Start.IsZero() || got.Duration < 0 {
		t.Errorf("statement %q: start %v, duration %v", text, got.Start, got.Duration)
	}
}

// pgState returns the SQLSTATE of a pgx error, or "".
func pgState(err error) string {
	var pe *pgconn.PgError
	if errors.As(err, &pe) {
		return pe.Code
	}
	return ""
}
