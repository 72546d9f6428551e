// Package audit writes and verifies Wicket's tamper-evident audit log.
//
// The log is an append-only file of JSON lines, one [Record] per line. Every
// record carries a sequence number and, in "prev", the hex SHA-256 of the exact
// bytes of the previous line including its terminating newline (the first
// record's prev is [Genesis]). A line can therefore be checked by hand:
//
//	sed -n 41p audit.log | sha256sum    # must equal the prev of line 42
//
// Editing, deleting, duplicating or reordering any line before the last one
// breaks the chain, and [Verify] names the first line where it breaks and what
// kind of damage it is.
//
// # What the chain does not prove
//
// The chain is a hash chain, not a signature: whoever can write the file can
// also append well-formed records, or cut records off the end (or edit the
// last line) and leave a shorter chain that still verifies. To make truncation
// detectable, anchor the head somewhere the gateway host cannot rewrite:
// [Log.Head] and [VerifyResult] give the newest sequence number and line hash,
// an [Anchor], and [VerifyFileAnchored] checks a file against anchors kept
// elsewhere (for example the "audit anchor" lines the gateway logs, shipped to
// a log collector): a record cut off the end is [ErrTruncated], a log rewritten
// with a recomputed chain [ErrRewritten].
//
// # Durability
//
// Each record is written with a single write(2) on a file opened O_APPEND and,
// by default, fsync'ed before [Log.Write] returns, so a record Write
// acknowledged survives a crash or power loss. Concurrent writers share
// fsyncs (group commit): a writer waits for one fsync that started after its
// own write, and one fsync covers every record written before it began.
// Measured on the project's development VM (ext4 on a virtio disk, 2 vCPU
// shared with other builds, so the figures move with the load: ranges over
// several runs on 2026-11-25; Go 1.26):
//
//	go test -run '^$' -bench BenchmarkWrite -benchtime 2000x -count 3 ./gateway/audit/
//	BenchmarkWrite/fsync            0.30-0.81 ms/op   one writer, one fsync per record
//	BenchmarkWrite/nosync           6-17 µs/op
//	BenchmarkWriteParallel/fsync    0.10-0.15 ms/op   16 writers sharing fsyncs
//	BenchmarkWriteParallel/nosync   7-15 µs/op
//
// So durability costs about 50x for a lone writer, which can audit some
// 1,200-3,300 records per second; with many streams opening and closing at
// once (the case that matters), group commit brings that to 6,500-10,000
// per second. Verifying
// reads 50,000-100,000 records per second (BenchmarkVerify: 0.1-0.2 s for
// 10,000 records). [Options.NoSync] turns the fsync off for tests and
// benchmarks only.
//
// # Crash recovery: torn tails are sealed, never deleted
//
// A crash in the middle of a write can leave a "torn" last line: bytes after
// the last newline. [Open] never chains a new record onto such a fragment and
// never deletes it. Instead it terminates the fragment with a newline and, in
// the same write, appends a [TypeLogRecovered] record that chains onto the
// last complete record and names the fragment's length and SHA-256 (extra
// keys "torn_bytes" and "torn_sha256"). [Verify] accepts a line only as such a
// sealed fragment when the record right after it names exactly its bytes.
//
// Why seal rather than truncate or refuse: an auditor wants no byte removed
// from an audit log, not even garbage, and wants the gateway to come back
// after a power cut without a human editing the file. Sealing keeps the file
// strictly append-only (it works under `chattr +a`), keeps the evidence in
// place, and records in the chain itself when and how much was recovered. A
// truncation would destroy evidence; refusing would turn every power cut into
// an outage. Anything a crash cannot produce (a last complete line that is not
// a record, or an unterminated tail longer than a record can be) makes Open
// refuse with an error instead, because silently sealing it could launder an
// edit into a "recovery".
//
// # What this package must not do
//
// It must never write payloads (bytes relayed between a user and a resource),
// tokens, keys or passwords: [Record] has no field for them, and callers must
// not smuggle them into [Record.Extra] or [Record.Reason]. It never rewrites
// or truncates the file, and it knows nothing about the gateway that uses it.
package audit

import (
	"bytes"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"
)

// Genesis is the prev value of the first record of a log: 64 hex zeros, so
// that every record, the first included, has a prev of the same shape.
const Genesis = "0000000000000000000000000000000000000000000000000000000000000000"

