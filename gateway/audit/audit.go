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
// # What happens when the log cannot be written
//
// Audit is part of access: an access that leaves no record must not be granted.
// A write or fsync that fails (a full disk, an I/O error, a file system remounted
// read-only) begins an outage, and until it ends:
//
//   - [Log.Write], [Log.WriteAccess] and [Log.Admit] write nothing and return an error
//     wrapping [ErrUnavailable] at once. The gateway writes the record of every
//     access-creating event (a token minted, an enrollment, a renewal, a new user
//     session) with WriteAccess, or asks Admit before an action that is costly to undo,
//     and refuses the event when either fails; [Log.Health] tells /readyz and the
//     metrics.
//   - Records of other events (a session ended, a refused handshake, an agent that
//     disconnected) cannot be written either. Those events have happened, or cannot be
//     refused (refusing to end a session would not undo it), so their records are
//     lost: the Log counts them, by type, rather than keeping them in memory.
//   - Every [Options.RetryInterval] (1 s) the Log reopens its file by path, seals what
//     a failed write left of a line exactly as Open seals a torn tail after a crash (no
//     byte that reached the file is removed), and writes a [TypeLogGap] record: the
//     first and the last failure, the error, how many access-creating events were
//     refused and how many other records lost, by type, and, if an fsync failed, which
//     records are in the file although their writers were told they were not written.
//     The outage ends when that record is on disk.
//
// On Linux the Log reserves room for each line before writing it (fallocate(2), which
// keeps the file size), so a full disk refuses a record whole instead of cutting it
// short; where a file system cannot reserve, the cut line is sealed on reopen.
//
// The trade-offs, chosen for an auditor rather than for uptime:
//
//   - A full disk stops new access (tokens, logins, enrollments, renewals, new
//     sessions) until it has room again. Sessions already running are not cut: their
//     start is on record, and cutting them would lose users' work without adding
//     evidence; what the log loses meanwhile (their ends, disconnects, refused
//     handshakes) is counted in the log.gap record.
//   - Lost records are counted, not buffered: a buffer would need a bound, would vanish
//     in a crash all the same, and would put on record, later and out of order,
//     events whose times the chain could not vouch for when they happened.
//   - The file is reopened, never created again: a log that was deleted or moved
//     away is not replaced by a new chain behind the operator's back, and the outage
//     lasts until the gateway is restarted.
//   - A reopen drops the file's lock for an instant (a lock belongs to a descriptor);
//     a second gateway on the same data directory could take it only by starting in
//     that instant, and it would then resume the same chain, so the chain stays whole.
//   - A Log closed during an outage returns an error with the counts, because no
//     log.gap record can state them; the next start finds no gateway.stopped record
//     and says so ([ScanLastRun]).
//
// # Statement logs
//
// A database session can run thousands of statements a second, more than audit.log,
// fsync'ed per record, should carry. So each such session keeps its own hash-chained
// statement log, statements/SESSION_ID.log next to audit.log (directory 0700, file
// 0600, created by [OpenStatementLog], never overwritten), and the main log ties it in:
//
//   - the session's session.started record names the file in Extra
//     "statements_log" ([StatementLogName]: "statements/SESSION_ID.log", relative to
//     audit.log's directory; the log is created before that record is written);
//   - its session.ended record carries the seal ([Seal.Put]): Extra "statements", the
//     number of statement lines, and "statements_head", the hex SHA-256 of the log's
//     last line (of the begin line when there are no statements), newline included.
//
// The file is JSON lines chained exactly like audit.log: every line's "prev" is the hex
// SHA-256 of the previous line including its newline, the first line's prev is
// [Genesis], and "seq" counts from 0 (the begin line) up by one per line. The first
// line is the begin record:
//
//	type          "statements.begin"
//	seq           0
//	time          when the log was opened, RFC 3339, UTC
//	session_id    the session id; must equal the file's name without ".log"
//	user          the user's name; identity: the user's SPIFFE ID
//	resource      the resource name; agent: the agent that serves it
//	db_user       the user of the client's StartupMessage; database: its database
//	records_text  true when the statements' text is recorded (the resource opted in)
//	prev          Genesis
//
// Every later line is one statement:
//
//	type            "statement"
//	seq             1, 2, ...: the statement's number in the session
//	time            when the statement started (the message that began it arrived)
//	kind            simple (Query), extended (Execute), copy (COPY), function (FunctionCall)
//	sha256          the command hash: hex SHA-256 of the statement text as the client
//	                sent it, the exact bytes given to [StatementLog.Append] (so an auditor
//	                holding a query checks it with `printf %s "$q" | sha256sum`); an
//	                Execute has the hash of the statement it runs
//	len             the text's length in bytes
//	text            the text, only when records_text; cut to [MaxStatementText] bytes
//	                (at a UTF-8 boundary), with "text_truncated": true when cut. A
//	                text that is not cut must hash to sha256: verification checks it
//	tag             the CommandComplete tag(s), e.g. "SELECT 42", "UPDATE 3"
//	rows            the rows returned or affected
//	sqlstate        the SQLSTATE of the error that ended the statement
//	status          ok, error, skipped (not run: an earlier error in its batch) or
//	                incomplete (the session ended first)
//	duration_us     how long it ran, in microseconds
//	prev            the hex SHA-256 of the previous line
//
// Parameter values are never recorded, and statement text only when the session says
// so: Append drops the text of a log that does not record text.
//
// Durability is traded for throughput on purpose: Append only encodes the line; a
// timer writes the pending lines (in one write(2); at once when 64 KiB are pending) and
// fsyncs the file at most once per [StatementLogOptions.SyncEvery] (1 s), and Close does
// both. So a crash of the gateway, or a power loss, loses at most about a second of
// statements, and whatever it cuts is visible (a torn line, and a log without a seal); a
// write that fails (a full disk) ends the session at the next statement, at most about
// a second after the lines it lost. The main log's session.started, by contrast, is on
// disk before the session's first byte moves. Measured on the development VM (2 vCPU,
// ext4 on virtio, shared; 2026-12-04, Go 1.26), two runs each, against the previous
// line writer (encoding/json and one write(2) per line, ee86c0f) built from its tree in
// the same minutes:
//
//	go test -run '^$' -bench BenchmarkStatementAppend -benchtime 20000x ./gateway/audit/
//	                                      now            one write(2) per line
//	BenchmarkStatementAppend/sync1s       0.86-0.87 µs   3.2-3.3 µs   305 bytes/statement
//	BenchmarkStatementAppend/sync1s-text  1.06 µs        4.1 µs       348 bytes/statement (text recorded)
//	BenchmarkStatementAppend/nosync       0.73-0.78 µs   3.2-3.9 µs
//	BenchmarkCheckStatementLog            70-85 ms per 10,000 statements (earlier runs)
//
// that is over a million statements per second for one session, far over the 10,000 a
// busy session runs. Verifying reads some 120,000-140,000 statements per second.
//
// [VerifyStatementLogs] (`wicket audit verify`) checks every statement log's chain and
// compares each with its seal: a statement that was edited breaks the next line's prev
// (or, for the last line, the sealed head), a deleted one leaves a seq gap, lines cut
// off or appended change the count. A log whose session has no session.ended yet
// (still open, or the gateway stopped first) is reported as unsealed, its chain checked
// but not its end. A crash mid-write can leave a torn last line: it is reported as
// torn, not as tampering. On its next start the gateway closes such logs with
// [RecoverStatementLog], which appends a "statements.recovered" line (seq one past the
// last statement, chained, extra "torn_bytes" and "torn_sha256" naming a torn line's
// bytes, which stay in the file) and returns the seal for the session.ended record
// that ends the session; the recovered line is always the last.
//
// The seal lives in the main chain, so a statement log is as tamper-evident as
// audit.log itself, with the same limit: someone who can rewrite audit.log and the
// statement log together can recompute both chains, and only an [Anchor] kept
// elsewhere shows it.
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
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
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
	// TypeLogRecovered: written by the Log when it opens (or reopens after an outage) to
	// seal a torn last line; see the package doc.
	TypeLogRecovered = "log.recovered"
	// TypeLogGap: written by the Log when it can write again after an outage: how many
	// events were refused and how many records lost, between which times (Extra); see
	// "What happens when the log cannot be written" in the package doc.
	TypeLogGap = "log.gap"
	// TypeGatewayCrashed: at start, the gateway found that its previous run ended
	// without a gateway.stopped record; it ended what that run left open (outcome
	// gateway_crashed) and then wrote this record. See [ScanLastRun].
	TypeGatewayCrashed = "gateway.crashed"
	// TypeGrantChanged: an administrator allowed or disallowed resources for an agent name
	// (`wicket agents allow|disallow`, or `wicket token create agent --resources`); Extra
	// has the actor, the action, the resources named and the grant after the change.
	TypeGrantChanged = "grant.changed"
	// TypeAgentClaimRefused: an agent announced a resource not granted to its name; the
	// resource is not routed to that agent.
	TypeAgentClaimRefused = "agent.claim_refused"
	// TypeGrantsMigrated: at its first start with resource ownership, the gateway granted
	// every agent it knew the resources it was last seen serving (Extra lists them).
	TypeGrantsMigrated = "grants.migrated"
	// TypeACMEOrder: a new-order request to the ACME server for internal names, created
	// or refused (Reason says why, e.g. "not in --acme-names").
	TypeACMEOrder = "acme.order"
	// TypeACMEValidation: one validation connection of the ACME server; Extra's path says
	// where it went: "agent" (through the session of Agent), "public" (the gateway's own
	// public listener) or "direct" (over the network).
	TypeACMEValidation = "acme.validation"
	// TypeACMERevoked: a certificate of the ACME server revoked through ACME (revokeCert).
	TypeACMERevoked = "acme.revoked"
	// TypeStatementCancel: a PostgreSQL CancelRequest, forwarded to the backend of the
	// session it names (extra cancelled_session; outcome ok or error) or refused because
	// its key matches no live session of that user on that resource (outcome denied).
	TypeStatementCancel = "statement.cancel"
)

