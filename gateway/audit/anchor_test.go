package audit

import (
	"errors"
	"path/filepath"
	"strings"
	"testing"
)

// An anchor kept elsewhere catches what the chain alone cannot: records cut off the end, and
// a log rewritten from scratch with a valid chain of its own.
func TestVerifyAnchored(t *testing.T) {
	path := writeN(t, 10)
	res, err := VerifyFile(path)
	if err != nil {
		t.Fatal(err)
	}
	head := Anchor{Seq: res.LastSeq, Hash: res.Head}
	lines := readLines(t, path)
	mid := Anchor{Seq: 4, Hash: lineHash(lines[3])}

	if _, err := VerifyFileAnchored(path, head, mid); err != nil {
		t.Fatalf("intact log with its own anchors: %v", err)
	}

	// Cut the last three records: the chain still verifies, the anchor does not.
	writeLines(t, path, lines[:7])
	if _, err := VerifyFile(path); err != nil {
		t.Fatalf("a truncated chain verifies on its own (that is the gap anchors close): %v", err)
	}
	_, err = VerifyFileAnchored(path, head, mid)
	var ve *VerifyError
	if !errors.Is(err, ErrTruncated) || !errors.As(err, &ve) || !strings.Contains(ve.Detail, "ends at seq 7 but an anchor names seq 10") {
		t.Fatalf("truncated log: %v, want ErrTruncated naming seq 7 and 10", err)
	}
	if _, err := VerifyFileAnchored(path, mid); err != nil {
		t.Fatalf("an anchor inside what is left still holds: %v", err)
	}

	// A different log of the same length, chained correctly from genesis.
	other := filepath.Join(t.TempDir(), "audit.log")
	l := openLog(t, other)
	for i := 1; i <= 10; i++ {
		r := sampleRecord(i)
		r.User = "mallory"
		if err := l.Write(r); err != nil {
			t.Fatal(err)
		}
	}
	l.Close()
	_, err = VerifyFileAnchored(other, mid, head)
	if !errors.Is(err, ErrRewritten) || !errors.As(err, &ve) || ve.Line != 4 {
		t.Fatalf("rewritten log: %v, want ErrRewritten at line 4", err)
	}
}

func TestParseAnchor(t *testing.T) {
	h := strings.Repeat("ab", 32)
	a, err := ParseAnchor(" 42:" + strings.ToUpper(h) + "\n")
	if err != nil || a.Seq != 42 || a.Hash != h || a.String() != "42:"+h {
		t.Fatalf("ParseAnchor = %+v, %v", a, err)
	}
	for _, bad := range []string{"", "42", "42:", ":" + h, "0:" + h, "x:" + h, "42:" + h[:63], "42:" + h + "0", "42:" + strings.Repeat("zz", 32)} {
		if _, err := ParseAnchor(bad); err == nil || !strings.Contains(err.Error(), "SEQ:HASH") {
			t.Errorf("ParseAnchor(%q) = %v, want a clear refusal", bad, err)
		}
	}
}
