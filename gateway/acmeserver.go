package gateway

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/wicketgw/wicket/ca"
	"github.com/wicketgw/wicket/gateway/audit"
	"github.com/wicketgw/wicket/gateway/public"
	"github.com/wicketgw/wicket/tunnel"
)

// The ACME server for internal names (`wicket gateway --acme-server --acme-names ...`,
// DESIGN.md "ACME for private hosts"): the built-in CA's ACME provisioner at
// /acme/acme/directory on the gateway's port, open to the organization for the names in
// ACMEServerConfig.Names. Its http-01 and tls-alpn-01 validation connections for a name
// an allowed agent vouches for travel through that agent's session (acmehosts.go); names
// the public listener publishes with --acme-ca internal go to that listener; any other
// name is dialed directly. Every order, validation path, issuance and revocation is
// audited (type acme.*, cert.issued, cert.revoked) and counted.

// ACMEServerConfig turns on the ACME server for internal names.
type ACMEServerConfig struct {
	// Names is the allow-list: DNS names and *.suffix patterns (one label under suffix,
	// as certificate wildcards) the server issues for. Required.
	Names []string
	// RequireEAB requires External Account Binding: accounts are created only with a key
	// from `wicket token create acme PATTERN`, and order only names matching PATTERN.
	// Default false: anyone who reaches the gateway's port may create an account and
	// order names of the allow-list that it can validate.
	RequireEAB bool
	// Challenges is the subset of "http-01", "tls-alpn-01", "dns-01" offered. Default all.
	Challenges []string
	// CertLifetime is the validity of the certificates issued. Default 24h; 5m..24h.
	CertLifetime time.Duration
}

// acmeAllowedNames is the CA's ACME allow-list: the ACME server's names and, with
// --acme-ca internal, the published hosts.
func acmeAllowedNames(srv *ACMEServerConfig, published []string) ([]string, error) {
	var out []string
	if srv != nil {
		if len(srv.Names) == 0 {
			return nil, errors.New("gateway: --acme-server needs --acme-names: the DNS names or *.suffix patterns it may issue for")
		}
		for _, n := range srv.Names {
			n = strings.ToLower(strings.TrimSpace(n))
			if !validACMEPattern(n) {
				return nil, fmt.Errorf("gateway: --acme-names %q is not a lowercase DNS name or *.suffix such as grafana.corp or *.svc.example.internal", n)
			}
			out = append(out, n)
		}
	}
	out = append(out, published...)
	slices.Sort(out)
	return slices.Compact(out), nil
}

// prepareACMEServer loads the ACME host grants and sets the CA's ACME allow-list: the ACME
// server's names and the names the public listener publishes with --acme-ca internal.
func (g *Gateway) prepareACMEServer(publishedNames []string) error {
	var err error
	if g.acmeHostGrants, err = loadACMEHostGrants(g.cfg.DataDir); err != nil {
		return err
	}
	g.acmeRoutes.gate = g.acmeHostGrants.allowed
	g.acmeNames, err = acmeAllowedNames(g.cfg.ACMEServer, publishedNames)
	return err
}

// withACMEServer completes the public listener's ACME configuration (c: its names, its
// validation dialer) with the ACME server's: the allow-list of prepareACMEServer, the
// validation dialer that routes through agents, the settings, and the audit hooks.
func (g *Gateway) withACMEServer(c ca.ACMEConfig, published map[string]public.Host) ca.ACMEConfig {
	c.AllowedNames, c.OnOrder, c.OnRevoked = g.acmeNames, g.onACMEOrder, g.onACMERevoked
	if len(g.acmeNames) > 0 {
		c.DialContext = g.acmeValidationDialer(c.DialContext, published)
	}
	if srv := g.cfg.ACMEServer; srv != nil {
		c.RequireEAB, c.Challenges, c.Lifetime = srv.RequireEAB, srv.Challenges, srv.CertLifetime
	}
	return c
}

