package agent

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"path/filepath"

	"github.com/wicketgw/wicket/agent/identity"
)

// ConfigFile is the file in the agent's data directory that keeps the list
// of resources it serves (and, for the operator's eye, the gateway of its
// identity), so that a restart with only the data directory serves the same
// resources. Written atomically, mode 0600, whenever the agent starts with an
// expose list or applies a new one.
const ConfigFile = "agent.json"

// storedConfig is the content of ConfigFile.
type storedConfig struct {
	// Gateway is the gateway URL of the stored identity (the identity is what
	// the agent dials; this copy is informational).
	Gateway string `json:"gateway"`
	// Expose is the last list of resources the agent served.
	Expose map[string]string `json:"expose"`
}

// loadStoredExpose returns the expose list kept in dir, or nil if there is none.
func loadStoredExpose(dir string) (map[string]string, error) {
	data, err := os.ReadFile(filepath.Join(dir, ConfigFile))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("%w: read the stored configuration: %v", ErrConfig, err)
	}
	var c storedConfig
	if err := json.Unmarshal(data, &c); err != nil {
		return nil, fmt.Errorf("%w: %s is not valid JSON (%v): start with --expose to write it again", ErrConfig, filepath.Join(dir, ConfigFile), err)
	}
	return c.Expose, nil
}

// saveStoredConfig keeps expose and gateway in dir unless they are already
// what is stored. A failure is reported, not fatal: the agent serves anyway.
func (a *agent) saveStoredConfig(expose map[string]string) {
	dir := a.cfg.DataDir
	prev, _ := loadStoredExpose(dir)
	if prev != nil && maps.Equal(prev, expose) {
		if data, err := os.ReadFile(filepath.Join(dir, ConfigFile)); err == nil {
			var c storedConfig
			if json.Unmarshal(data, &c) == nil && c.Gateway == a.meta.URL {
				return
			}
		}
	}
	data, err := json.MarshalIndent(storedConfig{Gateway: a.meta.URL, Expose: expose}, "", "  ")
	if err == nil {
		err = identity.WriteFileAtomic(dir, ConfigFile, append(data, '\n'), 0o600)
	}
	if err != nil {
		a.log.Warn("could not keep the list of resources in the data directory; a restart will need --expose again", "err", err)
		return
	}
	a.log.Info("kept the list of resources for restarts", "file", filepath.Join(dir, ConfigFile))
}
