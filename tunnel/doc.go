// Package tunnel is Wicket's transport: a mutually authenticated TLS 1.3
// connection carrying one hashicorp/yamux session, the small stream-open
// exchange that names what a stream is for, a control stream for hellos and
// updates, the relay that copies bytes between a stream and a TCP connection,
// and the reconnect backoff an agent loops on.
//
// Agents and users Dial out; the gateway hands each accepted, already
// handshaken *tls.Conn to Server. Either side may open streams. Every stream
// starts with a length-prefixed Header (protocol version, kind, resource,
// session id, extension fields) and the acceptor answers with a Status before
// any payload flows. The exact bytes are written down in PROTOCOL.md.
//
// What this package must NOT do: it knows certificates and bytes, never users,
// roles or policy. It does not decide who may reach which resource (the caller
// inspects Stream.Header and answers with Stream.Reply), it does not check
// revocation (the caller supplies the verify hook in its tls.Config), and it
// never logs payloads, keys or tokens.
package tunnel