// MaxRecordSize is the largest line, newline included, that [Log.Write]
// writes and that [Verify] accepts. Real records are a few hundred bytes; the
// cap keeps a corrupted or hostile file from making Verify or Open buffer an
// unbounded line.
const MaxRecordSize = 64 << 10

// Record types. The set is stable: tools that read the log match on these
// strings, so a type is never renamed or reused for another meaning.
const (
	// TypeTokenCreated: a one-time bootstrap token was minted (never the token itself).
	TypeTokenCreated = "token.created"
	// TypeAgentEnrolled: an agent redeemed a token and received its first certificate.
	TypeAgentEnrolled = "agent.enrolled"
	// TypeUserEnrolled: a user redeemed a token (`wicket login`) and received a certificate.
	TypeUserEnrolled = "user.enrolled"
	// TypeCertIssued: the CA issued a certificate outside enrollment and renewal (e.g. ACME, the gateway's own).
	TypeCertIssued = "cert.issued"
	// TypeCertRenewed: a certificate was renewed.
	TypeCertRenewed = "cert.renewed"
	// TypeCertRevoked: a certificate was revoked; Serial names it.
	TypeCertRevoked = "cert.revoked"
	// TypeAgentConnected: an agent session was established.
	TypeAgentConnected = "agent.connected"
	// TypeAgentDisconnected: an agent session ended; Reason says why.
	TypeAgentDisconnected = "agent.disconnected"
	// TypeAgentUpdated: a connected agent changed the resources it exposes
	// (a later Hello on a new control stream).
	TypeAgentUpdated = "agent.updated"
	// TypeUserConnected: a user's client session was established.
	TypeUserConnected = "user.connected"
	// TypeUserDisconnected: a user's client session ended.
	TypeUserDisconnected = "user.disconnected"
	// TypeSessionStarted: a stream from a user to a resource was opened.
	TypeSessionStarted = "session.started"
	// TypeSessionEnded: such a stream ended; bytes and duration are set.
	TypeSessionEnded = "session.ended"
	// TypeSessionDenied: a stream was refused (policy, unknown resource, agent refusal, dial failure).
	TypeSessionDenied = "session.denied"
	// TypeTLSRefused: a TLS handshake on the gateway port was refused (version, unknown CA, expired, revoked, wrong role).
	TypeTLSRefused = "tls.refused"
	// TypePolicyReloaded: the policy file changed; Outcome says whether the new policy was applied.
	TypePolicyReloaded = "policy.reloaded"
	// TypeAdminRequest: a state-changing request arrived on the admin socket.
	TypeAdminRequest = "admin.request"
	// TypeAdminDenied: a request on the admin socket was refused.
	TypeAdminDenied = "admin.denied"
	// TypeGatewayStarted: the gateway started serving.
	TypeGatewayStarted = "gateway.started"
	// TypeGatewayStopped: the gateway stopped serving.
	TypeGatewayStopped = "gateway.stopped"
	// TypeACMEBind: an agent opened an ACME validation connection (ALPN wicket-acme/1);
	// Outcome says whether it was bound to its ACME account.
	TypeACMEBind = "acme.bind"
	// TypeLogRecovered: written by [Open] to seal a torn last line; see the package doc.
	TypeLogRecovered = "log.recovered"
)

// Outcome values for [Record.Outcome].
const (
	OutcomeOK     = "ok"     // the action happened
	OutcomeDenied = "denied" // refused by policy or authentication
	OutcomeError  = "error"  // failed for an operational reason
)

