package gateway

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/wicketgw/wicket/ca"
	"github.com/wicketgw/wicket/gateway/audit"
	"github.com/wicketgw/wicket/tunnel"
)

// The admin API, HTTP+JSON on <data-dir>/admin.sock. Whoever can open the socket (mode 0600,
// in a 0700 directory: the gateway's own user) is an administrator; there is no other
// authentication, which is why it is never exposed on TCP.

// TokenRequest is the body of POST /v1/tokens.
type TokenRequest struct {
	Role string `json:"role"` // "agent" or "user"
	Name string `json:"name"`
	TTL  string `json:"ttl,omitempty"` // Go duration; "" means 15m
	// ACME asks, for an agent, for an ACME enrollment credential (an External Account
	// Binding key bound to the name) instead of a JWT bootstrap token.
	ACME bool `json:"acme,omitempty"`
	// Resources, for an agent, are granted to the name when the token is minted (merged
	// with its existing grant). Without them the agent serves nothing until an
	// administrator allows resources (GrantsFileName).
	Resources []string `json:"resources,omitempty"`
}

// GrantRequest is the body of POST /v1/agents/{name}/grants: resources to allow, or with
// Disallow, to withdraw.
type GrantRequest struct {
	Resources []string `json:"resources"`
	Disallow  bool     `json:"disallow,omitempty"`
}

// GrantResult is the answer of POST /v1/agents/{name}/grants: the agent's grant after it.
type GrantResult struct {
	Agent   string   `json:"agent"`
	Allowed []string `json:"allowed"`
	Changed bool     `json:"changed"`
}

// actorKey carries, in an admin request's context, who is on the other end of the socket.
type actorKey struct{}

// actor names who sent an admin request: the local user, from the socket's peer credentials.
func actor(r *http.Request) string {
	if a, ok := r.Context().Value(actorKey{}).(string); ok {
		return a
	}
	return "admin.sock"
}

// TokenResponse is the answer of POST /v1/tokens.
type TokenResponse struct {
	Token string `json:"token"`
}

// RevokeResult is the answer of POST /v1/agents/{name}/revoke and /v1/users/{name}/revoke.
type RevokeResult struct {
	RevokedSerials []string `json:"revoked_serials"`
	ClosedSessions int      `json:"closed_sessions"`
}

// errorBody is every admin API error: one sentence.
type errorBody struct {
	Error string `json:"error"`
}

// maxAdminBody caps admin request bodies.
const maxAdminBody = 64 << 10

func (g *Gateway) adminHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/tokens", g.adminToken)
	mux.HandleFunc("GET /v1/agents", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, g.registry.List())
	})
	mux.HandleFunc("POST /v1/agents/{name}/revoke", func(w http.ResponseWriter, r *http.Request) {
		g.adminRevoke(w, r, ca.RoleAgent)
	})
	mux.HandleFunc("DELETE /v1/agents/{name}", g.adminForget)
	mux.HandleFunc("POST /v1/agents/{name}/grants", g.adminGrant)
	mux.HandleFunc("POST /v1/agents/{name}/acme-hosts", g.adminACMEHostGrant)
	mux.HandleFunc("POST /v1/acme/eab", g.adminACMEEAB)
	mux.HandleFunc("GET /v1/acme", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, g.acmeStatus())
	})
	mux.HandleFunc("POST /v1/users/{name}/revoke", func(w http.ResponseWriter, r *http.Request) {
		g.adminRevoke(w, r, ca.RoleUser)
	})
	mux.HandleFunc("GET /v1/sessions", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, g.sessions.list())
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotFound, fmt.Sprintf("no admin endpoint %s %s", r.Method, r.URL.Path))
	})
	return mux
}