// Outcome values for [Record.Outcome].
const (
	OutcomeOK     = "ok"     // the action happened
	OutcomeDenied = "denied" // refused by policy or authentication
	OutcomeError  = "error"  // failed for an operational reason
	// OutcomeGatewayCrashed ends a session or connection that a gateway left open when it
	// was killed or lost power; written by its next start (session.ended, *.disconnected).
	OutcomeGatewayCrashed = "gateway_crashed"
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
	// Now is the clock used for records whose Time is zero, and for the times of an
	// outage. Default time.Now.
	Now func() time.Time
	// NoSync skips the fsync after each record. Default false (fsync every
	// record). Only for tests and benchmarks: with NoSync a crash can lose
	// records that Write already acknowledged.
	NoSync bool
	// RetryInterval is how often a Log that cannot write tries to reopen its file.
	// Default 1 s: access comes back within about a second of the disk being writable
	// again, and one open, tail read and write per second costs nothing.
	RetryInterval time.Duration
	// OpenFile opens the log's file. Default os.OpenFile, with fallocate(2) for
	// reservations on Linux. Tests pass one that fails on demand.
	OpenFile func(name string, flag int, perm fs.FileMode) (File, error)
	// OnStateChange, if set, is called when the log becomes unavailable and when it is
	// written again, with its health at that moment, outside the Log's locks and one
	// call at a time. Calls can repeat a state (an outage that began and ended between
	// two calls); it must not call the Log's Write methods.
	OnStateChange func(Health)
}