// Record is one audit event. Fields with omitempty are absent when zero, so
// a missing bytes_up means zero bytes. No field may hold payload data or a
// secret (token, key, password).
type Record struct {
	// Time of the event, UTC. Write fills it from the log's clock when zero.
	Time time.Time `json:"time"`
	// Seq is the record's position in the log, from 1, without gaps. Set by Write.
	Seq uint64 `json:"seq"`
	// Type is one of the Type* constants. Required.
	Type string `json:"type"`
	// Agent is the agent name involved, if any.
	Agent string `json:"agent,omitempty"`
	// User is the user name involved, if any.
	User string `json:"user,omitempty"`
	// Identity is the full SPIFFE ID of the peer, when known.
	Identity string `json:"identity,omitempty"`
	// Resource is the resource name involved, if any.
	Resource string `json:"resource,omitempty"`
	// SessionID ties the records of one stream or session together.
	SessionID string `json:"session_id,omitempty"`
	// Remote is the peer's network address.
	Remote string `json:"remote,omitempty"`
	// TLSVersion is the negotiated TLS version name, e.g. "TLS 1.3".
	TLSVersion string `json:"tls_version,omitempty"`
	// Cipher is the negotiated cipher suite name.
	Cipher string `json:"cipher,omitempty"`
	// BytesUp counts bytes from the user toward the resource.
	BytesUp int64 `json:"bytes_up,omitempty"`
	// BytesDown counts bytes from the resource toward the user.
	BytesDown int64 `json:"bytes_down,omitempty"`
	// DurationMS is how long the session or stream lasted, in milliseconds.
	DurationMS int64 `json:"duration_ms,omitempty"`
	// Outcome is one of the Outcome* constants.
	Outcome string `json:"outcome,omitempty"`
	// Reason says why, in one sentence, for denials, errors and disconnects.
	Reason string `json:"reason,omitempty"`
	// Serial is a certificate serial number (decimal) when a certificate is involved.
	Serial string `json:"serial,omitempty"`
	// Extra holds further small key/value facts; never payloads or secrets.
	Extra map[string]string `json:"extra,omitempty"`
	// Prev is the hex SHA-256 of the previous line (newline included), or Genesis. Set by Write.
	Prev string `json:"prev"`
}

// SetTLS fills TLSVersion and Cipher from a connection state.
func (r *Record) SetTLS(cs tls.ConnectionState) {
	if cs.Version != 0 {
		r.TLSVersion = tls.VersionName(cs.Version)
	}
	if cs.CipherSuite != 0 {
		r.Cipher = tls.CipherSuiteName(cs.CipherSuite)
	}
}

// Options tune [OpenWithOptions]. The zero value is the production setting.
type Options struct {
	// Now is the clock used for records whose Time is zero. Default time.Now.
	Now func() time.Time
	// NoSync skips the fsync after each record. Default false (fsync every
	// record). Only for tests and benchmarks: with NoSync a crash can lose
	// records that Write already acknowledged.
	NoSync bool
}

// Log appends records to an audit file. It is safe for concurrent use; the
// chain order is the order in which Write calls take the internal lock.
//
// Concurrent writers share fsyncs (group commit): a record is written under
// mu, then its writer waits on syncMu for an fsync that started after its
// write returned. While one fsync runs, later records are written and the
// next fsync covers all of them, so the durability promise of Write holds
// while the per-record fsync cost is divided among the waiting writers.
// Lock order: syncMu before mu.
type Log struct {
	path   string
	now    func() time.Time
	noSync bool

	syncMu sync.Mutex // serialises fsyncs; guards synced
	synced uint64     // every record up to this seq is on disk

	mu     sync.Mutex
	f      *os.File
	seq    uint64 // seq of the last record written to the file, 0 if none
	head   string // hex SHA-256 of the last line, or Genesis
	broken error  // sticky: set when a write or fsync failed
	closed bool
}

// Open opens or creates the audit log at path with the production options
// (fsync per record). now may be nil for time.Now. See [OpenWithOptions].
func Open(path string, now func() time.Time) (*Log, error) {
	return OpenWithOptions(path, Options{Now: now})
}

// OpenWithOptions opens or creates the audit log at path, mode 0600 (an
// existing file with wider permissions is tightened to 0600), takes an
// exclusive lock on it so a second writer cannot fork the chain, and resumes
// the chain from the last complete line. A torn last line is sealed as the
// package doc describes; a tail that a crash cannot explain is refused with
// an error that says what to do. Open reads only the tail, so opening a large
// log is fast; it does not check the older chain, which is Verify's job.
func OpenWithOptions(path string, opts Options) (*Log, error) {
	now := opts.Now
	if now == nil {
		now = time.Now
	}
	_, statErr := os.Stat(path)
	created := errors.Is(statErr, os.ErrNotExist)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open audit log %s: %w", path, err)
	}
	l := &Log{path: path, now: now, noSync: opts.NoSync, f: f, head: Genesis}
	if err := l.init(created); err != nil {
		f.Close()
		return nil, err
	}
	return l, nil
}

