package pgwire

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"net"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"
	"github.com/wicketgw/wicket/tunnel"
)

// Defaults of Options.
const (
	// DefaultMaxMessage caps one client message, and one server message that
	// Follow decodes: 64 MiB.
	DefaultMaxMessage = 64 << 20
	// DefaultMaxPending caps the client requests awaiting an answer, and the
	// prepared statements and portals tracked.
	DefaultMaxPending = 1 << 20
	// DefaultMaxTracked caps the statement text held for pending requests and
	// prepared statements: 128 MiB.
	DefaultMaxTracked = 128 << 20
)

// bindPrefix is how much of a Bind body Follow keeps: its portal and
// statement names must end within it. The parameter values that follow are
// streamed, never kept.
const bindPrefix = 4096

// errorWriteTimeout bounds the write of a closing ErrorResponse to a client
// that does not read.
const errorWriteTimeout = time.Second

// holdKeep is the largest held-message buffer kept between messages; a
// bigger one (a long query text) is dropped once decoded.
const holdKeep = 64 << 10

// SQLSTATEs of the ErrorResponses Follow writes to the client.
const (
	codeProtocolViolation = "08P01"
	codeNotRecorded       = "58000"
)

// Options configure Follow. The zero value passes every statement nowhere
// and keeps the server's cancel keys.
type Options struct {
	// OnStatement receives each completed statement, in order, before the
	// server's message that completed it is forwarded (the CommandComplete,
	// ErrorResponse, EmptyQueryResponse or PortalSuspended of an Execute; the
	// ReadyForQuery of a Query, a FunctionCall or a Sync after skipped
	// Executes). If it returns an error the session ends at once: the
	// statement has run on the server, but the client never sees its result.
	// When the session ends, statements still pending are passed with
	// StatusIncomplete; an error then is returned by Follow. nil: statements
	// are followed and dropped. Never called concurrently; it runs on the
	// path from the server to the client, so a slow one slows the session.
	OnStatement func(Statement) error
	// OnBackendKey is given the server's BackendKeyData and returns the key
	// the client sees instead (so a CancelRequest must come back through the
	// caller, which maps it). nil: the key passes unchanged.
	OnBackendKey func(pid, secret uint32) (uint32, uint32)
	// MaxMessage caps the length of one client message, and of one server
	// message of a kind Follow decodes (CommandComplete, ErrorResponse, ...:
	// those at most 1 MiB whatever MaxMessage says);
	// over it the session ends as a protocol violation. DataRow and CopyData
	// from the server are streamed and have no cap. Default DefaultMaxMessage.
	MaxMessage int
	// MaxPending caps the client's requests awaiting an answer (a pipeline)
	// and the prepared statements and portals tracked. Default DefaultMaxPending.
	MaxPending int
	// MaxTracked caps the bytes of statement text held for pending requests
	// and prepared statements. Default DefaultMaxTracked.
	MaxTracked int64
	// Now is the clock of Statement.Start and Duration. Default time.Now.
	Now func() time.Time
}

func (o Options) withDefaults() Options {
	if o.MaxMessage <= 0 {
		o.MaxMessage = DefaultMaxMessage
	}
	if o.MaxPending <= 0 {
		o.MaxPending = DefaultMaxPending
	}
	if o.MaxTracked <= 0 {
		o.MaxTracked = DefaultMaxTracked
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	return o
}

// violation is an error wrapping ErrProtocolViolation.
func violation(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrProtocolViolation}, args...)...)
}