// DefaultRetryInterval is [Options.RetryInterval]'s default.
const DefaultRetryInterval = time.Second

// Health is a Log's state, for readiness checks and metrics.
type Health struct {
	// OK is false while the log cannot be written.
	OK bool
	// Since is when the current outage began; Err is the failure that began it and
	// Retry the reason the latest attempt to reopen failed (zero and nil when OK).
	Since      time.Time
	Err, Retry error
	// Refused and Lost count the events of the current outage so far (see [Log.Write]).
	Refused, Lost uint64
	// Failures counts, since Open, the records that could not be written: the one whose
	// write or fsync failed, those left unconfirmed by a failed fsync, and every event
	// refused or lost while the log was unavailable. It never decreases.
	Failures uint64
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
//
// A failed write or fsync starts an outage (outage.go): the Log refuses
// writes at once, counts them, and a goroutine reopens the file every
// RetryInterval until it can write the outage's log.gap record.
type Log struct {
	path     string
	now      func() time.Time
	noSync   bool
	retry    time.Duration
	openFile func(name string, flag int, perm fs.FileMode) (File, error)
	onChange func(Health)
	notifyMu sync.Mutex // one OnStateChange call at a time

	syncMu sync.Mutex    // serialises fsyncs and reopens
	synced atomic.Uint64 // every record up to this seq is on disk (within the current epoch)

	mu       sync.Mutex
	f        File  // nil only during an outage, after a reopen failed
	size     int64 // bytes in the file, where the next reservation starts
	reserved int64 // the file has room reserved up to here (>= size)
	noAlloc  bool  // the file system cannot reserve space
	seq      uint64
	head     string // hex SHA-256 of the last line, or Genesis
	closed   bool
	// epoch counts outages. A writer waiting for its fsync when an outage begins
	// learns from it that its record was not confirmed (durable, per ended epoch, is
	// the last seq an fsync confirmed before the outage).
	epoch    uint64
	durable  map[uint64]uint64
	pending  []pendingRecord // written but not yet fsynced (fsync mode only)
	out      *outage         // non-nil while the log cannot be written
	retrying bool            // a retry goroutine runs
	failures uint64          // Health.Failures

	stop chan struct{}  // closed by Close: ends the retry goroutine
	bg   sync.WaitGroup // the retry goroutine
}

// pendingRecord is a record written to the file whose fsync has not yet confirmed it.
type pendingRecord struct {
	seq    uint64
	typ    string
	access bool
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
	l := &Log{path: path, now: opts.Now, noSync: opts.NoSync, retry: opts.RetryInterval,
		openFile: opts.OpenFile, onChange: opts.OnStateChange, head: Genesis,
		durable: map[uint64]uint64{}, stop: make(chan struct{})}
	if l.now == nil {
		l.now = time.Now
	}
	if l.retry <= 0 {
		l.retry = DefaultRetryInterval
	}
	if l.openFile == nil {
		l.openFile = openOSFile
	}
	_, statErr := os.Stat(path)
	created := errors.Is(statErr, os.ErrNotExist)
	f, err := l.openFile(path, os.O_RDWR|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open audit log %s: %w", path, err)
	}
	l.f = f
	if err := l.init(created); err != nil {
		f.Close()
		return nil, err
	}
	return l, nil
}

func (l *Log) init(created bool) error {
	if err := lockFile(l.f.Fd()); err != nil {
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
	l.size, l.reserved = fi.Size(), fi.Size()
	return l.resume(fi.Size())
}

// resume reads the tail of the file to restore seq and head, sealing a torn
// fragment if there is one.
func (l *Log) resume(size int64) error {
	l.seq, l.head = 0, Genesis
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
	l.synced.Store(l.seq)
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
	// write, so the file never holds a terminated fragment without its seal
	// (and the reservation before it keeps a full disk from cutting it short).
	line, err := l.encode(rec)
	if err == nil {
		err = l.appendLine([]byte{'\n'}, line)
	}
	if err != nil {
		return fmt.Errorf("seal torn tail of audit log %s: %w", l.path, err)
	}
	if err := l.f.Sync(); err != nil {
		return fmt.Errorf("seal torn tail of audit log %s: fsync: %w", l.path, err)
	}
	l.synced.Store(l.seq)
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
// when Write returns nil.
//
// While the log cannot be written (a write or fsync failed and the file has not
// been reopened yet), Write writes nothing and returns an error wrapping
// [ErrUnavailable] at once; the record counts as lost in the log.gap record
// written when the log is back. Use [Log.WriteAccess] for the record of an
// event that the caller refuses when it cannot be recorded.
func (l *Log) Write(r Record) error { return l.write(r, false) }

// WriteAccess is [Log.Write] for the record of an access-creating event (a token
// minted, a certificate issued or renewed, a session started): the caller must
// refuse or undo the event when it returns an error, so while the log is
// unavailable the event counts as refused rather than lost.
func (l *Log) WriteAccess(r Record) error { return l.write(r, true) }

// Admit returns nil while the log can be written, and otherwise an error wrapping
// [ErrUnavailable], counting one refused event of type typ. Callers use it before an
// access-creating action that is costly to undo (signing a certificate, opening a
// stream to a resource), then record the action with [Log.WriteAccess] and undo it if
// that fails: the log can break between the two.
func (l *Log) Admit(typ string) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return ErrClosed
	}
	if l.out == nil {
		return nil
	}
	l.countLocked(typ, true)
	return l.unavailableLocked()
}

func (l *Log) write(r Record, access bool) error {
	if r.Type == "" {
		return errors.New("audit record has no type")
	}
	if r.Type == TypeLogRecovered || r.Type == TypeLogGap {
		// Reserved for the Log itself: Verify treats the line before a
		// log.recovered record specially, and a log.gap record speaks for the
		// Log, so no caller may write one.
		return fmt.Errorf("audit record type %s is reserved for the log itself", r.Type)
	}
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return ErrClosed
	}
	if l.out != nil {
		l.countLocked(r.Type, access)
		err := l.unavailableLocked()
		l.mu.Unlock()
		return err
	}
	line, err := l.encode(r)
	if err != nil {
		l.mu.Unlock()
		return err // nothing was written: not an outage
	}
	if err := l.appendLine(nil, line); err != nil {
		l.breakLocked(err)
		l.countLocked(r.Type, access)
		uerr := l.unavailableLocked()
		l.mu.Unlock()
		l.notify()
		return uerr
	}
	seq, epoch := l.seq, l.epoch
	if !l.noSync {
		l.pending = append(l.pending, pendingRecord{seq: seq, typ: r.Type, access: access})
	}
	l.mu.Unlock()
	if l.noSync {
		return nil
	}
	return l.syncThrough(seq, epoch)
}

