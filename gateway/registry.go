package gateway

import (
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/wicketgw/wicket/tunnel"
)

// AgentInfo describes one agent name as `wicket agents list` shows it.
type AgentInfo struct {
	// Name is the agent name from its certificate.
	Name string `json:"name"`
	// Status is "online" while at least one session is up, else "offline".
	Status string `json:"status"`
	// Resources are the resource names the agent serves: announced and granted to its name
	// (union over its live sessions; the last known set when offline).
	Resources []string `json:"resources"`
	// Allowed are the resource names granted to the agent name (GrantsFileName), whether
	// it announces them or not.
	Allowed []string `json:"allowed"`
	// Refused are the resource names its live sessions announce that are not granted to
	// it: they are not routed to this agent (empty when offline).
	Refused []string `json:"refused"`
	// Version is the agent version from its newest session's hello.
	Version string `json:"version"`
	// Remote is the remote address of the newest session.
	Remote string `json:"remote"`
	// Since is when the current status began: connected since (oldest live session) or
	// disconnected since.
	Since time.Time `json:"since"`
	// CertExpires is the latest certificate expiry among live sessions (last known when offline).
	CertExpires time.Time `json:"cert_expires"`
	// Protocols names the protocol of each served resource that is not raw TCP, as its
	// agent announced it (e.g. "postgres"); omitted when all are raw.
	Protocols map[string]string `json:"protocols,omitempty"`
	// Instances is the number of agent processes connected under this name; Sessions counts
	// their sessions (more than one per instance during a make-before-break renewal).
	Instances int `json:"instances"`
	Sessions  int `json:"sessions"`
}

// agentSession is one registered, routable agent session.
type agentSession struct {
	id        string
	name      string
	instance  string
	version   string
	announced []string // valid names from its latest hello
	// protocols and recordText are the hello's Protocols and RecordText (the registry's lock).
	protocols  map[string]string
	recordText []string
	resources  []string // announced and granted: what it is routed (the registry's lock)
	refused    []string // announced and not granted (the registry's lock)
	// claimAudited are the refused resources whose agent.claim_refused record this session
	// has written (once per session and resource).
	claimAudited map[string]bool
	remote       string
	since        time.Time
	expires      time.Time
	sess         *tunnel.Session
	peer         *peer
	ctl          *tunnel.Control // the first control stream: the gateway's messages to the agent
}

type agentRecord struct {
	sessions []*agentSession // registration order: oldest first
	// What was last known, for listing an offline agent.
	resources []string
	version   string
	remote    string
	expires   time.Time
	since     time.Time
}

// Registry is the set of agents the gateway knows: every session an agent has open, and for
// each name the last known state once it went offline. It decides where a new stream goes:
// across instances of the same name round-robin, within one instance to the newest session
// (older ones drain after a renewal).
type Registry struct {
	mu     sync.Mutex
	agents map[string]*agentRecord
	rr     map[string]uint64 // per resource
	// allowed returns the resources granted to an agent name; nil grants nothing. It is
	// called with mu held.
	allowed func(name string) []string
}

// NewRegistry returns an empty registry.
func NewRegistry() *Registry {
	return &Registry{agents: map[string]*agentRecord{}, rr: map[string]uint64{}}
}

// grantedLocked splits as.announced by the current grants into as.resources and as.refused,
// and returns the refused resources not yet audited for this session.
func (r *Registry) grantedLocked(as *agentSession) (newlyRefused []string) {
	var allowed []string
	if r.allowed != nil {
		allowed = r.allowed(as.name)
	}
	as.resources, as.refused = split(as.announced, allowed)
	for _, x := range as.refused {
		if !as.claimAudited[x] {
			if as.claimAudited == nil {
				as.claimAudited = map[string]bool{}
			}
			as.claimAudited[x] = true
			newlyRefused = append(newlyRefused, x)
		}
	}
	return newlyRefused
}

// add registers a session, routing only the announced resources granted to its name. It
// returns the refused ones not yet audited for the session.
func (r *Registry) add(as *agentSession) (newlyRefused []string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	newlyRefused = r.grantedLocked(as)
	rec := r.agents[as.name]
	if rec == nil {
		rec = &agentRecord{}
		r.agents[as.name] = rec
	}
	if len(rec.sessions) == 0 {
		rec.since = as.since
	}
	rec.sessions = append(rec.sessions, as)
	rec.resources, rec.version, rec.remote, rec.expires = as.resources, as.version, as.remote, as.expires
	return newlyRefused
}

// update replaces the announced resources and version of a live session (a later hello). It
// returns the refused resources not yet audited for the session.
func (r *Registry) update(as *agentSession, announced []string, version string, h tunnel.Hello) (newlyRefused []string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	as.announced = announced
	as.protocols, as.recordText = h.Protocols, h.RecordText
	newlyRefused = r.grantedLocked(as)
	if version != "" {
		as.version = version
	}
	if rec := r.agents[as.name]; rec != nil {
		rec.resources, rec.version = as.resources, as.version
	}
	return newlyRefused
}

// protocolOf returns the protocol a resource is announced with: ProtocolPostgres when a live
// session that is routed the resource announces it so, else "" (raw TCP).
func (r *Registry) protocolOf(resource string) string {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, rec := range r.agents {
		for _, as := range rec.sessions {
			if p := as.protocols[resource]; p != "" && slices.Contains(as.resources, resource) {
				return p
			}
		}
	}
	return ""
}

// recordsText reports whether as announced that resource keeps statement texts.
func (r *Registry) recordsText(as *agentSession, resource string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Contains(as.recordText, resource)
}

