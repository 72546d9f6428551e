package audit

import (
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
)

// VerifyResult summarises a log that verified (or the part before the first
// error).
type VerifyResult struct {
	// Lines is the number of newline-terminated lines read.
	Lines int
	// Records is the number of chained records, log.recovered records included.
	Records int
	// LastSeq is the seq of the newest chained record (0 if none).
	LastSeq uint64
	// Head is the hex SHA-256 of the newest chained line, or Genesis. Compare
	// it with an anchored copy to detect truncation; see the package doc.
	Head string
	// Sealed lists the 1-based line numbers of torn lines that Open sealed
	// with a log.recovered record (evidence of past crashes, not tampering).
	Sealed []int
	// TornTail is true when the file ends with bytes after its last newline:
	// a write interrupted by a crash, not yet sealed by Open. Those bytes are
	// not verified and not counted.
	TornTail bool
	// TornBytes is the length of that unterminated tail.
	TornBytes int
}

// VerifyError says where the chain first breaks and how. It wraps one of
// ErrMalformed, ErrModified, ErrDeleted, ErrReordered, ErrSeq.
type VerifyError struct {
	// Line is the 1-based line number where the damage is detected.
	Line int
	// Kind is the sentinel error for the kind of damage.
	Kind error
	// Detail is one sentence saying what is wrong.
	Detail string
}

// Error implements error.
func (e *VerifyError) Error() string {
	return fmt.Sprintf("audit log line %d: %s", e.Line, e.Detail)
}

// Unwrap returns the kind sentinel.
func (e *VerifyError) Unwrap() error { return e.Kind }

// VerifyFile verifies the audit log at path; see [Verify].
func VerifyFile(path string) (VerifyResult, error) {
	f, err := os.Open(path)
	if err != nil {
		return VerifyResult{Head: Genesis}, fmt.Errorf("verify audit log: %w", err)
	}
	defer f.Close()
	res, err := Verify(f)
	if err != nil {
		return res, fmt.Errorf("verify %s: %w", path, err)
	}
	return res, nil
}

// Anchor is a record's seq and line hash, kept somewhere the gateway host cannot rewrite
// (a log collector, a ticket): verifying against it shows records cut off the end and a log
// rewritten with a recomputed chain, which the chain alone cannot show. Its text form, as
// `wicket audit verify` prints it and the gateway logs it, is "SEQ:HASH".
type Anchor struct {
	Seq  uint64
	Hash string
}

// String is the "SEQ:HASH" form.
func (a Anchor) String() string { return strconv.FormatUint(a.Seq, 10) + ":" + a.Hash }

// ParseAnchor reads the "SEQ:HASH" form.
func ParseAnchor(s string) (Anchor, error) {
	seq, hash, ok := strings.Cut(strings.TrimSpace(s), ":")
	n, err := strconv.ParseUint(seq, 10, 64)
	if !ok || err != nil || n == 0 || len(hash) != sha256.Size*2 || strings.Trim(strings.ToLower(hash), "0123456789abcdef") != "" {
		return Anchor{}, fmt.Errorf("audit anchor %q is not SEQ:HASH (a record number and the 64-hex-digit SHA-256 of its line, as `wicket audit verify` prints them)", s)
	}
	return Anchor{Seq: n, Hash: strings.ToLower(hash)}, nil
}

// VerifyFileAnchored verifies the audit log at path like [VerifyFile] and
// then checks every anchor: the record with the anchor's seq must exist and
// its line must have the anchor's hash. A missing record is ErrTruncated, a
// different line ErrRewritten (both in a *VerifyError).
func VerifyFileAnchored(path string, anchors ...Anchor) (VerifyResult, error) {
	f, err := os.Open(path)
	if err != nil {
		return VerifyResult{Head: Genesis}, fmt.Errorf("verify audit log: %w", err)
	}
	defer f.Close()
	v := newVerifier(f)
	v.anchors = map[uint64]string{}
	for _, a := range anchors {
		v.anchors[a.Seq] = a.Hash
	}
	res, err := v.run()
	if err == nil {
		err = v.checkAnchors()
	}
	if err != nil {
		return res, fmt.Errorf("verify %s: %w", path, err)
	}
	return res, nil
}

// Verify reads a whole audit log and checks its chain: the first record has
// seq 1 and prev Genesis, every further record has seq one more than the
// previous record and prev equal to the SHA-256 of the previous line. A line
// that the next record seals (a log.recovered record naming its exact length
// and SHA-256) is skipped, and an unterminated last line is reported in
// TornTail; neither is an error. The first damage found is returned as a
// *VerifyError naming the line; an I/O error is returned as is. The result
// describes the lines before the error.
func Verify(r io.Reader) (VerifyResult, error) {
	return newVerifier(r).run()
}

