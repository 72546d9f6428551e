package audit

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode/utf8"
)

// Statement-log record types; see "Statement logs" in the package doc.
const (
	// TypeStatementsBegin is the first line of a statement log: who, where, and whether
	// statement text is recorded.
	TypeStatementsBegin = "statements.begin"
	// TypeStatement is one statement of the session.
	TypeStatement = "statement"
	// TypeStatementsRecovered is written once, by [RecoverStatementLog], to close a log
	// whose writer stopped without Close (a crash): it seals a torn last line, if any, the
	// way [TypeLogRecovered] does in audit.log, and it is always the log's last line.
	TypeStatementsRecovered = "statements.recovered"
)

// Statement kinds ([Statement.Kind]).
const (
	KindSimple   = "simple"   // a statement of a simple-protocol Query message
	KindExtended = "extended" // an Execute of the extended protocol
	KindCopy     = "copy"     // a COPY (its data is never recorded)
	KindFunction = "function" // a FunctionCall message
)

// Statement statuses ([Statement.Status]).
const (
	StatusOK         = "ok"         // the statement completed
	StatusError      = "error"      // the server returned an error; SQLState says which
	StatusSkipped    = "skipped"    // not run: an earlier error in the same batch or pipeline
	StatusIncomplete = "incomplete" // the session ended before the statement completed
)

// Keys of [Record.Extra] that tie the main log to a statement log.
const (
	// ExtraStatementsLog, in session.started, names the session's statement log relative
	// to the audit log's directory; its value is [StatementLogName] of the session.
	ExtraStatementsLog = "statements_log"
	// ExtraStatements, in session.ended, is the seal's count of statement lines.
	ExtraStatements = "statements"
	// ExtraStatementsHead, in session.ended, is the seal's hex SHA-256 of the log's last line.
	ExtraStatementsHead = "statements_head"
)

// StatementsDir is the directory, next to audit.log, that holds the statement logs.
const StatementsDir = "statements"

// MaxStatementText is how many bytes of statement text a log keeps when it records
// text; longer text is cut (at a UTF-8 boundary) and flagged text_truncated. The hash
// and the length always describe the whole text.
const MaxStatementText = 64 << 10

// MaxStatementTag is how many bytes of CommandComplete tags a record keeps.
const MaxStatementTag = 1 << 10

// MaxStatementLineSize is the longest statement-log line, newline included, that Append
// writes and verification accepts: text of MaxStatementText bytes may grow six-fold when
// JSON escapes control bytes, and the rest of a record is small.
const MaxStatementLineSize = 7*MaxStatementText + 2*MaxStatementTag + 4<<10

// DefaultStatementSyncEvery is [StatementLogOptions.SyncEvery]'s default.
const DefaultStatementSyncEvery = time.Second

// Statement-log verification failures that audit.log has no equivalent for. A
// *StatementLogError wraps one of these or one of ErrMalformed, ErrModified,
// ErrDeleted, ErrReordered, ErrSeq.
var (
	// ErrSealMismatch: the statement log does not end where its session.ended seal says:
	// lines were cut off the end, appended after the session ended, or the last line was
	// changed.
	ErrSealMismatch = errors.New("statement log does not match its seal")
	// ErrMissingLog: the main log names a statement log (or seals one) that is not there.
	ErrMissingLog = errors.New("statement log missing")
	// ErrWrongSession: the begin line names another session than the file's name, or the
	// main log names a statement log by another path than the session's.
	ErrWrongSession = errors.New("statement log belongs to another session")
)

// StatementBegin is the first line of a statement log.
type StatementBegin struct {
	// Session is the session id of the session.started record; the file is named after it.
	Session string
	// User, Identity, Resource and Agent are those of the session.
	User, Identity, Resource, Agent string
	// DBUser and Database are the user and database of the client's StartupMessage.
	DBUser, Database string
	// RecordsText says whether the statements' text is recorded; when false, [Append]
	// drops any Text it is given and keeps only the hash and the length.
	RecordsText bool
	// Time is when the log was opened, UTC; filled from the clock when zero.
	Time time.Time
}

// Statement is one statement of a session. The JSON names in brackets are those of
// the line; see the package doc.
type Statement struct {
	// Seq is the statement's position in the log, from 1, without gaps. Set by Append.
	Seq uint64
	// Time is when the statement started (time); filled from the clock when zero.
	Time time.Time
	// Kind is one of the Kind* constants (kind).
	Kind string
	// SHA256 is the hex SHA-256 of the statement text, the command hash (sha256). When
	// empty, Append computes it from Text and sets Len = len(Text).
	SHA256 string
	// Len is the length of the statement text in bytes (len).
	Len int
	// Text is the statement text (text), kept only when the log records text, cut to
	// MaxStatementText bytes.
	Text string
	// TextTruncated says that Text was cut (text_truncated).
	TextTruncated bool
	// Tag is the CommandComplete tag or tags, e.g. "SELECT 42" (tag), cut to MaxStatementTag.
	Tag string
	// Rows is the number of rows the statement returned or affected (rows).
	Rows int64
	// SQLState is the SQLSTATE of the error that ended the statement (sqlstate).
	SQLState string
	// Status is one of the Status* constants (status).
	Status string
	// Duration is how long the statement ran (duration_us, in microseconds).
	Duration time.Duration
	// Prev is the hex SHA-256 of the previous line, newline included (prev). Set by Append.
	Prev string
}

// StatementLogOptions tune [OpenStatementLog]. The zero value is the production setting.
type StatementLogOptions struct {
	// Now is the clock for the begin line and for statements whose Time is zero.
	// Default time.Now.
	Now func() time.Time
	// NoSync turns off fsync entirely (tests and benchmarks only). Default false.
	NoSync bool
	// SyncEvery is the longest a written line waits for its fsync, and so the shortest
	// time between two fsyncs of one log. Default 1 s: a crash or power loss can lose at
	// most the last second of a session's statements, and a session running 10,000
	// statements per second costs one fsync per second, not 10,000.
	SyncEvery time.Duration
}

// Seal is what a session.ended record says about its statement log: how many
// statement lines it has, and the hex SHA-256 of its last line (of the begin line when
// there are none). A log that does not end there was cut or extended afterwards.
type Seal struct {
	Count uint64
	Head  string
}