func (l *Log) init(created bool) error {
	if err := lockFile(l.f); err != nil {
		return fmt.Errorf("audit log %s: %w", l.path, err)
	}
	fi, err := l.f.Stat()
	if err != nil {
		return fmt.Errorf("audit log %s: %w", l.path, err)
	}
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("audit log %s is not a regular file", l.path)
	}
	if fi.Mode().Perm() != 0o600 {
		if err := l.f.Chmod(0o600); err != nil {
			return fmt.Errorf("audit log %s: set mode 0600: %w", l.path, err)
		}
	}
	if created {
		// The new name must survive a crash too, or the first records vanish with it.
		if err := syncDir(filepath.Dir(l.path)); err != nil {
			return fmt.Errorf("audit log %s: %w", l.path, err)
		}
	}
	return l.resume(fi.Size())
}

// resume reads the tail of the file to restore seq and head, sealing a torn
// fragment if there is one.
func (l *Log) resume(size int64) error {
	if size == 0 {
		return nil
	}
	window := int64(2*MaxRecordSize + 2)
	from := max(size-window, 0)
	buf := make([]byte, size-from)
	if _, err := l.f.ReadAt(buf, from); err != nil && !errors.Is(err, io.EOF) {
		return fmt.Errorf("read audit log %s: %w", l.path, err)
	}
	lastNL := bytes.LastIndexByte(buf, '\n')
	fragment := buf[lastNL+1:]
	if len(fragment) > MaxRecordSize || (lastNL < 0 && from > 0) {
		return fmt.Errorf("audit log %s ends with more than %d bytes that are not a complete line, which no interrupted write produces: run `wicket audit verify %s`, keep the file as evidence and move it aside to start a new log", l.path, MaxRecordSize, l.path)
	}
	if lastNL >= 0 {
		prevNL := bytes.LastIndexByte(buf[:lastNL], '\n')
		if prevNL < 0 && from > 0 {
			return fmt.Errorf("audit log %s: the last complete line is longer than %d bytes, so it is not a record this package wrote: run `wicket audit verify %s`, keep the file as evidence and move it aside to start a new log", l.path, MaxRecordSize, l.path)
		}
		line := buf[prevNL+1 : lastNL+1]
		var rec Record
		if err := json.Unmarshal(line, &rec); err != nil || rec.Seq == 0 || rec.Type == "" {
			n, cerr := l.countLines(from + int64(lastNL))
			where := "the last complete line"
			if cerr == nil {
				where = fmt.Sprintf("line %d (the last complete line)", n)
			}
			return fmt.Errorf("audit log %s: %s is not a valid audit record, which an interrupted write cannot cause: run `wicket audit verify %s`, keep the file as evidence and move it aside to start a new log", l.path, where, l.path)
		}
		l.seq = rec.Seq
		l.head = lineHash(line)
	}
	if len(fragment) == 0 {
		return nil
	}
	sum := sha256.Sum256(fragment)
	rec := Record{
		Type:    TypeLogRecovered,
		Outcome: OutcomeOK,
		Reason:  "sealed a torn last line left by an interrupted write; its bytes stay in the file just above this record",
		Extra: map[string]string{
			"torn_bytes":  strconv.Itoa(len(fragment)),
			"torn_sha256": hex.EncodeToString(sum[:]),
		},
	}
	// The newline that terminates the fragment and the record go out in one
	// write, so the file never holds a terminated fragment without its seal.
	if err := l.append([]byte{'\n'}, rec); err != nil {
		return fmt.Errorf("seal torn tail of audit log %s: %w", l.path, err)
	}
	if err := l.f.Sync(); err != nil {
		return fmt.Errorf("seal torn tail of audit log %s: fsync: %w", l.path, err)
	}
	l.synced = l.seq
	return nil
}

// countLines counts newlines in the first n+1 bytes; only used to name a line in an error.
func (l *Log) countLines(upto int64) (int, error) {
	r := io.NewSectionReader(l.f, 0, upto+1)
	buf := make([]byte, 64<<10)
	n := 0
	for {
		k, err := r.Read(buf)
		n += bytes.Count(buf[:k], []byte{'\n'})
		if errors.Is(err, io.EOF) {
			return n, nil
		}
		if err != nil {
			return 0, err
		}
	}
}

