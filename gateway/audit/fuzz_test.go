package audit

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"testing"
)

// FuzzVerifyByteFlip changes one byte of a valid log anywhere before its
// last line; every such change must be reported (the last line is the
// documented blind spot that head anchoring covers).
func FuzzVerifyByteFlip(f *testing.F) {
	dir := f.TempDir()
	path := filepath.Join(dir, "audit.log")
	l, err := OpenWithOptions(path, Options{Now: fixedClock(), NoSync: true})
	if err != nil {
		f.Fatal(err)
	}
	for i := 1; i <= 5; i++ {
		if err := l.Write(sampleRecord(i)); err != nil {
			f.Fatal(err)
		}
	}
	l.Close()
	log, err := os.ReadFile(path)
	if err != nil {
		f.Fatal(err)
	}
	lastStart := bytes.LastIndexByte(log[:len(log)-1], '\n') + 1
	for _, seed := range []struct {
		pos uint
		xor byte
	}{{0, 1}, {10, 0x20}, {uint(lastStart - 1), '\n' ^ 'x'}, {200, 0xff}, {uint(lastStart / 2), 1}} {
		f.Add(seed.pos, seed.xor)
	}
	f.Fuzz(func(t *testing.T, pos uint, xor byte) {
		if xor == 0 {
			return
		}
		i := int(pos % uint(lastStart))
		mutated := bytes.Clone(log)
		mutated[i] ^= xor
		_, err := Verify(bytes.NewReader(mutated))
		var ve *VerifyError
		if !errors.As(err, &ve) {
			t.Fatalf("flipping byte %d (%q -> %q) went unnoticed: %v", i, log[i], mutated[i], err)
		}
	})
}

// FuzzVerify feeds arbitrary bytes: Verify must not panic and must return
// either nil or a *VerifyError, never another kind of error for in-memory input.
func FuzzVerify(f *testing.F) {
	f.Add([]byte(""))
	f.Add([]byte("{}\n"))
	f.Add([]byte(`{"seq":1,"type":"x","prev":"` + Genesis + `"}` + "\n"))
	f.Add([]byte("garbage\n{\"seq\":1,\"type\":\"log.recovered\",\"prev\":\"" + Genesis + "\",\"extra\":{\"torn_bytes\":\"7\"}}\n"))
	f.Add([]byte("\n\n\n{"))
	f.Fuzz(func(t *testing.T, data []byte) {
		res, err := Verify(bytes.NewReader(data))
		var ve *VerifyError
		if err != nil && !errors.As(err, &ve) {
			t.Fatalf("Verify returned a non-VerifyError for in-memory input: %v", err)
		}
		if err == nil && res.Records > res.Lines {
			t.Fatalf("more records (%d) than lines (%d)", res.Records, res.Lines)
		}
	})
}