// Put writes the seal into r.Extra (statements, statements_head).
func (s Seal) Put(r *Record) {
	if r.Extra == nil {
		r.Extra = map[string]string{}
	}
	r.Extra[ExtraStatements] = strconv.FormatUint(s.Count, 10)
	r.Extra[ExtraStatementsHead] = s.Head
}

// SealOf reads the seal from a session.ended record; ok is false when it has none or
// it is not well formed.
func SealOf(r Record) (Seal, bool) {
	return sealOf(r.Extra)
}

func sealOf(extra map[string]string) (Seal, bool) {
	c, ok1 := extra[ExtraStatements]
	h, ok2 := extra[ExtraStatementsHead]
	n, err := strconv.ParseUint(c, 10, 64)
	if !ok1 || !ok2 || err != nil || !isHash(h) {
		return Seal{}, false
	}
	return Seal{Count: n, Head: h}, true
}

// StatementLogName is the path of a session's statement log relative to the audit
// log's directory, as session.started names it in Extra["statements_log"].
func StatementLogName(session string) string {
	return StatementsDir + "/" + session + ".log"
}

// StatementLogPath is the statement log of session in dir, the audit log's directory.
// It refuses a session id that cannot be a file name, so a hostile id in a record never
// leads outside the statements directory.
func StatementLogPath(dir, session string) (string, error) {
	if !validSessionID(session) {
		return "", fmt.Errorf("session id %q is not 1-128 letters, digits, '-' or '_', so it has no statement log", session)
	}
	return filepath.Join(dir, filepath.FromSlash(StatementLogName(session))), nil
}

// validSessionID reports whether id can name a file: 1-128 of [A-Za-z0-9_-].
func validSessionID(id string) bool {
	if id == "" || len(id) > 128 {
		return false
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '-') {
			return false
		}
	}
	return true
}

// StatementLog appends the statements of one session to its own hash-chained file.
// It is safe for concurrent use; the chain order is the order of the Append calls.
//
// Append encodes a line into memory; the lines are written to the file in one write(2)
// when 64 KiB are pending, on a timer at most SyncEvery after the first pending line,
// and at Close, and the timer fsyncs what was written, off the Append path. So neither
// a write(2) nor an fsync waits on the path of a statement's reply. After a failed write
// or fsync the log is broken: every later Append returns the error (the gateway then
// ends the session), and Close returns it with the seal of the lines known to be in the
// file.
type StatementLog struct {
	path        string
	now         func() time.Time
	noSync      bool
	every       time.Duration
	recordsText bool

	syncMu sync.Mutex // serialises fsyncs with Close

	mu      sync.Mutex
	f       *os.File
	seq     uint64 // of the last line appended
	head    string // hash of the last line appended
	pending []byte // lines appended and not yet written
	onDisk  Seal   // the last line written to the file: seq and hash
	dirty   bool   // written since the last fsync started
	armed   bool   // the timer will run
	timer   *time.Timer
	err     error // sticky: the log is broken
	closed  bool
	seal    Seal // what Close returned
}

// statementFlushSize is how many bytes of appended lines wait in memory before they are
// written without waiting for the timer.
const statementFlushSize = 64 << 10

// OpenStatementLog creates dir/statements/SESSION.log (dir is the audit log's
// directory; the statements directory is created 0700 if needed, the file 0600, and an
// existing file is an error) and writes and fsyncs its begin line. Open the log before
// writing the session.started record that names it.
func OpenStatementLog(dir string, begin StatementBegin, o StatementLogOptions) (*StatementLog, error) {
	if !validSessionID(begin.Session) {
		return nil, fmt.Errorf("open statement log: session id %q is not 1-128 letters, digits, '-' or '_'", begin.Session)
	}
	l := &StatementLog{now: o.Now, noSync: o.NoSync, every: o.SyncEvery, recordsText: begin.RecordsText, head: Genesis}
	if l.now == nil {
		l.now = time.Now
	}
	if l.every <= 0 {
		l.every = DefaultStatementSyncEvery
	}
	sdir := filepath.Join(dir, StatementsDir)
	if err := os.Mkdir(sdir, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
		return nil, fmt.Errorf("create statement log directory: %w", err)
	} else if err == nil && !l.noSync {
		if err := syncDir(dir); err != nil {
			return nil, fmt.Errorf("create statement log directory: %w", err)
		}
	}
	l.path = filepath.Join(dir, filepath.FromSlash(StatementLogName(begin.Session)))
	f, err := os.OpenFile(l.path, os.O_WRONLY|os.O_APPEND|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, fmt.Errorf("create statement log: %w", err)
	}
	l.f = f
	if begin.Time.IsZero() {
		begin.Time = l.now()
	}
	line, err := json.Marshal(begin.line())
	if err == nil {
		line = append(line, '\n')
		if len(line) > MaxStatementLineSize {
			err = errors.New("the begin record is too long")
		}
	}
	if err == nil {
		_, err = f.Write(line)
	}
	if err == nil && !l.noSync {
		if err = f.Sync(); err == nil {
			err = syncDir(sdir)
		}
	}
	if err != nil {
		// Nothing names the file yet and nothing chains onto it: it goes, so no torn
		// begin line is left to look like damage.
		f.Close()
		os.Remove(l.path)
		return nil, fmt.Errorf("write the begin line of statement log %s: %w", l.path, err)
	}
	l.head = lineHash(line)
	l.onDisk = Seal{Count: 0, Head: l.head}
	return l, nil
}

// Path returns the file the log writes to.
func (l *StatementLog) Path() string { return l.path }

