package test

import (
	"testing"
	"time"
)

// TestAgentBackAfterQuickRestarts: a gateway restarted six times a few
// seconds apart has the agent serving again quickly every time, not only the
// first (the reconnect backoff starts over once a session is established, not
// after a minute of uptime). Figures are logged; the bound is generous.
func TestAgentBackAfterQuickRestarts(t *testing.T) {
	h := NewHarness(t)
	gw := h.StartGateway(GatewayOptions{Policy: allowAlice, Args: []string{"--grace-period", "0"}})
	h.StartAgent(gw, "db1", "echo="+echoServer(t))
	user := h.Login(gw, "alice")
	_, local := h.Connect(user, "echo")
	if err := transfer(local, 1<<10); err != nil {
		t.Fatal(err)
	}
	const bound = 6 * time.Second // the aim is ~3 s; slow shared machines get slack
	// Each outage costs the old backoff (reset only after a minute up) one or two
	// doublings: six restarts take its ceiling past the bound.
	const restarts = 6
	for i := 1; i <= restarts; i++ {
		if err := gw.Stop(); err != nil {
			t.Fatalf("gateway did not exit 0 on SIGTERM: %v", err)
		}
		down := time.Now()
		gw = h.StartGateway(GatewayOptions{DataDir: gw.DataDir, Listen: gw.Addr, Policy: allowAlice, Args: []string{"--grace-period", "0"}})
		listening := time.Now()
		var back time.Duration
		for {
			if online(gw, "db1") {
				back = time.Since(listening)
				break
			}
			if time.Since(listening) > waitTimeout {
				t.Fatalf("restart %d: agent not back within %s", i, waitTimeout)
			}
			time.Sleep(20 * time.Millisecond) // polling interval
		}
		var served time.Duration
		for {
			if transfer(local, 1<<10) == nil {
				served = time.Since(listening)
				break
			}
			if time.Since(listening) > waitTimeout {
				t.Fatalf("restart %d: no transfer through the restarted gateway within %s", i, waitTimeout)
			}
			time.Sleep(20 * time.Millisecond) // polling interval
		}
		t.Logf("restart %d: gateway down for %s; agent online %s and a user transfer through it %s after the gateway listened again",
			i, listening.Sub(down).Round(time.Millisecond), back.Round(time.Millisecond), served.Round(time.Millisecond))
		if back > bound || served > bound {
			t.Errorf("restart %d: agent back after %s, user served after %s; want both within %s", i, back, served, bound)
		}
	}
}

// online reports whether the gateway lists agent name online.
func online(g *Gateway, name string) bool {
	for _, a := range g.Agents() {
		if a.Name == name && a.Status == "online" {
			return true
		}
	}
	return false
}
