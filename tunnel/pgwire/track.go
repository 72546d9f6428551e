package pgwire

import (
	"crypto/sha256"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Statement statuses.
const (
	StatusOK         = "ok"         // completed
	StatusError      = "error"      // ended by an ErrorResponse (SQLState says which)
	StatusSkipped    = "skipped"    // pipelined after an error: the server discarded it unrun
	StatusIncomplete = "incomplete" // the session ended before the statement completed
)

// Statement kinds.
const (
	KindSimple   = "simple"   // a Query message (simple protocol), all its statements together
	KindExtended = "extended" // an Execute message (extended protocol)
	KindCopy     = "copy"     // a Query or Execute that ran a COPY, either direction
	KindFunction = "function" // a FunctionCall message
)

// maxTagLen bounds the joined CommandComplete tags of one statement: a hostile
// server could send any number of them for one Query.
const maxTagLen = 4096

// Statement is one statement of a session as Follow saw it: what the client
// sent and what the server answered. It never holds parameter values.
type Statement struct {
	// Start is when the client's message that started the statement passed.
	Start time.Time
	// Duration runs from Start to the server's message that completed it.
	Duration time.Duration
	// Kind is KindSimple, KindExtended, KindCopy or KindFunction.
	Kind string
	// Text is the statement text exactly as the client sent it: the Query's
	// string, or for an Execute the query of the Parse its portal was bound
	// from. It is empty for a FunctionCall, and for a portal bound from a
	// statement Follow never saw parsed (one made by SQL PREPARE: that PREPARE
	// was recorded as its own statement).
	Text string
	// Hash is the SHA-256 of Text's bytes as they were on the wire, without the
	// NUL terminator: printf '%s' "$SQL" | sha256sum.
	Hash [32]byte
	// FunctionOID is the function a FunctionCall invoked; 0 for other kinds.
	FunctionOID uint32
	// Tag is the CommandComplete tag ("SELECT 42"); the tags of a
	// multi-statement Query joined by "; ". Empty when none came.
	Tag string
	// Rows is the sum of the row counts in the tag(s); for an Execute that
	// ended with PortalSuspended (a row limit), the DataRows it returned.
	Rows int64
	// SQLState is the code of the ErrorResponse that ended the statement, "" if none.
	SQLState string
	// Status is StatusOK, StatusError, StatusSkipped or StatusIncomplete.
	Status string
}

// prepared is a statement or portal as the server holds it.
type prepared struct {
	text string
	hash [32]byte
}

// pending is a client message that awaits the server's answer.
type pending struct {
	op    byte // the client message type
	start time.Time
	name  string   // P: statement; B: portal; E: portal; D, C: the object
	stmt  string   // B: the source statement
	which byte     // D, C: 'S' statement or 'P' portal
	text  prepared // Q, P: the text sent; E: the server's portal, once answered
	// intended is, for B and E, the text the client's own messages bound the
	// portal to: what a skipped Execute would have run.
	intended prepared
	oid      uint32 // F

	// What the answer has said so far (Q, E, F).
	copy     bool
	tags     []string
	tagLen   int
	rows     int64
	sqlstate string
}

// tracker follows the client's requests and the server's answers in order.
// The client direction pushes, the server direction pops; both hold mu.
type tracker struct {
	mu       sync.Mutex
	now      func() time.Time
	maxQueue int
	maxBytes int64

	queue []*pending // head at queue[0]
	bytes int64      // statement text held by queue, stmts and portals

	// stmts and portals are the server's namespaces, changed only when the
	// server confirms (ParseComplete, BindComplete, CloseComplete): a client
	// cannot make Follow believe a name holds a text the server refused.
	stmts   map[string]prepared
	portals map[string]prepared
	// cstmts and cportals are the same namespaces as the client's messages
	// change them, at once: they name what an Execute the server skipped (its
	// Parse or Bind failed, or an earlier request did) would have run.
	cstmts   map[string]prepared
	cportals map[string]prepared

	// carried is the SQLSTATE of an error on a Parse, Bind, Describe or Close,
	// charged to the next Execute before the Sync (the statement it stopped).
	carried string
}

func newTracker(now func() time.Time, maxQueue int, maxBytes int64) *tracker {
	return &tracker{
		now: now, maxQueue: maxQueue, maxBytes: maxBytes,
		stmts: map[string]prepared{}, portals: map[string]prepared{},
		cstmts: map[string]prepared{}, cportals: map[string]prepared{},
	}
}

// emptyHash is the command hash of a FunctionCall, which has no text.
var emptyHash = sha256.Sum256(nil)

func hashText(s string) prepared { return prepared{text: s, hash: sha256.Sum256([]byte(s))} }

// push queues a client request; it fails when a bound would be exceeded.
func (t *tracker) push(p *pending) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if len(t.queue) >= t.maxQueue {
		return violation("the client has more than %d requests awaiting an answer", t.maxQueue)
	}
	if (p.op == 'P' || p.op == 'B') && len(t.stmts)+len(t.portals)+len(t.cstmts)+len(t.cportals) >= t.maxQueue {
		return violation("the client holds more than %d prepared statements and portals", t.maxQueue)
	}
	if n := int64(len(p.text.text)); n > 0 {
		// Counted twice: held by the request, then by the client's view.
		if t.bytes+2*n > t.maxBytes {
			return violation("the client's pending and prepared statements hold more than %d bytes of text", t.maxBytes)
		}
		t.bytes += n
	}
	switch p.op {
	case 'Q':
		t.deleteClient("")
		delete(t.cportals, "")
	case 'P':
		t.deleteClient(p.name)
		t.cstmts[p.name] = p.text
		t.bytes += int64(len(p.text.text))
	case 'B':
		p.intended = t.cstmts[p.stmt]
		t.cportals[p.name] = p.intended
	case 'E':
		p.intended = t.cportals[p.name]
	case 'C':
		if p.which == 'S' {
			t.deleteClient(p.name)
		} else {
			delete(t.cportals, p.name)
		}
	}
	p.start = t.now()
	t.queue = append(t.queue, p)
	return nil
}