// Follow relays client<->server with tunnel.Relay after writing startup.Raw
// to server, framing both directions as they pass and reporting each
// statement to o.OnStatement. Half-close, reset propagation and the stall
// bound are Relay's. It returns the bytes from the client (startup included)
// and from the server, and the first error.
//
// A protocol violation on either side (a message length over the cap or
// under 4, an unknown message type, a body that does not decode, more
// pending requests than the cap) ends the session: the client is sent an
// ErrorResponse (SQLSTATE 08P01) when the stream to it is at a message
// boundary, and the error wraps ErrProtocolViolation and says what was
// wrong. A failure of OnStatement ends it the same way (SQLSTATE 58000,
// ErrStatementNotRecorded). Follow closes both connections before it returns.
func Follow(ctx context.Context, client, server net.Conn, startup *Startup, o Options) (up, down int64, err error) {
	if startup == nil || startup.Cancel != nil {
		client.Close()
		server.Close()
		return 0, 0, errors.New("pgwire: Follow needs a StartupMessage; a CancelRequest is forwarded by the caller, not followed")
	}
	o = o.withDefaults()
	f := &follower{o: o, tr: newTracker(o.Now, o.MaxPending, o.MaxTracked)}
	if _, err := server.Write(startup.Raw); err != nil {
		client.Close()
		server.Close()
		return 0, 0, fmt.Errorf("forward the startup message to the database: %w", err)
	}
	toClient := &tap{Conn: client, f: f, toClient: true, atBoundary: true}
	toServer := &tap{Conn: server, f: f, peer: toClient, atBoundary: true}
	up, down, err = tunnel.Relay(ctx, toClient, toServer)
	up += int64(len(startup.Raw))
	if ferr := f.firstErr(); ferr != nil {
		err = ferr
	}
	for _, s := range f.tr.drain() {
		if rerr := f.record(s); rerr != nil && err == nil {
			err = rerr
		}
	}
	return up, down, err
}

// follower is the state one Follow shares between its two directions.
type follower struct {
	o  Options
	tr *tracker

	mu    sync.Mutex
	first error // the violation or record failure that ended the session
	told  bool  // the client was sent an ErrorResponse about it
}

func (f *follower) fail(err error, told bool) {
	f.mu.Lock()
	if f.first == nil {
		f.first = err
		f.told = told
	}
	f.mu.Unlock()
}

func (f *follower) firstErr() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.first
}

func (f *follower) clientTold() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.told
}

func (f *follower) record(s Statement) error {
	if f.o.OnStatement == nil {
		return nil
	}
	if err := f.o.OnStatement(s); err != nil {
		return fmt.Errorf("%w: the audit log refused the statement (%v); the session is closed", ErrStatementNotRecorded, err)
	}
	return nil
}

func (f *follower) recordAll(stmts []Statement) error {
	for _, s := range stmts {
		if err := f.record(s); err != nil {
			return err
		}
	}
	return nil
}

// closingMessage is the ErrorResponse that tells the client why its session ends.
func closingMessage(err error) []byte {
	if errors.Is(err, ErrStatementNotRecorded) {
		return ErrorMessage(codeNotRecorded, "the statement could not be recorded in the audit log; the session is closed")
	}
	return ErrorMessage(codeProtocolViolation, err.Error())
}

// class is how a message type is framed.
type class uint8

const (
	invalid class = iota
	stream        // forwarded as it arrives, never kept
	hold          // kept whole and decoded before it is forwarded
)

func clientClass(typ byte) class {
	switch typ {
	case 'Q', 'P', 'E', 'D', 'C', 'S', 'H', 'X':
		return hold
	case 'B', 'F', 'd', 'c', 'f', 'p':
		return stream
	}
	return invalid
}

func serverClass(typ byte) class {
	switch typ {
	case 'K', 'Z', 'C', 'E', 's', 'I', '1', '2', '3', 'n':
		return hold
	case 'R', 'S', 'N', 'A', 'T', 't', 'D', 'G', 'H', 'W', 'd', 'c', 'V', 'v':
		return stream
	}
	return invalid
}

// tap wraps the connection one direction writes to: Relay's Write to it is
// framed, inspected and forwarded, message kinds that must be decoded are
// kept until whole, everything else passes as it arrives.
type tap struct {
	net.Conn
	f        *follower
	toClient bool // Conn is the client: the bytes written come from the server
	peer     *tap // on the server side: the client's tap, to tell it why the session ends

	mu         sync.Mutex // serializes Write and tell
	failed     error
	atBoundary bool // the bytes written to Conn so far end at a message boundary

	hdr     [5]byte
	nhdr    int
	typ     byte
	left    int // body bytes still to come
	inBody  bool
	holding bool
	held    []byte // the held message so far, header included
	prefix  []byte // the kept start of a streamed Bind or FunctionCall body
	want    int    // prefix bytes wanted; 0 when none (or done)
	rows    int64  // DataRows since the server's last decoded message
}

// CloseWrite half-closes the wrapped connection, as Relay would.
func (t *tap) CloseWrite() error {
	if cw, ok := t.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return t.Conn.Close()
}

