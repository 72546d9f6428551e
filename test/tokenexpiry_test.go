package test

import (
	"encoding/base64"
	"encoding/json"
	"strings"
	"testing"
	"time"
)

// tokenExpiry reads exp from a one-time token (a JWT) without verifying it; the
// package does not import ca (see credentialExpiry).
func tokenExpiry(t *testing.T, tok string) time.Time {
	t.Helper()
	var c struct {
		Exp int64 `json:"exp"`
	}
	parts := strings.Split(tok, ".")
	if len(parts) != 3 {
		t.Fatalf("token %q is not a JWT", tok)
	}
	b, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err == nil {
		err = json.Unmarshal(b, &c)
	}
	if err != nil || c.Exp == 0 {
		t.Fatalf("unreadable token claims: %v", err)
	}
	return time.Unix(c.Exp, 0)
}

// TestTokenExpiry: a token is valid for its --ttl after minting, checked to the
// second by the gateway. step-ca's own check would still take it for a minute after
// exp; 2 s after exp, enrollment and login are refused with one sentence that gives
// the expiry and the command to mint another, and the refusal is audited.
func TestTokenExpiry(t *testing.T) {
	h := NewHarness(t)
	gw := h.StartGateway(GatewayOptions{Policy: allowAlice})

	// The shortest --ttl: one second (times in a token are whole seconds).
	if _, errOut, err := gw.Admin("token", "create", "agent", "x", "--ttl", "500ms"); err == nil ||
		!strings.Contains(errOut, "between 1s and 24h") {
		t.Fatalf("--ttl 500ms: err %v, stderr %q; want a refusal naming the bounds", err, errOut)
	}
	minted := time.Now()
	agentTok := gw.Token("agent", "late", "--ttl", "1s")
	userTok := gw.Token("user", "alice", "--ttl", "1s")
	exp, userExp := tokenExpiry(t, agentTok), tokenExpiry(t, userTok)
	if d := exp.Sub(minted); d < 0 || d > 2*time.Second {
		t.Fatalf("--ttl 1s minted a token expiring %s after minting", d)
	}

	// Sleeping until a wall-clock time is the point here: there is no event to wait for.
	time.Sleep(time.Until(userExp.Add(2 * time.Second)))

	_, errOut, err := h.Run(nil, "agent", "--token", agentTok, "--data-dir", h.Dir("agent-late"),
		"--expose", "echo="+echoServer(t))
	want := "the one-time token expired at " + exp.UTC().Format(time.RFC3339) +
		"; mint a new one with `wicket token create agent late`"
	if err == nil || !strings.Contains(errOut, want) {
		t.Fatalf("agent with a token expired 2 s ago: err %v, stderr:\n%s\nwant %q", err, errOut, want)
	}
	rec := gw.WaitAudit(map[string]string{"type": "agent.enrolled", "agent": "late", "outcome": "denied"})
	if r, _ := rec["reason"].(string); !strings.Contains(r, "expired at "+exp.UTC().Format(time.RFC3339)) {
		t.Fatalf("audit record %v does not give the expiry", rec)
	}

	_, errOut, err = h.Run(nil, "login", "--token", userTok, "--data-dir", h.Dir("user-alice"))
	want = "the one-time token expired at " + userExp.UTC().Format(time.RFC3339) +
		"; mint a new one with `wicket token create user alice`"
	if err == nil || !strings.Contains(errOut, want) {
		t.Fatalf("login with a token expired 2 s ago: err %v, stderr:\n%s\nwant %q", err, errOut, want)
	}
	gw.WaitAudit(map[string]string{"type": "user.enrolled", "user": "alice", "outcome": "denied"})
	for _, r := range gw.AuditRecords() {
		if (r["type"] == "agent.enrolled" || r["type"] == "user.enrolled") && r["outcome"] == "ok" {
			t.Fatalf("an expired token enrolled: %v", r)
		}
	}
}
