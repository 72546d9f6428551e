package tunnel

import (
	"bytes"
	"errors"
	"io"
	"reflect"
	"strings"
	"testing"
)

func TestHeaderRoundTrip(t *testing.T) {
	cases := []Header{
		{Kind: KindData, Resource: "postgres", SessionID: "s-123"},
		{Kind: KindControl},
		{Kind: KindData, Resource: "web", Fields: map[string]string{"b": "2", "a": "", "client": "alice@laptop"}},
		{Kind: KindData, Resource: strings.Repeat("r", 255), SessionID: strings.Repeat("s", 255)},
	}
	for _, h := range cases {
		b, err := appendHeader(nil, h, 4096)
		if err != nil {
			t.Fatalf("encode %+v: %v", h, err)
		}
		// Payload after the header must stay unread.
		r := bytes.NewReader(append(b, "payload"...))
		got, err := readHeader(r, 4096)
		if err != nil {
			t.Fatalf("decode %+v: %v", h, err)
		}
		h.Version = ProtocolVersion
		if !reflect.DeepEqual(got, h) {
			t.Fatalf("round trip: got %+v want %+v", got, h)
		}
		rest, _ := io.ReadAll(r)
		if string(rest) != "payload" {
			t.Fatalf("decoder consumed payload: %q left", rest)
		}
	}
}

// TestHeaderBytes pins the wire layout documented in PROTOCOL.md.
func TestHeaderBytes(t *testing.T) {
	b, err := appendHeader(nil, Header{Kind: KindData, Resource: "pg", SessionID: "s1",
		Fields: map[string]string{"k": "v"}}, 4096)
	if err != nil {
		t.Fatal(err)
	}
	want := []byte{
		1,     // version
		0, 12, // body length
		1,           // kind data
		2, 'p', 'g', // resource
		2, 's', '1', // session id
		1, 'k', 0, 1, 'v', // field k=v
	}
	if !bytes.Equal(b, want) {
		t.Fatalf("header bytes\n got % x\nwant % x", b, want)
	}
	r := appendReply(nil, StatusDialFailed, "no route")
	wantR := []byte{1, 2, 0, 8, 'n', 'o', ' ', 'r', 'o', 'u', 't', 'e'}
	if !bytes.Equal(r, wantR) {
		t.Fatalf("reply bytes\n got % x\nwant % x", r, wantR)
	}
}

func TestHeaderEncodeRefuses(t *testing.T) {
	for name, h := range map[string]Header{
		"no kind":         {Resource: "x"},
		"data no name":    {Kind: KindData},
		"long resource":   {Kind: KindData, Resource: strings.Repeat("x", 256)},
		"newline":         {Kind: KindData, Resource: "a\nb"},
		"bad utf8":        {Kind: KindData, Resource: "\xff"},
		"empty field key": {Kind: KindData, Resource: "x", Fields: map[string]string{"": "v"}},
		"future version":  {Version: 2, Kind: KindData, Resource: "x"},
	} {
		if _, err := appendHeader(nil, h, 4096); err == nil {
			t.Errorf("%s: encoded", name)
		}
	}
	big := Header{Kind: KindData, Resource: "x", Fields: map[string]string{"v": strings.Repeat("x", 5000)}}
	if _, err := appendHeader(nil, big, 4096); !errors.Is(err, ErrHeaderTooLarge) {
		t.Errorf("oversized: %v", err)
	}
}

func TestHeaderDecodeErrors(t *testing.T) {
	cases := map[string]struct {
		in   []byte
		want error
	}{
		"empty":       {nil, ErrBadHeader},
		"version":     {[]byte{2, 0, 3, 1, 0, 0}, ErrUnsupportedVersion},
		"too large":   {[]byte{1, 0x10, 0}, ErrHeaderTooLarge},
		"short body":  {[]byte{1, 0, 2, 1, 0}, ErrBadHeader},
		"dup field":   {[]byte{1, 0, 13, 2, 0, 0, 1, 'k', 0, 0, 1, 'k', 0, 0}, ErrBadHeader},
		"trunc field": {[]byte{1, 0, 5, 2, 0, 0, 1, 'k'}, ErrBadHeader},
	}
	for name, c := range cases {
		_, err := readHeader(bytes.NewReader(c.in), 4096)
		if !errors.Is(err, c.want) || !errors.Is(err, ErrBadHeader) {
			t.Errorf("%s: %v, want %v", name, err, c.want)
		}
	}
}

func TestReplyDecode(t *testing.T) {
	st, reason, err := readReply(bytes.NewReader(appendReply(nil, StatusRefused, "policy\x00says no"+strings.Repeat("é", 600))))
	if err != nil || st != StatusRefused || len(reason) > MaxReasonLen || strings.ContainsRune(reason, 0) {
		t.Fatalf("reply: %v %q %v", st, reason, err)
	}
	if _, _, err := readReply(bytes.NewReader([]byte{1, 0, 0xff, 0xff})); !errors.Is(err, ErrBadReply) {
		t.Fatalf("oversized reason: %v", err)
	}
	if _, _, err := readReply(bytes.NewReader([]byte{7, 0, 0, 0})); !errors.Is(err, ErrUnsupportedVersion) {
		t.Fatalf("reply version: %v", err)
	}
}

// FuzzDecodeHeader: the decoder never panics, never reads past what the
// prefix declares, never accepts more than MaxHeaderSize, and whatever it
// accepts re-encodes to a header that decodes to the same value.
func FuzzDecodeHeader(f *testing.F) {
	for _, h := range []Header{
		{Kind: KindData, Resource: "postgres", SessionID: "sess-1"},
		{Kind: KindControl},
		{Kind: KindData, Resource: "web", Fields: map[string]string{"a": "1", "client": "x"}},
	} {
		b, _ := appendHeader(nil, h, 4096)
		f.Add(b)
	}
	f.Add([]byte{1, 0xff, 0xff})
	f.Add([]byte{9, 0, 3, 1, 0, 0})
	f.Fuzz(func(t *testing.T, data []byte) {
		const max = 512
		r := bytes.NewReader(data)
		h, err := readHeader(r, max)
		if err != nil {
			if !errors.Is(err, ErrBadHeader) {
				t.Fatalf("decode error %v does not match ErrBadHeader", err)
			}
			return
		}
		consumed := len(data) - r.Len()
		if consumed > max {
			t.Fatalf("accepted a %d-byte header with limit %d", consumed, max)
		}
		enc, err := appendHeader(nil, h, max)
		if err != nil {
			t.Fatalf("decoded header %+v does not re-encode: %v", h, err)
		}
		if len(enc) != consumed {
			t.Fatalf("re-encoded length %d, consumed %d", len(enc), consumed)
		}
		h2, err := readHeader(bytes.NewReader(enc), max)
		if err != nil || !reflect.DeepEqual(h, h2) {
			t.Fatalf("re-decode: %+v vs %+v (%v)", h, h2, err)
		}
	})
}