// Reset ends the wrapped connection abnormally, as Relay would, except that
// a client told why its session ends is closed gracefully so the message
// reaches it (a reset stream discards what it still buffers).
func (t *tap) Reset() error {
	if t.toClient && t.f.clientTold() {
		return t.Conn.Close()
	}
	if r, ok := t.Conn.(tunnel.Resetter); ok {
		return r.Reset()
	}
	return t.Conn.Close()
}

func (t *tap) side() string {
	if t.toClient {
		return "the database server"
	}
	return "the client"
}

// Write frames and forwards p. It reports all of p written, or an error that
// ends the relay.
func (t *tap) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.failed != nil {
		return 0, t.failed
	}
	if err := t.process(p); err != nil {
		t.failed = err
		if errors.Is(err, ErrProtocolViolation) || errors.Is(err, ErrStatementNotRecorded) {
			if t.toClient {
				t.f.fail(err, t.writeClosing(err))
			} else {
				t.f.fail(err, t.peer.tell(err))
			}
		}
		return 0, err
	}
	return len(p), nil
}

// tell writes the closing ErrorResponse to the client, if the stream to it is
// at a message boundary, and stops further writes. It reports whether the
// message was written.
func (t *tap) tell(err error) bool {
	// A write of the other direction blocked on a client that does not read
	// would hold mu; the deadline frees it.
	t.Conn.SetWriteDeadline(time.Now().Add(errorWriteTimeout))
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.failed != nil {
		return false
	}
	t.failed = err
	return t.writeClosing(err)
}

// writeClosing writes the closing ErrorResponse if the stream is at a
// message boundary; t.mu is held.
func (t *tap) writeClosing(err error) bool {
	if !t.atBoundary {
		return false
	}
	t.Conn.SetWriteDeadline(time.Now().Add(errorWriteTimeout))
	_, werr := t.Conn.Write(closingMessage(err))
	return werr == nil
}

// out forwards b; boundary says whether b ends at a message boundary.
func (t *tap) out(b []byte, boundary bool) error {
	if len(b) == 0 {
		return nil
	}
	t.atBoundary = false
	if _, err := t.Conn.Write(b); err != nil {
		return err
	}
	t.atBoundary = boundary
	return nil
}

func (t *tap) process(p []byte) error {
	fwd, i := 0, 0 // p[fwd:i] is inspected and not yet forwarded
	for i < len(p) {
		if t.inBody {
			n := min(t.left, len(p)-i)
			if t.holding {
				t.held = append(t.held, p[i:i+n]...)
				i += n
				fwd = i
				t.left -= n
				if t.left == 0 {
					if err := t.finishHeld(); err != nil {
						return err
					}
				}
				continue
			}
			if k := t.want - len(t.prefix); k > 0 {
				t.prefix = append(t.prefix, p[i:i+min(k, n)]...)
			}
			i += n
			t.left -= n
			if t.left == 0 {
				t.inBody = false
			}
			if t.want > 0 && (len(t.prefix) == t.want || t.left == 0) {
				if err := t.prefixDone(); err != nil {
					return err
				}
			}
			continue
		}

		hs := i
		split := t.nhdr > 0 // the header began in an earlier Write; it is in t.hdr only
		n := copy(t.hdr[t.nhdr:], p[i:])
		t.nhdr += n
		i += n
		if t.nhdr < len(t.hdr) {
			return t.out(p[fwd:hs], true)
		}
		t.nhdr = 0
		typ, length := t.hdr[0], binary.BigEndian.Uint32(t.hdr[1:])
		cls, err := t.check(typ, length)
		if err != nil {
			t.out(p[fwd:hs], true)
			return err
		}
		body := int(length) - 4
		t.typ, t.left = typ, body

		if cls == hold {
			if !split && len(p)-i >= body {
				// The whole message is in p: decode it in place.
				i += body
				repl, err := t.handle(typ, p[hs+5:i])
				if err != nil {
					t.out(p[fwd:hs], true)
					return err
				}
				if repl != nil {
					if err := t.out(p[fwd:hs], true); err != nil {
						return err
					}
					if err := t.out(repl, true); err != nil {
						return err
					}
					fwd = i
				}
				continue
			}
			if err := t.out(p[fwd:hs], true); err != nil {
				return err
			}
			t.held = append(t.held[:0], t.hdr[:]...)
			t.inBody, t.holding = true, true
			fwd = i
			if body == 0 {
				if err := t.finishHeld(); err != nil {
					return err
				}
			}
			continue
		}

		if err := t.begin(typ); err != nil {
			t.out(p[fwd:hs], true)
			return err
		}
		if split {
			if err := t.out(t.hdr[:], body == 0); err != nil {
				return err
			}
			fwd = i
		}
		needPrefix := !t.toClient && (typ == 'B' || typ == 'F')
		t.prefix, t.want = t.prefix[:0], t.prefixWanted(typ, body)
		if !needPrefix && !split && len(p)-i >= body {
			i += body // the common DataRow: whole in p, passed over
			continue
		}
		t.inBody = body > 0
		if needPrefix && body == 0 {
			if err := t.prefixDone(); err != nil {
				return err
			}
		}
	}
	return t.out(p[fwd:], !t.inBody || t.holding)
}

