package tunnel

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"unicode"
	"unicode/utf8"
)

// Kind says what a stream is for.
type Kind uint8

const (
	// KindData carries a client's bytes to or from a resource.
	KindData Kind = 1
	// KindControl carries length-prefixed JSON messages (hello, updates).
	KindControl Kind = 2
)

// String names the kind for logs.
func (k Kind) String() string {
	switch k {
	case KindData:
		return "data"
	case KindControl:
		return "control"
	}
	return fmt.Sprintf("kind(%d)", uint8(k))
}

// Header is the first thing written on every stream, by the side that opens it.
type Header struct {
	// Version is the protocol version; 0 means ProtocolVersion when encoding.
	Version uint8
	// Kind is KindData or KindControl.
	Kind Kind
	// Resource names what a data stream wants to reach (required for
	// KindData, at most 255 bytes of printable UTF-8).
	Resource string
	// SessionID ties the stream to the gateway's audit record (optional, at
	// most 255 bytes of printable UTF-8).
	SessionID string
	// Fields carries later extensions. Keys 1..255 bytes of printable UTF-8,
	// values up to 65535 bytes. A receiver ignores keys it does not know.
	Fields map[string]string
}

const (
	// headerPrefixLen is version (1) + body length (2).
	headerPrefixLen = 3
	maxNameLen      = 255
)

// appendHeader encodes h after dst (see PROTOCOL.md, "Stream header").
func appendHeader(dst []byte, h Header, maxSize int) ([]byte, error) {
	v := h.Version
	if v == 0 {
		v = ProtocolVersion
	}
	if v != ProtocolVersion {
		return nil, fmt.Errorf("encode stream header: %w: %d", ErrUnsupportedVersion, v)
	}
	if err := validateHeader(h); err != nil {
		return nil, fmt.Errorf("encode stream header: %w", err)
	}
	start := len(dst)
	dst = append(dst, v, 0, 0)
	dst = append(dst, byte(h.Kind))
	dst = append(dst, byte(len(h.Resource)))
	dst = append(dst, h.Resource...)
	dst = append(dst, byte(len(h.SessionID)))
	dst = append(dst, h.SessionID...)
	keys := make([]string, 0, len(h.Fields))
	for k := range h.Fields {
		keys = append(keys, k)
	}
	slices.Sort(keys) // deterministic bytes: same header, same encoding
	for _, k := range keys {
		val := h.Fields[k]
		dst = append(dst, byte(len(k)))
		dst = append(dst, k...)
		dst = binary.BigEndian.AppendUint16(dst, uint16(len(val)))
		dst = append(dst, val...)
	}
	n := len(dst) - start
	if n > maxSize || n-headerPrefixLen > 0xffff {
		return nil, fmt.Errorf("encode stream header: %w: %d bytes, limit %d", ErrHeaderTooLarge, n, maxSize)
	}
	binary.BigEndian.PutUint16(dst[start+1:], uint16(n-headerPrefixLen))
	return dst, nil
}

// validateHeader checks the rules both the encoder and the decoder enforce.
func validateHeader(h Header) error {
	switch h.Kind {
	case KindData:
		if h.Resource == "" {
			return fmt.Errorf("%w: data stream without a resource name", ErrBadHeader)
		}
	case KindControl:
	default:
		return fmt.Errorf("%w: unknown stream kind %d", ErrBadHeader, uint8(h.Kind))
	}
	if err := checkText("resource", h.Resource, maxNameLen); err != nil {
		return err
	}
	if err := checkText("session id", h.SessionID, maxNameLen); err != nil {
		return err
	}
	for k, v := range h.Fields {
		if k == "" {
			return fmt.Errorf("%w: empty field key", ErrBadHeader)
		}
		if err := checkText("field key", k, maxNameLen); err != nil {
			return err
		}
		if len(v) > 0xffff {
			return fmt.Errorf("%w: field %q value longer than 65535 bytes", ErrBadHeader, k)
		}
	}
	return nil
}