// Append sets s.Seq and s.Prev (and s.Time when zero), drops s.Text unless the log
// records text (cutting it to MaxStatementText otherwise), and writes the line. It
// returns an error, writing nothing, for a record that is not well formed (unknown kind
// or status, a hash that is not 64 hex digits, recorded text whose SHA-256 is not the
// hash), and after the log broke or was closed.
func (l *StatementLog) Append(s Statement) error {
	if s.SHA256 == "" {
		sum := sha256.Sum256([]byte(s.Text))
		s.SHA256, s.Len = hex.EncodeToString(sum[:]), len(s.Text)
	}
	if err := checkStatement(&s); err != nil {
		return err
	}
	switch {
	case !l.recordsText || s.Text == "":
		s.Text, s.TextTruncated = "", false
	case len(s.Text) > s.Len:
		return errors.New("statement record: its text is longer than its len: set len to the length of the hashed text")
	case len(s.Text) < s.Len:
		s.TextTruncated = true // the caller kept only a prefix
	default:
		if sum := sha256.Sum256([]byte(s.Text)); hex.EncodeToString(sum[:]) != s.SHA256 {
			return errors.New("statement record: the SHA-256 of its text is not its sha256: hash the exact text recorded")
		}
		s.TextTruncated = false
	}
	if len(s.Text) > MaxStatementText {
		s.Text, s.TextTruncated = cutUTF8(s.Text, MaxStatementText), true
	}
	if !utf8.ValidString(s.Text) {
		// JSON holds only UTF-8 (a client_encoding such as LATIN1 sends other bytes): keep
		// the valid prefix, marked as cut, so the text is never altered under its hash.
		s.Text, s.TextTruncated = validPrefix(s.Text), true
	}
	if len(s.Tag) > MaxStatementTag {
		s.Tag = cutUTF8(s.Tag, MaxStatementTag)
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return fmt.Errorf("statement log %s is closed", l.path)
	}
	if l.err != nil {
		return l.err
	}
	if s.Time.IsZero() {
		s.Time = l.now()
	}
	s.Seq, s.Prev = l.seq+1, l.head
	start := len(l.pending)
	buf, err := appendStatementLine(l.pending, &s)
	if err != nil {
		return err
	}
	l.pending = buf
	l.seq, l.head = s.Seq, lineHash(buf[start:])
	if len(l.pending) >= statementFlushSize {
		if err := l.flushLocked(); err != nil {
			return err
		}
	}
	if !l.armed {
		l.armed = true
		if l.timer == nil {
			l.timer = time.AfterFunc(l.every, l.syncTick)
		} else {
			l.timer.Reset(l.every)
		}
	}
	return nil
}

// flushLocked writes the pending lines in one write(2). After a failure the log is
// broken, and what it says it holds goes back to the last line known to be on disk (a
// short write may have left part of a line after it, which the recovery names).
func (l *StatementLog) flushLocked() error {
	if len(l.pending) == 0 {
		return nil
	}
	if _, err := l.f.Write(l.pending); err != nil {
		l.err = fmt.Errorf("write statement log %s: %w", l.path, err)
		l.seq, l.head = l.onDisk.Count, l.onDisk.Head
		return l.err
	}
	l.onDisk = Seal{Count: l.seq, Head: l.head}
	l.dirty = true
	l.pending = l.pending[:0]
	if cap(l.pending) > 4*statementFlushSize {
		l.pending = nil // do not keep a huge buffer after one long statement
	}
	return nil
}

// syncTick is the timer: it writes the pending lines and fsyncs what was written, the
// fsync outside l.mu so Append does not wait for the disk.
func (l *StatementLog) syncTick() {
	l.syncMu.Lock()
	defer l.syncMu.Unlock()
	l.mu.Lock()
	l.armed = false
	if l.closed || l.err != nil {
		l.mu.Unlock()
		return
	}
	err := l.flushLocked()
	sync := err == nil && l.dirty && !l.noSync
	l.dirty = false // a write from now on needs the next fsync
	f := l.f
	l.mu.Unlock()
	if !sync {
		return
	}
	if err := f.Sync(); err != nil {
		l.mu.Lock()
		if l.err == nil {
			l.err = fmt.Errorf("fsync statement log %s: %w", l.path, err)
		}
		l.mu.Unlock()
	}
}

// Close fsyncs and closes the file and returns the seal to put into session.ended
// ([Seal.Put]). After a failure it returns the seal of the lines written before it,
// with the error. Close is idempotent.
func (l *StatementLog) Close() (Seal, error) {
	l.syncMu.Lock()
	defer l.syncMu.Unlock()
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return l.seal, l.err
	}
	l.closed = true
	if l.timer != nil {
		l.timer.Stop()
	}
	if l.err == nil {
		_ = l.flushLocked()
	}
	if !l.noSync && l.err == nil {
		if err := l.f.Sync(); err != nil {
			l.err = fmt.Errorf("fsync statement log %s: %w", l.path, err)
		}
	}
	if err := l.f.Close(); err != nil && l.err == nil {
		l.err = fmt.Errorf("close statement log %s: %w", l.path, err)
	}
	l.seal = Seal{Count: l.seq, Head: l.head}
	return l.seal, l.err
}

// validPrefix returns the longest prefix of s that is valid UTF-8.
func validPrefix(s string) string {
	for i := 0; i < len(s); {
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			return s[:i]
		}
		i += size
	}
	return s
}

// cutUTF8 returns the longest prefix of s of at most n bytes that does not split a
// UTF-8 sequence.
func cutUTF8(s string, n int) string {
	if len(s) <= n {
		return s
	}
	for i := n; i > n-utf8.UTFMax && i > 0; i-- {
		if utf8.RuneStart(s[i]) {
			return s[:i]
		}
	}
	return s[:n]
}

func checkStatement(s *Statement) error {
	switch s.Kind {
	case KindSimple, KindExtended, KindCopy, KindFunction:
	default:
		return fmt.Errorf("statement record: kind %q is not simple, extended, copy or function", s.Kind)
	}
	switch s.Status {
	case StatusOK, StatusError, StatusSkipped, StatusIncomplete:
	default:
		return fmt.Errorf("statement record: status %q is not ok, error, skipped or incomplete", s.Status)
	}
	if !isHash(s.SHA256) {
		return errors.New("statement record: sha256 is not 64 lowercase hex digits")
	}
	if s.Len < 0 || s.Rows < 0 || s.Duration < 0 {
		return errors.New("statement record: len, rows and duration cannot be negative")
	}
	return nil
}

func isHash(h string) bool {
	if len(h) != sha256.Size*2 {
		return false
	}
	for i := 0; i < len(h); i++ {
		if c := h[i]; !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return false
		}
	}
	return true
}