// finishHeld decodes and forwards the held message, now whole.
func (t *tap) finishHeld() error {
	t.inBody, t.holding = false, false
	msg := t.held
	if cap(t.held) > holdKeep {
		t.held = nil
	}
	repl, err := t.handle(t.typ, msg[5:])
	if err != nil {
		return err
	}
	if repl == nil {
		repl = msg
	}
	return t.out(repl, true)
}

// check validates a message header.
func (t *tap) check(typ byte, length uint32) (class, error) {
	cls := clientClass(typ)
	if t.toClient {
		cls = serverClass(typ)
	}
	switch {
	case cls == invalid:
		return invalid, violation("%s sent a message of unknown type %q", t.side(), typ)
	case length < 4 || length > math.MaxInt32:
		return invalid, violation("%s sent a %q message with the impossible length %d", t.side(), typ, length)
	case (!t.toClient || cls == hold) && int64(length)-4 > int64(t.limit()):
		return invalid, violation("%s sent a %q message of %d bytes, over the limit of %d", t.side(), typ, length-4, t.limit())
	}
	return cls, nil
}

// limit is the longest message body this side may send of a kind that is checked: any
// client message, and the server messages Follow decodes, which are held whole until
// decoded. The server's are capped lower: PostgreSQL's own CommandComplete, ErrorResponse
// and the like are at most a few KiB, and the server side is the one a compromised agent
// plays, so it must not make the gateway hold 64 MiB per session.
func (t *tap) limit() int {
	if t.toClient {
		return min(t.f.o.MaxMessage, maxServerHeld)
	}
	return t.f.o.MaxMessage
}

// maxServerHeld caps a server message that Follow holds to decode.
const maxServerHeld = 1 << 20

func (t *tap) prefixWanted(typ byte, body int) int {
	switch {
	case t.toClient:
		return 0
	case typ == 'B':
		return min(body, bindPrefix)
	case typ == 'F':
		return min(body, 4)
	}
	return 0
}

// handle acts on a held message of type typ: it returns the bytes to forward
// instead (nil: the message as it is) or the error that ends the session.
// The decoders run on hostile bytes: a panic is a violation.
func (t *tap) handle(typ byte, body []byte) (repl []byte, err error) {
	defer func() {
		if r := recover(); r != nil {
			repl, err = nil, violation("%s sent a %q message that does not decode", t.side(), typ)
		}
	}()
	if t.toClient {
		return t.serverMessage(typ, body)
	}
	return nil, t.clientMessage(typ, body)
}

func (t *tap) undecodable(typ byte, err error) error {
	return violation("%s sent a %q message that does not decode (%v)", t.side(), typ, err)
}

