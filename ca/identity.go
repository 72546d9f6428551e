package ca

import (
	"crypto/x509"
	"fmt"
	"net/url"
	"regexp"
	"strings"
)

// Role is what an identity may do; it is the first path segment of the SPIFFE ID.
type Role string

// The roles Wicket issues certificates for.
const (
	RoleAgent   Role = "agent"
	RoleUser    Role = "user"
	RoleGateway Role = "gateway"
)

// DefaultTrustDomain is the SPIFFE trust domain used when Config.TrustDomain is empty.
const DefaultTrustDomain = "wicket.local"

var nameRE = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`)

// ValidName reports whether name may be used as an agent, user or gateway name:
// lowercase letters, digits and inner hyphens, 1 to 63 characters (a DNS label), so it
// is safe in a URI path, a file name and a log line.
func ValidName(name string) error {
	if !nameRE.MatchString(name) {
		return fmt.Errorf("%w: %q must be 1-63 lowercase letters, digits or inner hyphens", ErrInvalidName, name)
	}
	return nil
}

func validRole(r Role) error {
	switch r {
	case RoleAgent, RoleUser, RoleGateway:
		return nil
	}
	return fmt.Errorf("%w: unknown role %q (want agent, user or gateway)", ErrWrongRole, r)
}

// Identity is a parsed SPIFFE ID spiffe://<TrustDomain>/<Role>/<Name>. The SPIFFE URI,
// not the subject CN, is what Wicket authorizes on.
type Identity struct {
	TrustDomain string
	Role        Role
	Name        string
}

// URI returns the SPIFFE ID as a URL.
func (id Identity) URI() *url.URL {
	return &url.URL{Scheme: "spiffe", Host: id.TrustDomain, Path: "/" + string(id.Role) + "/" + id.Name}
}

// String returns the SPIFFE ID text, e.g. spiffe://wicket.local/agent/db1.
func (id Identity) String() string { return id.URI().String() }

// ParseIdentityURI parses and validates a SPIFFE ID of Wicket's shape.
func ParseIdentityURI(u *url.URL) (Identity, error) {
	if u == nil || u.Scheme != "spiffe" || u.Host == "" || u.User != nil || u.Port() != "" ||
		u.RawQuery != "" || u.Fragment != "" || u.Opaque != "" || u.RawPath != "" {
		return Identity{}, fmt.Errorf("%w: %q is not a spiffe://<trust-domain>/<role>/<name> URI", ErrNoIdentity, u)
	}
	parts := strings.Split(strings.TrimPrefix(u.Path, "/"), "/")
	if len(parts) != 2 {
		return Identity{}, fmt.Errorf("%w: %q does not have the form spiffe://<trust-domain>/<role>/<name>", ErrNoIdentity, u)
	}
	id := Identity{TrustDomain: u.Host, Role: Role(parts[0]), Name: parts[1]}
	if err := validRole(id.Role); err != nil {
		return Identity{}, err
	}
	if err := ValidName(id.Name); err != nil {
		return Identity{}, err
	}
	return id, nil
}

// ParseIdentity returns the identity of cert: it must carry exactly one URI SAN, and
// that URI must be a Wicket SPIFFE ID. Certificates with zero or several URIs are
// refused rather than guessed at.
func ParseIdentity(cert *x509.Certificate) (Identity, error) {
	if cert == nil {
		return Identity{}, fmt.Errorf("%w: no certificate", ErrNoIdentity)
	}
	if len(cert.URIs) != 1 {
		return Identity{}, fmt.Errorf("%w: certificate has %d URI SANs, want exactly one SPIFFE ID", ErrNoIdentity, len(cert.URIs))
	}
	return ParseIdentityURI(cert.URIs[0])
}