func (t *tracker) head() *pending {
	if len(t.queue) == 0 {
		return nil
	}
	return t.queue[0]
}

func (t *tracker) pop() *pending {
	p := t.queue[0]
	t.queue[0] = nil
	t.queue = t.queue[1:]
	if len(t.queue) == 0 {
		t.queue = t.queue[:0:0] // let a long pipeline's backing array go
	}
	if p.op == 'Q' || p.op == 'P' {
		t.bytes -= int64(len(p.text.text))
	}
	return p
}

// setStmt records a confirmed prepared statement, keeping the byte count.
// Portals share their statement's text, so only statements are counted.
func (t *tracker) setStmt(name string, v prepared) {
	t.deleteStmt(name)
	t.bytes += int64(len(v.text))
	t.stmts[name] = v
}

func (t *tracker) deleteClient(name string) {
	if old, ok := t.cstmts[name]; ok {
		t.bytes -= int64(len(old.text))
		delete(t.cstmts, name)
	}
}

func (t *tracker) deleteStmt(name string) {
	if old, ok := t.stmts[name]; ok {
		t.bytes -= int64(len(old.text))
		delete(t.stmts, name)
	}
}

// statement builds the record of a finished Q, E or F.
func (t *tracker) statement(p *pending, status string) Statement {
	s := Statement{
		Start: p.start, Duration: t.now().Sub(p.start), Kind: KindExtended, Text: p.text.text, Hash: p.text.hash,
		Tag: strings.Join(p.tags, "; "), Rows: p.rows, SQLState: p.sqlstate, Status: status,
	}
	switch p.op {
	case 'Q':
		s.Kind = KindSimple
	case 'F':
		s.Kind, s.FunctionOID, s.Text, s.Hash = KindFunction, p.oid, "", emptyHash
	}
	if p.copy {
		s.Kind = KindCopy
	}
	if status == StatusIncomplete && s.SQLState != "" {
		s.Status = StatusError
	}
	return s
}

// The server's answers. Each returns the statements it completed, in order.
// An answer that does not fit the head request (a hostile or confused
// server) changes nothing: it cannot make a record claim a text the client
// did not send.

func (t *tracker) copyStarted() {
	t.mu.Lock()
	if p := t.head(); p != nil && (p.op == 'E' || p.op == 'Q') {
		p.copy = true
	}
	t.mu.Unlock()
}

// simpleAnswer handles ParseComplete, BindComplete, CloseComplete,
// RowDescription and NoData: they complete the head P, B, C or D.
func (t *tracker) simpleAnswer(typ byte) {
	t.mu.Lock()
	defer t.mu.Unlock()
	p := t.head()
	if p == nil {
		return
	}
	switch {
	case typ == '1' && p.op == 'P':
		t.pop()
		t.setStmt(p.name, p.text)
	case typ == '2' && p.op == 'B':
		t.pop()
		t.portals[p.name] = t.stmts[p.stmt]
	case typ == '3' && p.op == 'C':
		t.pop()
		if p.which == 'S' {
			t.deleteStmt(p.name)
		} else {
			delete(t.portals, p.name)
		}
	case (typ == 'T' || typ == 'n') && p.op == 'D':
		t.pop()
	}
}