// beginLine is the JSON form of a begin line.
type beginLine struct {
	Type        string    `json:"type"`
	Seq         uint64    `json:"seq"`
	Time        time.Time `json:"time"`
	Session     string    `json:"session_id"`
	User        string    `json:"user,omitempty"`
	Identity    string    `json:"identity,omitempty"`
	Resource    string    `json:"resource,omitempty"`
	Agent       string    `json:"agent,omitempty"`
	DBUser      string    `json:"db_user,omitempty"`
	Database    string    `json:"database,omitempty"`
	RecordsText bool      `json:"records_text"`
	Prev        string    `json:"prev"`
}

// stmtLine is the JSON form of a statement line (and, with Extra, of a
// statements.recovered line).
type stmtLine struct {
	Type          string            `json:"type"`
	Seq           uint64            `json:"seq"`
	Time          time.Time         `json:"time"`
	Kind          string            `json:"kind,omitempty"`
	SHA256        string            `json:"sha256,omitempty"`
	Len           int               `json:"len"`
	Text          *string           `json:"text,omitempty"`
	TextTruncated bool              `json:"text_truncated,omitempty"`
	Tag           string            `json:"tag,omitempty"`
	Rows          int64             `json:"rows"`
	SQLState      string            `json:"sqlstate,omitempty"`
	Status        string            `json:"status,omitempty"`
	DurationUS    int64             `json:"duration_us"`
	Extra         map[string]string `json:"extra,omitempty"`
	Prev          string            `json:"prev"`
}

// appendStatementLine appends the statement's line, newline included, to buf. It
// writes the JSON of stmtLine by hand, field for field in the same order and with the
// same omissions as encoding/json would (reading it back uses encoding/json), because
// encoding a line is on the path of every statement's reply: this is a third of
// encoding/json's cost.
func appendStatementLine(buf []byte, s *Statement) ([]byte, error) {
	start := len(buf)
	buf = append(buf, `{"type":"statement","seq":`...)
	buf = strconv.AppendUint(buf, s.Seq, 10)
	buf = append(buf, `,"time":"`...)
	buf = s.Time.UTC().AppendFormat(buf, time.RFC3339Nano)
	buf = append(buf, '"')
	buf = appendJSONField(buf, "kind", s.Kind)
	buf = appendJSONField(buf, "sha256", s.SHA256)
	buf = append(buf, `,"len":`...)
	buf = strconv.AppendInt(buf, int64(s.Len), 10)
	if s.Text != "" {
		buf = append(buf, `,"text":`...)
		buf = appendJSONString(buf, s.Text)
	}
	if s.TextTruncated {
		buf = append(buf, `,"text_truncated":true`...)
	}
	buf = appendJSONField(buf, "tag", s.Tag)
	buf = append(buf, `,"rows":`...)
	buf = strconv.AppendInt(buf, s.Rows, 10)
	buf = appendJSONField(buf, "sqlstate", s.SQLState)
	buf = appendJSONField(buf, "status", s.Status)
	buf = append(buf, `,"duration_us":`...)
	buf = strconv.AppendInt(buf, s.Duration.Microseconds(), 10)
	buf = append(buf, `,"prev":`...)
	buf = appendJSONString(buf, s.Prev)
	buf = append(buf, "}\n"...)
	if n := len(buf) - start; n > MaxStatementLineSize {
		return buf[:start], fmt.Errorf("statement record is %d bytes, more than the %d-byte limit", n, MaxStatementLineSize)
	}
	return buf, nil
}

// appendJSONField appends ,"name":"value", or nothing when value is empty (omitempty).
func appendJSONField(buf []byte, name, value string) []byte {
	if value == "" {
		return buf
	}
	buf = append(append(append(buf, ',', '"'), name...), '"', ':')
	return appendJSONString(buf, value)
}

// appendJSONString appends s as a JSON string, escaped as encoding/json escapes it
// (quotes, backslashes, control characters, U+2028 and U+2029; invalid UTF-8 becomes
// U+FFFD), except that <, > and & are kept as they are: the line is read back by a JSON
// decoder, never embedded in HTML.
func appendJSONString(buf []byte, s string) []byte {
	const hexDigits = "0123456789abcdef"
	buf = append(buf, '"')
	start := 0
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			if c >= 0x20 && c != '"' && c != '\\' {
				i++
				continue
			}
			buf = append(buf, s[start:i]...)
			switch c {
			case '"', '\\':
				buf = append(buf, '\\', c)
			case '\n':
				buf = append(buf, '\\', 'n')
			case '\r':
				buf = append(buf, '\\', 'r')
			case '\t':
				buf = append(buf, '\\', 't')
			default:
				buf = append(buf, '\\', 'u', '0', '0', hexDigits[c>>4], hexDigits[c&0xf])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		switch {
		case r == utf8.RuneError && size == 1:
			buf = append(append(buf, s[start:i]...), `\ufffd`...)
		case r == '\u2028' || r == '\u2029':
			buf = append(append(buf, s[start:i]...), '\\', 'u', '2', '0', '2', hexDigits[r&0xf])
		default:
			i += size
			continue
		}
		i += size
		start = i
	}
	return append(append(buf, s[start:]...), '"')
}

// MarshalJSON writes the statement as its line in the log (without the newline).
func (s Statement) MarshalJSON() ([]byte, error) {
	b, err := appendStatementLine(nil, &s)
	if err != nil {
		return nil, err
	}
	return b[:len(b)-1], nil
}

// UnmarshalJSON reads a statement line.
func (s *Statement) UnmarshalJSON(b []byte) error {
	var r stmtLine
	if err := json.Unmarshal(b, &r); err != nil {
		return err
	}
	*s = r.statement()
	return nil
}

// MarshalJSON writes the begin record as its line in the log (without the newline).
func (b StatementBegin) MarshalJSON() ([]byte, error) {
	return json.Marshal(b.line())
}

// UnmarshalJSON reads a begin line.
func (b *StatementBegin) UnmarshalJSON(data []byte) error {
	var r beginLine
	if err := json.Unmarshal(data, &r); err != nil {
		return err
	}
	*b = r.begin()
	return nil
}

func (b StatementBegin) line() beginLine {
	return beginLine{Type: TypeStatementsBegin, Time: b.Time.UTC(), Session: b.Session,
		User: b.User, Identity: b.Identity, Resource: b.Resource, Agent: b.Agent,
		DBUser: b.DBUser, Database: b.Database, RecordsText: b.RecordsText, Prev: Genesis}
}

