package gateway

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/wicketgw/wicket/agent/identity"
)

// AgentsFileName is where the registry's last known state of each agent survives a restart,
// inside the gateway's data dir. Without it `wicket agents list` would forget every agent
// that has not reconnected since the gateway started, and a stream to a resource of an
// offline agent would be refused as unknown instead of naming the agent that serves it.
const AgentsFileName = "agents.json"

// agentsForget is how long after its last certificate expired an offline agent is still
// remembered. Such an agent can only come back by enrolling again, and then it reappears.
const agentsForget = 30 * 24 * time.Hour

// agentsSaveDelay coalesces the writes of a burst of connects and disconnects (a gateway
// restart reconnects every agent at once) into one write.
const agentsSaveDelay = time.Second

// savedAgent is one agent's last known state in the agents file.
type savedAgent struct {
	Resources   []string  `json:"resources"`
	Version     string    `json:"version,omitempty"`
	Remote      string    `json:"remote,omitempty"`
	LastSeen    time.Time `json:"last_seen"`
	CertExpires time.Time `json:"cert_expires"`
}

// saved returns every agent's state to remember: online agents as seen now.
func (r *Registry) saved(now time.Time) map[string]savedAgent {
	out := map[string]savedAgent{}
	for _, ai := range r.List() {
		seen := ai.Since
		if ai.Status == "online" {
			seen = now
		}
		out[ai.Name] = savedAgent{Resources: ai.Resources, Version: ai.Version, Remote: ai.Remote,
			LastSeen: seen.UTC(), CertExpires: ai.CertExpires.UTC()}
	}
	return out
}

// restore adds remembered agents as offline, skipping names already known.
func (r *Registry) restore(saved map[string]savedAgent) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for name, s := range saved {
		if _, ok := r.agents[name]; ok {
			continue
		}
		r.agents[name] = &agentRecord{resources: s.Resources, version: s.Version, remote: s.Remote,
			expires: s.CertExpires, since: s.LastSeen}
	}
}

// loadAgents reads the agents file into the registry. A file that cannot be parsed is moved
// aside (kept for inspection, never overwritten) and the gateway starts without it.
func (g *Gateway) loadAgents() {
	path := filepath.Join(g.cfg.DataDir, AgentsFileName)
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return
	}
	var saved map[string]savedAgent
	if err == nil {
		err = json.Unmarshal(b, &saved)
	}
	if err != nil {
		aside := fmt.Sprintf("%s.unreadable-%d", path, g.clock.Now().Unix())
		_ = os.Rename(path, aside)
		g.log.Warn("the list of known agents could not be read; it was moved aside and agents will reappear as they connect",
			"file", path, "moved_to", aside, "err", err)
		return
	}
	now := g.clock.Now()
	for name, s := range saved {
		if now.Sub(s.CertExpires) > agentsForget {
			delete(saved, name)
		}
	}
	g.registry.restore(saved)
}

// saveAgents writes the agents file atomically (identity.WriteFileAtomic), 0600.
func (g *Gateway) saveAgents() error {
	b, err := json.MarshalIndent(g.registry.saved(g.clock.Now()), "", "  ")
	if err != nil {
		return err
	}
	return identity.WriteFileAtomic(g.cfg.DataDir, AgentsFileName, append(b, '\n'), 0o600)
}

// agentsChanged notes that the registry changed; saveAgentsLoop writes it soon.
func (g *Gateway) agentsChanged() {
	select {
	case g.agentsDirty <- struct{}{}:
	default:
	}
}

// saveAgentsLoop writes the agents file after changes, at most once per agentsSaveDelay,
// until the gateway stops (Close writes the final state).
func (g *Gateway) saveAgentsLoop() {
	for {
		select {
		case <-g.bgCtx.Done():
			return
		case <-g.agentsDirty:
		}
		t := time.NewTimer(agentsSaveDelay)
		select {
		case <-g.bgCtx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		if err := g.saveAgents(); err != nil {
			g.log.Warn("could not save the list of known agents", "file", AgentsFileName, "err", err)
		}
	}
}
