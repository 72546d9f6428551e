package pgwire

import (
	"encoding/binary"
	"fmt"
	"io"
	"net"

	"github.com/jackc/pgx/v5/pgproto3"
)

// MaxStartupSize is the longest startup packet ReadStartup accepts, length
// prefix included: PostgreSQL's own limit (MAX_STARTUP_PACKET_LENGTH).
const MaxStartupSize = 10000

// Request codes of the startup phase, carried where a StartupMessage carries its
// protocol version.
const (
	codeCancel    = 80877102
	codeSSL       = 80877103
	codeGSSENC    = 80877104
	protocol30    = pgproto3.ProtocolVersionNumber // 3.0
	specialMajor  = 1234                           // the major "version" of the request codes
	maxNegotiate  = 2                              // SSLRequest/GSSENCRequest answered before the StartupMessage
	tlsHandshake  = 0x16                           // first byte of a TLS record carrying a ClientHello
	minStartupLen = 8                              // length and code
)

// tlsAlertHandshakeFailure is a TLS record: fatal alert handshake_failure. A
// client that opened with a ClientHello (direct SSL) then reports a TLS
// handshake failure instead of a confusing protocol error.
var tlsAlertHandshakeFailure = []byte{21, 3, 3, 0, 2, 2, 40}

// Startup is the client's first packet, read by ReadStartup.
type Startup struct {
	// Raw is the StartupMessage (or CancelRequest) exactly as received, length
	// prefix included, to forward verbatim to the server.
	Raw []byte
	// User is the "user" parameter.
	User string
	// Database is the "database" parameter, or User when it is absent, as
	// PostgreSQL does.
	Database string
	// Params holds every parameter of the StartupMessage, user and database included.
	Params map[string]string
	// Cancel is set when the connection was a CancelRequest: no session follows,
	// and User, Database and Params are empty. Raw holds the request too.
	Cancel *pgproto3.CancelRequest
}

// ReadStartup reads the client's first packet(s) from c. It answers SSLRequest
// and GSSENCRequest with 'N' (the client leg is already inside Wicket's mTLS,
// and the bytes must be readable here), at most twice, then reads the
// StartupMessage or a CancelRequest.
//
// It refuses, with an error wrapping the sentinel: a first byte 0x16
// (PostgreSQL 17 direct SSL), after writing a TLS handshake_failure alert so
// the client reports a clear TLS error (ErrDirectTLS); a packet over
// MaxStartupSize (ErrStartupTooLarge); a protocol version other than 3.0,
// 3.2 included (ErrProtocolVersion); anything else that does not decode
// (ErrBadStartup). It reads exactly the packets' bytes, nothing beyond, and
// sets no deadline: the caller bounds the time the client has.
func ReadStartup(c net.Conn) (*Startup, error) {
	for negotiated := 0; ; negotiated++ {
		pkt, err := readStartupPacket(c)
		if err != nil {
			return nil, err
		}
		code := binary.BigEndian.Uint32(pkt[4:8])
		switch {
		case code == codeSSL || code == codeGSSENC:
			if len(pkt) != 8 {
				return nil, fmt.Errorf("%w: the encryption request is %d bytes long instead of 8; use a PostgreSQL client", ErrBadStartup, len(pkt))
			}
			if negotiated == maxNegotiate {
				return nil, fmt.Errorf("%w: more than %d encryption requests; connect with sslmode=disable or prefer", ErrBadStartup, maxNegotiate)
			}
			if _, err := c.Write([]byte{'N'}); err != nil {
				return nil, fmt.Errorf("answer the client's encryption request: %w", err)
			}
		case code == codeCancel:
			return decodeCancel(pkt)
		case code == protocol30:
			return decodeStartup(pkt)
		case code>>16 == specialMajor:
			return nil, fmt.Errorf("%w: unknown request code %d.%d; use a PostgreSQL client", ErrBadStartup, code>>16, code&0xffff)
		default:
			return nil, fmt.Errorf("%w: the client asked for protocol %d.%d, Wicket supports 3.0 only; use max_protocol_version=3.0", ErrProtocolVersion, code>>16, code&0xffff)
		}
	}
}