func (r beginLine) begin() StatementBegin {
	return StatementBegin{Session: r.Session, User: r.User, Identity: r.Identity, Resource: r.Resource,
		Agent: r.Agent, DBUser: r.DBUser, Database: r.Database, RecordsText: r.RecordsText, Time: r.Time}
}

func (r *stmtLine) statement() Statement {
	s := Statement{Seq: r.Seq, Time: r.Time, Kind: r.Kind, SHA256: r.SHA256, Len: r.Len,
		TextTruncated: r.TextTruncated, Tag: r.Tag, Rows: r.Rows, SQLState: r.SQLState, Status: r.Status,
		Duration: time.Duration(r.DurationUS) * time.Microsecond, Prev: r.Prev}
	if r.Text != nil {
		s.Text = *r.Text
	}
	return s
}

// StatementLogError says where a statement log is damaged and how. It wraps one of
// ErrMalformed, ErrModified, ErrDeleted, ErrReordered, ErrSeq, ErrSealMismatch,
// ErrMissingLog, ErrWrongSession.
type StatementLogError struct {
	// File is the statement log's path as given (relative to the audit log's directory
	// in [VerifyStatementLogs]'s results, e.g. "statements/ID.log").
	File string
	// Line is the 1-based line where the damage is found; 0 when it is about the whole file.
	Line int
	// Kind is the sentinel error for the kind of damage.
	Kind error
	// Detail is one sentence saying what is wrong.
	Detail string
}

// Error implements error.
func (e *StatementLogError) Error() string {
	if e.Line == 0 {
		return fmt.Sprintf("statement log %s: %s", e.File, e.Detail)
	}
	return fmt.Sprintf("statement log %s line %d: %s", e.File, e.Line, e.Detail)
}

// Unwrap returns the kind sentinel.
func (e *StatementLogError) Unwrap() error { return e.Kind }

// StatementLogInfo is what reading a statement log's chain found.
type StatementLogInfo struct {
	// Begin is the begin line.
	Begin StatementBegin
	// Statements counts the statement lines; Lines counts every complete line.
	Statements uint64
	Lines      int
	// Head is the hex SHA-256 of the last chained line; the log's seal is
	// {Statements, Head}.
	Head string
	// Recovered is true when the log ends with a statements.recovered line.
	Recovered bool
	// TornBytes is the length of an unterminated last line (a write cut by a crash), not
	// verified; 0 when the file ends with a newline.
	TornBytes int
	// SealedLine is the 1-based line of a torn line that the statements.recovered line
	// after it seals (evidence of a crash, not tampering); 0 if none.
	SealedLine int
}

// Seal returns the seal a writer closing the log here would have returned.
func (i StatementLogInfo) Seal() Seal { return Seal{Count: i.Statements, Head: i.Head} }

// statementScanner reads a statement log line by line and checks its chain.
type statementScanner struct {
	name    string // for errors
	session string // expected session id (from the file name); "" to skip the check
	in      *bufio.Reader
	info    StatementLogInfo
	seq     uint64
	stmt    Statement // the statement of the last next() that returned true

	hasPeek bool // peeked and peekErr hold the next readRaw result
	peeked  []byte
	peekErr error
}

func newStatementScanner(r io.Reader, name, session string) *statementScanner {
	return &statementScanner{name: name, session: session, in: bufio.NewReaderSize(r, 64<<10), info: StatementLogInfo{Head: Genesis}}
}

func (sc *statementScanner) fail(line int, kind error, format string, args ...any) error {
	return &StatementLogError{File: sc.name, Line: line, Kind: kind, Detail: fmt.Sprintf(format, args...)}
}

// errLineTooLong is readRaw's report of an overlong line; readLine names the line.
var errLineTooLong = errors.New("line too long")

// readRaw reads the next complete line (newline included), or nil at the end; a torn
// tail is noted in info and ends the input.
func (sc *statementScanner) readRaw() ([]byte, error) {
	var line []byte
	for {
		b, err := sc.in.ReadSlice('\n')
		if len(line)+len(b) > MaxStatementLineSize {
			return nil, errLineTooLong
		}
		switch {
		case err == nil:
			return append(line, b...), nil // append to nil copies
		case errors.Is(err, bufio.ErrBufferFull):
			line = append(line, b...)
		case errors.Is(err, io.EOF):
			sc.info.TornBytes = len(line) + len(b)
			return nil, nil
		default:
			return nil, fmt.Errorf("read statement log %s: %w", sc.name, err)
		}
	}
}

// readLine returns the next complete line and counts it in info.Lines.
func (sc *statementScanner) readLine() ([]byte, error) {
	line, err := sc.peeked, sc.peekErr
	if !sc.hasPeek {
		line, err = sc.readRaw()
	}
	sc.hasPeek, sc.peeked, sc.peekErr = false, nil, nil
	if errors.Is(err, errLineTooLong) {
		return nil, sc.fail(sc.info.Lines+1, ErrMalformed, "line is longer than %d bytes, which no writer produces", MaxStatementLineSize)
	}
	if line != nil {
		sc.info.Lines++
	}
	return line, err
}

// peek returns the line readLine returns next, without counting it.
func (sc *statementScanner) peek() []byte {
	if !sc.hasPeek {
		sc.peeked, sc.peekErr = sc.readRaw()
		sc.hasPeek = true
	}
	if sc.peekErr != nil {
		return nil
	}
	return sc.peeked
}

// sealedBy reports whether nxt is the statements.recovered line that seals line as a
// torn fragment: it chains onto the line before, and names line's exact bytes.
func (sc *statementScanner) sealedBy(line, nxt []byte) bool {
	if !bytes.Contains(nxt, []byte(TypeStatementsRecovered)) {
		return false
	}
	var r stmtLine
	if json.Unmarshal(nxt, &r) != nil || r.Type != TypeStatementsRecovered || r.Seq != sc.seq+1 || r.Prev != sc.info.Head {
		return false
	}
	frag := line[:len(line)-1]
	sum := sha256.Sum256(frag)
	return r.Extra["torn_bytes"] == strconv.Itoa(len(frag)) && r.Extra["torn_sha256"] == hex.EncodeToString(sum[:])
}