func (t *tracker) commandComplete(tag string) []Statement {
	t.mu.Lock()
	defer t.mu.Unlock()
	p := t.head()
	if p == nil {
		return nil
	}
	switch p.op {
	case 'Q':
		p.addTag(tag)
		return nil
	case 'E':
		t.takeExecute()
		p.addTag(tag)
		return []Statement{t.statement(p, StatusOK)}
	}
	return nil
}

func (t *tracker) emptyQuery() []Statement {
	t.mu.Lock()
	defer t.mu.Unlock()
	if p := t.takeExecute(); p != nil {
		return []Statement{t.statement(p, StatusOK)}
	}
	return nil
}

// portalSuspended completes the head Execute, which returned rows DataRows.
func (t *tracker) portalSuspended(rows int64) []Statement {
	t.mu.Lock()
	defer t.mu.Unlock()
	if p := t.takeExecute(); p != nil {
		p.rows = rows
		return []Statement{t.statement(p, StatusOK)}
	}
	return nil
}

// takeExecute pops the head request if it is an Execute, the one the server's answer
// completes, and resolves its text; nil when the head is something else.
func (t *tracker) takeExecute() *pending {
	if p := t.head(); p == nil || p.op != 'E' {
		return nil
	}
	p := t.pop()
	t.resolve(p)
	return p
}

func (t *tracker) errorResponse(code string) []Statement {
	t.mu.Lock()
	defer t.mu.Unlock()
	p := t.head()
	if p == nil {
		return nil
	}
	switch p.op {
	case 'Q', 'F':
		if p.sqlstate == "" {
			p.sqlstate = code
		}
		return nil
	case 'E':
		t.takeExecute()
		p.sqlstate = code
		return []Statement{t.statement(p, StatusError)}
	case 'P', 'B', 'D', 'C':
		t.pop()
		for _, q := range t.queue {
			if q.op == 'S' {
				break
			}
			if q.op == 'E' {
				t.carried = code
				return nil
			}
		}
		if p.op == 'P' || p.op == 'B' {
			if p.op == 'B' {
				p.text = p.intended
			}
			p.sqlstate = code
			return []Statement{t.statement(p, StatusError)}
		}
	}
	return nil
}

// readyForQuery completes the head Query or FunctionCall, or the requests up
// to and including the head Sync: whatever got no answer was skipped.
func (t *tracker) readyForQuery() []Statement {
	t.mu.Lock()
	defer t.mu.Unlock()
	var done []Statement
	for len(t.queue) > 0 {
		p := t.pop()
		switch p.op {
		case 'Q':
			// A simple Query destroys the unnamed statement and portal.
			t.deleteStmt("")
			delete(t.portals, "")
			fallthrough
		case 'F':
			status := StatusOK
			if p.sqlstate != "" {
				status = StatusError
			}
			done = append(done, t.statement(p, status))
			t.carried = ""
			return done
		case 'E':
			p.text = p.intended
			if t.carried != "" {
				p.sqlstate, t.carried = t.carried, ""
				done = append(done, t.statement(p, StatusError))
			} else {
				done = append(done, t.statement(p, StatusSkipped))
			}
		case 'S':
			t.carried = ""
			return done
		}
	}
	return done
}

// resolve gives an Execute the text of the portal it runs, as the server
// holds it now that every earlier request has been answered.
func (t *tracker) resolve(p *pending) {
	p.text = t.portals[p.name]
}

// drain reports what is still pending when the session ends.
func (t *tracker) drain() []Statement {
	t.mu.Lock()
	defer t.mu.Unlock()
	var out []Statement
	for len(t.queue) > 0 {
		p := t.pop()
		switch p.op {
		case 'Q', 'F':
			out = append(out, t.statement(p, StatusIncomplete))
		case 'E':
			p.text = p.intended
			out = append(out, t.statement(p, StatusIncomplete))
		}
	}
	return out
}

func (p *pending) addTag(tag string) {
	if p.tagLen+len(tag) <= maxTagLen {
		p.tags = append(p.tags, tag)
		p.tagLen += len(tag) + 2
	}
	if i := strings.LastIndexByte(tag, ' '); i >= 0 {
		if n, err := strconv.ParseInt(tag[i+1:], 10, 64); err == nil && n >= 0 && p.rows+n >= p.rows {
			p.rows += n
		}
	}
}