// clientMessage queues a request the server will answer.
func (t *tap) clientMessage(typ byte, body []byte) error {
	var p *pending
	switch typ {
	case 'Q':
		var m pgproto3.Query
		if err := m.Decode(body); err != nil {
			return t.undecodable(typ, err)
		}
		p = &pending{op: 'Q', text: hashText(m.String)}
	case 'P':
		var m pgproto3.Parse
		if err := m.Decode(body); err != nil {
			return t.undecodable(typ, err)
		}
		p = &pending{op: 'P', name: m.Name, text: hashText(m.Query)}
	case 'E':
		var m pgproto3.Execute
		if err := m.Decode(body); err != nil {
			return t.undecodable(typ, err)
		}
		p = &pending{op: 'E', name: m.Portal}
	case 'D':
		var m pgproto3.Describe
		if err := m.Decode(body); err != nil {
			return t.undecodable(typ, err)
		}
		if m.ObjectType != 'S' && m.ObjectType != 'P' {
			return violation("the client sent a Describe of unknown object type %q", m.ObjectType)
		}
		p = &pending{op: 'D', which: m.ObjectType, name: m.Name}
	case 'C':
		var m pgproto3.Close
		if err := m.Decode(body); err != nil {
			return t.undecodable(typ, err)
		}
		if m.ObjectType != 'S' && m.ObjectType != 'P' {
			return violation("the client sent a Close of unknown object type %q", m.ObjectType)
		}
		p = &pending{op: 'C', which: m.ObjectType, name: m.Name}
	case 'S':
		var m pgproto3.Sync
		if err := m.Decode(body); err != nil {
			return t.undecodable(typ, err)
		}
		p = &pending{op: 'S'}
	case 'H':
		var m pgproto3.Flush
		if err := m.Decode(body); err != nil {
			return t.undecodable(typ, err)
		}
		return nil
	case 'X':
		var m pgproto3.Terminate
		if err := m.Decode(body); err != nil {
			return t.undecodable(typ, err)
		}
		return nil
	}
	return t.f.tr.push(p)
}

// prefixDone acts on the kept start of a streamed client Bind or FunctionCall.
func (t *tap) prefixDone() error {
	b := t.prefix
	t.want = 0
	switch t.typ {
	case 'B':
		// Bind: portal name, statement name (both NUL-terminated), then the
		// parameters, which are never kept.
		i := bytes.IndexByte(b, 0)
		j := -1
		if i >= 0 {
			j = bytes.IndexByte(b[i+1:], 0)
		}
		if j < 0 {
			return violation("the client sent a Bind whose portal and statement names do not end within its first %d bytes", bindPrefix)
		}
		return t.f.tr.push(&pending{op: 'B', name: string(b[:i]), stmt: string(b[i+1 : i+1+j])})
	case 'F':
		if len(b) < 4 {
			return violation("the client sent a FunctionCall too short to name its function")
		}
		return t.f.tr.push(&pending{op: 'F', oid: binary.BigEndian.Uint32(b)})
	}
	return nil
}

// begin acts on the header of a streamed server message.
func (t *tap) begin(typ byte) error {
	if !t.toClient {
		return nil
	}
	switch typ {
	case 'D':
		t.rows++ // counted here, not in the tracker: no lock per row
	case 'G', 'H', 'W':
		t.f.tr.copyStarted()
	case 'T':
		t.f.tr.simpleAnswer(typ)
		t.rows = 0
	}
	return nil
}

// serverMessage acts on a held server message.
func (t *tap) serverMessage(typ byte, body []byte) ([]byte, error) {
	tr := t.f.tr
	var done []Statement
	rows := t.rows
	t.rows = 0
	switch typ {
	case 'K':
		var m pgproto3.BackendKeyData
		if err := m.Decode(body); err != nil {
			return nil, t.undecodable(typ, err)
		}
		if t.f.o.OnBackendKey == nil {
			return nil, nil
		}
		m.ProcessID, m.SecretKey = t.f.o.OnBackendKey(m.ProcessID, m.SecretKey)
		return m.Encode(nil)
	case 'Z':
		var m pgproto3.ReadyForQuery
		if err := m.Decode(body); err != nil {
			return nil, t.undecodable(typ, err)
		}
		done = tr.readyForQuery()
	case 'C':
		var m pgproto3.CommandComplete
		if err := m.Decode(body); err != nil {
			return nil, t.undecodable(typ, err)
		}
		done = tr.commandComplete(string(m.CommandTag))
	case 'E':
		var m pgproto3.ErrorResponse
		if err := m.Decode(body); err != nil {
			return nil, t.undecodable(typ, err)
		}
		done = tr.errorResponse(m.Code)
	case 's':
		var m pgproto3.PortalSuspended
		if err := m.Decode(body); err != nil {
			return nil, t.undecodable(typ, err)
		}
		done = tr.portalSuspended(rows)
	case 'I':
		var m pgproto3.EmptyQueryResponse
		if err := m.Decode(body); err != nil {
			return nil, t.undecodable(typ, err)
		}
		done = tr.emptyQuery()
	case '1', '2', '3', 'n':
		if len(body) != 0 {
			return nil, violation("the database server sent a %q message with a body; it has none", typ)
		}
		tr.simpleAnswer(typ)
	}
	return nil, t.f.recordAll(done)
}