// adminForget removes an offline agent from the registry and from AgentsFileName, for an agent
// that was decommissioned: it no longer shows in `wicket agents list`, and its resources are
// answered "unknown" rather than "offline". An online agent is refused: revoke or stop it first.
func (g *Gateway) adminForget(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	rec := audit.Record{Type: audit.TypeAdminRequest, Agent: name, Outcome: audit.OutcomeOK,
		Extra: map[string]string{"action": "forget agent"}}
	status, msg := http.StatusOK, ""
	switch g.registry.forget(name) {
	case forgetUnknown:
		status, msg = http.StatusNotFound, fmt.Sprintf("no agent named %s is known to this gateway", name)
	case forgetOnline:
		status, msg = http.StatusConflict, fmt.Sprintf("agent %s is online; stop it (or `wicket agents revoke %s`) before forgetting it", name, name)
	}
	if status != http.StatusOK {
		rec.Type, rec.Outcome, rec.Reason = audit.TypeAdminDenied, audit.OutcomeDenied, msg
		g.record(rec)
		writeError(w, status, msg)
		return
	}
	g.agentsChanged()
	g.record(rec)
	g.log.Info("agent forgotten", "agent", name)
	writeJSON(w, http.StatusOK, map[string]string{"forgotten": name})
}

func (g *Gateway) adminToken(w http.ResponseWriter, r *http.Request) {
	var req TokenRequest
	dec := json.NewDecoder(io.LimitReader(r.Body, maxAdminBody))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		writeError(w, http.StatusBadRequest, "the token request is not valid JSON: "+err.Error())
		return
	}
	role := ca.Role(req.Role)
	if role != ca.RoleAgent && role != ca.RoleUser {
		writeError(w, http.StatusBadRequest, fmt.Sprintf("role %q is not agent or user", req.Role))
		return
	}
	if err := ca.ValidName(req.Name); err != nil {
		writeError(w, http.StatusBadRequest, fmt.Sprintf("name %q is not valid: %v", req.Name, err))
		return
	}
	var ttl time.Duration
	if req.TTL != "" {
		d, err := time.ParseDuration(req.TTL)
		if err != nil || d <= 0 {
			writeError(w, http.StatusBadRequest, fmt.Sprintf("ttl %q is not a positive duration such as 15m", req.TTL))
			return
		}
		ttl = d
	}
	var (
		tok   string
		err   error
		extra = map[string]string{"ttl": effectiveTTL(ttl).String(), "via": "admin.sock"}
	)
	if req.ACME && role != ca.RoleAgent {
		writeError(w, http.StatusBadRequest, "--acme enrollment credentials are for agents only")
		return
	}
	if len(req.Resources) > 0 && role != ca.RoleAgent {
		writeError(w, http.StatusBadRequest, "--resources are granted to agents only")
		return
	}
	if err := validNames(req.Resources); err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	if role == ca.RoleAgent {
		extra["resources"] = strings.Join(normalize(req.Resources), ",")
	}
	// A token exists for its holder only once it is returned, and it is returned only
	// after its token.created record is written: asked first so that, while the log is
	// known to be down, no ACME credential is even stored.
	if err := g.audit.Admit(audit.TypeTokenCreated); err != nil {
		g.log.Warn("token refused: the audit log cannot be written", "role", role, "name", req.Name, "err", err)
		writeError(w, http.StatusServiceUnavailable, g.tokenRefusal())
		return
	}
	if req.ACME {
		var cred ca.ACMECredential
		cred, err = g.authority.NewAgentACMECredential(r.Context(), req.Name, ttl)
		if err == nil {
			tok = cred.String()
			// The key id identifies the credential in later records; the HMAC is the secret.
			extra["kind"], extra["eab_kid"] = "acme", cred.KeyID
		}
	} else {
		tok, err = g.authority.MintToken(role, req.Name, ttl)
	}
	if err != nil {
		writeError(w, http.StatusBadRequest, "could not mint the token: "+err.Error())
		return
	}
	id := ca.Identity{TrustDomain: g.authority.TrustDomain(), Role: role, Name: req.Name}
	rec := audit.Record{Type: audit.TypeTokenCreated, Outcome: "ok", Extra: extra}
	setIdentity(&rec, id)
	if err := g.recordAccess(rec); err != nil {
		// The token is dropped unseen: a JWT nobody holds is as good as none, and an ACME
		// credential's key is useless without the HMAC that goes with it here.
		writeError(w, http.StatusServiceUnavailable, g.tokenRefusal())
		return
	}
	if len(req.Resources) > 0 {
		// The grant is recorded before the token is returned: an agent never holds a
		// certificate for resources its grant does not name yet.
		if _, err := g.changeGrant(actor(r), "token create", req.Name, req.Resources, true); errors.Is(err, audit.ErrUnavailable) {
			writeError(w, http.StatusServiceUnavailable, g.tokenRefusal())
			return
		} else if err != nil {
			writeError(w, http.StatusInternalServerError, "could not record the grant, the token was dropped: "+err.Error())
			return
		}
	}
	g.log.Info("token created", "identity", id.String(), "ttl", effectiveTTL(ttl).String())
	writeJSON(w, http.StatusOK, TokenResponse{Token: tok})
}

