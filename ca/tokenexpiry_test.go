package ca

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"strings"
	"sync"
	"testing"
	"time"

	"go.step.sm/crypto/jose"
	"golang.org/x/crypto/acme"
)

// stoppedClock is the system clock until a test stops it at a chosen time: the CA
// then reads that time however long the request takes, so "2 s before exp" stays
// 2 s before exp on a loaded machine.
type stoppedClock struct {
	mu sync.Mutex
	at time.Time
}

func (c *stoppedClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.at.IsZero() {
		return time.Now()
	}
	return c.at
}

func (c *stoppedClock) stopAt(t time.Time) {
	c.mu.Lock()
	c.at = t
	c.mu.Unlock()
}

func (c *stoppedClock) run() { c.stopAt(time.Time{}) }

func tokenID(t *testing.T, tok string) string {
	t.Helper()
	jwt, err := jose.ParseSigned(tok)
	if err != nil {
		t.Fatal(err)
	}
	var c jose.Claims
	if err := jwt.UnsafeClaimsWithoutVerification(&c); err != nil {
		t.Fatal(err)
	}
	return c.ID
}

// step-ca accepts a token up to a minute after its exp; the CA must not.
func TestTokenExpiryWindow(t *testing.T) {
	forEachDB(t, func(t *testing.T, dsn string) {
		clk := &stoppedClock{}
		e := startEnv(t, t.TempDir(), dsn, func(c *Config) { c.Now = clk.Now })
		ctx := ctx10s(t)
		for _, role := range []Role{RoleAgent, RoleUser} {
			// 2 s before exp (by the CA's clock): accepted.
			tok, err := e.a.MintToken(role, "early", time.Minute)
			if err != nil {
				t.Fatal(err)
			}
			info, _ := InspectToken(tok)
			clk.stopAt(info.Expiry.Add(-2 * time.Second))
			mustEnroll(t, tok)
			clk.run()

			// 2 s past exp: refused with the time and the command, nothing issued,
			// and the token is not recorded as used.
			tok, err = e.a.MintToken(role, "late", time.Minute)
			if err != nil {
				t.Fatal(err)
			}
			info, _ = InspectToken(tok)
			clk.stopAt(info.Expiry.Add(2 * time.Second))
			_, err = Enroll(ctx, tok)
			wantErr(t, err, ErrTokenExpired)
			for _, want := range []string{
				"the one-time token expired at " + info.Expiry.UTC().Format(time.RFC3339),
				"mint a new one with `wicket token create " + string(role) + " late`",
			} {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("%s: error %q does not say %q", role, err, want)
				}
			}
			// The server's own answer (what the audit record carries) says the same.
			err = signCSR(t, e, tok, "late", []string{e.a.Identity(role, "late").String()}, nil)
			wantErr(t, err, ErrTokenExpired)
			if !strings.Contains(err.Error(), "expired at "+info.Expiry.UTC().Format(time.RFC3339)) {
				t.Errorf("%s: the CA's refusal %q does not give the expiry", role, err)
			}
			if n := issuedCount(t, e.a, role, "late"); n != 0 {
				t.Fatalf("%s: %d certificates issued for an expired token", role, n)
			}
			if e.a.tokenRecorded(tokenID(t, tok)) {
				t.Fatalf("%s: the refused expired token was recorded as used", role)
			}
			clk.run()
		}
	})
}

// A token that is not valid yet by the CA's clock (nbf, or iat, in the future) is
// refused and not burnt: once its time comes it enrolls.
func TestTokenNotYetValid(t *testing.T) {
	forEachDB(t, func(t *testing.T, dsn string) {
		clk := &stoppedClock{}
		e := startEnv(t, t.TempDir(), dsn, func(c *Config) { c.Now = clk.Now })
		ctx := ctx10s(t)

		tok := mustToken(t, e.a, RoleAgent, "soon")
		jwt, _ := jose.ParseSigned(tok)
		var c jose.Claims
		_ = jwt.UnsafeClaimsWithoutVerification(&c)
		clk.stopAt(c.NotBefore.Time().Add(-3 * time.Second))
		_, err := Enroll(ctx, tok)
		wantErr(t, err, ErrTokenNotYetValid)
		if !strings.Contains(err.Error(), "(valid from "+c.NotBefore.Time().UTC().Format(time.RFC3339)) {
			t.Errorf("error %q does not give the time", err)
		}
		if e.a.tokenRecorded(c.ID) {
			t.Fatal("a token refused as not yet valid was recorded as used")
		}
		clk.run()
		mustEnroll(t, tok)

		// iat in the future, nbf now: refused the same way.
		tok = signToken(t, e.a, RoleAgent, func(c *tokenClaims) {
			c.Subject = "iat"
			c.SANs = []string{"spiffe://wicket.local/agent/iat"}
			c.IssuedAt = jose.NewNumericDate(time.Now().Add(30 * time.Second))
		})
		err = signCSR(t, e, tok, "iat", []string{"spiffe://wicket.local/agent/iat"}, nil)
		wantErr(t, err, ErrTokenNotYetValid)
		if e.a.tokenRecorded(tokenID(t, tok)) {
			t.Fatal("a token issued in the future was recorded as used")
		}
	})
}

