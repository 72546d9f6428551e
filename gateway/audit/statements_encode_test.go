package audit

import (
	"bytes"
	"encoding/json"
	"math/rand/v2"
	"strings"
	"testing"
	"time"
	"unicode/utf8"
)

// TestStatementLineEncoding checks the hand-written line encoder against encoding/json:
// for valid UTF-8 the bytes are those of a json.Encoder without HTML escaping, and any
// line decodes back to the statement it was made from.
func TestStatementLineEncoding(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	pieces := []string{"", "select 1", `"quoted"`, `back\slash`, "tab\tnew\nline\r", "\x00\x01\x1f\x7f",
		"<a href='x'>&amp;</a>", "é中文😀", "\u2028\u2029", "\xff\xfe", "a\xc3", "SELECT 42; UPDATE 3"}
	str := func() string {
		var b strings.Builder
		for n := rng.IntN(4); n > 0; n-- {
			b.WriteString(pieces[rng.IntN(len(pieces))])
		}
		return b.String()
	}
	for i := 0; i < 5000; i++ {
		s := Statement{Seq: rng.Uint64(), Time: time.Unix(rng.Int64N(4e9), rng.Int64N(1e9)), Kind: str(), SHA256: str(),
			Len: rng.IntN(1 << 20), Text: str(), TextTruncated: rng.IntN(2) == 0, Tag: str(), Rows: rng.Int64N(1e9),
			SQLState: str(), Status: str(), Duration: time.Duration(rng.Int64N(1e12)), Prev: str()}
		line, err := appendStatementLine([]byte("earlier bytes"), &s)
		if err != nil {
			t.Fatal(err)
		}
		line = bytes.TrimPrefix(line, []byte("earlier bytes"))
		var back stmtLine
		if err := json.Unmarshal(line, &back); err != nil {
			t.Fatalf("line %q does not decode: %v", line, err)
		}
		want := s
		want.Time = s.Time.UTC()
		want.Duration = s.Duration.Truncate(time.Microsecond)
		for _, f := range []*string{&want.Kind, &want.SHA256, &want.Text, &want.Tag, &want.SQLState, &want.Status, &want.Prev} {
			*f = perByteValid(*f)
		}
		if got := back.statement(); got != want {
			t.Fatalf("line %q decodes to\n%+v, want\n%+v", line, got, want)
		}
		if utf8.Valid(line) && !bytes.Contains(line, []byte(`\ufffd`)) {
			rec := stmtLine{Type: TypeStatement, Seq: s.Seq, Time: s.Time.UTC(), Kind: s.Kind, SHA256: s.SHA256,
				Len: s.Len, TextTruncated: s.TextTruncated, Tag: s.Tag, Rows: s.Rows, SQLState: s.SQLState,
				Status: s.Status, DurationUS: s.Duration.Microseconds(), Prev: s.Prev}
			if s.Text != "" {
				rec.Text = &s.Text
			}
			var ref bytes.Buffer
			enc := json.NewEncoder(&ref)
			enc.SetEscapeHTML(false)
			if err := enc.Encode(&rec); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(line, ref.Bytes()) {
				t.Fatalf("line\n%s differs from encoding/json's\n%s", line, ref.Bytes())
			}
		}
	}
}

// perByteValid replaces each byte of an invalid UTF-8 sequence with U+FFFD, as
// encoding/json does.
func perByteValid(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); {
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			b.WriteRune(utf8.RuneError)
		} else {
			b.WriteString(s[i : i+size])
		}
		i += size
	}
	return b.String()
}

// TestStatementLogInvalidUTF8Text: a text that is not UTF-8 (a LATIN1 client) keeps its
// valid prefix, marked cut, so verification never sees a text altered under its hash.
func TestStatementLogInvalidUTF8Text(t *testing.T) {
	dir := t.TempDir()
	l, err := OpenStatementLog(dir, StatementBegin{Session: "s1", RecordsText: true}, StatementLogOptions{NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Append(Statement{Kind: KindSimple, Status: StatusOK, Text: "select 'caf\xe9'"}); err != nil {
		t.Fatal(err)
	}
	if _, err := l.Close(); err != nil {
		t.Fatal(err)
	}
	_, stmts, err := ReadStatementLog(l.Path())
	if err != nil {
		t.Fatal(err)
	}
	if len(stmts) != 1 || stmts[0].Text != "select 'caf" || !stmts[0].TextTruncated || stmts[0].Len != len("select 'caf\xe9'") {
		t.Fatalf("statements = %+v", stmts)
	}
	if _, err := CheckStatementLog(l.Path()); err != nil {
		t.Fatalf("the log does not verify: %v", err)
	}
}

// TestStatementLogWritesOnTheTimer: appended lines reach the file at the latest at the
// timer's tick, without Close, and at once when they fill the flush buffer.
func TestStatementLogWritesOnTheTimer(t *testing.T) {
	dir := t.TempDir()
	l, err := OpenStatementLog(dir, StatementBegin{Session: "s2"}, StatementLogOptions{NoSync: true, SyncEvery: 20 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if err := l.Append(Statement{Kind: KindSimple, Status: StatusOK, Text: "select 1"}); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		info, err := CheckStatementLog(l.Path())
		if err == nil && info.Statements == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the line was not written by the timer: %+v, %v", info, err)
		}
		time.Sleep(5 * time.Millisecond)
	}
	l2, err := OpenStatementLog(dir, StatementBegin{Session: "s3"}, StatementLogOptions{NoSync: true, SyncEvery: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	defer l2.Close()
	n := 0
	for info, _ := CheckStatementLog(l2.Path()); info.Statements == 0; info, _ = CheckStatementLog(l2.Path()) {
		if err := l2.Append(Statement{Kind: KindSimple, Status: StatusOK, Text: "select 1"}); err != nil {
			t.Fatal(err)
		}
		if n++; n > 2*statementFlushSize/100 {
			t.Fatalf("%d lines appended and none written", n)
		}
	}
}
