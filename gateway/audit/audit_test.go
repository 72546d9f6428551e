package audit

import (
	"bytes"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

var t0 = time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)

// fixedClock returns a clock that advances one second per call.
func fixedClock() func() time.Time {
	var mu sync.Mutex
	n := 0
	return func() time.Time {
		mu.Lock()
		defer mu.Unlock()
		n++
		return t0.Add(time.Duration(n) * time.Second)
	}
}

func openLog(t *testing.T, path string) *Log {
	t.Helper()
	l, err := Open(path, fixedClock())
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { l.Close() })
	return l
}

func sampleRecord(i int) Record {
	return Record{
		Type:      TypeSessionEnded,
		User:      "alice",
		Agent:     "db-agent",
		Identity:  "spiffe://wicket.local/user/alice",
		Resource:  "postgres",
		SessionID: fmt.Sprintf("s-%d", i),
		Remote:    "127.0.0.1:5000",
		BytesUp:   int64(100 * i),
		BytesDown: int64(1000 * i),
		Outcome:   OutcomeOK,
	}
}

// writeN creates a log at a new path with n records and returns the path.
func writeN(t *testing.T, n int) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "audit.log")
	l := openLog(t, path)
	for i := 1; i <= n; i++ {
		if err := l.Write(sampleRecord(i)); err != nil {
			t.Fatalf("Write %d: %v", i, err)
		}
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	return path
}

// splitLines splits after each newline, keeping it; a trailing fragment is kept too.
func splitLines(b []byte) [][]byte {
	var out [][]byte
	for len(b) > 0 {
		i := bytes.IndexByte(b, '\n')
		if i < 0 {
			out = append(out, b)
			break
		}
		out = append(out, b[:i+1])
		b = b[i+1:]
	}
	return out
}

func readLines(t *testing.T, path string) [][]byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return splitLines(b)
}

func writeLines(t *testing.T, path string, lines [][]byte) {
	t.Helper()
	if err := os.WriteFile(path, bytes.Join(lines, nil), 0o600); err != nil {
		t.Fatal(err)
	}
}

func TestRoundTrip(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	l := openLog(t, path)
	types := []string{TypeTokenCreated, TypeAgentEnrolled, TypeAgentConnected, TypeSessionStarted, TypeSessionEnded, TypeSessionDenied}
	for i, typ := range types {
		r := sampleRecord(i + 1)
		r.Type = typ
		r.Extra = map[string]string{"b": "2", "a": "1"}
		if err := l.Write(r); err != nil {
			t.Fatalf("Write: %v", err)
		}
	}
	seq, head := l.Head()
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}

	lines := readLines(t, path)
	if len(lines) != len(types) {
		t.Fatalf("got %d lines, want %d", len(lines), len(types))
	}
	prev := Genesis
	for i, line := range lines {
		var r Record
		if err := json.Unmarshal(line, &r); err != nil {
			t.Fatalf("line %d: %v", i+1, err)
		}
		if r.Seq != uint64(i+1) || r.Type != types[i] || r.Prev != prev {
			t.Fatalf("line %d: seq=%d type=%q prev=%s, want seq=%d type=%q prev=%s", i+1, r.Seq, r.Type, r.Prev, i+1, types[i], prev)
		}
		if want := t0.Add(time.Duration(i+1) * time.Second); !r.Time.Equal(want) || r.Time.Location() != time.UTC {
			t.Fatalf("line %d: time %v, want %v UTC", i+1, r.Time, want)
		}
		if r.User != "alice" || r.BytesDown != int64(1000*(i+1)) || r.SessionID != fmt.Sprintf("s-%d", i+1) {
			t.Fatalf("line %d: fields not preserved: %+v", i+1, r)
		}
		// The documented hand check: sha256 of the line with its newline.
		sum := sha256.Sum256(line)
		prev = hex.EncodeToString(sum[:])
	}
	if seq != uint64(len(types)) || head != prev {
		t.Fatalf("Head() = %d %s, want %d %s", seq, head, len(types), prev)
	}
	if !bytes.Contains(lines[0], []byte(`"extra":{"a":"1","b":"2"}`)) {
		t.Fatalf("extra keys not in stable order: %s", lines[0])
	}

	res, err := VerifyFile(path)
	if err != nil {
		t.Fatalf("VerifyFile: %v", err)
	}
	if res.Records != len(types) || res.LastSeq != uint64(len(types)) || res.Head != head || res.TornTail || len(res.Sealed) != 0 {
		t.Fatalf("VerifyFile = %+v", res)
	}
}