// acmeValidationDialer is the CA's validation dialer: a name the public listener
// publishes goes to it (publicDial), a name an allowed agent vouches for through that
// agent's session and nowhere else, any other name directly over the network. Each
// connection's path is audited and counted.
func (g *Gateway) acmeValidationDialer(publicDial func(ctx context.Context, network, addr string) (net.Conn, error), published map[string]public.Host) func(ctx context.Context, network, addr string) (net.Conn, error) {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		host, port, err := net.SplitHostPort(addr)
		if err != nil {
			return nil, err
		}
		name := strings.ToLower(strings.TrimSuffix(host, "."))
		rec := audit.Record{Type: audit.TypeACMEValidation, Outcome: audit.OutcomeOK,
			Extra: map[string]string{"dns_name": name, "port": port}}
		done := func(path string, conn net.Conn, err error) (net.Conn, error) {
			rec.Extra["path"] = path
			outcome := "ok"
			if err != nil {
				rec.Outcome, rec.Reason, outcome = audit.OutcomeError, err.Error(), "error"
			}
			g.counters.acme.inc("validation_"+path, outcome)
			g.recordRefusal(rec, err != nil)
			return conn, err
		}
		if _, ok := published[name]; ok && publicDial != nil {
			conn, err := publicDial(ctx, network, addr)
			return done("public", conn, err)
		}
		if cands := g.acmeRoutes.lookup(name); len(cands) > 0 {
			conn, agent, err := g.dialACMEHost(ctx, cands, name, port)
			rec.Agent = agent
			return done("agent", conn, err)
		}
		var d net.Dialer
		conn, err := d.DialContext(ctx, network, addr)
		return done("direct", conn, err)
	}
}

// dialACMEHost opens a validation stream for name:port on the first of cands (sessions
// of agents allowed to vouch for name that declared it) that accepts it. It never falls
// back to another path: a name an agent vouches for is validated through it or not at all.
func (g *Gateway) dialACMEHost(ctx context.Context, cands []*agentSession, name, port string) (net.Conn, string, error) {
	if port != "80" && port != "443" {
		return nil, cands[0].name, fmt.Errorf("ACME validation of %s on port %s: agents relay ports 80 and 443 only", name, port)
	}
	var lastErr error
	for _, as := range cands {
		st, err := as.sess.OpenStream(ctx, tunnel.Header{Version: tunnel.ProtocolVersion, Kind: tunnel.KindData,
			Resource: tunnel.ACMEValidationResource, SessionID: newID(),
			Fields: map[string]string{tunnel.FieldACMEHost: name, tunnel.FieldACMEPort: port}})
		if err == nil {
			return st, as.name, nil
		}
		lastErr = fmt.Errorf("agent %s: %w", as.name, err)
		var re *tunnel.ReplyError
		if errors.As(err, &re) {
			return nil, as.name, fmt.Errorf("ACME validation of %s through %w", name, lastErr)
		}
	}
	return nil, cands[len(cands)-1].name, fmt.Errorf("ACME validation of %s: no agent session vouching for it took the connection: %w", name, lastErr)
}

// onACMEOrder audits and counts a new-order of the ACME provisioner.
func (g *Gateway) onACMEOrder(o ca.ACMEOrder) {
	rec := audit.Record{Type: audit.TypeACMEOrder, Outcome: audit.OutcomeOK,
		Extra: map[string]string{"dns_names": strings.Join(o.Names, ","), "acme_account": o.AccountID,
			"status": fmt.Sprint(o.Status)}}
	outcome := "created"
	if o.Status >= 400 {
		rec.Outcome, rec.Reason, outcome = audit.OutcomeDenied, o.Reason, "refused"
		if len(rec.Reason) > 300 {
			rec.Reason = rec.Reason[:300]
		}
		if o.Status >= 500 {
			rec.Outcome, outcome = audit.OutcomeError, "error"
		}
	}
	g.counters.acme.inc("order", outcome)
	g.recordRefusal(rec, o.Status >= 400)
}

// recordRefusal writes rec; a refusal (refused true) goes through the refused-request limit,
// since anyone who reaches the port can cause one (the new-order pre-check runs before
// step-ca verifies the request's signature).
func (g *Gateway) recordRefusal(rec audit.Record, refused bool) {
	if !refused {
		g.record(rec)
		return
	}
	ok, suppressed := g.caRefusedLimit.allow(time.Now())
	if !ok {
		return
	}
	if suppressed > 0 {
		rec.Extra["suppressed_before"] = fmt.Sprint(suppressed)
	}
	g.record(rec)
}