// begin reads and checks the begin line.
func (sc *statementScanner) begin() error {
	line, err := sc.readLine()
	if err != nil {
		return err
	}
	if line == nil {
		return sc.fail(1, ErrMalformed, "the file has no complete begin line (empty, or its first write was cut by a crash)")
	}
	var b beginLine
	if err := json.Unmarshal(line, &b); err != nil {
		return sc.fail(1, ErrMalformed, "the begin line is not valid JSON (edited or corrupted): %v", err)
	}
	switch {
	case b.Type != TypeStatementsBegin:
		return sc.fail(1, ErrMalformed, "the first line is a %q record, not statements.begin", b.Type)
	case b.Seq != 0:
		return sc.fail(1, ErrSeq, "the begin line has seq %d, not 0", b.Seq)
	case b.Prev != Genesis:
		return sc.fail(1, ErrModified, "the begin line's prev is not the genesis value: it was altered, or the file is not the start of a chain")
	case sc.session != "" && b.Session != sc.session:
		return sc.fail(1, ErrWrongSession, "the begin line names session %q but the file is named for session %q", b.Session, sc.session)
	}
	sc.info.Begin = b.begin()
	sc.info.Head = lineHash(line)
	return nil
}

// next reads and checks the next line; it returns false at the end of the log.
func (sc *statementScanner) next() (bool, error) {
	line, err := sc.readLine()
	if err != nil || line == nil {
		return false, err
	}
	no := sc.info.Lines
	if nxt := sc.peek(); !sc.info.Recovered && nxt != nil && sc.sealedBy(line, nxt) {
		sc.info.SealedLine = no
		if line, err = sc.readLine(); err != nil {
			return false, err
		}
		no = sc.info.Lines
	}
	if sc.info.Recovered {
		return false, sc.fail(no, ErrSealMismatch, "a line follows the statements.recovered line, which closes the log: it was appended afterwards")
	}
	var r stmtLine
	if err := json.Unmarshal(line, &r); err != nil {
		return false, sc.fail(no, ErrMalformed, "not a valid JSON statement record (edited or corrupted): %v", err)
	}
	if r.Type != TypeStatement && r.Type != TypeStatementsRecovered {
		return false, sc.fail(no, ErrMalformed, "a %q record where a statement belongs", r.Type)
	}
	linked := r.Prev == sc.info.Head
	switch {
	case r.Seq <= sc.seq:
		what := "goes back from"
		if r.Seq == sc.seq {
			what = "repeats"
		}
		return false, sc.fail(no, ErrReordered, "seq %d %s seq %d of line %d: a line was inserted, duplicated or moved", r.Seq, what, sc.seq, no-1)
	case r.Seq > sc.seq+1 && !linked:
		missing := fmt.Sprintf("statement %d is", sc.seq+1)
		if r.Seq-sc.seq > 2 {
			missing = fmt.Sprintf("statements %d to %d are", sc.seq+1, r.Seq-1)
		}
		return false, sc.fail(no, ErrDeleted, "seq jumps from %d to %d and the chain breaks here: %s missing, deleted before this line", sc.seq, r.Seq, missing)
	case r.Seq > sc.seq+1:
		return false, sc.fail(no, ErrSeq, "seq jumps from %d to %d although prev links to the line before: the seq field was altered", sc.seq, r.Seq)
	case !linked:
		return false, sc.fail(no, ErrModified, "prev does not match the SHA-256 of line %d although seq continues: line %d (or this line's prev) was modified", no-1, no-1)
	}
	if r.Type == TypeStatementsRecovered {
		sc.info.Recovered = true
	} else {
		s := r.statement()
		if err := checkStatement(&s); err != nil {
			return false, sc.fail(no, ErrMalformed, "%s", strings.TrimPrefix(err.Error(), "statement record: "))
		}
		if s.Text != "" && !s.TextTruncated {
			if sum := sha256.Sum256([]byte(s.Text)); hex.EncodeToString(sum[:]) != s.SHA256 || len(s.Text) != s.Len {
				return false, sc.fail(no, ErrModified, "the recorded text does not match the line's sha256 and len: the text or the hash was edited")
			}
		}
		sc.stmt = s
		sc.info.Statements++
	}
	sc.seq = r.Seq
	sc.info.Head = lineHash(line)
	return true, nil
}

// StatementReader reads a statement log one statement at a time, checking its chain as
// it goes, so a log of any size is read in constant memory:
//
//	r, err := audit.OpenStatementReader(path)
//	...
//	defer r.Close()
//	for r.Next() {
//		s := r.Statement()
//	}
//	if err := r.Err(); err != nil { ... }
type StatementReader struct {
	f   *os.File
	sc  *statementScanner
	err error
}

// OpenStatementReader opens the statement log at path and reads its begin line, which
// must name the session the file is named for. Damage is a *StatementLogError.
func OpenStatementReader(path string) (*StatementReader, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("read statement log: %w", err)
	}
	r := &StatementReader{f: f, sc: newStatementScanner(f, path, sessionOfFile(path))}
	if err := r.sc.begin(); err != nil {
		f.Close()
		return nil, err
	}
	return r, nil
}

// Begin returns the begin line.
func (r *StatementReader) Begin() StatementBegin { return r.sc.info.Begin }

// Next reads the next statement; it returns false at the end of the log and on damage
// (see Err).
func (r *StatementReader) Next() bool {
	if r.err != nil {
		return false
	}
	for {
		ok, err := r.sc.next()
		if err != nil || !ok {
			r.err = err
			return false
		}
		if !r.sc.info.Recovered {
			return true
		}
	}
}

// Statement returns the statement the last Next read.
func (r *StatementReader) Statement() Statement { return r.sc.stmt }

// Err returns the damage or I/O error that stopped Next, nil at a clean end.
func (r *StatementReader) Err() error { return r.err }

// Info says what was read so far; after Next returned false with no error, where the
// log ends (its seal, a torn tail, a recovery line).
func (r *StatementReader) Info() StatementLogInfo { return r.sc.info }

// Close closes the file.
func (r *StatementReader) Close() error { return r.f.Close() }

