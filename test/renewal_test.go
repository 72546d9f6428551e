package test

import (
	"strings"
	"testing"
)

// TestRenewalDuringTransfer forces several make-before-break renewals of the
// agent's and the user's certificates (--renew-period 2s; certificates cannot
// be shorter than 5 minutes, so the period, not the lifetime, is shortened)
// while byte-checked transfers run. No stream may fail.
func TestRenewalDuringTransfer(t *testing.T) {
	h := NewHarness(t)
	gw := h.StartGateway(GatewayOptions{Policy: allowAlice})
	agentDir := h.Dir("agent-renew")
	agent := h.StartAgentWith(gw.AgentToken("renewer", []string{"echo"}), agentDir, []string{"--renew-period", "2s"}, "echo="+echoServer(t))
	gw.WaitAgentOnline("renewer", "echo")
	user := h.Login(gw, "alice")
	conn, local := h.Connect(user, "echo", "--renew-period", "3s")

	// Keep transfers going until both sides have renewed at least twice.
	load := startLoad(t, local, 2, 2<<20)
	renewals := func(p *Process) int { return strings.Count(p.Output(), "certificate renewed") }
	eventually(t, "two agent and two user renewals", func() bool {
		return renewals(agent) >= 2 && renewals(conn) >= 2
	})
	streams, failures := load.stop()
	if len(failures) > 0 {
		t.Fatalf("%d of %d streams failed during renewals; first: %v", len(failures), streams, failures[0])
	}
	t.Logf("%d byte-checked streams, agent renewed %d times, user %d times, zero failures", streams, renewals(agent), renewals(conn))
	gw.WaitAudit(map[string]string{"type": "cert.renewed", "agent": "renewer"})
}
