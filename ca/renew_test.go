package ca

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"io"
	"math/big"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func TestRenewRevoke(t *testing.T) {
	forEachDB(t, func(t *testing.T, dsn string) {
		var mu sync.Mutex
		var revoked []string
		e := startEnv(t, t.TempDir(), dsn, func(c *Config) {
			c.OnRevoke = func(s []string) { mu.Lock(); revoked = append(revoked, s...); mu.Unlock() }
		})
		cur := mustEnroll(t, mustToken(t, e.a, RoleAgent, "r1"))
		next, err := Renew(ctx10s(t), e.url, cur)
		if err != nil {
			t.Fatalf("Renew: %v", err)
		}
		if next.Chain[0].SerialNumber.Cmp(cur.Chain[0].SerialNumber) == 0 {
			t.Fatal("renewal kept the serial")
		}
		checkLeaf(t, e, next, RoleAgent, "r1", DefaultAgentLifetime)
		if !bytes.Equal(next.Chain[0].RawSubjectPublicKeyInfo, cur.Chain[0].RawSubjectPublicKeyInfo) {
			t.Fatal("renewal changed the key")
		}
		serial := next.Chain[0].SerialNumber.String()
		if rev, _ := e.a.IsRevoked(serial); rev {
			t.Fatal("revoked before Revoke")
		}
		if err := e.a.Revoke(ctx10s(t), serial, "test"); err != nil {
			t.Fatal(err)
		}
		if rev, _ := e.a.IsRevoked(serial); !rev {
			t.Fatal("IsRevoked false after Revoke")
		}
		_, err = Renew(ctx10s(t), e.url, next)
		wantErr(t, err, ErrRevoked)
		_, err = e.a.VerifyPeer(next.Chain, RoleAgent)
		wantErr(t, err, ErrRevoked)
		// The older certificate is still valid and not revoked: RevokeIdentity gets it.
		serials, err := e.a.RevokeIdentity(ctx10s(t), e.a.Identity(RoleAgent, "r1"), "compromised")
		if err != nil {
			t.Fatal(err)
		}
		if len(serials) != 1 || serials[0] != cur.Chain[0].SerialNumber.String() {
			t.Fatalf("RevokeIdentity revoked %v, want [%s]", serials, cur.Chain[0].SerialNumber)
		}
		_, err = Renew(ctx10s(t), e.url, cur)
		wantErr(t, err, ErrRevoked)
		list, _ := e.a.Issued(ctx10s(t), e.a.Identity(RoleAgent, "r1"))
		if len(list) != 2 || !list[0].Revoked || !list[1].Revoked {
			t.Fatalf("Issued = %+v, want 2 revoked", list)
		}
		mu.Lock()
		if len(revoked) != 2 {
			t.Fatalf("OnRevoke saw %v, want 2 serials", revoked)
		}
		mu.Unlock()
		// Revoking again is not an error and does not fire OnRevoke again.
		if err := e.a.Revoke(ctx10s(t), serial, ""); err != nil {
			t.Fatal(err)
		}
		if err := e.a.Revoke(ctx10s(t), "12345", ""); err == nil {
			t.Fatal("revoking an unknown serial succeeded")
		}
		// The CRL lists both.
		crl := fetchCRL(t, e)
		got := map[string]bool{}
		for _, r := range crl.RevokedCertificateEntries {
			got[r.SerialNumber.String()] = true
		}
		if !got[serial] || !got[cur.Chain[0].SerialNumber.String()] {
			t.Fatalf("CRL lists %v", got)
		}
	})
}

func fetchCRL(t *testing.T, e *testEnv) *x509.RevocationList {
	t.Helper()
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: e.a.RootPool()}}
	defer tr.CloseIdleConnections()
	resp, err := (&http.Client{Transport: tr}).Get(e.url + "/crl")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	crl, err := x509.ParseRevocationList(b)
	if err != nil {
		t.Fatalf("parse CRL (HTTP %d): %v", resp.StatusCode, err)
	}
	if err := crl.CheckSignatureFrom(e.a.Intermediate()); err != nil {
		t.Fatalf("CRL signature: %v", err)
	}
	return crl
}