// ReadStatementLog reads the whole statement log at path with a [StatementReader]. On
// damage it returns what it read before it and a *StatementLogError; a torn last line
// is not an error (see [CheckStatementLog] to learn of it).
func ReadStatementLog(path string) (StatementBegin, []Statement, error) {
	r, err := OpenStatementReader(path)
	if err != nil {
		return StatementBegin{}, nil, err
	}
	defer r.Close()
	var out []Statement
	for r.Next() {
		out = append(out, r.Statement())
	}
	return r.Begin(), out, r.Err()
}

// CheckStatementLog verifies the chain of the statement log at path without keeping
// its statements, and says where it ends (its seal, a torn tail, a recovery line).
func CheckStatementLog(path string) (StatementLogInfo, error) {
	f, err := os.Open(path)
	if err != nil {
		return StatementLogInfo{Head: Genesis}, fmt.Errorf("read statement log: %w", err)
	}
	defer f.Close()
	return scanStatements(f, path, sessionOfFile(path))
}

func scanStatements(r io.Reader, name, session string) (StatementLogInfo, error) {
	sc := newStatementScanner(r, name, session)
	if err := sc.begin(); err != nil {
		return sc.info, err
	}
	for {
		ok, err := sc.next()
		if err != nil || !ok {
			return sc.info, err
		}
	}
}

// sessionOfFile is the session id a statement log's file name says, or "".
func sessionOfFile(path string) string {
	base := filepath.Base(path)
	id, ok := strings.CutSuffix(base, ".log")
	if !ok || !validSessionID(id) {
		return ""
	}
	return id
}

// RecoverStatementLog closes the statement log of a session that its writer left open
// (the gateway stopped without calling Close: killed, or lost power) and returns the
// seal for the session.ended record that ends the session. It verifies the chain and
// appends one statements.recovered line that chains onto the last complete line; a torn
// last line is first terminated with a newline and named in that line (extra
// torn_bytes and torn_sha256), so no byte is removed. The file is fsynced. dir is the
// audit log's directory. A log that already ends with a statements.recovered line is
// left as it is and its seal returned.
func RecoverStatementLog(dir, session string, now func() time.Time) (Seal, error) {
	if !validSessionID(session) {
		return Seal{}, fmt.Errorf("recover statement log: session id %q is not a valid file name", session)
	}
	if now == nil {
		now = time.Now
	}
	path := filepath.Join(dir, filepath.FromSlash(StatementLogName(session)))
	info, err := CheckStatementLog(path)
	if err != nil {
		return info.Seal(), err
	}
	if info.Recovered {
		return info.Seal(), nil
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		return info.Seal(), fmt.Errorf("recover statement log: %w", err)
	}
	defer f.Close()
	rec := stmtLine{Type: TypeStatementsRecovered, Seq: info.Statements + 1, Time: now().UTC(), Prev: info.Head,
		Extra: map[string]string{"reason": "the gateway stopped before the session ended; this line closes the log"}}
	var prefix []byte
	if info.TornBytes > 0 {
		torn := make([]byte, info.TornBytes)
		fi, err := f.Stat()
		if err != nil {
			return info.Seal(), fmt.Errorf("recover statement log %s: %w", path, err)
		}
		r, err := os.Open(path)
		if err != nil {
			return info.Seal(), fmt.Errorf("recover statement log: %w", err)
		}
		_, err = r.ReadAt(torn, fi.Size()-int64(info.TornBytes))
		r.Close()
		if err != nil {
			return info.Seal(), fmt.Errorf("recover statement log %s: %w", path, err)
		}
		sum := sha256.Sum256(torn)
		rec.Extra["torn_bytes"] = strconv.Itoa(len(torn))
		rec.Extra["torn_sha256"] = hex.EncodeToString(sum[:])
		prefix = []byte{'\n'}
	}
	b, err := json.Marshal(&rec)
	if err != nil {
		return info.Seal(), fmt.Errorf("recover statement log %s: %w", path, err)
	}
	line := append(b, '\n')
	if _, err := f.Write(append(prefix, line...)); err != nil {
		return info.Seal(), fmt.Errorf("recover statement log %s: %w", path, err)
	}
	if err := f.Sync(); err != nil {
		return info.Seal(), fmt.Errorf("recover statement log %s: fsync: %w", path, err)
	}
	return Seal{Count: info.Statements, Head: lineHash(line)}, nil
}

// StatementsResult is what [VerifyStatementLogs] found.
type StatementsResult struct {
	// Logs counts the statement log files read; Statements their statement lines.
	Logs       int
	Statements uint64
	// Sealed counts the logs whose session.ended seal matched.
	Sealed int
	// Unsealed lists the logs (relative paths) whose session has no session.ended
	// record yet: the session is still open, or the gateway stopped before it ended and
	// has not been restarted. They are checked as chains only: not tampering.
	Unsealed []string
	// Torn lists the unsealed logs that end with a line cut by a crash, and the logs
	// whose begin line a crash cut before any record named them (not tampering).
	Torn []string
	// Recovered lists the logs closed after a crash by [RecoverStatementLog].
	Recovered []string
	// Unnamed lists the logs that no session.started record names (a session whose
	// start could not be recorded, so it was refused). Their chains are checked.
	Unnamed []string
	// Problems lists every damage found, in file order; VerifyStatementLogs returns the
	// first one as its error.
	Problems []*StatementLogError
}

// sessionSeal is what the main log says about one session's statement log.
type sessionSeal struct {
	named     string // statements_log of session.started
	startLine int
	seal      Seal
	sealed    bool
	endLine   int
}

