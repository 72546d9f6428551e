package audit

import "errors"

// Errors returned by [Log] methods. Compare with errors.Is.
var (
	// ErrClosed is returned by Write after Close.
	ErrClosed = errors.New("audit log is closed")
	// ErrUnavailable is returned by Write, WriteAccess and Admit while the log
	// cannot be written: a write or fsync failed (a full disk, an I/O error, a
	// file system remounted read-only) and the Log has not yet reopened the file
	// and written the outage's log.gap record. The error also wraps the failure.
	ErrUnavailable = errors.New("the audit log cannot be written")
	// ErrLocked is returned by Open when another process or Log holds the file.
	ErrLocked = errors.New("audit log is already open for writing elsewhere (another gateway on the same data directory?)")
)

// Verification failures. A *VerifyError wraps exactly one of them, so a
// caller can tell the kind of damage with errors.Is.
var (
	// ErrMalformed: a line is not a well-formed audit record (bad JSON, no
	// seq, prev or type, or too long), and is not a sealed torn line.
	ErrMalformed = errors.New("not a valid audit record")
	// ErrModified: a line's prev does not match the hash of the line before
	// it although seq continues: that earlier line (or this prev) was edited.
	ErrModified = errors.New("line modified")
	// ErrDeleted: seq jumps forward and the chain is broken there: records
	// were removed.
	ErrDeleted = errors.New("records deleted")
	// ErrReordered: seq goes backwards or repeats, or a record missing at
	// one place appears later: lines were inserted, moved or duplicated.
	ErrReordered = errors.New("records reordered or duplicated")
	// ErrSeq: the chain links but seq does not increase by exactly one (or
	// the first record does not start at 1): the seq field was altered.
	ErrSeq = errors.New("sequence number broken")
	// ErrTruncated: an anchor names a seq past the log's last record: records
	// were cut off the end.
	ErrTruncated = errors.New("records cut off the end")
	// ErrRewritten: the record at an anchored seq is not the anchored line:
	// the log was rewritten up to there (a chain recomputed from an edit
	// verifies on its own; only an anchor kept elsewhere shows it).
	ErrRewritten = errors.New("log rewritten")
)