// onACMERevoked audits and counts a certificate revoked through ACME.
func (g *Gateway) onACMERevoked(serial string) {
	g.counters.acme.inc("revoked", "ok")
	g.record(audit.Record{Type: audit.TypeACMERevoked, Outcome: audit.OutcomeOK, Serial: serial,
		Extra: map[string]string{"via": "acme"}})
	g.log.Info("ACME certificate revoked", "serial", serial)
}

// ACMEStatus is what `wicket ca status` shows of the ACME server (GET /v1/acme).
type ACMEStatus struct {
	// Enabled is true when the CA's ACME provisioner is on (--acme-server, or --publish
	// with --acme-ca internal).
	Enabled bool `json:"enabled"`
	// DirectoryURL is the ACME directory clients use (certbot --server, lego --server).
	DirectoryURL string `json:"directory_url,omitempty"`
	// RootFile is the Wicket root certificate (PEM) clients must trust.
	RootFile string `json:"root_file"`
	// RootFingerprint is the SHA-256 of the root certificate (hex).
	RootFingerprint string `json:"root_fingerprint"`
	// Names is the allow-list.
	Names []string `json:"names"`
	// RequireEAB says whether accounts need a key from `wicket token create acme`.
	RequireEAB bool `json:"require_eab"`
	// Challenges are the challenge types offered.
	Challenges []string `json:"challenges"`
	// CertLifetime is the validity of issued certificates (a Go duration).
	CertLifetime string `json:"cert_lifetime"`
	// ACMEHosts are the ACME host grants by agent name (ACMEHostGrantsFileName).
	ACMEHosts map[string][]string `json:"acme_hosts"`
}

// EABRequest is the body of POST /v1/acme/eab.
type EABRequest struct {
	// Names are the DNS names or *.suffix patterns the account may order.
	Names []string `json:"names"`
}

// EABResponse is the answer of POST /v1/acme/eab: the key id and the HMAC key
// (base64url, as certbot --eab-hmac-key and lego --hmac take it).
type EABResponse struct {
	KeyID   string `json:"key_id"`
	HMACKey string `json:"hmac_key"`
}

// ACMEHostGrantRequest is the body of POST /v1/agents/{name}/acme-hosts.
type ACMEHostGrantRequest struct {
	Names    []string `json:"names"`
	Disallow bool     `json:"disallow,omitempty"`
}

func (g *Gateway) acmeStatus() ACMEStatus {
	s := ACMEStatus{RootFile: filepath.Join(g.cfg.DataDir, "ca", "root.crt"),
		RootFingerprint: g.authority.RootFingerprint(), Names: slices.Clone(g.acmeNames),
		Challenges: []string{}, ACMEHosts: map[string][]string{}}
	if s.Names == nil {
		s.Names = []string{}
	}
	if len(g.acmeNames) > 0 {
		s.Enabled, s.DirectoryURL = true, g.authority.ACMEDirectoryURL()
		s.Challenges = []string{"http-01", "tls-alpn-01", "dns-01"}
		s.CertLifetime = ca.DefaultACMELifetime.String()
		if srv := g.cfg.ACMEServer; srv != nil {
			s.RequireEAB = srv.RequireEAB
			if len(srv.Challenges) > 0 {
				s.Challenges = slices.Clone(srv.Challenges)
			}
			if srv.CertLifetime > 0 {
				s.CertLifetime = srv.CertLifetime.String()
			}
		}
	}
	g.acmeHostGrants.mu.Lock()
	for k, v := range g.acmeHostGrants.m {
		s.ACMEHosts[k] = slices.Clone(v)
	}
	g.acmeHostGrants.mu.Unlock()
	return s
}