// readStartupPacket reads one length-prefixed startup-phase packet, refusing
// direct TLS and lengths out of bounds before reading the body.
func readStartupPacket(c net.Conn) ([]byte, error) {
	var head [4]byte
	if _, err := io.ReadFull(c, head[:1]); err != nil {
		return nil, fmt.Errorf("%w: the client sent no startup packet: %v", ErrBadStartup, err)
	}
	if head[0] == tlsHandshake {
		c.Write(tlsAlertHandshakeFailure)
		return nil, fmt.Errorf("%w: the client opened with TLS (sslnegotiation=direct); connect with sslnegotiation=postgres and sslmode=disable or prefer", ErrDirectTLS)
	}
	if _, err := io.ReadFull(c, head[1:]); err != nil {
		return nil, fmt.Errorf("%w: the startup packet ended inside its length: %v", ErrBadStartup, err)
	}
	n := binary.BigEndian.Uint32(head[:])
	if n > MaxStartupSize {
		return nil, fmt.Errorf("%w: the client announced %d bytes, the limit is %d", ErrStartupTooLarge, n, MaxStartupSize)
	}
	if n < minStartupLen {
		return nil, fmt.Errorf("%w: the startup packet is %d bytes long, under the minimum of %d", ErrBadStartup, n, minStartupLen)
	}
	pkt := make([]byte, n)
	copy(pkt, head[:])
	if _, err := io.ReadFull(c, pkt[4:]); err != nil {
		return nil, fmt.Errorf("%w: the startup packet ended after fewer than its %d bytes: %v", ErrBadStartup, n, err)
	}
	return pkt, nil
}

func decodeCancel(pkt []byte) (s *Startup, err error) {
	defer recoverBadStartup(&err)
	var cr pgproto3.CancelRequest
	if err := cr.Decode(pkt[4:]); err != nil {
		return nil, fmt.Errorf("%w: the CancelRequest does not decode (%v); use a PostgreSQL client", ErrBadStartup, err)
	}
	return &Startup{Raw: pkt, Cancel: &cr}, nil
}

func decodeStartup(pkt []byte) (s *Startup, err error) {
	defer recoverBadStartup(&err)
	var sm pgproto3.StartupMessage
	if err := sm.Decode(pkt[4:]); err != nil {
		return nil, fmt.Errorf("%w: the StartupMessage does not decode (%v); use a PostgreSQL client", ErrBadStartup, err)
	}
	user := sm.Parameters["user"]
	if user == "" {
		return nil, fmt.Errorf("%w: the StartupMessage names no user; set the database user in the connection string", ErrBadStartup)
	}
	db := sm.Parameters["database"]
	if db == "" {
		db = user
	}
	return &Startup{Raw: pkt, User: user, Database: db, Params: sm.Parameters}, nil
}

// recoverBadStartup turns a panic of a decoder on hostile bytes into ErrBadStartup.
func recoverBadStartup(err *error) {
	if r := recover(); r != nil {
		*err = fmt.Errorf("%w: the decoder failed on the packet (%v); use a PostgreSQL client", ErrBadStartup, r)
	}
}

// ErrorMessage encodes an ErrorResponse of severity FATAL with the SQLSTATE
// code and the message msg prefixed "wicket: ", to write to a client before
// closing its connection.
func ErrorMessage(code, msg string) []byte {
	e := pgproto3.ErrorResponse{
		Severity:            "FATAL",
		SeverityUnlocalized: "FATAL",
		Code:                code,
		Message:             "wicket: " + msg,
	}
	b, err := e.Encode(nil)
	if err != nil {
		// Encode fails only for a message over 1 GiB; msg is ours and short.
		panic("pgwire: encode ErrorResponse: " + err.Error())
	}
	return b
}
