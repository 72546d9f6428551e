package tunnel

// ACME validation streams (PROTOCOL.md, "ACME validation streams"): the gateway's ACME
// server opens a KindData stream with ACMEValidationResource as the resource and the
// name and port being validated in these header fields.
const (
	// ACMEValidationResource is the resource of an ACME validation stream. Agents tell
	// these streams by the FieldACMEHost field, never by this name, so an exposed
	// resource of the same name is not confused with one.
	ACMEValidationResource = "acme-validation"
	// FieldACMEHost is the DNS name being validated.
	FieldACMEHost = "acme-host"
	// FieldACMEPort is "80" (http-01) or "443" (tls-alpn-01).
	FieldACMEPort = "acme-port"
)