// validNames checks a list of resource names from an admin request.
func validNames(resources []string) error {
	for _, r := range resources {
		if err := ca.ValidName(r); err != nil {
			return fmt.Errorf("resource name %q is not valid: %v", r, err)
		}
	}
	return nil
}

// adminGrant allows or disallows resources for an agent name (`wicket agents allow|disallow`).
func (g *Gateway) adminGrant(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	if err := ca.ValidName(name); err != nil {
		writeError(w, http.StatusBadRequest, fmt.Sprintf("agent name %q is not valid: %v", name, err))
		return
	}
	var req GrantRequest
	dec := json.NewDecoder(io.LimitReader(r.Body, maxAdminBody))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		writeError(w, http.StatusBadRequest, "the grant request is not valid JSON: "+err.Error())
		return
	}
	if len(req.Resources) == 0 {
		writeError(w, http.StatusBadRequest, "name at least one resource: --resources a,b")
		return
	}
	if err := validNames(req.Resources); err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	action := "allow"
	if req.Disallow {
		action = "disallow"
	}
	res, err := g.changeGrant(actor(r), action, name, req.Resources, !req.Disallow)
	if errors.Is(err, audit.ErrUnavailable) {
		writeError(w, http.StatusServiceUnavailable, g.grantRefusal())
		return
	}
	if err != nil {
		writeError(w, http.StatusInternalServerError, fmt.Sprintf("could not change the grant of agent %s: %v", name, err))
		return
	}
	writeJSON(w, http.StatusOK, res)
}

// changeGrant changes the grant of agent name, saves it, audits grant.changed when it
// changed, and applies it to the agent's live sessions at once.
//
// Allowing creates access, so it fails closed on the audit log like a token: it is refused
// (an error wrapping audit.ErrUnavailable) while the log cannot be written, and when the
// record fails after the file was saved, the resources it added are taken back out.
// Disallowing only takes access away and is never refused; its record is then counted as
// lost by the log.
func (g *Gateway) changeGrant(who, action, name string, resources []string, allow bool) (GrantResult, error) {
	if allow {
		if err := g.audit.Admit(audit.TypeGrantChanged); err != nil {
			g.log.Warn("grant refused: the audit log cannot be written", "agent", name, "err", err)
			return GrantResult{}, err
		}
	}
	before := g.grants.allowed(name)
	after, changed, err := g.grants.change(name, resources, allow)
	if err != nil {
		g.log.Error("could not save the resource grants", "file", GrantsFileName, "agent", name, "err", err)
		return GrantResult{}, err
	}
	res := GrantResult{Agent: name, Allowed: after, Changed: changed}
	if res.Allowed == nil {
		res.Allowed = []string{}
	}
	if !changed {
		return res, nil
	}
	rec := audit.Record{Type: audit.TypeGrantChanged, Agent: name, Outcome: audit.OutcomeOK,
		Extra: map[string]string{"actor": who, "action": action, "resources": strings.Join(normalize(resources), ","),
			"allowed": strings.Join(after, ",")}}
	if allow {
		if err := g.recordAccess(rec); err != nil {
			added := slices.DeleteFunc(slices.Clone(after), func(r string) bool { return slices.Contains(before, r) })
			if _, _, rerr := g.grants.change(name, added, false); rerr != nil {
				g.log.Error("could not take back a grant whose record failed", "agent", name, "resources", added, "err", rerr)
			}
			return GrantResult{}, err
		}
	} else {
		g.record(rec)
	}
	g.log.Info("resource grant changed", "agent", name, "action", action, "resources", normalize(resources),
		"allowed", after, "actor", who)
	for _, gr := range g.registry.regrant(name) {
		log := g.log.With("agent", name, "remote", gr.as.remote, "session", gr.as.id)
		why := "the grant was withdrawn by " + who
		g.claimsRefused(log, gr.as.peer.ident, gr.as.peer, gr.refused, why)
		if gr.as.ctl != nil && len(gr.withdrawn) > 0 {
			msg := tunnel.Withdrawn{}
			for _, rf := range refusals(name, gr.withdrawn) {
				rf.Reason = why + ": " + rf.Reason
				msg.Withdrawn = append(msg.Withdrawn, rf)
			}
			// Not waited for: Send is bounded by the session's write timeout, and a
			// session that cannot take it fails anyway.
			go gr.as.ctl.Send(msg)
		}
	}
	g.agentsChanged()
	return res, nil
}