// adminACMEEAB creates a one-time EAB key bound to name patterns (`wicket token create acme`).
func (g *Gateway) adminACMEEAB(w http.ResponseWriter, r *http.Request) {
	var req EABRequest
	dec := json.NewDecoder(io.LimitReader(r.Body, maxAdminBody))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		writeError(w, http.StatusBadRequest, "the EAB request is not valid JSON: "+err.Error())
		return
	}
	if err := g.audit.Admit(audit.TypeTokenCreated); err != nil {
		writeError(w, http.StatusServiceUnavailable, g.tokenRefusal())
		return
	}
	kid, hmac, err := g.authority.NewACMEEABKey(r.Context(), req.Names)
	if err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	// The key id identifies the key in later records; the HMAC is the secret.
	rec := audit.Record{Type: audit.TypeTokenCreated, Outcome: audit.OutcomeOK,
		Extra: map[string]string{"kind": "acme_eab", "eab_kid": kid, "dns_names": strings.Join(req.Names, ","),
			"via": "admin.sock", "actor": actor(r)}}
	if err := g.recordAccess(rec); err != nil {
		writeError(w, http.StatusServiceUnavailable, g.tokenRefusal())
		return
	}
	g.counters.acme.inc("eab_key", "created")
	g.log.Info("ACME EAB key created", "eab_kid", kid, "dns_names", req.Names)
	writeJSON(w, http.StatusOK, EABResponse{KeyID: kid, HMACKey: base64.RawURLEncoding.EncodeToString(hmac)})
}

// adminACMEHostGrant allows or disallows ACME hosts for an agent name.
func (g *Gateway) adminACMEHostGrant(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	if err := ca.ValidName(name); err != nil {
		writeError(w, http.StatusBadRequest, fmt.Sprintf("agent name %q is not valid: %v", name, err))
		return
	}
	var req ACMEHostGrantRequest
	dec := json.NewDecoder(io.LimitReader(r.Body, maxAdminBody))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		writeError(w, http.StatusBadRequest, "the ACME host grant request is not valid JSON: "+err.Error())
		return
	}
	if len(req.Names) == 0 {
		writeError(w, http.StatusBadRequest, "name at least one ACME host: --acme-hosts a.example.internal,*.svc.example.internal")
		return
	}
	for i, n := range req.Names {
		req.Names[i] = strings.ToLower(strings.TrimSpace(n))
	}
	if err := validACMEPatterns(req.Names); err != nil {
		writeError(w, http.StatusBadRequest, "--acme-hosts: "+err.Error())
		return
	}
	action := "allow"
	if req.Disallow {
		action = "disallow"
	}
	res, err := g.changeACMEHostGrant(actor(r), action, name, req.Names, !req.Disallow)
	if errors.Is(err, audit.ErrUnavailable) {
		writeError(w, http.StatusServiceUnavailable, g.grantRefusal())
		return
	}
	if err != nil {
		writeError(w, http.StatusInternalServerError, fmt.Sprintf("could not change the ACME hosts of agent %s: %v", name, err))
		return
	}
	writeJSON(w, http.StatusOK, res)
}

// ACMEStatus returns the ACME server's directory URL, root and settings.
func (c *AdminClient) ACMEStatus(ctx context.Context) (ACMEStatus, error) {
	var out ACMEStatus
	err := c.do(ctx, http.MethodGet, "/v1/acme", nil, &out)
	return out, err
}

// CreateACMEEAB creates a one-time EAB key for an ACME client, bound to the names it may order.
func (c *AdminClient) CreateACMEEAB(ctx context.Context, names []string) (EABResponse, error) {
	var out EABResponse
	err := c.do(ctx, http.MethodPost, "/v1/acme/eab", EABRequest{Names: names}, &out)
	return out, err
}

// AllowACMEHosts lets agent name vouch for ACME host names or *.suffix patterns.
func (c *AdminClient) AllowACMEHosts(ctx context.Context, name string, names []string) (GrantResult, error) {
	var out GrantResult
	err := c.do(ctx, http.MethodPost, "/v1/agents/"+url.PathEscape(name)+"/acme-hosts", ACMEHostGrantRequest{Names: names}, &out)
	return out, err
}

// DisallowACMEHosts withdraws ACME host names from agent name.
func (c *AdminClient) DisallowACMEHosts(ctx context.Context, name string, names []string) (GrantResult, error) {
	var out GrantResult
	err := c.do(ctx, http.MethodPost, "/v1/agents/"+url.PathEscape(name)+"/acme-hosts", ACMEHostGrantRequest{Names: names, Disallow: true}, &out)
	return out, err
}
