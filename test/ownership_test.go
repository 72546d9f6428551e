package test

import (
	"io"
	"net"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/wicketgw/wicket/tunnel/loopback"
)

// tagServer listens on 127.0.0.1 and answers every connection with tag, then closes it:
// a target that says which agent's side a connection reached.
func tagServer(t *testing.T, tag string) string {
	t.Helper()
	return loopback.Serve(t, func(c net.Conn) { _, _ = c.Write([]byte(tag)) })
}

// reached opens n connections to local and counts the tags that answer.
func reached(t *testing.T, local string, n int) map[string]int {
	t.Helper()
	got := map[string]int{}
	for i := range n {
		c, err := net.DialTimeout("tcp", local, 10*time.Second)
		if err != nil {
			t.Fatalf("connection %d: %v", i, err)
		}
		_ = c.SetDeadline(time.Now().Add(waitTimeout))
		b, err := io.ReadAll(c)
		c.Close()
		if err != nil {
			t.Fatalf("connection %d: %v", i, err)
		}
		got[string(b)]++
	}
	return got
}

// TestAgentCannotCaptureAnotherAgentsResource is issue 10's hijack with the real binary:
// agent db1 is granted bulk; agent evil, enrolled with a token that grants nothing, announces
// bulk too. Every user connection to bulk reaches db1's target, none evil's; the refusal is
// audited (agent.claim_refused), evil's log names the allow command, and `agents list` shows
// it refused. Once the administrator runs `wicket agents allow evil --resources bulk`, evil
// shares bulk with db1 (replicas of a resource, round-robin), without reconnecting.
func TestAgentCannotCaptureAnotherAgentsResource(t *testing.T) {
	h := NewHarness(t)
	gw := h.StartGateway(GatewayOptions{Policy: allowAlice})
	h.StartAgent(gw, "db1", "bulk="+tagServer(t, "db1"))

	evil := h.StartAgentWith(gw.Token("agent", "evil"), h.Dir("agent-evil"), nil, "bulk="+tagServer(t, "evil"))
	gw.WaitAudit(map[string]string{"type": "agent.claim_refused", "agent": "evil", "resource": "bulk", "outcome": "denied"})
	evil.WaitFor("resource bulk is not granted to agent evil.*`wicket agents allow evil --resources bulk`")

	user := h.Login(gw, "alice")
	_, local := h.Connect(user, "bulk")
	got := reached(t, local, 20)
	if got["db1"] != 20 || got["evil"] != 0 {
		t.Fatalf("20 connections to bulk reached %v; want all 20 at db1 and none at evil", got)
	}

	var evilRow *AgentInfo
	for _, a := range gw.Agents() {
		if a.Name == "evil" {
			evilRow = &a
		}
	}
	if evilRow == nil || evilRow.Status != "online" || len(evilRow.Resources) != 0 ||
		!slices.Equal(evilRow.Refused, []string{"bulk"}) || len(evilRow.Allowed) != 0 {
		t.Fatalf("agents list --json shows evil as %+v; want online, serving nothing, bulk refused", evilRow)
	}
	table := gw.MustAdmin("agents", "list")
	if !strings.Contains(table, "REFUSED") || !regexpLine(table, `^evil\s+online\s+-\s+-\s+bulk\s`) ||
		!regexpLine(table, `^db1\s+online\s+bulk\s+bulk\s+-\s`) {
		t.Fatalf("agents list:\n%s", table)
	}

	if out := gw.MustAdmin("agents", "allow", "evil", "--resources", "bulk"); !strings.Contains(out, "agent evil may serve: bulk") {
		t.Fatalf("agents allow printed %q", out)
	}
	gw.WaitAudit(map[string]string{"type": "grant.changed", "agent": "evil"})
	gw.WaitAgentOnline("evil", "bulk")
	got = reached(t, local, 20)
	if got["db1"] == 0 || got["evil"] == 0 || got["db1"]+got["evil"] != 20 {
		t.Fatalf("after allow, 20 connections reached %v; want both agents to share bulk", got)
	}
	t.Logf("after allow: %v", got)

	if _, errOut, err := gw.Admin("agents", "allow", "evil"); err == nil || !strings.Contains(errOut, "--resources") {
		t.Fatalf("agents allow without --resources: err %v, stderr %q", err, errOut)
	}

	// Withdrawing the grant routes nothing more to evil, and evil hears of it at once,
	// on its live session, not at its next hello.
	gw.MustAdmin("agents", "disallow", "evil", "--resources", "bulk")
	evil.WaitFor("the grant was withdrawn by .*resource bulk is not granted to agent evil")
	if got := reached(t, local, 10); got["evil"] != 0 || got["db1"] != 10 {
		t.Fatalf("after disallow, 10 connections reached %v; want all at db1", got)
	}
}

// regexpLine reports whether some line of text matches re.
func regexpLine(text, re string) bool {
	for _, l := range strings.Split(text, "\n") {
		if ok, _ := regexp.MatchString(re, l); ok {
			return true
		}
	}
	return false
}