// checkText keeps names safe to log: valid UTF-8, no control characters.
func checkText(what, s string, max int) error {
	if len(s) > max {
		return fmt.Errorf("%w: %s longer than %d bytes", ErrBadHeader, what, max)
	}
	if !utf8.ValidString(s) {
		return fmt.Errorf("%w: %s is not valid UTF-8", ErrBadHeader, what)
	}
	for _, r := range s {
		if unicode.IsControl(r) {
			return fmt.Errorf("%w: %s contains a control character", ErrBadHeader, what)
		}
	}
	return nil
}

// readHeader reads one header from r, refusing (without reading the body) one
// whose declared size exceeds maxSize. It reads exactly the header's bytes and
// nothing more, so payload that follows stays in r.
func readHeader(r io.Reader, maxSize int) (Header, error) {
	var prefix [headerPrefixLen]byte
	if _, err := io.ReadFull(r, prefix[:]); err != nil {
		return Header{}, truncated(err, "header prefix")
	}
	if prefix[0] != ProtocolVersion {
		return Header{}, fmt.Errorf("%w: %w %d (this side speaks %d)", ErrBadHeader, ErrUnsupportedVersion, prefix[0], ProtocolVersion)
	}
	n := int(binary.BigEndian.Uint16(prefix[1:]))
	if headerPrefixLen+n > maxSize {
		return Header{}, fmt.Errorf("%w: %w: declares %d bytes, limit %d", ErrBadHeader, ErrHeaderTooLarge, headerPrefixLen+n, maxSize)
	}
	body := make([]byte, n)
	if _, err := io.ReadFull(r, body); err != nil {
		return Header{}, truncated(err, "header body")
	}
	return decodeHeaderBody(prefix[0], body)
}

func truncated(err error, what string) error {
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return fmt.Errorf("%w: truncated %s", ErrBadHeader, what)
	}
	return fmt.Errorf("read stream %s: %w", what, err)
}

// decodeHeaderBody parses the body that follows the 3-byte prefix.
func decodeHeaderBody(version uint8, b []byte) (Header, error) {
	h := Header{Version: version}
	if len(b) < 3 {
		return Header{}, fmt.Errorf("%w: body of %d bytes is shorter than the fixed fields", ErrBadHeader, len(b))
	}
	h.Kind = Kind(b[0])
	b = b[1:]
	var ok bool
	if h.Resource, b, ok = takeU8String(b); !ok {
		return Header{}, fmt.Errorf("%w: truncated resource", ErrBadHeader)
	}
	if h.SessionID, b, ok = takeU8String(b); !ok {
		return Header{}, fmt.Errorf("%w: truncated session id", ErrBadHeader)
	}
	for len(b) > 0 {
		var k string
		if k, b, ok = takeU8String(b); !ok || k == "" {
			return Header{}, fmt.Errorf("%w: truncated or empty field key", ErrBadHeader)
		}
		if len(b) < 2 {
			return Header{}, fmt.Errorf("%w: truncated length of field %q", ErrBadHeader, k)
		}
		vl := int(binary.BigEndian.Uint16(b))
		b = b[2:]
		if len(b) < vl {
			return Header{}, fmt.Errorf("%w: truncated value of field %q", ErrBadHeader, k)
		}
		if h.Fields == nil {
			h.Fields = make(map[string]string)
		}
		if _, dup := h.Fields[k]; dup {
			return Header{}, fmt.Errorf("%w: duplicate field %q", ErrBadHeader, k)
		}
		h.Fields[k] = string(b[:vl])
		b = b[vl:]
	}
	if err := validateHeader(h); err != nil {
		return Header{}, err
	}
	return h, nil
}

func takeU8String(b []byte) (string, []byte, bool) {
	if len(b) < 1 {
		return "", b, false
	}
	n := int(b[0])
	if len(b) < 1+n {
		return "", b, false
	}
	return string(b[1 : 1+n]), b[1+n:], true
}

