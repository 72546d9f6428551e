package gateway

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/wicketgw/wicket/ca"
	"github.com/wicketgw/wicket/gateway/audit"
	"github.com/wicketgw/wicket/tunnel"
)

// TestGrantStoreMergesAndPersists checks allow merges with the existing grant, disallow
// removes, and the file (0600) holds exactly the grants after each change.
func TestGrantStoreMergesAndPersists(t *testing.T) {
	dir := t.TempDir()
	gs, exists, err := loadGrants(dir)
	if err != nil || exists {
		t.Fatalf("loadGrants on an empty dir: exists %v, err %v", exists, err)
	}
	if after, changed, err := gs.change("db1", []string{"web", "postgres"}, true); err != nil || !changed || !slices.Equal(after, []string{"postgres", "web"}) {
		t.Fatalf("allow: %v %v %v", after, changed, err)
	}
	if after, changed, _ := gs.change("db1", []string{"web", "bulk"}, true); !changed || !slices.Equal(after, []string{"bulk", "postgres", "web"}) {
		t.Fatalf("allow merge: %v %v", after, changed)
	}
	if _, changed, _ := gs.change("db1", []string{"web"}, true); changed {
		t.Fatal("allowing a granted resource again reported a change")
	}
	if after, _, _ := gs.change("db1", []string{"postgres", "nothere"}, false); !slices.Equal(after, []string{"bulk", "web"}) {
		t.Fatalf("disallow: %v", after)
	}
	fi, err := os.Stat(filepath.Join(dir, GrantsFileName))
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("grants file: %v, mode %v", err, fi.Mode())
	}
	again, exists, err := loadGrants(dir)
	if err != nil || !exists || !slices.Equal(again.allowed("db1"), []string{"bulk", "web"}) || again.allowed("evil") != nil {
		t.Fatalf("reloaded grants: %v %v %v", again.allowed("db1"), exists, err)
	}
	if err := os.WriteFile(filepath.Join(dir, GrantsFileName), []byte(`{"db1": ["Bad Name"]}`), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, _, err := loadGrants(dir); err == nil || !strings.Contains(err.Error(), "invalid resource name") {
		t.Fatalf("an invalid grants file was accepted: %v", err)
	}
}

// TestAgentClaimRefused is the hijack: agent evil, enrolled but granted nothing, announces
// db1's resource. No user stream reaches evil, evil's hello reply names the refusal and the
// allow command, the refusal is audited once and counted, and `agents list` shows it; once
// an administrator allows it, evil shares the resource with db1 at once.
func TestAgentClaimRefused(t *testing.T) {
	checkLeaks(t)
	tg := startGateway(t, nil)
	echo := echoServer(t)
	db1 := tg.mustAgent("db1", map[string]string{"echo": echo})
	evil, err := tg.connectAgentAs(tg.enroll(ca.RoleAgent, "evil"), "e", map[string]string{"echo": echo})
	if err != nil {
		t.Fatal(err)
	}
	if len(evil.ack.Refused) != 1 || evil.ack.Refused[0].Resource != "echo" ||
		!strings.Contains(evil.ack.Refused[0].Reason, "wicket agents allow evil --resources echo") {
		t.Fatalf("evil's hello reply: %+v", evil.ack)
	}
	// A later hello is answered with the refusals too.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ctl, err := evil.sess.OpenControl(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := ctl.Send(tunnel.Hello{Name: "evil", Instance: "e", Resources: []string{"echo"}}); err != nil {
		t.Fatal(err)
	}
	var later tunnel.Hello
	if err := ctl.Recv(&later); err != nil || len(later.Refused) != 1 || later.Refused[0].Resource != "echo" {
		t.Fatalf("reply to a later hello: %+v, %v", later, err)
	}
	ctl.Close()

	user := tg.dialUser("alice")
	for range 20 {
		echoOnce(t, user, "echo", "hello")
	}
	if db1.servedCount() != 20 || evil.servedCount() != 0 {
		t.Fatalf("db1 served %d, evil %d; want 20 and 0", db1.servedCount(), evil.servedCount())
	}
	rec := tg.waitAudit("agent.claim_refused", func(r audit.Record) bool { return r.Type == audit.TypeAgentClaimRefused })
	if rec.Agent != "evil" || rec.Resource != "echo" || rec.Outcome != audit.OutcomeDenied {
		t.Fatalf("agent.claim_refused = %+v", rec)
	}
	if n := tg.Counters().ClaimsRefused; n != 1 {
		t.Fatalf("ClaimsRefused = %d, want 1", n)
	}
	for _, a := range tg.Registry().List() {
		switch a.Name {
		case "evil":
			if len(a.Resources) != 0 || !slices.Equal(a.Refused, []string{"echo"}) || len(a.Allowed) != 0 {
				t.Fatalf("evil listed as %+v", a)
			}
		case "db1":
			if !slices.Equal(a.Resources, []string{"echo"}) || !slices.Equal(a.Allowed, []string{"echo"}) || len(a.Refused) != 0 {
				t.Fatalf("db1 listed as %+v", a)
			}
		}
	}

	res, err := tg.changeGrant("test", "allow", "evil", []string{"echo"}, true)
	if err != nil || !res.Changed {
		t.Fatalf("allow: %+v %v", res, err)
	}
	chg := tg.waitAudit("grant.changed", func(r audit.Record) bool { return r.Type == audit.TypeGrantChanged && r.Agent == "evil" })
	if chg.Extra["actor"] != "test" || chg.Extra["action"] != "allow" || chg.Extra["resources"] != "echo" {
		t.Fatalf("grant.changed = %+v", chg)
	}
	for range 20 {
		echoOnce(t, user, "echo", "hello")
	}
	if db1.servedCount() != 30 || evil.servedCount() != 10 {
		t.Fatalf("after allow: db1 served %d, evil %d; want 30 and 10 (round-robin)", db1.servedCount(), evil.servedCount())
	}

	// Disallowing takes it away again, for new streams, and is a refusal of a live claim.
	if _, err := tg.changeGrant("test", "disallow", "db1", []string{"echo"}, false); err != nil {
		t.Fatal(err)
	}
	for range 4 {
		echoOnce(t, user, "echo", "hello")
	}
	if db1.servedCount() != 30 || evil.servedCount() != 14 {
		t.Fatalf("after disallow: db1 served %d, evil %d; want 30 and 14", db1.servedCount(), evil.servedCount())
	}
	tg.waitAudit("claim refused after disallow", func(r audit.Record) bool {
		return r.Type == audit.TypeAgentClaimRefused && r.Agent == "db1" && strings.Contains(r.Reason, "withdrawn")
	})
}