// syncThrough returns once every record up to seq is on disk, running an
// fsync itself unless one that covers seq already completed. epoch is the
// log's epoch when seq was written.
func (l *Log) syncThrough(seq, epoch uint64) error {
	l.syncMu.Lock()
	defer l.syncMu.Unlock()
	l.mu.Lock()
	if l.epoch != epoch {
		// An outage began after this record was written: it stands only if an
		// fsync confirmed it before. If not, it was counted when the outage began.
		ok := seq <= l.durable[epoch]
		err := l.unavailableLocked()
		l.mu.Unlock()
		if ok {
			return nil
		}
		return err
	}
	if l.synced.Load() >= seq {
		l.mu.Unlock()
		return nil // a writer that queued earlier fsynced our record too
	}
	if l.closed {
		l.mu.Unlock()
		return ErrClosed // Close's fsync failed, or ran before this record
	}
	// Every record up to target has been written (write(2) returned), so
	// the fsync below makes all of them durable.
	target, f := l.seq, l.f
	l.mu.Unlock()
	err := f.Sync()
	l.mu.Lock()
	switch {
	case l.epoch != epoch:
		// A write failed while this fsync ran, and that outage counted our records
		// as unconfirmed: whatever this fsync did, they stay so.
		err = l.unavailableLocked()
		l.mu.Unlock()
		return err
	case err != nil:
		// After a failed fsync the kernel may have dropped the dirty pages:
		// nothing written since the last good fsync can be trusted.
		l.breakLocked(fmt.Errorf("fsync audit log %s: %w", l.path, err))
		err = l.unavailableLocked()
		l.mu.Unlock()
		l.notify()
		return err
	}
	l.synced.Store(target)
	kept := l.pending[:0]
	for _, p := range l.pending {
		if p.seq > target {
			kept = append(kept, p)
		}
	}
	l.pending = kept
	l.mu.Unlock()
	return nil
}

