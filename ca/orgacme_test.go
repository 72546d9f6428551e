package ca

import (
	"context"
	"crypto/x509"
	"errors"
	"net"
	"strings"
	"sync"
	"testing"

	"golang.org/x/crypto/acme"
)

func TestMatchACMEName(t *testing.T) {
	for _, c := range []struct {
		pattern, name string
		want          bool
	}{
		{"grafana.corp", "grafana.corp", true},
		{"grafana.corp", "GRAFANA.corp.", true},
		{"grafana.corp", "x.grafana.corp", false},
		{"*.svc.example.internal", "db.svc.example.internal", true},
		{"*.svc.example.internal", "a.b.svc.example.internal", false},
		{"*.svc.example.internal", "svc.example.internal", false},
		{"*.svc.example.internal", "dbsvc.example.internal", false},
		{"*.svc.example.internal", ".svc.example.internal", false},
	} {
		if got := MatchACMEName(c.pattern, c.name); got != c.want {
			t.Errorf("MatchACMEName(%q, %q) = %v, want %v", c.pattern, c.name, got, c.want)
		}
	}
}

// orgACMEEnv is acmeEnv with the order and revocation hooks recorded.
type orgHooks struct {
	mu      sync.Mutex
	orders  []ACMEOrder
	revoked []string
}

func orgACMEEnv(t *testing.T, requireEAB bool) (*testEnv, *http01Responder, *orgHooks) {
	return orgACMEEnvDB(t, "", requireEAB)
}

func orgACMEEnvDB(t *testing.T, dsn string, requireEAB bool) (*testEnv, *http01Responder, *orgHooks) {
	r := newHTTP01Responder(t)
	h := &orgHooks{}
	e := startEnv(t, t.TempDir(), dsn, func(c *Config) {
		c.ACME = ACMEConfig{
			AllowedNames: []string{"app.wicket.test", "*.apps.wicket.test"},
			RequireEAB:   requireEAB,
			DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, "tcp", r.srv.Listener.Addr().String())
			},
			OnOrder: func(o ACMEOrder) { h.mu.Lock(); h.orders = append(h.orders, o); h.mu.Unlock() },
			OnRevoked: func(serial string) {
				h.mu.Lock()
				h.revoked = append(h.revoked, serial)
				h.mu.Unlock()
			},
		}
	})
	return e, r, h
}

func TestACMEServerRefusesNamesOutsideTheAllowList(t *testing.T) {
	e, _, h := orgACMEEnv(t, false)
	ctx := ctx10s(t)
	cl := acmeClient(t, e)
	if _, err := cl.Register(ctx, &acme.Account{}, acme.AcceptTOS); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"evil.example.com", "apps.wicket.test"} {
		_, err := cl.AuthorizeOrder(ctx, acme.DomainIDs(name))
		var ae *acme.Error
		if !errors.As(err, &ae) || !strings.Contains(ae.Detail, "not in --acme-names") ||
			!strings.HasSuffix(ae.ProblemType, "rejectedIdentifier") {
			t.Fatalf("order for %s: %v, want a rejectedIdentifier saying not in --acme-names", name, err)
		}
	}
	if _, err := cl.AuthorizeOrder(ctx, acme.DomainIDs("ok.apps.wicket.test")); err != nil {
		t.Fatal(err)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if len(h.orders) != 3 || h.orders[0].Status != 403 || !strings.Contains(h.orders[0].Reason, "not in --acme-names") ||
		h.orders[2].Status != 201 || h.orders[2].Names[0] != "ok.apps.wicket.test" || h.orders[2].AccountID == "" {
		t.Fatalf("orders reported: %+v", h.orders)
	}
}

func TestACMEServerEABKeyBoundToPatterns(t *testing.T) {
	for _, db := range []string{"bbolt", "postgres"} {
		t.Run(db, func(t *testing.T) {
			dsn := ""
			if db == "postgres" {
				dsn = freshPostgres(t)
			}
			testACMEServerEABKeyBoundToPatterns(t, dsn)
		})
	}
}

func testACMEServerEABKeyBoundToPatterns(t *testing.T, dsn string) {
	e, r, h := orgACMEEnvDB(t, dsn, true)
	ctx := ctx10s(t)
	if _, _, err := e.a.NewACMEEABKey(ctx, []string{"other.example.com"}); err == nil ||
		!strings.Contains(err.Error(), "not in --acme-names") {
		t.Fatalf("EAB key for a name outside the allow-list: %v", err)
	}
	if _, _, err := e.a.NewACMEEABKey(ctx, []string{"*.wicket.test"}); err == nil {
		t.Fatal("EAB key for a pattern wider than the allow-list")
	}
	if _, _, err := e.a.NewACMEEABKey(ctx, []string{"*.db.apps.wicket.test"}); err == nil {
		t.Fatal("EAB key for names step-ca's allow-list does not cover (two labels under *.apps)")
	}
	kid, hmac, err := e.a.NewACMEEABKey(ctx, []string{"pg.apps.wicket.test", "app.wicket.test"})
	if err != nil {
		t.Fatal(err)
	}
	cl := acmeClient(t, e)
	if _, err := cl.Register(ctx, &acme.Account{ExternalAccountBinding: &acme.ExternalAccountBinding{KID: kid, Key: hmac}}, acme.AcceptTOS); err != nil {
		t.Fatalf("register with EAB: %v", err)
	}
	// Allowed by --acme-names, but not by the key: refused with the key's reason.
	_, err = cl.AuthorizeOrder(ctx, acme.DomainIDs("web.apps.wicket.test"))
	var ae *acme.Error
	if !errors.As(err, &ae) || !strings.Contains(ae.Detail, "EAB key may order") {
		t.Fatalf("order outside the key's names: %v", err)
	}
	der, err := obtain(t, ctx, cl, r, "pg.apps.wicket.test")
	if err != nil {
		t.Fatal(err)
	}
	leaf, _ := x509.ParseCertificate(der[0])
	if len(leaf.URIs) != 0 {
		t.Fatalf("ACME certificate carries URI SANs %v", leaf.URIs)
	}
	if _, err := e.a.VerifyPeer([]*x509.Certificate{leaf}, RoleAgent); err == nil {
		t.Fatal("an ACME certificate passed VerifyPeer")
	}
	if err := cl.RevokeCert(ctx, nil, der[0], acme.CRLReasonKeyCompromise); err != nil {
		t.Fatalf("revoke: %v", err)
	}
	if ok, _ := e.a.IsRevoked(leaf.SerialNumber.String()); !ok {
		t.Fatal("revoked certificate is not revoked")
	}
	// OnRevoked runs on the revoking request, before its answer.
	h.mu.Lock()
	defer h.mu.Unlock()
	if len(h.revoked) != 1 || h.revoked[0] != leaf.SerialNumber.String() {
		t.Fatalf("OnRevoked calls %v, want [%s]", h.revoked, leaf.SerialNumber)
	}
}
