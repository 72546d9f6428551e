package tunnel

import "errors"

// Sentinel errors. Compare with errors.Is; the errors returned by this package
// wrap them with context.
var (
	// ErrSessionClosed: the session (and so every stream on it) has ended.
	ErrSessionClosed = errors.New("tunnel session closed")
	// ErrStreamReset: the peer reset the stream (it gave up on it, or its
	// backlog was full).
	ErrStreamReset = errors.New("tunnel stream reset by peer")
	// ErrKeepaliveTimeout: the peer stopped answering keepalive pings.
	ErrKeepaliveTimeout = errors.New("tunnel peer stopped answering keepalives")
	// ErrWriteTimeout: a write to the connection made no progress within
	// Config.ConnectionWriteTimeout; the whole session was closed (yamux #142).
	ErrWriteTimeout = errors.New("tunnel connection write timed out")
	// ErrGoAway: the peer no longer accepts new streams on this session (it is
	// draining); open the stream on a newer session.
	ErrGoAway = errors.New("tunnel peer is draining this session")

	// ErrBadHeader: a stream header could not be decoded (truncated, oversized,
	// malformed). The stream is refused; the session keeps serving others.
	ErrBadHeader = errors.New("malformed tunnel stream header")
	// ErrHeaderTooLarge: a stream header is larger than Config.MaxHeaderSize.
	// It also matches ErrBadHeader.
	ErrHeaderTooLarge = errors.New("tunnel stream header too large")
	// ErrUnsupportedVersion: a header or reply carries a protocol version this
	// side does not speak. It also matches ErrBadHeader.
	ErrUnsupportedVersion = errors.New("unsupported tunnel protocol version")
	// ErrBadReply: the stream-open reply could not be decoded.
	ErrBadReply = errors.New("malformed tunnel stream reply")

	// Reply statuses as errors: OpenStream returns a *ReplyError that matches
	// one of these with errors.Is.
	ErrUnknownResource = errors.New("unknown resource")
	ErrDialFailed      = errors.New("dial failed")
	ErrRefused         = errors.New("stream refused")
	ErrUnavailable     = errors.New("resource unavailable")

	// ErrNotReplied: payload was written on an accepted stream before Reply.
	ErrNotReplied = errors.New("tunnel stream: Reply must be sent before any payload")
	// ErrAlreadyReplied: Reply was called twice, or on a stream this side opened.
	ErrAlreadyReplied = errors.New("tunnel stream: reply already sent or not ours to send")
	// ErrControlTooLarge: a control message exceeds MaxControlMessageSize.
	ErrControlTooLarge = errors.New("tunnel control message too large")

	// ErrTLSVersion: the connection did not negotiate TLS 1.3.
	ErrTLSVersion = errors.New("tunnel requires TLS 1.3")
	// ErrALPN: the peer did not agree on the required ALPN protocol.
	ErrALPN = errors.New("tunnel ALPN protocol not negotiated")
	// ErrNoPeerCertificate: the peer presented no certificate (mTLS is required).
	ErrNoPeerCertificate = errors.New("tunnel peer presented no certificate")
)