// recordError is a record that cannot be encoded: nothing is written, and the log stays usable.
type recordError struct{ msg string }

func (e *recordError) Error() string { return e.msg }

// encode sets r's time, seq and prev after the current head and returns its line,
// newline included. Callers hold l.mu.
func (l *Log) encode(r Record) ([]byte, error) {
	if r.Time.IsZero() {
		r.Time = l.now()
	}
	r.Time = r.Time.UTC()
	r.Seq = l.seq + 1
	r.Prev = l.head
	line, err := json.Marshal(r)
	if err != nil {
		return nil, &recordError{fmt.Sprintf("encode audit record %s: %v", r.Type, err)}
	}
	line = append(line, '\n')
	if len(line) > MaxRecordSize {
		return nil, &recordError{fmt.Sprintf("audit record %s is %d bytes, more than the %d-byte limit: shorten its reason or extra fields", r.Type, len(line), MaxRecordSize)}
	}
	return line, nil
}

// appendLine writes prefix+line (an encoded record) in one write, without fsync, after
// reserving room for it, and advances the head. On failure the head stays, and part of
// the bytes may be in the file: nothing may chain onto them until a reopen seals them.
// Callers hold l.mu (or own l exclusively, as in Open).
func (l *Log) appendLine(prefix, line []byte) error {
	buf := line
	if len(prefix) > 0 {
		buf = append(append(make([]byte, 0, len(prefix)+len(line)), prefix...), line...)
	}
	if err := l.reserve(int64(len(buf))); err != nil {
		return err
	}
	n, err := l.f.Write(buf)
	l.size += int64(n)
	if err != nil {
		return fmt.Errorf("write audit log %s: %w", l.path, err)
	}
	l.seq++
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

// Close fsyncs what was written, stops retrying after an outage, releases
// the lock and closes the file. Writes after Close fail with ErrClosed. Close
// is idempotent. Closing during an outage returns an error that states what
// the outage refused and lost, since no log.gap record will.
func (l *Log) Close() error {
	l.syncMu.Lock()
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		l.syncMu.Unlock()
		return nil
	}
	l.closed = true
	close(l.stop)
	var errs []error
	if l.out == nil && !l.noSync && l.synced.Load() < l.seq {
		// A writer between its write and its fsync finds synced >= its seq
		// once Close returns, so this fsync is the one it waits for.
		if err := l.f.Sync(); err != nil {
			errs = append(errs, fmt.Errorf("fsync audit log %s: %w", l.path, err))
		} else {
			l.synced.Store(l.seq)
		}
	}
	if o := l.out; o != nil {
		errs = append(errs, fmt.Errorf("audit log %s closed while it could not be written (since %s: %v): %d access-creating events were refused and %d records lost, and no log.gap record states it",
			l.path, o.first.UTC().Format(time.RFC3339), o.cause, o.nRefused, o.nLost))
	}
	f := l.f
	l.mu.Unlock()
	l.syncMu.Unlock()
	l.bg.Wait()
	if f != nil {
		if err := f.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close audit log %s: %w", l.path, err))
		}
	}
	return errors.Join(errs...)
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