func TestWriteKeepsGivenTimeInUTC(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	l := openLog(t, path)
	at := time.Date(2026, 1, 2, 3, 4, 5, 6, time.FixedZone("X", 3600))
	if err := l.Write(Record{Type: TypeGatewayStarted, Time: at}); err != nil {
		t.Fatal(err)
	}
	l.Close()
	var r Record
	if err := json.Unmarshal(readLines(t, path)[0], &r); err != nil {
		t.Fatal(err)
	}
	if !r.Time.Equal(at) || !strings.Contains(string(readLines(t, path)[0]), `"time":"2026-01-02T02:04:05.000000006Z"`) {
		t.Fatalf("time = %v, line %s", r.Time, readLines(t, path)[0])
	}
}

func TestResumeAfterReopen(t *testing.T) {
	path := writeN(t, 3)
	l := openLog(t, path)
	if seq, _ := l.Head(); seq != 3 {
		t.Fatalf("resumed at seq %d, want 3", seq)
	}
	for i := 4; i <= 5; i++ {
		if err := l.Write(sampleRecord(i)); err != nil {
			t.Fatal(err)
		}
	}
	_, head := l.Head()
	l.Close()
	res, err := VerifyFile(path)
	if err != nil {
		t.Fatalf("VerifyFile after reopen: %v", err)
	}
	if res.Records != 5 || res.LastSeq != 5 || res.Head != head {
		t.Fatalf("VerifyFile = %+v, want 5 records ending at head %s", res, head)
	}
}

func TestFileMode0600(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	l := openLog(t, path)
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Fatalf("new log mode %v, want 0600", fi.Mode().Perm())
	}
	l.Close()

	if err := os.Chmod(path, 0o644); err != nil {
		t.Fatal(err)
	}
	openLog(t, path).Close()
	fi, err = os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Fatalf("reopened 0644 log has mode %v, want tightened to 0600", fi.Mode().Perm())
	}
}

func TestSecondWriterRefused(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	openLog(t, path)
	if l2, err := Open(path, nil); !errors.Is(err, ErrLocked) {
		if l2 != nil {
			l2.Close()
		}
		t.Fatalf("second Open: err = %v, want ErrLocked", err)
	}
}

func TestWriteErrors(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	l := openLog(t, path)
	if err := l.Write(Record{}); err == nil {
		t.Fatal("Write without a type succeeded")
	}
	big := Record{Type: TypeAdminRequest, Reason: strings.Repeat("x", MaxRecordSize)}
	if err := l.Write(big); err == nil {
		t.Fatal("oversized record was written")
	}
	if err := l.Write(Record{Type: TypeLogRecovered}); err == nil {
		t.Fatal("a caller wrote a log.recovered record")
	}
	// A rejected record writes nothing, so the log stays usable.
	if err := l.Write(sampleRecord(1)); err != nil {
		t.Fatalf("Write after rejected record: %v", err)
	}
	l.Close()
	if err := l.Write(sampleRecord(2)); !errors.Is(err, ErrClosed) {
		t.Fatalf("Write after Close: %v, want ErrClosed", err)
	}
	if res, err := VerifyFile(path); err != nil || res.Records != 1 {
		t.Fatalf("VerifyFile = %+v, %v", res, err)
	}
}

func TestSetTLS(t *testing.T) {
	var r Record
	r.SetTLS(tls.ConnectionState{Version: tls.VersionTLS13, CipherSuite: tls.TLS_AES_128_GCM_SHA256})
	if r.TLSVersion != "TLS 1.3" || r.Cipher != "TLS_AES_128_GCM_SHA256" {
		t.Fatalf("SetTLS: %q %q", r.TLSVersion, r.Cipher)
	}
}

func TestConcurrentWriters(t *testing.T) {
	// Both modes: fsync exercises group commit (shared fsyncs), NoSync the
	// plain write path at a higher rate.
	t.Run("fsync", func(t *testing.T) { testConcurrentWriters(t, false, 8, 25) })
	t.Run("nosync", func(t *testing.T) { testConcurrentWriters(t, true, 8, 100) })
}