func newVerifier(r io.Reader) *verifier {
	return &verifier{
		res: VerifyResult{Head: Genesis},
		in:  bufio.NewReaderSize(r, MaxRecordSize+1),
	}
}

// chainFields is the part of a record that verification reads; decoding
// only these (not time and the rest) keeps Verify fast on large logs.
type chainFields struct {
	Seq   uint64            `json:"seq"`
	Type  string            `json:"type"`
	Extra map[string]string `json:"extra"`
	Prev  string            `json:"prev"`
}

type rawLine struct {
	no       int
	b        []byte // newline included when complete
	complete bool
	tooLong  bool
}

type verifier struct {
	in   *bufio.Reader
	res  VerifyResult
	line int

	anchors map[uint64]string // seq -> expected line hash; checked ones are removed
	badLine int               // the line whose hash differs from its anchor
	badSeq  uint64
}

// checkAnchors reports the first anchor that did not hold, after the whole log verified.
func (v *verifier) checkAnchors() error {
	if v.badLine != 0 {
		return &VerifyError{Line: v.badLine, Kind: ErrRewritten, Detail: fmt.Sprintf(
			"record seq %d is not the anchored one: the log was rewritten up to here", v.badSeq)}
	}
	var missing uint64
	for seq := range v.anchors {
		if missing == 0 || seq < missing {
			missing = seq
		}
	}
	if missing != 0 {
		return &VerifyError{Line: v.res.Lines + 1, Kind: ErrTruncated, Detail: fmt.Sprintf(
			"the log ends at seq %d but an anchor names seq %d: records were cut off the end", v.res.LastSeq, missing)}
	}
	return nil
}

// next returns the next line, or nil at end of input.
func (v *verifier) next() (*rawLine, error) {
	b, err := v.in.ReadSlice('\n')
	switch {
	case err == nil:
		v.line++
		return &rawLine{no: v.line, b: append([]byte(nil), b...), complete: true}, nil
	case errors.Is(err, bufio.ErrBufferFull):
		// Skip the rest of the overlong line; it is reported, not parsed.
		for errors.Is(err, bufio.ErrBufferFull) {
			_, err = v.in.ReadSlice('\n')
		}
		if err != nil && !errors.Is(err, io.EOF) {
			return nil, err
		}
		v.line++
		return &rawLine{no: v.line, complete: err == nil, tooLong: true}, nil
	case errors.Is(err, io.EOF):
		if len(b) == 0 {
			return nil, nil
		}
		return &rawLine{no: v.line + 1, b: append([]byte(nil), b...)}, nil
	default:
		return nil, err
	}
}

func (v *verifier) run() (VerifyResult, error) {
	cur, err := v.next()
	for err == nil && cur != nil {
		if !cur.complete {
			v.res.TornTail = true
			v.res.TornBytes = len(cur.b)
			if cur.tooLong {
				return v.res, &VerifyError{Line: cur.no, Kind: ErrMalformed, Detail: fmt.Sprintf("the unterminated last line is longer than %d bytes, which no interrupted write produces", MaxRecordSize)}
			}
			break
		}
		v.res.Lines = cur.no
		var nxt *rawLine
		nxt, err = v.next()
		if err != nil {
			break
		}
		if nxt != nil && nxt.complete && !nxt.tooLong && !cur.tooLong {
			sealed, serr := v.sealedBy(cur, nxt)
			if serr != nil {
				return v.res, serr
			}
			if sealed {
				v.res.Sealed = append(v.res.Sealed, cur.no)
				cur = nxt
				continue
			}
		}
		if verr := v.check(cur); verr != nil {
			return v.res, v.classify(verr, nxt)
		}
		cur = nxt
	}
	if err != nil {
		return v.res, fmt.Errorf("read audit log after line %d: %w", v.res.Lines, err)
	}
	return v.res, nil
}

// sealedBy reports whether nxt is the log.recovered record that seals cur.
// If nxt is a seal that chains correctly but names other bytes, the sealed
// line was changed after recovery, and that is an error.
func (v *verifier) sealedBy(cur, nxt *rawLine) (bool, error) {
	var rec chainFields
	if json.Unmarshal(nxt.b, &rec) != nil || rec.Type != TypeLogRecovered {
		return false, nil
	}
	if rec.Prev != v.res.Head || rec.Seq != v.res.LastSeq+1 {
		return false, nil
	}
	torn := cur.b[:len(cur.b)-1]
	sum := sha256.Sum256(torn)
	if rec.Extra["torn_sha256"] == hex.EncodeToString(sum[:]) && rec.Extra["torn_bytes"] == strconv.Itoa(len(torn)) {
		return true, nil
	}
	if _, named := rec.Extra["torn_sha256"]; named {
		return false, &VerifyError{Line: cur.no, Kind: ErrModified, Detail: fmt.Sprintf("this torn line was sealed by the log.recovered record on line %d, but its bytes no longer match the length and SHA-256 recorded there: it was altered after recovery", nxt.no)}
	}
	return false, nil
}