// TestClaimRefusedAuditBounded checks that an agent reconnecting in a loop with a refused
// claim writes one agent.claim_refused record per claimAuditEvery, while each refusal is
// counted.
func TestClaimRefusedAuditBounded(t *testing.T) {
	checkLeaks(t)
	tg := startGateway(t, nil)
	creds := tg.enroll(ca.RoleAgent, "evil")
	for i := range 5 {
		a, err := tg.connectAgentAs(creds, "e", map[string]string{"echo": "127.0.0.1:1"})
		if err != nil {
			t.Fatal(err)
		}
		if len(a.ack.Refused) != 1 {
			t.Fatalf("session %d: hello reply %+v", i, a.ack)
		}
		a.close()
	}
	if n := tg.Counters().ClaimsRefused; n != 5 {
		t.Fatalf("ClaimsRefused = %d, want 5", n)
	}
	count := func() (n int, last audit.Record) {
		for _, r := range tg.auditRecords() {
			if r.Type == audit.TypeAgentClaimRefused {
				n++
				last = r
			}
		}
		return n, last
	}
	if n, _ := count(); n != 1 {
		t.Fatalf("%d agent.claim_refused records for 5 sessions within a minute, want 1", n)
	}
	tg.clock.Advance(claimAuditEvery + time.Second)
	a, err := tg.connectAgentAs(creds, "e", map[string]string{"echo": "127.0.0.1:1"})
	if err != nil {
		t.Fatal(err)
	}
	a.close()
	if n, last := count(); n != 2 || last.Extra["suppressed"] != "4" {
		t.Fatalf("after a minute: %d records, last %+v; want 2, suppressed 4", n, last)
	}
}

// TestGrantsMigratedFromAgentsFile is the upgrade: a data dir with an agents file and no
// grants file grants each known agent what it last served, writes grants.json and audits one
// grants.migrated; an agent with no recorded resources gets nothing. A restart migrates no
// more.
func TestGrantsMigratedFromAgentsFile(t *testing.T) {
	checkLeaks(t)
	dataDir := filepath.Join(t.TempDir(), "gw")
	if err := os.MkdirAll(dataDir, 0o700); err != nil {
		t.Fatal(err)
	}
	exp := time.Now().Add(time.Hour).UTC()
	saved := map[string]savedAgent{
		"db1": {Resources: []string{"web", "postgres"}, LastSeen: time.Now().UTC(), CertExpires: exp},
		"old": {Resources: []string{}, LastSeen: time.Now().UTC(), CertExpires: exp},
	}
	b, _ := json.Marshal(saved)
	if err := os.WriteFile(filepath.Join(dataDir, AgentsFileName), b, 0o600); err != nil {
		t.Fatal(err)
	}
	tg := startGateway(t, func(c *Config) { c.DataDir = dataDir })
	gb, err := os.ReadFile(filepath.Join(dataDir, GrantsFileName))
	if err != nil {
		t.Fatal(err)
	}
	var got map[string][]string
	if err := json.Unmarshal(gb, &got); err != nil || len(got) != 1 || !slices.Equal(got["db1"], []string{"postgres", "web"}) {
		t.Fatalf("grants.json = %s (%v)", gb, err)
	}
	rec := tg.waitAudit("grants.migrated", func(r audit.Record) bool { return r.Type == audit.TypeGrantsMigrated })
	if rec.Extra["grants"] != "db1=postgres,web old=" {
		t.Fatalf("grants.migrated = %+v", rec)
	}
	tg.stop()

	tg2 := startGateway(t, func(c *Config) { c.DataDir = dataDir })
	n := 0
	for _, r := range tg2.auditRecords() {
		if r.Type == audit.TypeGrantsMigrated {
			n++
		}
	}
	if n != 1 {
		t.Fatalf("%d grants.migrated records after a restart, want 1", n)
	}
}