func effectiveTTL(d time.Duration) time.Duration {
	if d == 0 {
		return 15 * time.Minute
	}
	return d
}

func (g *Gateway) adminRevoke(w http.ResponseWriter, r *http.Request, role ca.Role) {
	name := r.PathValue("name")
	if err := ca.ValidName(name); err != nil {
		writeError(w, http.StatusBadRequest, fmt.Sprintf("name %q is not valid: %v", name, err))
		return
	}
	id := ca.Identity{TrustDomain: g.authority.TrustDomain(), Role: role, Name: name}
	ctx, cancel := context.WithTimeout(r.Context(), 30*time.Second)
	defer cancel()
	// Learn the serials first so the cert.revoked records name whose certificates they were.
	if issued, err := g.authority.Issued(ctx, id); err == nil {
		for _, c := range issued {
			g.rememberSerial(c.Serial, id, c.NotAfter)
		}
	}
	// The sessions live now are closed by OnRevoke during RevokeIdentity; they are noted first
	// so the answer can count them.
	live := g.peers.ofIdentity(id)
	serials, err := g.authority.RevokeIdentity(ctx, id, "revoked by an administrator")
	// Close the live sessions of the identity whatever their certificate, even if the
	// revocation failed half-way.
	closed := map[*peer]bool{}
	for _, p := range live {
		closed[p] = true
	}
	for _, p := range g.peers.closeIdentity(id, reasonRevoked) {
		g.counters.closedRevoked.Add(1)
		closed[p] = true
	}
	for _, s := range serials {
		g.auditRevoked(s, id, "revoked by an administrator")
	}
	if err != nil {
		writeError(w, http.StatusInternalServerError, fmt.Sprintf("revoking %s %s failed: %v", role, name, err))
		return
	}
	if len(serials) == 0 && len(closed) == 0 {
		writeError(w, http.StatusNotFound, fmt.Sprintf("%s %s holds no unexpired certificate", role, name))
		return
	}
	g.log.Info("identity revoked", "identity", id.String(), "serials", len(serials), "closed_sessions", len(closed))
	if serials == nil {
		serials = []string{}
	}
	writeJSON(w, http.StatusOK, RevokeResult{RevokedSerials: serials, ClosedSessions: len(closed)})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

func writeError(w http.ResponseWriter, status int, msg string) {
	writeJSON(w, status, errorBody{Error: msg})
}

// AdminError is an error the admin API answered with.
type AdminError struct {
	Status  int    // HTTP status
	Message string // one sentence from the gateway
}

// Error is the gateway's sentence.
func (e *AdminError) Error() string { return e.Message }

// ErrNotFound matches an AdminError with status 404 (errors.Is).
var ErrNotFound = errors.New("not found")

// Is makes errors.Is(err, ErrNotFound) work for 404 answers.
func (e *AdminError) Is(target error) bool {
	return target == ErrNotFound && e.Status == http.StatusNotFound
}
