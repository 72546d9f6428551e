// Package public is the gateway's public HTTPS listener: it serves HTTP resources that agents
// expose, at public host names, to ordinary browsers and HTTP clients.
//
// Certificates for the published host names are obtained and renewed from an ACME CA (Let's
// Encrypt by default, any RFC 8555 CA, or the gateway's built-in CA) by certmagic, answering
// tls-alpn-01 on the HTTPS listener and http-01 on the plain HTTP listener (which otherwise only
// redirects to HTTPS). Renewal runs in the background; while the CA is unreachable the current
// certificate keeps being served and every failed attempt is logged and counted (Stats).
//
// Each request is reverse-proxied (net/http/httputil) over a connection that the StreamDialer
// opens: in the gateway, a tunnel stream to an agent exposing the host's resource. WebSocket
// upgrades and streaming responses pass through unbuffered. A host is either public, or open
// only to holders of a valid Wicket user certificate presented in the TLS handshake (mTLS,
// requested per SNI so public hosts never ask browsers for a certificate). Every request is
// audited: host, path without the query, status, bytes, user, duration.
//
// The package knows nothing of the gateway's registry, policy or CA: they come in through
// Config (StreamDialer, VerifyUser, Allow, Audit). It must NOT serve a name that is not
// published (no certificate is requested or presented for it), must NOT ask browsers of public
// hosts for a client certificate, must NOT forward a request for a "users" host without a
// verified user certificate, must NOT trust an identity header sent by the client (X-Wicket-User
// is always replaced), and must NOT log or audit query strings, headers or bodies.
package public
