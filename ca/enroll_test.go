package ca

import (
	"crypto/x509"
	"testing"
	"time"
)

func checkLeaf(t *testing.T, e *testEnv, c *Credentials, role Role, name string, lifetime time.Duration) {
	t.Helper()
	leaf := c.Chain[0]
	id, err := ParseIdentity(leaf)
	if err != nil {
		t.Fatal(err)
	}
	want := Identity{TrustDomain: DefaultTrustDomain, Role: role, Name: name}
	if id != want {
		t.Fatalf("identity %v, want %v", id, want)
	}
	if len(leaf.URIs) != 1 || leaf.URIs[0].String() != "spiffe://wicket.local/"+string(role)+"/"+name {
		t.Fatalf("URI SANs %v", leaf.URIs)
	}
	if len(leaf.DNSNames)+len(leaf.IPAddresses)+len(leaf.EmailAddresses) != 0 {
		t.Fatalf("unexpected extra SANs: %v %v %v", leaf.DNSNames, leaf.IPAddresses, leaf.EmailAddresses)
	}
	if got := time.Until(leaf.NotAfter); got < lifetime-time.Minute || got > lifetime+time.Minute {
		t.Fatalf("remaining lifetime %s, want about %s", got, lifetime)
	}
	if len(leaf.ExtKeyUsage) != 1 || leaf.ExtKeyUsage[0] != x509.ExtKeyUsageClientAuth {
		t.Fatalf("EKU %v, want client auth only", leaf.ExtKeyUsage)
	}
	inter := x509.NewCertPool()
	for _, x := range c.Chain[1:] {
		inter.AddCert(x)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: e.a.RootPool(), Intermediates: inter,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Fatalf("does not chain to the root: %v", err)
	}
	if !c.Root.Equal(e.a.Root()) {
		t.Fatal("pinned root differs from the CA root")
	}
	if got, err := e.a.VerifyPeer(c.Chain, role); err != nil || got != want {
		t.Fatalf("VerifyPeer = %v, %v", got, err)
	}
}

func TestEnrollAgentAndUser(t *testing.T) {
	forEachDB(t, func(t *testing.T, dsn string) {
		e := startEnv(t, t.TempDir(), dsn, nil)
		agent := mustEnroll(t, mustToken(t, e.a, RoleAgent, "db1"))
		checkLeaf(t, e, agent, RoleAgent, "db1", DefaultAgentLifetime)
		user := mustEnroll(t, mustToken(t, e.a, RoleUser, "alice"))
		checkLeaf(t, e, user, RoleUser, "alice", DefaultUserLifetime)
	})
}