// grantRefusal is a live session's resources that a grant change left refused and that
// the session had not yet had audited.
type grantRefusal struct {
	as        *agentSession
	refused   []string // refused and not yet audited for this session
	withdrawn []string // routed to the session before the change, and no longer
}

// servedOf returns the resources routed to as.
func (r *Registry) servedOf(as *agentSession) []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(as.resources)
}

// refusedOf returns the resources as announces that are not routed to it.
func (r *Registry) refusedOf(as *agentSession) []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(as.refused)
}

// regrant applies a changed grant of agent name to its live sessions: a newly allowed
// resource is routed at once, a disallowed one is no longer routed (streams open now keep
// running). It returns, per session, the refusals not yet audited and the resources
// withdrawn from it.
func (r *Registry) regrant(name string) []grantRefusal {
	r.mu.Lock()
	defer r.mu.Unlock()
	rec := r.agents[name]
	if rec == nil {
		return nil
	}
	var out []grantRefusal
	for _, as := range rec.sessions {
		before := as.resources
		n := r.grantedLocked(as)
		w := slices.DeleteFunc(slices.Clone(before), func(x string) bool { return slices.Contains(as.resources, x) })
		if len(n) > 0 || len(w) > 0 {
			out = append(out, grantRefusal{as: as, refused: n, withdrawn: w})
		}
	}
	if len(rec.sessions) > 0 {
		rec.resources = rec.sessions[len(rec.sessions)-1].resources
	}
	return out
}

func (r *Registry) remove(as *agentSession, now time.Time) {
	r.mu.Lock()
	defer r.mu.Unlock()
	rec := r.agents[as.name]
	if rec == nil {
		return
	}
	i := slices.Index(rec.sessions, as)
	if i < 0 {
		return
	}
	rec.sessions = slices.Delete(rec.sessions, i, i+1)
	if len(rec.sessions) == 0 {
		rec.since = now
	}
}

// candidates returns the sessions that may serve resource, in the order to try them: the
// newest session of every instance exposing it, rotated round-robin per resource. known
// reports whether any agent (online or not) has ever exposed the resource.
func (r *Registry) candidates(resource string) (cands []*agentSession, offlineAgents []string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	names := make([]string, 0, len(r.agents))
	for n := range r.agents {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		rec := r.agents[n]
		newest := map[string]*agentSession{}
		var order []string
		for _, as := range rec.sessions {
			key := as.instance
			if key == "" {
				// Without an instance id every session counts as its own instance.
				key = "session:" + as.id
			}
			if _, seen := newest[key]; !seen {
				order = append(order, key)
			}
			newest[key] = as
		}
		for _, k := range order {
			if as := newest[k]; slices.Contains(as.resources, resource) {
				cands = append(cands, as)
			}
		}
		if len(rec.sessions) == 0 && slices.Contains(rec.resources, resource) {
			offlineAgents = append(offlineAgents, n)
		}
	}
	if len(cands) > 1 {
		k := int(r.rr[resource] % uint64(len(cands)))
		r.rr[resource]++
		cands = append(cands[k:], cands[:k]...)
	}
	return cands, offlineAgents
}

// List describes every agent the gateway knows, sorted by name: those seen since it started
// and those remembered from its data dir (AgentsFileName), which are offline until they
// reconnect.
func (r *Registry) List() []AgentInfo {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]AgentInfo, 0, len(r.agents))
	for name, rec := range r.agents {
		ai := AgentInfo{Name: name, Status: "offline", Since: rec.since,
			Resources: slices.Clone(rec.resources), Version: rec.version, Remote: rec.remote, CertExpires: rec.expires}
		if len(rec.sessions) > 0 {
			ai.Status = "online"
			ai.Sessions = len(rec.sessions)
			instances := map[string]bool{}
			var res, refused []string
			for _, as := range rec.sessions {
				key := as.instance
				if key == "" {
					key = "session:" + as.id
				}
				instances[key] = true
				for _, x := range as.resources {
					if !slices.Contains(res, x) {
						res = append(res, x)
					}
				}
				for _, x := range as.resources {
					if p := as.protocols[x]; p != "" {
						if ai.Protocols == nil {
							ai.Protocols = map[string]string{}
						}
						ai.Protocols[x] = p
					}
				}
				for _, x := range as.refused {
					if !slices.Contains(refused, x) {
						refused = append(refused, x)
					}
				}
				if as.expires.After(ai.CertExpires) {
					ai.CertExpires = as.expires
				}
			}
			newest := rec.sessions[len(rec.sessions)-1]
			ai.Version, ai.Remote = newest.version, newest.remote
			sort.Strings(res)
			sort.Strings(refused)
			ai.Resources, ai.Refused = res, refused
			ai.Instances = len(instances)
		}
		if ai.Resources == nil {
			ai.Resources = []string{}
		}
		if ai.Refused == nil {
			ai.Refused = []string{}
		}
		ai.Allowed = []string{}
		if r.allowed != nil {
			if a := r.allowed(name); a != nil {
				ai.Allowed = a
			}
		}
		out = append(out, ai)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// forgetResult is what Registry.forget did.
type forgetResult int

const (
	forgotten forgetResult = iota
	forgetUnknown
	forgetOnline
)

// forget drops an offline agent's record.
func (r *Registry) forget(name string) forgetResult {
	r.mu.Lock()
	defer r.mu.Unlock()
	rec, ok := r.agents[name]
	switch {
	case !ok:
		return forgetUnknown
	case len(rec.sessions) > 0:
		return forgetOnline
	}
	delete(r.agents, name)
	return forgotten
}