func testConcurrentWriters(t *testing.T, noSync bool, writers, each int) {
	path := filepath.Join(t.TempDir(), "audit.log")
	l, err := OpenWithOptions(path, Options{NoSync: noSync})
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	errs := make(chan error, writers*each)
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range each {
				r := sampleRecord(i)
				r.SessionID = fmt.Sprintf("w%d-%d", w, i)
				if err := l.Write(r); err != nil {
					errs <- err
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatalf("concurrent Write: %v", err)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	res, err := VerifyFile(path)
	if err != nil {
		t.Fatalf("VerifyFile after concurrent writes: %v", err)
	}
	if res.Records != writers*each {
		t.Fatalf("Records = %d, want %d", res.Records, writers*each)
	}
	seen := map[string]bool{}
	for _, line := range readLines(t, path) {
		var r Record
		if err := json.Unmarshal(line, &r); err != nil {
			t.Fatal(err)
		}
		seen[r.SessionID] = true
	}
	if len(seen) != writers*each {
		t.Fatalf("%d distinct records, want %d", len(seen), writers*each)
	}
}

func TestVerifyEmpty(t *testing.T) {
	res, err := Verify(strings.NewReader(""))
	if err != nil || res.Records != 0 || res.Head != Genesis || res.TornTail {
		t.Fatalf("Verify(empty) = %+v, %v", res, err)
	}
}

func TestVerifyMissingFile(t *testing.T) {
	if _, err := VerifyFile(filepath.Join(t.TempDir(), "nope.log")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("VerifyFile(missing) = %v", err)
	}
}

func TestTamperingDetected(t *testing.T) {
	tests := []struct {
		name     string
		mutate   func(lines [][]byte) [][]byte
		line     int
		kind     error
		contains string
	}{
		{
			name: "edited line",
			mutate: func(ls [][]byte) [][]byte {
				ls[2] = bytes.Replace(ls[2], []byte(`"bytes_up":300`), []byte(`"bytes_up":3`), 1)
				return ls
			},
			line: 4, kind: ErrModified, contains: "line 3",
		},
		{
			name: "edited prev field",
			mutate: func(ls [][]byte) [][]byte {
				var r Record
				json.Unmarshal(ls[3], &r)
				r.Prev = strings.Repeat("ab", 32)
				b, _ := json.Marshal(r)
				ls[3] = append(b, '\n')
				return ls
			},
			line: 4, kind: ErrModified, contains: "prev does not match",
		},
		{
			name: "deleted line",
			mutate: func(ls [][]byte) [][]byte {
				return append(ls[:2:2], ls[3:]...)
			},
			line: 3, kind: ErrDeleted, contains: "record 3 is missing",
		},
		{
			name: "deleted two lines",
			mutate: func(ls [][]byte) [][]byte {
				return append(ls[:1:1], ls[3:]...)
			},
			line: 2, kind: ErrDeleted, contains: "2 records (seq 2 to 3)",
		},
		{
			name: "deleted first line",
			mutate: func(ls [][]byte) [][]byte {
				return ls[1:]
			},
			line: 1, kind: ErrDeleted, contains: "record 1 is missing",
		},
		{
			name: "swapped lines",
			mutate: func(ls [][]byte) [][]byte {
				ls[2], ls[3] = ls[3], ls[2]
				return ls
			},
			line: 3, kind: ErrReordered, contains: "appears later on line 4",
		},
		{
			name: "line moved to the end",
			mutate: func(ls [][]byte) [][]byte {
				moved := ls[1]
				ls = append(ls[:1:1], ls[2:]...)
				return append(ls, moved)
			},
			line: 2, kind: ErrReordered, contains: "appears later on line 5",
		},
		{
			name: "inserted forged record",
			mutate: func(ls [][]byte) [][]byte {
				// Chained correctly onto line 2, but line 3 still points at line 2.
				forged, _ := json.Marshal(Record{Time: t0, Seq: 3, Type: TypeSessionStarted, User: "mallory", Prev: hex.EncodeToString(sha256Of(ls[1]))})
				out := append([][]byte{}, ls[:2]...)
				out = append(out, append(forged, '\n'))
				return append(out, ls[2:]...)
			},
			line: 4, kind: ErrReordered, contains: "inserted",
		},
		{
			name: "duplicated line",
			mutate: func(ls [][]byte) [][]byte {
				out := append([][]byte{}, ls[:3]...)
				out = append(out, ls[2])
				return append(out, ls[3:]...)
			},
			line: 4, kind: ErrReordered, contains: "repeats",
		},
		{
			name: "broken seq",
			mutate: func(ls [][]byte) [][]byte {
				ls[2] = bytes.Replace(ls[2], []byte(`"seq":3,`), []byte(`"seq":9,`), 1)
				return ls
			},
			line: 3, kind: ErrSeq, contains: "seq jumps from 2 to 9",
		},
		{
			name: "first prev not genesis",
			mutate: func(ls [][]byte) [][]byte {
				ls[0] = bytes.Replace(ls[0], []byte(`"prev":"0`), []byte(`"prev":"1`), 1)
				return ls
			},
			line: 1, kind: ErrModified, contains: "genesis",
		},
		{
			name: "garbage line",
			mutate: func(ls [][]byte) [][]byte {
				ls[1] = []byte("garbage\n")
				return ls
			},
			line: 2, kind: ErrMalformed, contains: "not a valid JSON",
		},
		{
			name: "empty line inserted",
			mutate: func(ls [][]byte) [][]byte {
				out := append([][]byte{}, ls[:2]...)
				out = append(out, []byte("\n"))
				return append(out, ls[2:]...)
			},
			line: 3, kind: ErrMalformed, contains: "not a valid JSON",
		},
		{
			name: "overlong line",
			mutate: func(ls [][]byte) [][]byte {
				ls[1] = append(bytes.Repeat([]byte("x"), MaxRecordSize+10), '\n')
				return ls
			},
			line: 2, kind: ErrMalformed, contains: "longer than",
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			path := writeN(t, 5)
			writeLines(t, path, tc.mutate(readLines(t, path)))
			_, err := VerifyFile(path)
			var ve *VerifyError
			if !errors.As(err, &ve) {
				t.Fatalf("VerifyFile = %v, want a *VerifyError", err)
			}
			if ve.Line != tc.line || !errors.Is(err, tc.kind) || !strings.Contains(err.Error(), tc.contains) {
				t.Fatalf("VerifyFile error %q (line %d, kind %v), want line %d, kind %v, containing %q", err, ve.Line, ve.Kind, tc.line, tc.kind, tc.contains)
			}
			if !strings.Contains(err.Error(), fmt.Sprintf("line %d:", tc.line)) {
				t.Fatalf("error %q does not name line %d", err, tc.line)
			}
		})
	}
}

// The chain alone cannot see the newest records being cut off; the head
// anchor can. This test pins that documented limit so nobody oversells it.
func TestTruncationNeedsAnchor(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	l := openLog(t, path)
	for i := 1; i <= 4; i++ {
		if err := l.Write(sampleRecord(i)); err != nil {
			t.Fatal(err)
		}
	}
	anchorSeq, anchorHead := l.Head()
	l.Close()
	lines := readLines(t, path)
	writeLines(t, path, lines[:3])
	res, err := VerifyFile(path)
	if err != nil {
		t.Fatalf("truncated log: %v (the chain itself cannot detect this)", err)
	}
	if res.LastSeq == anchorSeq || res.Head == anchorHead {
		t.Fatalf("truncated log still matches the anchor: %+v", res)
	}
}

func TestTornTail(t *testing.T) {
	path := writeN(t, 3)
	intact, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	torn := []byte(`{"time":"2026-11-25T12:00:04Z","seq":4,"type":"sess`)
	if err := os.WriteFile(path, append(append([]byte{}, intact...), torn...), 0o600); err != nil {
		t.Fatal(err)
	}

	res, err := VerifyFile(path)
	if err != nil {
		t.Fatalf("torn tail reported as an error: %v", err)
	}
	if !res.TornTail || res.TornBytes != len(torn) || res.Records != 3 {
		t.Fatalf("VerifyFile = %+v, want torn tail of %d bytes after 3 records", res, len(torn))
	}

	// Open seals the fragment and the chain continues.
	l := openLog(t, path)
	if seq, _ := l.Head(); seq != 4 {
		t.Fatalf("after sealing, head seq = %d, want 4 (the log.recovered record)", seq)
	}
	if err := l.Write(sampleRecord(5)); err != nil {
		t.Fatal(err)
	}
	l.Close()

	after, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(after, append(append([]byte{}, intact...), append(torn, '\n')...)) {
		t.Fatalf("the torn bytes were not kept in place:\n%s", after)
	}
	lines := splitLines(after)
	var rec Record
	if err := json.Unmarshal(lines[4], &rec); err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(torn)
	if rec.Type != TypeLogRecovered || rec.Seq != 4 || rec.Extra["torn_bytes"] != strconv.Itoa(len(torn)) || rec.Extra["torn_sha256"] != hex.EncodeToString(sum[:]) {
		t.Fatalf("recovery record = %+v", rec)
	}
	if rec.Prev != hex.EncodeToString(sha256Of(lines[2])) {
		t.Fatal("log.recovered does not chain onto the last complete record")
	}

	res, err = VerifyFile(path)
	if err != nil {
		t.Fatalf("VerifyFile after sealing: %v", err)
	}
	if res.TornTail || res.Records != 5 || res.LastSeq != 5 || len(res.Sealed) != 1 || res.Sealed[0] != 4 {
		t.Fatalf("VerifyFile after sealing = %+v", res)
	}

	// Altering the sealed fragment afterwards is tampering.
	lines[3] = []byte(`{"time":"2026-11-25T12:00:04Z","seq":4,"type":"xxxx` + "\n")
	writeLines(t, path, lines)
	_, err = VerifyFile(path)
	var ve *VerifyError
	if !errors.As(err, &ve) || ve.Line != 4 || !errors.Is(err, ErrModified) {
		t.Fatalf("altered sealed line: %v, want ErrModified on line 4", err)
	}
}

func sha256Of(b []byte) []byte {
	s := sha256.Sum256(b)
	return s[:]
}

func TestTornTailVariants(t *testing.T) {
	t.Run("only newline lost", func(t *testing.T) {
		path := writeN(t, 2)
		lines := readLines(t, path)
		// A complete third record whose newline never reached the disk.
		full := filepath.Join(t.TempDir(), "full.log")
		l := openLog(t, full)
		for i := 1; i <= 3; i++ {
			l.Write(sampleRecord(i))
		}
		l.Close()
		third := readLines(t, full)[2]
		writeLines(t, path, append(lines, third[:len(third)-1]))
		res, err := VerifyFile(path)
		if err != nil || !res.TornTail || res.Records != 2 {
			t.Fatalf("VerifyFile = %+v, %v", res, err)
		}
		openLog(t, path).Close()
		res, err = VerifyFile(path)
		if err != nil || res.TornTail || res.Records != 3 || len(res.Sealed) != 1 {
			t.Fatalf("after sealing: %+v, %v", res, err)
		}
	})
	t.Run("last record cut mid-write", func(t *testing.T) {
		path := writeN(t, 3)
		fi, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(path, fi.Size()-20); err != nil {
			t.Fatal(err)
		}
		res, err := VerifyFile(path)
		if err != nil || !res.TornTail || res.Records != 2 {
			t.Fatalf("VerifyFile = %+v, %v", res, err)
		}
		l := openLog(t, path)
		if err := l.Write(sampleRecord(4)); err != nil {
			t.Fatal(err)
		}
		l.Close()
		res, err = VerifyFile(path)
		if err != nil || res.TornTail || res.Records != 4 || res.LastSeq != 4 || len(res.Sealed) != 1 || res.Sealed[0] != 3 {
			t.Fatalf("after sealing: %+v, %v", res, err)
		}
	})
	t.Run("first line torn", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "audit.log")
		writeLines(t, path, [][]byte{[]byte(`{"ti`)})
		l := openLog(t, path)
		if err := l.Write(sampleRecord(1)); err != nil {
			t.Fatal(err)
		}
		l.Close()
		res, err := VerifyFile(path)
		if err != nil || res.Records != 2 || len(res.Sealed) != 1 || res.Sealed[0] != 1 {
			t.Fatalf("VerifyFile = %+v, %v", res, err)
		}
	})
}