// gapError is returned by check when seq jumps forward over a broken link;
// classify looks ahead for the missing records to tell deletion from moving.
type gapError struct {
	line     int
	from, to uint64 // last good seq, and the seq found
}

func (g *gapError) Error() string { return "gap" }

// check verifies one complete line against the chain state and advances it.
func (v *verifier) check(l *rawLine) error {
	if l.tooLong {
		return &VerifyError{Line: l.no, Kind: ErrMalformed, Detail: fmt.Sprintf("line is longer than %d bytes", MaxRecordSize)}
	}
	var rec chainFields
	if err := json.Unmarshal(l.b, &rec); err != nil {
		return &VerifyError{Line: l.no, Kind: ErrMalformed, Detail: fmt.Sprintf("not a valid JSON audit record (edited or corrupted): %v", err)}
	}
	switch {
	case rec.Seq == 0:
		return &VerifyError{Line: l.no, Kind: ErrMalformed, Detail: "record has no seq"}
	case rec.Type == "":
		return &VerifyError{Line: l.no, Kind: ErrMalformed, Detail: "record has no type"}
	case len(rec.Prev) != sha256.Size*2:
		return &VerifyError{Line: l.no, Kind: ErrMalformed, Detail: "record has no valid prev hash"}
	}
	last, head := v.res.LastSeq, v.res.Head
	linked := rec.Prev == head
	switch {
	case rec.Seq <= last:
		what := "goes back from"
		if rec.Seq == last {
			what = "repeats"
		}
		return &VerifyError{Line: l.no, Kind: ErrReordered, Detail: fmt.Sprintf("seq %d %s seq %d of line %d: a line was inserted, duplicated or moved", rec.Seq, what, last, l.no-1)}
	case rec.Seq > last+1 && !linked:
		return &gapError{line: l.no, from: last, to: rec.Seq}
	case rec.Seq > last+1:
		return &VerifyError{Line: l.no, Kind: ErrSeq, Detail: fmt.Sprintf("seq jumps from %d to %d although prev links to the line before: the seq field was altered", last, rec.Seq)}
	case !linked && last == 0:
		return &VerifyError{Line: l.no, Kind: ErrModified, Detail: "the first record's prev is not the genesis value: it was altered, or the log is not the start of a chain"}
	case !linked:
		return &VerifyError{Line: l.no, Kind: ErrModified, Detail: fmt.Sprintf("prev does not match the SHA-256 of line %d although seq continues: line %d (or this line's prev) was modified", l.no-1, l.no-1)}
	}
	v.res.Records++
	v.res.LastSeq = rec.Seq
	v.res.Head = lineHash(l.b)
	if want, ok := v.anchors[rec.Seq]; ok {
		delete(v.anchors, rec.Seq)
		if want != v.res.Head && v.badLine == 0 {
			v.badLine, v.badSeq = l.no, rec.Seq
		}
	}
	return nil
}

// classify turns a gap into a precise error: if a missing seq shows up
// further down, the lines were moved; otherwise they were deleted. Reading
// the rest of the file costs nothing when the log is intact, because this
// only runs after damage was found.
func (v *verifier) classify(err error, nxt *rawLine) error {
	var g *gapError
	if !errors.As(err, &g) {
		return err
	}
	for l := nxt; l != nil; {
		if l.complete && !l.tooLong {
			var rec chainFields
			if json.Unmarshal(l.b, &rec) == nil && rec.Seq > g.from && rec.Seq < g.to {
				return &VerifyError{Line: g.line, Kind: ErrReordered, Detail: fmt.Sprintf("seq jumps from %d to %d, and seq %d appears later on line %d: lines were reordered", g.from, g.to, rec.Seq, l.no)}
			}
		}
		var rerr error
		if l, rerr = v.next(); rerr != nil {
			break
		}
	}
	missing := g.to - g.from - 1
	what := fmt.Sprintf("record %d is", g.from+1)
	if missing > 1 {
		what = fmt.Sprintf("%d records (seq %d to %d) are", missing, g.from+1, g.to-1)
	}
	return &VerifyError{Line: g.line, Kind: ErrDeleted, Detail: fmt.Sprintf("seq jumps from %d to %d and the chain breaks here: %s missing, deleted before this line", g.from, g.to, what)}
}
