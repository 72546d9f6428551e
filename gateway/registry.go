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
	// Resources are the resource names the agent exposes (union over its live sessions; the
	// last known set when offline).
	Resources []string `json:"resources"`
	// Version is the agent version from its newest session's hello.
	Version string `json:"version"`
	// Remote is the remote address of the newest session.
	Remote string `json:"remote"`
	// Since is when the current status began: connected since (oldest live session) or
	// disconnected since.
	Since time.Time `json:"since"`
	// CertExpires is the latest certificate expiry among live sessions (last known when offline).
	CertExpires time.Time `json:"cert_expires"`
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
	resources []string
	remote    string
	since     time.Time
	expires   time.Time
	sess      *tunnel.Session
	peer      *peer
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
}

// NewRegistry returns an empty registry.
func NewRegistry() *Registry {
	return &Registry{agents: map[string]*agentRecord{}, rr: map[string]uint64{}}
}

func (r *Registry) add(as *agentSession) {
	r.mu.Lock()
	defer r.mu.Unlock()
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
}

// update replaces the resources and version of a live session (a later hello).
func (r *Registry) update(as *agentSession, resources []string, version string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	as.resources = resources
	if version != "" {
		as.version = version
	}
	if rec := r.agents[as.name]; rec != nil {
		rec.resources, rec.version = resources, as.version
	}
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
			var res []string
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
				if as.expires.After(ai.CertExpires) {
					ai.CertExpires = as.expires
				}
			}
			newest := rec.sessions[len(rec.sessions)-1]
			ai.Version, ai.Remote = newest.version, newest.remote
			sort.Strings(res)
			ai.Resources = res
			ai.Instances = len(instances)
		}
		if ai.Resources == nil {
			ai.Resources = []string{}
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
