package test

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// TestAgentReloadsExposeOnSIGHUP edits the agent's --config file and sends SIGHUP, as
// `systemctl reload` does: the new resource becomes reachable through the gateway, a stream
// opened before the reload keeps working, the gateway audits the change, and a broken file is
// ignored with a log line, the agent still serving what it served.
func TestAgentReloadsExposeOnSIGHUP(t *testing.T) {
	h := NewHarness(t)
	gw := h.StartGateway(GatewayOptions{Policy: allowAlice})
	echo, web := echoServer(t), echoServer(t)
	dir := h.Dir("agent-reload")
	cfg := filepath.Join(h.Dir("agent-reload-config"), "agent.yaml")
	write := func(content string) {
		t.Helper()
		if err := os.WriteFile(cfg, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write("expose:\n  - echo=" + echo + "\n")
	agent := h.StartAgentWith(gw.AgentToken("db1", []string{"echo", "web"}), dir, []string{"--config", cfg})
	gw.WaitAgentOnline("db1", "echo")
	user := h.Login(gw, "alice")
	_, echoLocal := h.Connect(user, "echo")
	if err := transfer(echoLocal, 1<<20); err != nil {
		t.Fatal(err)
	}

	write("expose:\n  - echo=" + echo + "\n  - web=" + web + "\n")
	if err := agent.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	gw.WaitAgentOnline("db1", "web")
	gw.WaitAudit(map[string]string{"type": "agent.updated", "agent": "db1"})
	_, webLocal := h.Connect(user, "web")
	if err := transfer(webLocal, 1<<20); err != nil {
		t.Fatalf("the resource added by the reload: %v", err)
	}
	if err := transfer(echoLocal, 1<<20); err != nil {
		t.Fatalf("the resource kept by the reload: %v", err)
	}

	write("expose: [\"not a resource\"]\n")
	if err := agent.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	agent.WaitFor(`could not be read again; nothing changed`)
	if err := transfer(webLocal, 1<<16); err != nil {
		t.Fatalf("after a broken reload: %v", err)
	}
	if !agent.Running() {
		t.Fatalf("the agent stopped after a broken reload:\n%s", agent.Output())
	}
	if out := gw.MustAdmin("agents", "list"); !strings.Contains(out, "echo,web") {
		t.Fatalf("agents list after the reloads:\n%s", out)
	}

	// A decommissioned agent: refused while online, forgotten once it has stopped.
	if _, errOut, err := gw.Admin("agents", "forget", "db1"); err == nil || !strings.Contains(errOut, "is online") {
		t.Fatalf("forget an online agent: %v %q", err, errOut)
	}
	if err := agent.Stop(); err != nil {
		t.Fatalf("agent stop: %v", err)
	}
	gw.WaitAudit(map[string]string{"type": "agent.disconnected", "agent": "db1"})
	if out := gw.MustAdmin("agents", "forget", "db1"); !strings.Contains(out, "forgot agent db1") {
		t.Fatalf("forget: %q", out)
	}
	if out := gw.MustAdmin("agents", "list"); strings.Contains(out, "db1") {
		t.Fatalf("agents list after forget:\n%s", out)
	}
}
