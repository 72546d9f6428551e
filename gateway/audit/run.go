package audit

import (
	"bufio"
	"bytes"
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
)

// MaxOpenTracked bounds the starts without an end that [ScanLastRun] keeps track of (a
// few dozen bytes each): a run with more sessions and connections open at once than this
// is reported with the rest counted in LastRun.Untracked.
const MaxOpenTracked = 100_000

// maxOpenTracked is MaxOpenTracked; tests lower it.
var maxOpenTracked = MaxOpenTracked

// LastRun is what an audit log says about the newest run of the gateway that writes it.
type LastRun struct {
	// Started is the run's gateway.started record; Seq 0 when the log has none.
	Started Record
	// Last is the newest record of the log; Seq 0 when the log is empty.
	Last Record
	// Stopped is true when a gateway.stopped record follows Started; Recorded when a
	// gateway.crashed record does (a later start already found that the run crashed).
	Stopped, Recorded bool
	// Open counts the starts after Started (session.started, user.connected,
	// agent.connected) with no end record; Untracked is how many of them
	// EachOpen does not return because more than MaxOpenTracked were open at once.
	Open, Untracked int

	path  string
	spans []span // the lines of the open starts, in log order
}

// span is where a line is in the file.
type span struct{ off, n int64 }

// Crashed reports whether the run ended without a gateway.stopped record (killed, lost
// power, or its stop could not be recorded) and no later start has recorded it yet.
func (r LastRun) Crashed() bool { return r.Started.Seq != 0 && !r.Stopped && !r.Recorded }

// endTypes maps each start type ScanLastRun tracks to the type that ends it.
var endTypes = map[string]string{
	TypeSessionStarted: TypeSessionEnded,
	TypeUserConnected:  TypeUserDisconnected,
	TypeAgentConnected: TypeAgentDisconnected,
}

