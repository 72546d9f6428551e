package test

import (
	"encoding/base64"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// credentialExpiry reads exp from an ACME enrollment credential
// ("wicket-acme-v1." + base64url JSON). The test package does not import ca: step-ca
// would start glog's daemon goroutine in every test of this package.
func credentialExpiry(t *testing.T, cred string) time.Time {
	b, err := base64.RawURLEncoding.DecodeString(strings.TrimPrefix(cred, "wicket-acme-v1."))
	var c struct {
		Exp time.Time `json:"exp"`
	}
	if err == nil {
		err = json.Unmarshal(b, &c)
	}
	if err != nil || c.Exp.IsZero() {
		t.Fatalf("unreadable ACME credential: %v", err)
	}
	return c.Exp
}

// TestACMEAgent enrolls an agent by ACME with the real binaries
// (`wicket token create agent NAME --acme`, `wicket agent --token`), carries
// byte-checked transfers through it, and renews it by ACME several times
// (--renew-period 2s) while transfers run: no stream may fail. The same
// credential on a second agent is refused and audited.
func TestACMEAgent(t *testing.T) {
	h := NewHarness(t)
	gw := h.StartGateway(GatewayOptions{Policy: allowAlice})
	cred := gw.AgentToken("acme1", []string{"echo"}, "--acme")
	if !strings.HasPrefix(cred, "wicket-acme-v1.") {
		t.Fatalf("token create --acme printed %q", cred)
	}
	agentDir := h.Dir("agent-acme1")
	agent := h.StartAgentWith(cred, agentDir, []string{"--renew-period", "2s"}, "echo="+echoServer(t))
	gw.WaitAgentOnline("acme1", "echo")
	agent.WaitFor(`enrolled by ACME`)
	gw.WaitAudit(map[string]string{"type": "cert.issued", "agent": "acme1"})
	gw.WaitAudit(map[string]string{"type": "acme.bind", "agent": "acme1", "outcome": "ok"})
	if fi, err := os.Stat(filepath.Join(agentDir, "acme-account.key")); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("ACME account key: %v %v", fi, err)
	}

	user := h.Login(gw, "alice")
	_, local := h.Connect(user, "echo")
	if err := transfer(local, 4<<20); err != nil {
		t.Fatalf("transfer through the ACME-enrolled agent: %v", err)
	}

	load := startLoad(t, local, 2, 2<<20)
	renewals := func() int { return strings.Count(agent.Output(), "certificate renewed") }
	eventually(t, "two ACME renewals of the agent", func() bool { return renewals() >= 2 })
	streams, failures := load.stop()
	if len(failures) > 0 {
		t.Fatalf("%d of %d streams failed during ACME renewals; first: %v", len(failures), streams, failures[0])
	}
	// Every renewal was an ACME order (cert.issued via acme), none a /1.0/renew.
	issued, renewedByToken := 0, 0
	for _, r := range gw.AuditRecords() {
		if auditValue(r["agent"]) != "acme1" {
			continue
		}
		switch auditValue(r["type"]) {
		case "cert.issued":
			issued++
		case "cert.renewed":
			renewedByToken++
		}
	}
	if issued < 1+renewals() || renewedByToken != 0 {
		t.Fatalf("audit: %d ACME issuances for %d renewals (+1 enrollment), %d renewals by /1.0/renew", issued, renewals(), renewedByToken)
	}
	t.Logf("%d byte-checked streams, %d ACME renewals, zero failures", streams, renewals())

	// The credential again, on another agent: refused, audited; the first keeps running.
	second := h.StartAgentWith(cred, h.Dir("agent-acme1-again"), nil, "echo="+echoServer(t))
	if err := second.Exited(); err == nil {
		t.Fatalf("second agent with a used ACME credential exited 0:\n%s", second.Output())
	}
	if !strings.Contains(second.Output(), "already used") {
		t.Errorf("second agent's error does not say the credential was used:\n%s", second.Output())
	}
	gw.WaitAudit(map[string]string{"type": "agent.enrolled", "agent": "acme1", "outcome": "denied"})
	if !agent.Running() {
		t.Fatalf("first agent stopped:\n%s", agent.Output())
	}
	// A restart without the credential loads the identity and its ACME account key, and
	// keeps renewing by ACME.
	if err := agent.Stop(); err != nil {
		t.Logf("agent stop: %v", err)
	}
	restarted := h.StartAgentWith("", agentDir, []string{"--renew-period", "2s"}, "echo="+echoServer(t))
	gw.WaitAgentOnline("acme1", "echo")
	eventually(t, "an ACME renewal after the restart", func() bool {
		return strings.Contains(restarted.Output(), "certificate renewed")
	})
	if err := transfer(local, 1<<20); err != nil {
		t.Fatalf("transfer after the restart: %v", err)
	}

	// An expired credential: refused before anything is sent (the CA refuses it too:
	// gateway and ca tests), nothing issued.
	expired := gw.Token("agent", "late", "--acme", "--ttl", "1s")
	exp := credentialExpiry(t, expired)
	eventually(t, "the credential to expire", func() bool { return time.Now().After(exp) })
	late := h.StartAgentWith(expired, h.Dir("agent-late"), nil, "echo="+echoServer(t))
	if err := late.Exited(); err == nil || !strings.Contains(late.Output(), "expired") {
		t.Fatalf("agent with an expired ACME credential: %v\n%s", err, late.Output())
	}

	// A user cannot get an ACME credential.
	if _, _, err := gw.Admin("token", "create", "user", "bob", "--acme"); err == nil {
		t.Fatal("token create user --acme succeeded")
	}
}
