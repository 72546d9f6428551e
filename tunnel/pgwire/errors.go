package pgwire

import "errors"

// Sentinel errors of the package. Every error ReadStartup or Follow returns for a
// refused input wraps one of these; compare with errors.Is.
var (
	// ErrDirectTLS marks a client that opened with a TLS ClientHello (PostgreSQL 17
	// direct SSL, sslnegotiation=direct): Wicket must read the protocol, so it refuses.
	ErrDirectTLS = errors.New("direct TLS negotiation is not supported")
	// ErrStartupTooLarge marks a startup packet longer than MaxStartupSize.
	ErrStartupTooLarge = errors.New("startup packet too large")
	// ErrProtocolVersion marks a StartupMessage for a protocol version other than 3.0.
	ErrProtocolVersion = errors.New("unsupported protocol version")
	// ErrBadStartup marks a startup packet that cannot be decoded.
	ErrBadStartup = errors.New("malformed startup packet")
	// ErrProtocolViolation marks a session ended because one side broke the
	// protocol: a message over the size cap, an unknown message type, a body
	// that does not decode, or more pending messages than the cap.
	ErrProtocolViolation = errors.New("protocol violation")
	// ErrStatementNotRecorded marks a session ended because Options.OnStatement
	// failed: the statement ran, but its result was withheld from the client.
	ErrStatementNotRecorded = errors.New("statement not recorded")
)
