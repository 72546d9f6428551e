package agent

import (
	"strings"
	"testing"

	"github.com/wicketgw/wicket/tunnel"
)

func TestParseACMEHostAddr(t *testing.T) {
	for _, c := range []struct{ in, http, tls, err string }{
		{"127.0.0.1", "127.0.0.1:80", "127.0.0.1:443", ""},
		{"grafana.lan:5002", "grafana.lan:5002", "grafana.lan:443", ""},
		{"10.0.0.5:5002:5003", "10.0.0.5:5002", "10.0.0.5:5003", ""},
		{"[::1]:5002:5003", "[::1]:5002", "[::1]:5003", ""},
		{"[::1]", "[::1]:80", "[::1]:443", ""},
		{"", "", "", "no host"},
		{":80", "", "", "no host"},
		{"h:1:2:3", "", "", "too many ports"},
		{"h:http", "", "", "not a number"},
		{"h:70000", "", "", "not a number"},
		{"[::1", "", "", "unclosed"},
	} {
		h, tl, err := ParseACMEHostAddr(c.in)
		if c.err != "" {
			if err == nil || !strings.Contains(err.Error(), c.err) {
				t.Errorf("%q: err %v, want %q", c.in, err, c.err)
			}
			continue
		}
		if err != nil || h != c.http || tl != c.tls {
			t.Errorf("%q: %q %q %v, want %q %q", c.in, h, tl, err, c.http, c.tls)
		}
	}
}

// The agent dials only the address declared for a name, on the challenge's port, and
// nothing for an undeclared name or another port.
func TestACMEValidationTarget(t *testing.T) {
	hosts, err := validateACMEHosts(map[string]string{"Grafana.Corp": "127.0.0.1:5002"})
	if err != nil {
		t.Fatal(err)
	}
	a := &agent{acmeHosts: hosts}
	a.exposed.Store(newExposure(map[string]string{"web": "127.0.0.1:8080", "pg": "postgres://127.0.0.1?sslmode=disable"}))
	hdr := func(name, port string) tunnel.Header {
		return tunnel.Header{Kind: tunnel.KindData, Resource: tunnel.ACMEValidationResource,
			Fields: map[string]string{tunnel.FieldACMEHost: name, tunnel.FieldACMEPort: port}}
	}
	for _, c := range []struct {
		h    tunnel.Header
		want string
		ok   bool
	}{
		{hdr("grafana.corp", "80"), "127.0.0.1:5002", true},
		{hdr("grafana.corp", "443"), "127.0.0.1:443", true},
		{hdr("grafana.corp", "22"), "", false},
		{hdr("other.corp", "80"), "", false},
		{tunnel.Header{Kind: tunnel.KindData, Resource: "web"}, "127.0.0.1:8080", true},
		{tunnel.Header{Kind: tunnel.KindData, Resource: "pg"}, "127.0.0.1:5432", true},
		// A user stream for a resource named like the validation resource is no validation.
		{tunnel.Header{Kind: tunnel.KindData, Resource: tunnel.ACMEValidationResource}, "", false},
	} {
		got, ok, why := a.target(c.h)
		if got.addr != c.want || ok != c.ok || (!ok && why == "") {
			t.Errorf("target(%+v) = %q %v %q, want %q %v", c.h, got.addr, ok, why, c.want, c.ok)
		}
	}
	if _, err := validateACMEHosts(map[string]string{"*.corp": "127.0.0.1"}); err == nil {
		t.Error("a wildcard --acme-host was accepted")
	}
}