// ScanLastRun reads the newest run of the gateway from the log at path: the records
// from its last gateway.started on. It notes every start record (session.started,
// user.connected, agent.connected) that no end record with the same session id
// follows, for [LastRun.EachOpen], so the caller can end them (after a crash the run
// could not).
//
// It finds the run by reading the file backwards from the end and then reads only the
// run, forward: memory is bounded by MaxOpenTracked small entries and one record, not
// by the size of the log or of the run. Lines that are not records (a sealed torn line)
// are skipped; checking the chain is [Verify]'s job.
func ScanLastRun(path string) (LastRun, error) {
	run := LastRun{path: path}
	f, err := os.Open(path)
	if err != nil {
		return run, fmt.Errorf("read audit log: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return run, fmt.Errorf("read audit log %s: %w", path, err)
	}
	from, err := findLastRun(f, fi.Size(), &run)
	if err != nil || run.Started.Seq == 0 {
		return run, err
	}
	open := map[string]span{}
	in := bufio.NewReaderSize(io.NewSectionReader(f, from, fi.Size()-from), MaxRecordSize+1)
	for off := from; ; {
		line, err := in.ReadSlice('\n')
		n := int64(len(line))
		for errors.Is(err, bufio.ErrBufferFull) { // an overlong line: not a record
			var more []byte
			more, err = in.ReadSlice('\n')
			n += int64(len(more))
			line = nil
		}
		if errors.Is(err, io.EOF) {
			break // the end, or a torn tail that the writer's Open seals
		}
		if err != nil {
			return run, fmt.Errorf("read audit log %s: %w", path, err)
		}
		at := off
		off += n
		typ := lineType(line)
		end := ""
		switch typ {
		case TypeGatewayStopped:
			run.Stopped = true
			continue
		case TypeGatewayCrashed:
			run.Recorded = true
			continue
		case TypeSessionStarted, TypeUserConnected, TypeAgentConnected:
		case TypeSessionEnded, TypeUserDisconnected, TypeAgentDisconnected:
			end = typ
		default:
			continue
		}
		var rec struct {
			Seq       uint64 `json:"seq"`
			SessionID string `json:"session_id"`
		}
		if json.Unmarshal(line, &rec) != nil || rec.Seq == 0 || rec.SessionID == "" {
			continue
		}
		if end != "" {
			for start, e := range endTypes {
				if e == end {
					delete(open, start+" "+rec.SessionID)
				}
			}
			continue
		}
		if len(open) >= maxOpenTracked {
			run.Untracked++
			continue
		}
		open[typ+" "+rec.SessionID] = span{at, n}
	}
	run.spans = make([]span, 0, len(open))
	for _, s := range open {
		run.spans = append(run.spans, s)
	}
	slices.SortFunc(run.spans, func(a, b span) int { return cmp.Compare(a.off, b.off) })
	run.Open = len(run.spans) + run.Untracked
	return run, nil
}

// EachOpen calls fn, in log order, with the whole record of every start that
// ScanLastRun found without an end (at most MaxOpenTracked). fn may append to the log.
func (r LastRun) EachOpen(fn func(start Record) error) error {
	if len(r.spans) == 0 {
		return nil
	}
	f, err := os.Open(r.path)
	if err != nil {
		return fmt.Errorf("read audit log: %w", err)
	}
	defer f.Close()
	buf := make([]byte, MaxRecordSize)
	for _, s := range r.spans {
		line := buf[:s.n]
		if _, err := f.ReadAt(line, s.off); err != nil {
			return fmt.Errorf("read audit log %s: %w", r.path, err)
		}
		var rec Record
		if err := json.Unmarshal(line, &rec); err != nil {
			return fmt.Errorf("read audit log %s at byte %d: %w", r.path, s.off, err)
		}
		if err := fn(rec); err != nil {
			return err
		}
	}
	return nil
}

// findLastRun reads the file backwards in blocks until it meets a gateway.started record,
// sets run.Started and run.Last, and returns the offset of that record's line.
func findLastRun(f io.ReaderAt, size int64, run *LastRun) (int64, error) {
	const block = 64 << 10
	var carry []byte // the end of a line that began before pos, newline included
	dropTail := true // the bytes after the last newline are not a line (a torn tail, or the rest of an overlong line)
	for pos := size; pos > 0; {
		n := min(block, pos)
		pos -= n
		buf := make([]byte, n, n+int64(len(carry)))
		if _, err := f.ReadAt(buf, pos); err != nil && !errors.Is(err, io.EOF) {
			return 0, fmt.Errorf("read audit log: %w", err)
		}
		buf = append(buf, carry...)
		carry = nil
		j := len(buf)
		if dropTail {
			j = bytes.LastIndexByte(buf, '\n') + 1
			if j == 0 {
				continue // all of this block is tail; keep dropping
			}
			dropTail = false
		}
		for j > 0 {
			i := bytes.LastIndexByte(buf[:j-1], '\n')
			if i < 0 && pos > 0 {
				if j > MaxRecordSize {
					dropTail = true // an overlong line: skip to the newline before it
				} else {
					carry = append([]byte(nil), buf[:j]...)
				}
				break
			}
			line := buf[i+1 : j]
			j = i + 1
			typ := lineType(line)
			if typ == "" {
				continue
			}
			var rec Record
			if json.Unmarshal(line, &rec) != nil || rec.Seq == 0 {
				continue
			}
			if run.Last.Seq == 0 {
				run.Last = rec
			}
			if typ == TypeGatewayStarted {
				run.Started = rec
				return pos + int64(i+1), nil
			}
		}
	}
	return 0, nil
}

// lineType returns the type of an encoded record without decoding the rest: the first
// `"type":"` in a line this package wrote is the record's own (time and seq come before
// it, and a quote inside a string value is escaped), and type names hold no escapes.
func lineType(line []byte) string {
	const key = `"type":"`
	i := bytes.Index(line, []byte(key))
	if i < 0 {
		return ""
	}
	rest := line[i+len(key):]
	k := bytes.IndexByte(rest, '"')
	if k < 0 {
		return ""
	}
	return string(rest[:k])
}