func TestOpenRefusesUnexplainableTail(t *testing.T) {
	t.Run("last complete line is not a record", func(t *testing.T) {
		path := writeN(t, 2)
		lines := append(readLines(t, path), []byte("garbage\n"))
		writeLines(t, path, lines)
		before, _ := os.ReadFile(path)
		l, err := Open(path, nil)
		if err == nil {
			l.Close()
			t.Fatal("Open chained onto a garbage line")
		}
		if !strings.Contains(err.Error(), "line 3") || !strings.Contains(err.Error(), "wicket audit verify") {
			t.Fatalf("error %q should name line 3 and say what to do", err)
		}
		after, _ := os.ReadFile(path)
		if !bytes.Equal(before, after) {
			t.Fatal("a refused Open modified the file")
		}
	})
	t.Run("overlong unterminated tail", func(t *testing.T) {
		path := writeN(t, 2)
		lines := append(readLines(t, path), bytes.Repeat([]byte("x"), MaxRecordSize+1))
		writeLines(t, path, lines)
		l, err := Open(path, nil)
		if err == nil {
			l.Close()
			t.Fatal("Open sealed an overlong tail")
		}
		res, verr := VerifyFile(path)
		if !errors.Is(verr, ErrMalformed) || res.Records != 2 {
			t.Fatalf("VerifyFile = %+v, %v, want ErrMalformed after 2 records", res, verr)
		}
	})
}
