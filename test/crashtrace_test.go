package test

import (
	"io"
	"net"
	"path/filepath"
	"testing"
	"time"
)

// kill9 kills the process with SIGKILL, as a crash or the OOM killer would, and waits.
func (p *Process) kill9() {
	p.t.Helper()
	if err := p.cmd.Process.Kill(); err != nil {
		p.t.Fatalf("kill -9 %s: %v", p.name, err)
	}
	<-p.done
}

// TestCrashLeavesATrace kills the gateway with SIGKILL while a session is open: the next
// start ends that session (and the connections it ran on) in the audit log with outcome
// gateway_crashed and records the unclean stop, so every session.started has an end, and
// the log still verifies.
func TestCrashLeavesATrace(t *testing.T) {
	h := NewHarness(t)
	gw := h.StartGateway(GatewayOptions{Policy: allowAlice})
	h.StartAgent(gw, "db1", "echo="+echoServer(t))
	_, local := h.Connect(h.Login(gw, "alice"), "echo")
	c, err := net.DialTimeout("tcp", local, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(waitTimeout))
	if _, err := c.Write([]byte("open")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(c, make([]byte, 4)); err != nil {
		t.Fatalf("the session does not echo: %v", err)
	}
	started := gw.WaitAudit(map[string]string{"type": "session.started", "user": "alice"})
	sid := auditValue(started["session_id"])

	gw.kill9()
	gw2 := h.StartGateway(GatewayOptions{DataDir: gw.DataDir, Policy: allowAlice})
	ended := gw2.WaitAudit(map[string]string{"type": "session.ended", "session_id": sid})
	if ended["outcome"] != "gateway_crashed" || ended["user"] != "alice" || ended["resource"] != "echo" {
		t.Fatalf("the open session was ended as %v, want outcome gateway_crashed", ended)
	}
	crashed := gw2.WaitAudit(map[string]string{"type": "gateway.crashed"})
	if extra, _ := crashed["extra"].(map[string]any); auditValue(extra["sessions_ended"]) != "1" || auditValue(extra["connections_ended"]) != "2" {
		t.Fatalf("gateway.crashed = %v, want 1 session and 2 connections (alice's and db1's) ended", crashed)
	}
	eventually(t, "the new run's gateway.started after gateway.crashed", func() bool {
		for _, r := range gw2.AuditRecords() {
			if r["type"] == "gateway.started" && r["seq"].(float64) > crashed["seq"].(float64) {
				return true
			}
		}
		return false
	})

	// Every start has its end.
	open := map[string]bool{}
	for _, r := range gw2.AuditRecords() {
		id := auditValue(r["session_id"])
		switch r["type"] {
		case "session.started", "user.connected", "agent.connected":
			open[auditValue(r["type"])+" "+id] = true
		case "session.ended":
			delete(open, "session.started "+id)
		case "user.disconnected":
			delete(open, "user.connected "+id)
		case "agent.disconnected":
			delete(open, "agent.connected "+id)
		}
	}
	// The agent reconnects to nothing (the new gateway listens on a new port) and alice's
	// connection died with the old process: nothing may be open from the first run.
	for k := range open {
		t.Errorf("%s has no end record", k)
	}
	if err := gw2.Stop(); err != nil {
		t.Fatalf("gateway stop: %v\n%s", err, gw2.Output())
	}
	if out, errOut, err := h.Run(nil, "audit", "verify", filepath.Join(gw.DataDir, "audit.log")); err != nil {
		t.Fatalf("audit verify after a crash and its recovery: %v\n%s%s", err, out, errOut)
	}
}
