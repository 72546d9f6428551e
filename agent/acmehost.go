package agent

import (
	"fmt"
	"maps"
	"net"
	"slices"
	"strconv"
	"strings"

	"github.com/wicketgw/wicket/tunnel"
	"github.com/wicketgw/wicket/tunnel/pgwire"
)

// ACME validation through the agent (`--acme-host NAME=ADDR`): the agent vouches for NAME,
// and the gateway's ACME server routes the http-01 and tls-alpn-01 validation connections
// for NAME through this agent's session (if the administrator allowed this agent name to
// vouch for it). The agent dials only ADDR, on the port configured for the challenge, and
// only for a name it declared.

// acmeTarget is where validation connections for one declared name go.
type acmeTarget struct {
	http01, tlsALPN01 string // HOST:PORT
}

// ParseACMEHostAddr parses the ADDR of --acme-host NAME=ADDR: HOST (http-01 on port 80,
// tls-alpn-01 on 443), HOST:HTTP01PORT, or HOST:HTTP01PORT:TLSALPN01PORT, for an ACME
// client whose challenge server listens on other ports (lego --http.port, --tls.port).
// An IPv6 host is written in brackets: [::1]:5002:5003.
func ParseACMEHostAddr(addr string) (http01, tlsALPN01 string, err error) {
	host, rest := addr, ""
	if strings.HasPrefix(addr, "[") {
		end := strings.IndexByte(addr, ']')
		if end < 0 {
			return "", "", fmt.Errorf("%q: unclosed [ in an IPv6 address", addr)
		}
		host, rest = addr[1:end], addr[end+1:]
		if rest != "" && !strings.HasPrefix(rest, ":") {
			return "", "", fmt.Errorf("%q: expected :PORT after ]", addr)
		}
		rest = strings.TrimPrefix(rest, ":")
	} else if i := strings.IndexByte(addr, ':'); i >= 0 {
		host, rest = addr[:i], addr[i+1:]
	}
	if host == "" || strings.ContainsAny(host, " /") {
		return "", "", fmt.Errorf("%q: no host (want HOST, HOST:HTTP01PORT or HOST:HTTP01PORT:TLSALPN01PORT)", addr)
	}
	ports := []string{"80", "443"}
	if rest != "" {
		ps := strings.Split(rest, ":")
		if len(ps) > 2 {
			return "", "", fmt.Errorf("%q: too many ports (want HOST:HTTP01PORT:TLSALPN01PORT)", addr)
		}
		for i, p := range ps {
			if n, err := strconv.Atoi(p); err != nil || n < 1 || n > 65535 {
				return "", "", fmt.Errorf("%q: port %q is not a number from 1 to 65535", addr, p)
			}
			ports[i] = p
		}
	}
	return net.JoinHostPort(host, ports[0]), net.JoinHostPort(host, ports[1]), nil
}

// validateACMEHosts checks Config.ACMEHosts and returns the targets by (lowercase) name.
func validateACMEHosts(m map[string]string) (map[string]acmeTarget, error) {
	out := make(map[string]acmeTarget, len(m))
	for name, addr := range m {
		n := strings.ToLower(strings.TrimSuffix(name, "."))
		if !validDNSName(n) {
			return nil, fmt.Errorf("%w: --acme-host %s: not a DNS name", ErrConfig, name)
		}
		h, t, err := ParseACMEHostAddr(addr)
		if err != nil {
			return nil, fmt.Errorf("%w: --acme-host %s: %v", ErrConfig, name, err)
		}
		out[n] = acmeTarget{http01: h, tlsALPN01: t}
	}
	return out, nil
}

// validDNSName reports whether n is a DNS name of at least two labels (letters, digits,
// hyphens, no wildcard).
func validDNSName(n string) bool {
	if len(n) > 253 || !strings.Contains(n, ".") {
		return false
	}
	for _, l := range strings.Split(n, ".") {
		if l == "" || len(l) > 63 || l[0] == '-' || l[len(l)-1] == '-' {
			return false
		}
		for _, r := range l {
			if !(r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '-') {
				return false
			}
		}
	}
	return true
}

// acmeHostNames are the declared names, sorted, for the Hello.
func (a *agent) acmeHostNames() []string {
	return slices.Sorted(maps.Keys(a.acmeHosts))
}

// target is what a stream dials: an address, and for a PostgreSQL resource its URL, whose
// sslmode the agent negotiates with the database before relaying.
type target struct {
	addr string
	pg   *pgwire.Target
}

// target returns what to dial for a stream: an exposed resource, or for an ACME
// validation stream (tunnel.FieldACMEHost set) the declared name's address for that port.
// ok is false for anything else, with the reason to answer.
func (a *agent) target(h tunnel.Header) (t target, ok bool, reason string) {
	name, isACME := h.Fields[tunnel.FieldACMEHost]
	if !isACME {
		e := a.exposed.Load()
		addr, ok := e.targets[h.Resource]
		if pg := e.pg[h.Resource]; pg != nil {
			return target{addr: pg.Addr, pg: pg}, true, ""
		}
		return target{addr: addr}, ok, fmt.Sprintf("resource %s is not exposed by this agent", h.Resource)
	}
	ht, declared := a.acmeHosts[strings.ToLower(name)]
	if !declared {
		return target{}, false, fmt.Sprintf("this agent does not vouch for %s in ACME validation", name)
	}
	switch h.Fields[tunnel.FieldACMEPort] {
	case "80":
		return target{addr: ht.http01}, true, ""
	case "443":
		return target{addr: ht.tlsALPN01}, true, ""
	}
	return target{}, false, "ACME validation uses port 80 (http-01) or 443 (tls-alpn-01) only"
}
