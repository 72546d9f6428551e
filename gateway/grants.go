package gateway

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"

	"github.com/wicketgw/wicket/agent/identity"
	"github.com/wicketgw/wicket/ca"
	"github.com/wicketgw/wicket/gateway/audit"
)

// GrantsFileName is the file in the gateway's data dir that says which agent names may serve
// which resources: a JSON object keyed by agent name (the name in the agent's certificate),
// each value the list of resource names granted to it. It is written atomically, mode 0600.
// A resource an agent announces that is not granted to its name is refused for that resource
// (see the package doc, "Resource ownership").
const GrantsFileName = "grants.json"

// grantStore holds the grants and writes them to GrantsFileName on every change. Its lock
// is taken after the registry's (Registry.add reads it), never the other way round.
type grantStore struct {
	dir  string
	file string // "" is GrantsFileName
	mu   sync.Mutex
	m    map[string][]string // agent name -> sorted resource names
}

// loadGrants reads the grants file. It returns exists=false when there is none yet; a file
// that cannot be read or parsed is an error (the gateway does not start on a guess about
// who owns what).
func loadGrants(dir string) (gs *grantStore, exists bool, err error) {
	gs = &grantStore{dir: dir, m: map[string][]string{}}
	path := filepath.Join(dir, GrantsFileName)
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return gs, false, nil
	}
	if err != nil {
		return nil, false, fmt.Errorf("read the resource grants %s: %w", path, err)
	}
	var m map[string][]string
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, true, fmt.Errorf("the resource grants %s are not valid JSON (%v): fix or restore the file; "+
			"removing it grants every known agent what it last served", path, err)
	}
	for name, res := range m {
		if ca.ValidName(name) != nil {
			return nil, true, fmt.Errorf("the resource grants %s name an invalid agent %q: fix or restore the file", path, name)
		}
		for _, r := range res {
			if ca.ValidName(r) != nil {
				return nil, true, fmt.Errorf("the resource grants %s give agent %s an invalid resource name %q: fix or restore the file", path, name, r)
			}
		}
		gs.m[name] = normalize(res)
	}
	return gs, true, nil
}

// normalize sorts and deduplicates resource names.
func normalize(res []string) []string {
	out := slices.Clone(res)
	slices.Sort(out)
	return slices.Compact(out)
}

// allowed returns the resources granted to agent name.
func (gs *grantStore) allowed(name string) []string {
	gs.mu.Lock()
	defer gs.mu.Unlock()
	return slices.Clone(gs.m[name])
}

// change adds (allow) or removes (!allow) resources for name and saves the file. It returns
// the grant after the change and whether anything changed; on a write error nothing changes.
func (gs *grantStore) change(name string, resources []string, allow bool) (after []string, changed bool, err error) {
	gs.mu.Lock()
	defer gs.mu.Unlock()
	before := gs.m[name]
	next := slices.Clone(before)
	for _, r := range resources {
		if allow {
			next = append(next, r)
		} else {
			next = slices.DeleteFunc(next, func(x string) bool { return x == r })
		}
	}
	next = normalize(next)
	if slices.Equal(next, before) {
		return slices.Clone(before), false, nil
	}
	m := make(map[string][]string, len(gs.m)+1)
	for k, v := range gs.m {
		m[k] = v
	}
	if len(next) == 0 {
		delete(m, name)
	} else {
		m[name] = next
	}
	if err := gs.saveLocked(m); err != nil {
		return slices.Clone(before), false, err
	}
	gs.m = m
	return slices.Clone(next), true, nil
}

// replaceAll sets every grant at once and saves the file (the migration).
func (gs *grantStore) replaceAll(m map[string][]string) error {
	gs.mu.Lock()
	defer gs.mu.Unlock()
	if err := gs.saveLocked(m); err != nil {
		return err
	}
	gs.m = m
	return nil
}

func (gs *grantStore) saveLocked(m map[string][]string) error {
	out := make(map[string][]string, len(m))
	for k, v := range m {
		if v == nil {
			v = []string{}
		}
		out[k] = v
	}
	b, err := json.MarshalIndent(out, "", "  ")
	if err != nil {
		return err
	}
	file := gs.file
	if file == "" {
		file = GrantsFileName
	}
	return identity.WriteFileAtomic(gs.dir, file, append(b, '\n'), 0o600)
}

// split divides announced resources into those granted to name (served) and the others.
func split(announced, allowed []string) (served, refused []string) {
	served, refused = []string{}, []string{}
	for _, r := range announced {
		if slices.Contains(allowed, r) {
			served = append(served, r)
		} else {
			refused = append(refused, r)
		}
	}
	return served, refused
}

// allowCommand is the command an administrator runs to let agent serve resource.
func allowCommand(agent, resource string) string {
	return fmt.Sprintf("wicket agents allow %s --resources %s", agent, resource)
}

// claimRefusal is the sentence sent back to an agent, and logged, for a refused resource.
func claimRefusal(agent, resource string) string {
	return fmt.Sprintf("resource %s is not granted to agent %s, so the gateway does not route it here; "+
		"to allow it, the gateway's administrator runs `%s`", resource, agent, allowCommand(agent, resource))
}

// migrateGrants runs at start when the data dir has no grants file yet: every agent in the
// registry (loaded from AgentsFileName) is granted the resources it was last seen serving,
// the grants file is written, and one grants.migrated record lists what was granted. A
// fresh data dir gets an empty grants file and no record.
func (g *Gateway) migrateGrants() error {
	m := map[string][]string{}
	var parts []string
	known := g.registry.List()
	for _, a := range known {
		res := normalize(a.Resources)
		if len(res) > 0 {
			m[a.Name] = res
		}
		parts = append(parts, a.Name+"="+strings.Join(res, ","))
	}
	if err := g.grants.replaceAll(m); err != nil {
		return fmt.Errorf("write the resource grants (first start with resource ownership): %w", err)
	}
	if len(known) == 0 {
		return nil
	}
	sort.Strings(parts)
	g.log.Warn("no resource grants yet (upgrade): each known agent was granted the resources it last served; "+
		"agents with none serve nothing until `wicket agents allow NAME --resources R`",
		"file", GrantsFileName, "grants", strings.Join(parts, " "))
	g.record(audit.Record{Type: audit.TypeGrantsMigrated, Outcome: audit.OutcomeOK,
		Reason: "no grants file: each agent known from " + AgentsFileName + " was granted the resources it last served",
		Extra:  map[string]string{"grants": strings.Join(parts, " "), "agents": fmt.Sprint(len(known))}})
	return nil
}
