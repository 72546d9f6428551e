package test

import (
	"os"
	"path/filepath"
	"testing"
)

// TestAgentRestartWithOnlyDataDir is the README's restart command as it is:
// an agent started with --expose and stopped comes back with only --data-dir
// and serves the same resources (kept in DIR/agent.json, 0600); a later
// --expose replaces the kept list.
func TestAgentRestartWithOnlyDataDir(t *testing.T) {
	h := NewHarness(t)
	gw := h.StartGateway(GatewayOptions{Policy: allowAlice})
	echo := echoServer(t)
	agent, dir := h.StartAgent(gw, "db1", "echo="+echo, "echo2="+echo)
	_, local := h.Connect(h.Login(gw, "alice"), "echo2")
	if err := transfer(local, 4<<10); err != nil {
		t.Fatal(err)
	}
	if err := agent.Stop(); err != nil {
		t.Fatalf("agent did not exit 0 on SIGTERM: %v", err)
	}
	info, err := os.Stat(filepath.Join(dir, "agent.json"))
	if err != nil {
		t.Fatalf("the agent kept no configuration: %v", err)
	}
	if info.Mode().Perm() != 0o600 {
		t.Errorf("agent.json has mode %o, want 0600", info.Mode().Perm())
	}

	agent = h.StartAgentWith("", dir, nil) // wicket agent --data-dir DIR
	gw.WaitAgentOnline("db1", "echo")
	gw.WaitAgentOnline("db1", "echo2")
	eventually(t, "a transfer through the agent restarted with only --data-dir", func() bool {
		return transfer(local, 4<<10) == nil
	})
	if err := agent.Stop(); err != nil {
		t.Fatalf("agent did not exit 0 on SIGTERM: %v\n%s", err, agent.Output())
	}

	// Flags given override the kept list and are kept in turn.
	gw.MustAdmin("agents", "allow", "db1", "--resources", "echo3")
	agent = h.StartAgentWith("", dir, nil, "echo3="+echo)
	gw.WaitAgentOnline("db1", "echo3")
	if err := agent.Stop(); err != nil {
		t.Fatal(err)
	}
	h.StartAgentWith("", dir, nil)
	gw.WaitAgentOnline("db1", "echo3")
	for _, a := range gw.Agents() {
		if a.Name == "db1" && a.Status == "online" && len(a.Resources) != 1 {
			t.Fatalf("agent serves %v after --expose echo3 was kept, want only echo3", a.Resources)
		}
	}
}
