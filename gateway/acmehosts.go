package gateway

import (
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"

	"github.com/wicketgw/wicket/ca"
	"github.com/wicketgw/wicket/gateway/audit"
	"github.com/wicketgw/wicket/tunnel"
)

// ACME hosts: names an agent vouches for in ACME validation (`wicket agent --acme-host
// NAME=ADDR`). A name is a claim on certificates, so, as with resources (DESIGN.md "Who
// may serve a resource"), the agent does not decide it: the administrator allows agent
// names to vouch for names or *.suffix patterns (`wicket agents allow NAME --acme-hosts
// a,b`, kept in ACMEHostGrantsFileName), and an agent's Hello can only narrow that. A
// declared name outside the grant is refused, audited and counted, and its validation is
// never routed to that agent. A name that no online agent is allowed to vouch for and has
// declared is validated directly over the network, as any ACME server does.

// ACMEHostGrantsFileName is the file in the gateway's data dir that says which agent names
// may vouch for which DNS names in ACME validation: a JSON object keyed by agent name, each
// value a list of names or *.suffix patterns. Written atomically, mode 0600.
const ACMEHostGrantsFileName = "acme-hosts.json"

// loadACMEHostGrants reads ACMEHostGrantsFileName (none yet: no grants).
func loadACMEHostGrants(dir string) (*grantStore, error) {
	gs := &grantStore{dir: dir, file: ACMEHostGrantsFileName, m: map[string][]string{}}
	path := filepath.Join(dir, ACMEHostGrantsFileName)
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return gs, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read the ACME host grants %s: %w", path, err)
	}
	var m map[string][]string
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("the ACME host grants %s are not valid JSON (%v): fix or restore the file", path, err)
	}
	for name, pats := range m {
		if ca.ValidName(name) != nil {
			return nil, fmt.Errorf("the ACME host grants %s name an invalid agent %q: fix or restore the file", path, name)
		}
		if err := validACMEPatterns(pats); err != nil {
			return nil, fmt.Errorf("the ACME host grants %s, agent %s: %v: fix or restore the file", path, name, err)
		}
		gs.m[name] = normalize(pats)
	}
	return gs, nil
}

// validACMEPatterns checks DNS names or *.suffix patterns (lowercase, at least two labels).
func validACMEPatterns(pats []string) error {
	for _, p := range pats {
		if !validACMEPattern(p) {
			return fmt.Errorf("%q is not a lowercase DNS name or *.suffix such as grafana.corp or *.svc.example.internal", p)
		}
	}
	return nil
}

