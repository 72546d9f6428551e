// Package pgwire follows the PostgreSQL wire protocol (version 3.0) on the
// data path of a PostgreSQL resource, so that every statement of a session
// can be audited, and holds the agent's TLS leg to the database (target.go).
//
// # Where the protocol is parsed, and why
//
// The gateway parses; the agent only upgrades its own connection to the
// database to TLS ([Target.Negotiate]) and relays bytes. The agent is the
// component next to the untrusted network edge and may be compromised: if it
// parsed, a compromised agent could forge or hide statements at will.
// Parsed at the gateway, a statement record is derived from the bytes the
// user's own stream carried. A compromised agent controls the server side, so
// it can still lie about RESULTS — tags, row counts, errors, and which of the
// texts the user prepared an Execute is attributed to (names are tracked as
// the server confirms them) — but not about what the user sent. A compromised
// gateway can forge anything it records: the audit chain shows edits after
// the fact, not a lying writer.
//
// # What is hashed
//
// [Statement.Hash] is the SHA-256 of exactly the statement text bytes the
// client sent: the string of a Query message, or the query of the Parse that
// an Execute's portal was bound from, as on the wire (the client's encoding,
// normally UTF-8), without the NUL terminator. An auditor holding the text
// checks it with
//
//	printf '%s' "$SQL" | sha256sum
//
// A multi-statement Query ("select 1; select 2") is one record and one hash
// of the whole string. A FunctionCall has no text; its hash is that of the
// empty string and [Statement.FunctionOID] names the function.
//
// # Flow and bounds
//
// [ReadStartup] reads the startup phase (at most [MaxStartupSize] bytes a
// packet, as PostgreSQL), answering SSLRequest and GSSENCRequest with 'N'.
// [Follow] then relays with [tunnel.Relay], framing each direction as it
// passes (1 type byte, 4 length bytes). Message bodies are decoded with
// github.com/jackc/pgx/v5/pgproto3; only the kinds needed are kept, whole,
// until decoded: from the client Query, Parse, Execute, Describe, Close,
// Sync, Flush, Terminate; from the server CommandComplete, ErrorResponse,
// ReadyForQuery, BackendKeyData and the empty acknowledgements. Each is
// capped by [Options.MaxMessage] (64 MiB by default; the server's, which a
// compromised agent could inflate, by 1 MiB). Everything else —
// DataRow, CopyData, RowDescription, notices, authentication — streams
// through as it arrives, so a result of any size uses the relay's buffer
// only. Of a Bind, only the first 4096 bytes are kept (its portal and
// statement names must end there; the parameter values after them are
// never kept, recorded or logged). Password and SASL messages are never
// parsed. Pending requests and tracked prepared statements are capped by
// [Options.MaxPending] and [Options.MaxTracked].
//
// # What a record means
//
// One [Statement] per Query message (all its statements together, tags
// joined by "; "), per Execute, and per FunctionCall. Requests are matched to
// answers in order (a FIFO of the client messages that expect one), which
// covers pipelining (many Executes before one Sync, pgx batches and
// pipeline mode):
//
//   - An Execute's text is that of the statement its portal was bound
//     from. Statement and portal names are tracked as the server confirms
//     them (ParseComplete, BindComplete, CloseComplete; a simple Query drops
//     the unnamed ones), so a Parse the server refuses, a duplicate name,
//     cannot make an Execute be recorded with a text other than the one
//     that ran. A portal bound from a statement made by SQL PREPARE has no
//     text here (the PREPARE is its own record).
//   - An Execute with a row limit that ends in PortalSuspended is a
//     record of its own, Status ok, no tag, Rows the DataRows it returned;
//     the Execute that finishes the portal carries the CommandComplete tag.
//   - After an ErrorResponse the server discards everything up to the
//     Sync: the Executes in between are recorded "skipped", with the text
//     the client had bound them to. An error on a Parse, Bind, Describe or
//     Close is charged to the next Execute before the Sync (Status error,
//     that SQLSTATE); with no such Execute, a failed Parse or Bind is
//     recorded on its own (Kind extended). An error answering the Sync
//     itself (a deferred constraint failing at the implicit commit) is not
//     attributed: the Executes before it were already recorded ok.
//   - Statements pending when the session ends are recorded "incomplete".
//
// Records are made before the server's message that completes them is
// forwarded (fail closed). If [Options.OnStatement] fails, the session ends
// there: the statement has run on the server, but the client never sees its
// result; it gets an ErrorResponse (SQLSTATE 58000) instead.
//
// A protocol violation from either side ends the session with an
// ErrorResponse to the client (SQLSTATE 08P01, "wicket: protocol violation:
// ..."), written when the stream to the client is at a message boundary
// (it is not in the middle of a DataRow the server was sending, say: then
// the client sees the connection end).
//
// # Not supported
//
// Protocol 3.2 (PostgreSQL 18's longer cancel keys): the client must use
// max_protocol_version=3.0, the default of libpq and pgx. GSS encryption and
// client-side TLS: Wicket answers 'N', so the client leg must use sslmode
// disable, allow or prefer (the leg is inside Wicket's mTLS already), and
// direct SSL (sslnegotiation=direct) is refused with a TLS alert; SCRAM
// channel binding is therefore not used on the client leg.
package pgwire