// Write appends r to the log. It sets r.Seq and r.Prev, and r.Time when it is
// zero (always stored in UTC). With the default options the record is on disk
// when Write returns nil. After a failed write the file may end in a partial
// line, so the Log refuses further writes (ErrBroken); reopening it with
// [Open] seals the partial line and continues the chain.
func (l *Log) Write(r Record) error {
	if r.Type == "" {
		return errors.New("audit record has no type")
	}
	if r.Type == TypeLogRecovered {
		// Reserved for Open: Verify treats the line before a log.recovered
		// record specially, so no caller may write one.
		return errors.New("audit record type log.recovered is reserved for crash recovery")
	}
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return ErrClosed
	}
	if l.broken != nil {
		l.mu.Unlock()
		return fmt.Errorf("%w: %w", ErrBroken, l.broken)
	}
	err := l.append(nil, r)
	seq := l.seq
	l.mu.Unlock()
	if err != nil || l.noSync {
		return err
	}
	return l.syncThrough(seq)
}

// syncThrough returns once every record up to seq is on disk, running an
// fsync itself unless one that covers seq already completed.
func (l *Log) syncThrough(seq uint64) error {
	l.syncMu.Lock()
	defer l.syncMu.Unlock()
	if l.synced >= seq {
		return nil // a writer that queued earlier fsynced our record too
	}
	l.mu.Lock()
	if l.broken != nil {
		l.mu.Unlock()
		return fmt.Errorf("%w: %w", ErrBroken, l.broken)
	}
	// Every record up to target has been written (write(2) returned), so
	// the fsync below makes all of them durable.
	target := l.seq
	l.mu.Unlock()
	if err := l.f.Sync(); err != nil {
		// After a failed fsync the kernel may have dropped the dirty pages:
		// nothing written since the last good fsync can be trusted.
		l.mu.Lock()
		l.broken = err
		l.mu.Unlock()
		return fmt.Errorf("fsync audit log %s: %w", l.path, err)
	}
	l.synced = target
	return nil
}

// append encodes r after the current head and writes prefix+line in one
// write, without fsync. Callers hold l.mu (or own l exclusively, as in Open).
func (l *Log) append(prefix []byte, r Record) error {
	if r.Time.IsZero() {
		r.Time = l.now()
	}
	r.Time = r.Time.UTC()
	r.Seq = l.seq + 1
	r.Prev = l.head
	line, err := json.Marshal(r)
	if err != nil {
		return fmt.Errorf("encode audit record %s: %w", r.Type, err)
	}
	line = append(line, '\n')
	if len(line) > MaxRecordSize {
		return fmt.Errorf("audit record %s is %d bytes, more than the %d-byte limit: shorten its reason or extra fields", r.Type, len(line), MaxRecordSize)
	}
	buf := line
	if len(prefix) > 0 {
		buf = append(append(make([]byte, 0, len(prefix)+len(line)), prefix...), line...)
	}
	if _, err := l.f.Write(buf); err != nil {
		// Part of the line may be in the file: nothing may chain onto it.
		l.broken = err
		return fmt.Errorf("write audit log %s: %w", l.path, err)
	}
	l.seq = r.Seq
	l.head = lineHash(line)
	return nil
}

// Head returns the seq and line hash of the newest record written (0 and
// Genesis for an empty log). Anchoring these outside the host makes truncation of the log
// detectable; see the package doc.
func (l *Log) Head() (seq uint64, hash string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.seq, l.head
}

// Path returns the file the log writes to.
func (l *Log) Path() string { return l.path }

// Close fsyncs what was written, releases the lock and closes the file.
// Writes after Close fail with ErrClosed. Close is idempotent.
func (l *Log) Close() error {
	l.syncMu.Lock()
	defer l.syncMu.Unlock()
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return nil
	}
	l.closed = true
	var syncErr error
	if !l.noSync && l.broken == nil && l.synced < l.seq {
		// A writer between its write and its fsync finds synced >= its seq
		// once Close returns, so this fsync is the one it waits for.
		if syncErr = l.f.Sync(); syncErr == nil {
			l.synced = l.seq
		} else {
			l.broken = syncErr
		}
	}
	if err := l.f.Close(); err != nil {
		return fmt.Errorf("close audit log %s: %w", l.path, err)
	}
	if syncErr != nil {
		return fmt.Errorf("fsync audit log %s: %w", l.path, syncErr)
	}
	return nil
}

// lineHash is the chain function: hex SHA-256 of a line's exact bytes,
// newline included.
func lineHash(line []byte) string {
	sum := sha256.Sum256(line)
	return hex.EncodeToString(sum[:])
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("open directory %s: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("fsync directory %s: %w", dir, err)
	}
	return nil
}