func validACMEPattern(p string) bool {
	n := strings.TrimPrefix(p, "*.")
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

// acmeRoute is one agent session's declared ACME hosts.
type acmeRoute struct {
	seq      uint64   // registration order: the newest session of a name is preferred
	declared []string // valid names from its latest Hello
	granted  []string // declared and allowed for its agent name: routed here
}

// acmeRoutes says which live agent session each declared and granted ACME host is routed to.
type acmeRoutes struct {
	mu   sync.Mutex
	seq  uint64
	m    map[*agentSession]*acmeRoute
	gate func(agent string) []string // the patterns granted to an agent name
}

// set replaces the declared names of as and returns the granted and the refused ones.
func (r *acmeRoutes) set(as *agentSession, declared []string) (granted, refused []string) {
	allowed := r.gate(as.name)
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.m == nil {
		r.m = map[*agentSession]*acmeRoute{}
	}
	rt := r.m[as]
	if rt == nil {
		r.seq++
		rt = &acmeRoute{seq: r.seq}
		r.m[as] = rt
	}
	rt.declared = declared
	rt.granted, refused = splitACMEHosts(declared, allowed)
	return slices.Clone(rt.granted), refused
}

// splitACMEHosts divides declared names into those a pattern of allowed matches and the others.
func splitACMEHosts(declared, allowed []string) (granted, refused []string) {
	for _, n := range declared {
		ok := false
		for _, p := range allowed {
			if ca.MatchACMEName(p, n) {
				ok = true
				break
			}
		}
		if ok {
			granted = append(granted, n)
		} else {
			refused = append(refused, n)
		}
	}
	return granted, refused
}

// regrant re-applies the grant of agent name to its live sessions; it returns, per
// session, the names no longer routed to it.
func (r *acmeRoutes) regrant(name string) map[*agentSession][]string {
	allowed := r.gate(name)
	r.mu.Lock()
	defer r.mu.Unlock()
	out := map[*agentSession][]string{}
	for as, rt := range r.m {
		if as.name != name {
			continue
		}
		before := rt.granted
		rt.granted, _ = splitACMEHosts(rt.declared, allowed)
		for _, n := range before {
			if !slices.Contains(rt.granted, n) {
				out[as] = append(out[as], n)
			}
		}
	}
	return out
}

// drop forgets a session that ended.
func (r *acmeRoutes) drop(as *agentSession) {
	r.mu.Lock()
	delete(r.m, as)
	r.mu.Unlock()
}

// lookup returns the live sessions a validation for name is routed to, newest first.
func (r *acmeRoutes) lookup(name string) []*agentSession {
	name = strings.ToLower(strings.TrimSuffix(name, "."))
	r.mu.Lock()
	defer r.mu.Unlock()
	type cand struct {
		as  *agentSession
		seq uint64
	}
	var cs []cand
	for as, rt := range r.m {
		if slices.Contains(rt.granted, name) {
			cs = append(cs, cand{as, rt.seq})
		}
	}
	slices.SortFunc(cs, func(a, b cand) int { return cmp.Compare(b.seq, a.seq) })
	out := make([]*agentSession, len(cs))
	for i, c := range cs {
		out[i] = c.as
	}
	return out
}

// declaredHosts returns the valid, lowercase, deduplicated names of a Hello's ACMEHosts.
func declaredHosts(log *slog.Logger, in []string) []string {
	var out []string
	for _, n := range in {
		n = strings.ToLower(strings.TrimSuffix(n, "."))
		if strings.HasPrefix(n, "*.") || !validACMEPattern(n) {
			log.Warn("agent hello declares an invalid ACME host; ignored", "acme_host", n)
			continue
		}
		out = append(out, n)
	}
	slices.Sort(out)
	return slices.Compact(out)
}

// acmeHostRefusal is the sentence sent back to an agent, and logged, for a refused ACME host.
func acmeHostRefusal(agent, name string) string {
	return fmt.Sprintf("ACME host %s is not granted to agent %s, so the gateway does not route its ACME validation here; "+
		"to allow it, the gateway's administrator runs `wicket agents allow %s --acme-hosts %s`", name, agent, agent, name)
}

// acmeHostsDeclared applies a Hello's ACMEHosts to as: the granted names are routed to it,
// the refused ones are logged, counted, audited and returned for the Hello's answer.
func (g *Gateway) acmeHostsDeclared(log *slog.Logger, ident ca.Identity, p *peer, as *agentSession, hosts []string) []tunnel.Refusal {
	declared := declaredHosts(log, hosts)
	if len(declared) == 0 {
		g.acmeRoutes.drop(as)
		return nil
	}
	granted, refused := g.acmeRoutes.set(as, declared)
	if len(granted) > 0 {
		log.Info("agent vouches for ACME hosts", "acme_hosts", granted)
	}
	var out []tunnel.Refusal
	for _, n := range refused {
		sentence := acmeHostRefusal(ident.Name, n)
		out = append(out, tunnel.Refusal{Resource: n, Reason: sentence})
		g.counters.claimsRefused.Add(1)
		g.counters.acme.inc("acme_host", "refused")
		log.Warn("refused an agent's claim to vouch for an ACME host not granted to it", "acme_host", n, "reason", sentence)
		if ok, _ := g.claimLimit.admit(ident.Name, "acme-host:"+n, g.clock.Now()); !ok {
			continue
		}
		r := audit.Record{Type: audit.TypeAgentClaimRefused, Resource: n, Remote: p.remote, SessionID: p.id,
			Serial: p.serial, Outcome: audit.OutcomeDenied, Reason: sentence, Extra: map[string]string{"claim": "acme_host"}}
		setIdentity(&r, ident)
		g.record(r)
	}
	return out
}

// changeACMEHostGrant allows or disallows ACME host patterns for agent name, audits the
// change, and applies it to the agent's live sessions. Allowing fails closed on the audit
// log as a resource grant does.
func (g *Gateway) changeACMEHostGrant(who, action, name string, pats []string, allow bool) (GrantResult, error) {
	if allow {
		if err := g.audit.Admit(audit.TypeGrantChanged); err != nil {
			return GrantResult{}, err
		}
	}
	before := g.acmeHostGrants.allowed(name)
	after, changed, err := g.acmeHostGrants.change(name, pats, allow)
	if err != nil {
		return GrantResult{}, fmt.Errorf("save %s: %w", ACMEHostGrantsFileName, err)
	}
	res := GrantResult{Agent: name, Allowed: after, Changed: changed}
	if res.Allowed == nil {
		res.Allowed = []string{}
	}
	if !changed {
		return res, nil
	}
	rec := audit.Record{Type: audit.TypeGrantChanged, Agent: name, Outcome: audit.OutcomeOK,
		Extra: map[string]string{"actor": who, "action": action, "acme_hosts": strings.Join(normalize(pats), ","),
			"allowed_acme_hosts": strings.Join(after, ",")}}
	if allow {
		if err := g.recordAccess(rec); err != nil {
			added := slices.DeleteFunc(slices.Clone(after), func(r string) bool { return slices.Contains(before, r) })
			if _, _, rerr := g.acmeHostGrants.change(name, added, false); rerr != nil {
				g.log.Error("could not take back an ACME host grant whose record failed", "agent", name, "err", rerr)
			}
			return GrantResult{}, err
		}
	} else {
		g.record(rec)
	}
	g.log.Info("ACME host grant changed", "agent", name, "action", action, "acme_hosts", normalize(pats),
		"allowed", after, "actor", who)
	for as, withdrawn := range g.acmeRoutes.regrant(name) {
		if as.ctl == nil {
			continue
		}
		msg := tunnel.Withdrawn{}
		for _, n := range withdrawn {
			msg.Withdrawn = append(msg.Withdrawn, tunnel.Refusal{Resource: n,
				Reason: "the grant was withdrawn by " + who + ": " + acmeHostRefusal(name, n)})
		}
		go as.ctl.Send(msg)
	}
	return res, nil
}