// A token that reaches step-ca by another route than /1.0/sign (here /1.0/revoke,
// which takes a one-time token too) is not recorded when it has expired by our
// rule, although step-ca's own leeway would still take it.
func TestExpiredTokenNotBurntElsewhere(t *testing.T) {
	forEachDB(t, func(t *testing.T, dsn string) {
		e := startEnv(t, t.TempDir(), dsn, nil)
		tok := signToken(t, e.a, RoleAgent, func(c *tokenClaims) {
			c.Subject = "rev"
			c.SANs = []string{"spiffe://wicket.local/agent/rev"}
			c.IssuedAt = jose.NewNumericDate(time.Now().Add(-time.Minute))
			c.NotBefore = c.IssuedAt
			c.Expiry = jose.NewNumericDate(time.Now().Add(-2 * time.Second))
		})
		body, _ := json.Marshal(map[string]any{"serial": "1", "ott": tok, "passive": true})
		_, _ = post(context.Background(), e.url+"/1.0/revoke", body, &tls.Config{RootCAs: e.a.RootPool()}, kindSign)
		if e.a.tokenRecorded(tokenID(t, tok)) {
			t.Fatal("an expired token sent to /1.0/revoke was recorded as used")
		}
	})
}

func TestMintTokenTTLBounds(t *testing.T) {
	e := startEnv(t, t.TempDir(), "", nil)
	for _, ttl := range []time.Duration{-time.Second, time.Millisecond, 999 * time.Millisecond, MaxTokenTTL + time.Second} {
		if _, err := e.a.MintToken(RoleAgent, "a", ttl); err == nil || !strings.Contains(err.Error(), "between 1s and 24h") {
			t.Errorf("ttl %s: %v, want a refusal naming the bounds", ttl, err)
		}
	}
	tok, err := e.a.MintToken(RoleAgent, "a", MinTokenTTL)
	if err != nil {
		t.Fatal(err)
	}
	if info, _ := InspectToken(tok); time.Until(info.Expiry) > MinTokenTTL {
		t.Fatalf("a %s token expires at %s", MinTokenTTL, info.Expiry)
	}
}

// The agents' ACME enrollment credentials have their own expiry, in our table
// (step-ca's EAB keys never expire), checked by the CA's clock with no leeway: 2 s
// past it a registration is refused, and the key stays unbound for a use in time.
func TestAgentEABExpiryWindow(t *testing.T) {
	forEachDB(t, func(t *testing.T, dsn string) {
		env := newAgentACMEEnvDB(t, dsn)
		ctx := ctx10s(t)
		kid, hmac, exp, err := env.a.NewAgentEABKey(ctx, "db9", time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		register := func() error {
			_, err := env.client(t).Register(ctx, &acme.Account{ExternalAccountBinding: &acme.ExternalAccountBinding{KID: kid, Key: hmac}}, acme.AcceptTOS)
			return err
		}
		// The env's clock is the system clock plus an offset: set it to 2 s past exp.
		env.offset.Store(int64(time.Until(exp) + 2*time.Second))
		if err := register(); err == nil || !strings.Contains(err.Error(), ErrEABExpired.Error()) {
			t.Fatalf("EAB key 2 s past its expiry: %v", err)
		}
		if r := env.lastRefusal(t, "new-account"); r.Name != "db9" {
			t.Fatalf("refusal %+v", r)
		}
		// Before exp (12 s: this clock runs on, and a slow request must not cross
		// it): the refused key was not bound, so it still registers.
		env.offset.Store(int64(time.Until(exp) - 12*time.Second))
		if err := register(); err != nil {
			t.Fatalf("EAB key before its expiry, after a refusal: %v", err)
		}
	})
}