// TestHTTPRevokeFiresOnRevoke: a holder revokes its own certificate over mTLS
// /1.0/revoke; OnRevoke and IsRevoked must see it.
func TestHTTPRevokeFiresOnRevoke(t *testing.T) {
	got := make(chan []string, 1)
	e := startEnv(t, t.TempDir(), "", func(c *Config) { c.OnRevoke = func(s []string) { got <- s } })
	cur := mustEnroll(t, mustToken(t, e.a, RoleUser, "bob"))
	serial := cur.Chain[0].SerialNumber.String()
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: e.a.RootPool(), Certificates: []tls.Certificate{*cur.TLSCertificate()}}}
	defer tr.CloseIdleConnections()
	body, _ := json.Marshal(map[string]any{"serial": serial, "reasonCode": 1, "reason": "key compromise", "passive": true})
	resp, err := (&http.Client{Transport: tr}).Post(e.url+"/1.0/revoke", "application/json", bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("revoke: HTTP %d %s", resp.StatusCode, b)
	}
	select {
	case s := <-got:
		if len(s) != 1 || s[0] != serial {
			t.Fatalf("OnRevoke(%v), want [%s]", s, serial)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("OnRevoke not called for an HTTP revocation")
	}
	if rev, _ := e.a.IsRevoked(serial); !rev {
		t.Fatal("IsRevoked false after HTTP revoke")
	}
}

func TestRenewExpired(t *testing.T) {
	var offset atomic.Int64
	e := startEnv(t, t.TempDir(), "", func(c *Config) {
		c.Now = func() time.Time { return time.Now().Add(time.Duration(offset.Load())) }
	})
	cur := mustEnroll(t, mustToken(t, e.a, RoleAgent, "late"))
	if _, err := e.a.VerifyPeer(cur.Chain, RoleAgent); err != nil { // now cached
		t.Fatal(err)
	}
	offset.Store(int64(2 * time.Hour)) // the CA's clock says the 1h certificate expired
	_, err := Renew(ctx10s(t), e.url, cur)
	wantErr(t, err, ErrExpired)
	_, err = e.a.VerifyPeer(cur.Chain, RoleAgent)
	wantErr(t, err, ErrExpired)
	if n := issuedCount(t, e.a, RoleAgent, "late"); n != 0 { // Issued uses the CA clock too
		t.Fatalf("Issued lists %d certificates of an expired identity", n)
	}
	// Index entries expired for over an hour are pruned: back at the real time, the
	// certificate is no longer listed because its entry is gone.
	offset.Store(int64(3 * time.Hour))
	issuedCount(t, e.a, RoleAgent, "late")
	offset.Store(0)
	if n := issuedCount(t, e.a, RoleAgent, "late"); n != 0 {
		t.Fatalf("expired index entry not pruned (%d listed)", n)
	}
}

func TestVerifyPeer(t *testing.T) {
	e := startEnv(t, t.TempDir(), "", nil)
	agent := mustEnroll(t, mustToken(t, e.a, RoleAgent, "vp"))
	if _, err := e.a.VerifyPeer(agent.Chain, RoleUser); err == nil {
		t.Fatal("agent certificate accepted as user")
	} else {
		wantErr(t, err, ErrWrongRole)
	}
	_, err := e.a.VerifyPeer(nil, RoleAgent)
	wantErr(t, err, ErrUnknownCA)
	// A certificate from another CA with the same identity.
	other := startEnv(t, t.TempDir(), "", nil)
	foreign := mustEnroll(t, mustToken(t, other.a, RoleAgent, "vp"))
	_, err = e.a.VerifyPeer(foreign.Chain, RoleAgent)
	wantErr(t, err, ErrUnknownCA)
	// Leaf only (no intermediate sent) still verifies: we know our intermediate.
	if _, err := e.a.VerifyPeer(agent.Chain[:1], RoleAgent); err != nil {
		t.Fatal(err)
	}
	// The gateway's own certificate verifies as a gateway (server auth).
	gw, _ := e.a.GetCertificate(nil)
	if id, err := e.a.VerifyPeer([]*x509.Certificate{gw.Leaf}, RoleGateway); err != nil || id.Name != "gateway" {
		t.Fatalf("gateway cert: %v %v", id, err)
	}
	if n := new(big.Int).SetInt64(1); n == nil {
		t.Fatal()
	}
}

// BenchmarkVerifyPeerUncached is the baseline: full chain verification every time.
func BenchmarkVerifyPeerUncached(b *testing.B) {
	e := startEnv(b, b.TempDir(), "", nil)
	c := mustEnroll(b, mustToken(b, e.a, RoleAgent, "bench"))
	b.ResetTimer()
	for b.Loop() {
		e.a.peerCache.Clear()
		if _, err := e.a.VerifyPeer(c.Chain, RoleAgent); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkVerifyPeer(b *testing.B) {
	e := startEnv(b, b.TempDir(), "", nil)
	c := mustEnroll(b, mustToken(b, e.a, RoleAgent, "bench"))
	b.ResetTimer()
	for b.Loop() {
		if _, err := e.a.VerifyPeer(c.Chain, RoleAgent); err != nil {
			b.Fatal(err)
		}
	}
	_ = context.Background
}