// VerifyStatementLogs checks every statements/*.log next to the audit log at auditPath:
// each chain, each against the seal of its session.ended record in the main log (count
// and head), and that every statement log named by a session.started or sealed by a
// session.ended exists. It reads the main log for these records only; checking the main
// log's own chain is [VerifyFile]'s job. Damage is listed in the result's Problems and
// the first one is returned as a *StatementLogError; other errors are I/O errors.
func VerifyStatementLogs(auditPath string) (StatementsResult, error) {
	var res StatementsResult
	sessions, err := scanSessionSeals(auditPath)
	if err != nil {
		return res, err
	}
	dir := filepath.Dir(auditPath)
	entries, err := os.ReadDir(filepath.Join(dir, StatementsDir))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return res, fmt.Errorf("verify statement logs: %w", err)
	}
	seen := map[string]bool{}
	for _, e := range entries {
		id, ok := strings.CutSuffix(e.Name(), ".log")
		if !ok || !e.Type().IsRegular() {
			continue
		}
		rel := StatementsDir + "/" + e.Name()
		res.Logs++
		if !validSessionID(id) {
			res.Problems = append(res.Problems, &StatementLogError{File: rel, Kind: ErrWrongSession,
				Detail: "the file name is not a session id, so no session can have written it"})
			continue
		}
		seen[id] = true
		f, err := os.Open(filepath.Join(dir, StatementsDir, e.Name()))
		if err != nil {
			return res, fmt.Errorf("verify statement logs: %w", err)
		}
		info, err := scanStatements(f, rel, id)
		f.Close()
		res.Statements += info.Statements
		s, known := sessions[id]
		var le *StatementLogError
		switch {
		case errors.As(err, &le) && info.Lines == 0 && (!known || s.named == "" && !s.sealed):
			// A gateway killed while it created the log, before any record named it:
			// the session never started.
			res.Unnamed = append(res.Unnamed, rel)
			res.Torn = append(res.Torn, rel)
			continue
		case le != nil:
			res.Problems = append(res.Problems, le)
			continue
		case err != nil:
			return res, err
		}
		if !known || s.named == "" {
			res.Unnamed = append(res.Unnamed, rel)
		}
		if info.Recovered {
			res.Recovered = append(res.Recovered, rel)
		}
		if !known || !s.sealed {
			res.Unsealed = append(res.Unsealed, rel)
			if info.TornBytes > 0 {
				res.Torn = append(res.Torn, rel)
			}
			continue
		}
		if p := checkSeal(rel, info, s); p != nil {
			res.Problems = append(res.Problems, p)
			continue
		}
		res.Sealed++
	}
	ids := make([]string, 0, len(sessions))
	for id := range sessions {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	for _, id := range ids {
		s := sessions[id]
		want := StatementLogName(id)
		if s.named != "" && s.named != want {
			res.Problems = append(res.Problems, &StatementLogError{File: s.named, Kind: ErrWrongSession, Detail: fmt.Sprintf(
				"the session.started record of session %s on audit log line %d names this statement log, but a session's log is %s", id, s.startLine, want)})
			continue
		}
		if seen[id] {
			continue
		}
		switch {
		case s.sealed:
			res.Problems = append(res.Problems, &StatementLogError{File: want, Kind: ErrMissingLog, Detail: fmt.Sprintf(
				"the session.ended record on audit log line %d seals %d statements in this file, but it does not exist: it was deleted or moved", s.endLine, s.seal.Count)})
		case s.named != "":
			res.Problems = append(res.Problems, &StatementLogError{File: want, Kind: ErrMissingLog, Detail: fmt.Sprintf(
				"the session.started record on audit log line %d names this file, but it does not exist: it was deleted or moved", s.startLine)})
		}
	}
	if len(res.Problems) > 0 {
		return res, res.Problems[0]
	}
	return res, nil
}

// checkSeal compares a verified log with its session's seal.
func checkSeal(rel string, info StatementLogInfo, s sessionSeal) *StatementLogError {
	fail := func(line int, format string, args ...any) *StatementLogError {
		return &StatementLogError{File: rel, Line: line, Kind: ErrSealMismatch, Detail: fmt.Sprintf(format, args...)}
	}
	if info.TornBytes > 0 {
		return fail(info.Lines+1, "the file ends with %d bytes after its last complete line, but the session.ended record on audit log line %d sealed it: they were appended after the session ended", info.TornBytes, s.endLine)
	}
	switch {
	case info.Statements < s.seal.Count:
		return fail(info.Lines, "the file has %d statements but the session.ended record on audit log line %d sealed %d: statements were cut off the end", info.Statements, s.endLine, s.seal.Count)
	case info.Statements > s.seal.Count:
		return fail(int(s.seal.Count)+2, "the file has %d statements but the session.ended record on audit log line %d sealed %d: lines from here on were appended after the session ended", info.Statements, s.endLine, s.seal.Count)
	case info.Head != s.seal.Head:
		return fail(info.Lines, "the last line's SHA-256 is not the head sealed by the session.ended record on audit log line %d: it was modified or replaced after the session ended", s.endLine)
	}
	return nil
}

// scanSessionSeals reads the session.started and session.ended records of the main log
// that mention a statement log. Lines without the word "statements" are skipped before
// decoding, so scanning a large log costs little more than reading it.
func scanSessionSeals(auditPath string) (map[string]sessionSeal, error) {
	out := map[string]sessionSeal{}
	err := EachLine(auditPath, []byte(`"statements`), func(no int, line []byte) error {
		var rec chainFields
		var id struct {
			SessionID string `json:"session_id"`
		}
		if json.Unmarshal(line, &rec) != nil || json.Unmarshal(line, &id) != nil || id.SessionID == "" {
			return nil
		}
		s := out[id.SessionID]
		switch rec.Type {
		case TypeSessionStarted:
			if name, ok := rec.Extra[ExtraStatementsLog]; ok {
				s.named, s.startLine = name, no
			}
		case TypeSessionEnded:
			if seal, ok := sealOf(rec.Extra); ok {
				s.seal, s.sealed, s.endLine = seal, true, no
			}
		default:
			return nil
		}
		out[id.SessionID] = s
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("verify statement logs: %w", err)
	}
	return out, nil
}

// EachLine calls fn with every line (newline included) of the audit log at path that
// contains needle, and its line number from 1, reading the file once in constant memory;
// a line longer than MaxRecordSize is no record and is passed over. The line is valid
// only during the call. An error of fn ends the scan and is returned.
func EachLine(path string, needle []byte, fn func(no int, line []byte) error) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("read audit log: %w", err)
	}
	defer f.Close()
	in := bufio.NewReaderSize(f, MaxRecordSize+1)
	for no := 1; ; no++ {
		line, err := in.ReadSlice('\n')
		for errors.Is(err, bufio.ErrBufferFull) { // an overlong line: not a record
			_, err = in.ReadSlice('\n')
			line = nil
		}
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("read audit log %s: %w", path, err)
		}
		if !bytes.Contains(line, needle) {
			continue
		}
		if err := fn(no, line); err != nil {
			return err
		}
	}
}