// Status is the acceptor's answer to a stream-open header.
type Status uint8

const (
	// StatusOK: the stream is connected; payload may flow.
	StatusOK Status = 0
	// StatusUnknownResource: the acceptor does not expose that resource.
	StatusUnknownResource Status = 1
	// StatusDialFailed: the resource exists but could not be reached (the
	// reason says why).
	StatusDialFailed Status = 2
	// StatusRefused: the acceptor will not serve this stream (policy, bad
	// header, unsupported version, ...).
	StatusRefused Status = 3
	// StatusUnavailable: temporarily unable to serve (draining, overloaded);
	// retrying on another session may work.
	StatusUnavailable Status = 4
)

// String names the status for logs and errors.
func (s Status) String() string {
	switch s {
	case StatusOK:
		return "ok"
	case StatusUnknownResource:
		return "unknown resource"
	case StatusDialFailed:
		return "dial failed"
	case StatusRefused:
		return "refused"
	case StatusUnavailable:
		return "unavailable"
	}
	return fmt.Sprintf("status(%d)", uint8(s))
}

// ReplyError is what OpenStream returns when the peer answered with a status
// other than StatusOK. errors.Is matches ErrUnknownResource, ErrDialFailed,
// ErrRefused or ErrUnavailable.
type ReplyError struct {
	Status Status
	Reason string
}

// Error says what the peer answered, with its reason.
func (e *ReplyError) Error() string {
	if e.Reason == "" {
		return "stream open: " + e.Status.String()
	}
	return "stream open: " + e.Status.String() + ": " + e.Reason
}

// Is lets errors.Is(err, ErrDialFailed) and friends match.
func (e *ReplyError) Is(target error) bool {
	switch e.Status {
	case StatusUnknownResource:
		return target == ErrUnknownResource
	case StatusDialFailed:
		return target == ErrDialFailed
	case StatusRefused:
		return target == ErrRefused
	case StatusUnavailable:
		return target == ErrUnavailable
	}
	return false
}

// MaxReasonLen caps the reason text of a reply, in bytes.
const MaxReasonLen = 1024

const replyPrefixLen = 4 // version, status, reason length (2)

// appendReply encodes a reply (see PROTOCOL.md, "Reply"). The reason is cut to
// MaxReasonLen bytes on a rune boundary and stripped of control characters.
func appendReply(dst []byte, st Status, reason string) []byte {
	reason = cleanReason(reason)
	dst = append(dst, ProtocolVersion, byte(st))
	dst = binary.BigEndian.AppendUint16(dst, uint16(len(reason)))
	return append(dst, reason...)
}

func cleanReason(s string) string {
	s = strings.ToValidUTF8(s, "?")
	s = strings.Map(func(r rune) rune {
		if unicode.IsControl(r) {
			return ' '
		}
		return r
	}, s)
	for len(s) > MaxReasonLen {
		_, size := utf8.DecodeLastRuneInString(s)
		s = s[:len(s)-size]
	}
	return s
}

// readReply reads the acceptor's answer.
func readReply(r io.Reader) (Status, string, error) {
	var p [replyPrefixLen]byte
	if _, err := io.ReadFull(r, p[:]); err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return 0, "", fmt.Errorf("%w: stream ended before the reply", ErrBadReply)
		}
		return 0, "", err
	}
	if p[0] != ProtocolVersion {
		return 0, "", fmt.Errorf("%w: %w %d", ErrBadReply, ErrUnsupportedVersion, p[0])
	}
	n := int(binary.BigEndian.Uint16(p[2:]))
	if n > MaxReasonLen {
		return 0, "", fmt.Errorf("%w: reason of %d bytes exceeds %d", ErrBadReply, n, MaxReasonLen)
	}
	reason := make([]byte, n)
	if _, err := io.ReadFull(r, reason); err != nil {
		return 0, "", fmt.Errorf("%w: truncated reason", ErrBadReply)
	}
	return Status(p[1]), cleanReason(string(reason)), nil
}
