package ca

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.step.sm/crypto/jose"
)

// signToken signs claims with a provisioner key, to build tokens MintToken refuses to.
func signToken(t *testing.T, a *Authority, role Role, mod func(*tokenClaims)) string {
	t.Helper()
	priv := a.pki.provKeys[role]
	jwk, err := publicJWK(priv)
	if err != nil {
		t.Fatal(err)
	}
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.ES256, Key: priv},
		new(jose.SignerOptions).WithType("JWT").WithHeader("kid", jwk.KeyID))
	if err != nil {
		t.Fatal(err)
	}
	var jti [16]byte
	_, _ = rand.Read(jti[:])
	now := time.Now()
	c := tokenClaims{
		Claims: jose.Claims{
			Issuer: provisionerName(role), Subject: "x", Audience: jose.Audience{a.cfg.URL + "/1.0/sign"},
			ID: hex.EncodeToString(jti[:]), IssuedAt: jose.NewNumericDate(now), NotBefore: jose.NewNumericDate(now),
			Expiry: jose.NewNumericDate(now.Add(10 * time.Minute)),
		},
		SHA: a.rootFP,
	}
	mod(&c)
	tok, err := jose.Signed(signer).Claims(c).CompactSerialize()
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// signCSR posts a CSR with the given CN and URIs/DNS names, as a hostile client would.
func signCSR(t *testing.T, e *testEnv, tok, cn string, uris []string, dns []string) error {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.CertificateRequest{Subject: pkix.Name{CommonName: cn}, DNSNames: dns}
	for _, u := range uris {
		pu, _ := url.Parse(u)
		tmpl.URIs = append(tmpl.URIs, pu)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := json.Marshal(map[string]string{
		"csr": string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})), "ott": tok,
	})
	_, err = post(context.Background(), e.url+"/1.0/sign", body, &tls.Config{RootCAs: e.a.RootPool()}, kindSign)
	return err
}

// issuedCount counts certificates in the identity index.
func issuedCount(t *testing.T, a *Authority, role Role, name string) int {
	t.Helper()
	l, err := a.Issued(context.Background(), a.Identity(role, name))
	if err != nil {
		t.Fatal(err)
	}
	return len(l)
}

func TestTokenUsedTwice(t *testing.T) {
	forEachDB(t, func(t *testing.T, dsn string) {
		e := startEnv(t, t.TempDir(), dsn, nil)
		tok := mustToken(t, e.a, RoleAgent, "a1")
		mustEnroll(t, tok)
		_, err := Enroll(ctx10s(t), tok)
		wantErr(t, err, ErrTokenUsed)
		if n := issuedCount(t, e.a, RoleAgent, "a1"); n != 1 {
			t.Fatalf("%d certificates issued, want 1", n)
		}
	})
}

func TestTokenConcurrentSingleUse(t *testing.T) {
	forEachDB(t, func(t *testing.T, dsn string) {
		e := startEnv(t, t.TempDir(), dsn, nil)
		for round := 0; round < 3; round++ {
			name := "race" + string(rune('a'+round))
			tok := mustToken(t, e.a, RoleAgent, name)
			ok := race(20, func() bool {
				_, err := Enroll(context.Background(), tok)
				if err != nil && !strings.Contains(err.Error(), ErrTokenUsed.Error()) {
					t.Errorf("unexpected error: %v", err)
				}
				return err == nil
			})
			if ok != 1 {
				t.Fatalf("round %d: %d enrollments succeeded with one token, want exactly 1", round, ok)
			}
			if c := issuedCount(t, e.a, RoleAgent, name); c != 1 {
				t.Fatalf("round %d: %d certificates stored, want 1", round, c)
			}
		}
	})
}

// TestPostgresCASRace drives UseToken directly (no HTTP, no signing), the tightest race
// we can make, to show our PostgreSQL fix: exactly one winner. For the record it also
// runs step-ca's unwrapped driver and logs how often it lets several callers win
// (16 of 20 rounds when this was written).
func TestPostgresCASRace(t *testing.T) {
	dsn := freshPostgres(t)
	db, err := openDB(t.TempDir(), dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Shutdown()
	upstream := db.DB.DB.(*pgAtomic).DB // step's own driver, same database
	racy := 0
	for round := range 20 {
		id := "upstream-" + string(rune('a'+round))
		wins := race(20, func() bool {
			_, ok, err := upstream.CmpAndSwap(usedOTTTable, []byte(id), nil, []byte("tok"))
			return err == nil && ok
		})
		if wins != 1 {
			racy++
		}
	}
	t.Logf("step-ca's PostgreSQL compare-and-swap: %d of 20 rounds had more than one winner", racy)
	for round := range 20 {
		id := "jti-" + string(rune('a'+round))
		wins := race(20, func() bool {
			ok, err := db.UseToken(id, "tok")
			if err != nil {
				t.Error(err)
			}
			return ok
		})
		if wins != 1 {
			t.Fatalf("round %d: %d winners, want 1", round, wins)
		}
	}
}

func TestExpiredToken(t *testing.T) {
	forEachDB(t, func(t *testing.T, dsn string) {
		e := startEnv(t, t.TempDir(), dsn, nil)
		tok := signToken(t, e.a, RoleAgent, func(c *tokenClaims) {
			c.Subject = "old"
			c.SANs = []string{"spiffe://wicket.local/agent/old"}
			c.IssuedAt = jose.NewNumericDate(time.Now().Add(-time.Hour))
			c.NotBefore = c.IssuedAt
			c.Expiry = jose.NewNumericDate(time.Now().Add(-10 * time.Minute))
		})
		_, err := Enroll(ctx10s(t), tok)
		wantErr(t, err, ErrTokenExpired)
		// Past the client's own check too: the server must refuse it, and record nothing.
		err = signCSR(t, e, tok, "old", []string{"spiffe://wicket.local/agent/old"}, nil)
		wantErr(t, err, ErrTokenExpired)
		info, _ := InspectToken(tok)
		_ = info
		if n := issuedCount(t, e.a, RoleAgent, "old"); n != 0 {
			t.Fatalf("%d certificates issued", n)
		}
		var c jose.Claims
		jwt, _ := jose.ParseSigned(tok)
		_ = jwt.UnsafeClaimsWithoutVerification(&c)
		if e.a.tokenRecorded(c.ID) {
			t.Fatal("an expired token was recorded as used")
		}
	})
}

func TestAlteredSignature(t *testing.T) {
	forEachDB(t, func(t *testing.T, dsn string) {
		e := startEnv(t, t.TempDir(), dsn, nil)
		tok := mustToken(t, e.a, RoleAgent, "sig")
		parts := strings.Split(tok, ".")
		sig := []byte(parts[2])
		if sig[5] == 'A' {
			sig[5] = 'B'
		} else {
			sig[5] = 'A'
		}
		forged := parts[0] + "." + parts[1] + "." + string(sig)
		_, err := Enroll(ctx10s(t), forged)
		wantErr(t, err, ErrTokenInvalid)
		// A token signed by a key that is not the CA's.
		other, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		jwk, _ := publicJWK(other)
		signer, _ := jose.NewSigner(jose.SigningKey{Algorithm: jose.ES256, Key: other},
			new(jose.SignerOptions).WithType("JWT").WithHeader("kid", jwk.KeyID))
		var c tokenClaims
		jwt, _ := jose.ParseSigned(tok)
		_ = jwt.UnsafeClaimsWithoutVerification(&c)
		c.Subject, c.SANs = "evil", []string{"spiffe://wicket.local/agent/evil"}
		foreign, _ := jose.Signed(signer).Claims(c).CompactSerialize()
		_, err = Enroll(ctx10s(t), foreign)
		wantErr(t, err, ErrTokenInvalid)
		if n := issuedCount(t, e.a, RoleAgent, "evil") + issuedCount(t, e.a, RoleAgent, "sig"); n != 0 {
			t.Fatalf("%d certificates issued", n)
		}
		// Nothing was stored: the genuine token still works once.
		creds := mustEnroll(t, tok)
		if id, _ := creds.Identity(); id.Name != "sig" {
			t.Fatalf("identity %v", id)
		}
	})
}

func TestCSRMismatch(t *testing.T) {
	forEachDB(t, func(t *testing.T, dsn string) {
		e := startEnv(t, t.TempDir(), dsn, nil)
		cases := []struct {
			name string
			cn   string
			uris []string
			dns  []string
		}{
			{"other agent", "b", []string{"spiffe://wicket.local/agent/b"}, nil},
			{"extra URI", "a", []string{"spiffe://wicket.local/agent/a", "spiffe://wicket.local/agent/b"}, nil},
			{"extra DNS", "a", []string{"spiffe://wicket.local/agent/a"}, []string{"gw.example.com"}},
			{"user identity", "a", []string{"spiffe://wicket.local/user/a"}, nil},
			{"other CN", "root", []string{"spiffe://wicket.local/agent/a"}, nil},
		}
		for _, tc := range cases {
			tok := mustToken(t, e.a, RoleAgent, "a")
			err := signCSR(t, e, tok, tc.cn, tc.uris, tc.dns)
			if err == nil {
				t.Fatalf("%s: CSR accepted", tc.name)
			}
			wantErr(t, err, ErrRequestRefused)
		}
		for _, n := range []string{"a", "b"} {
			if c := issuedCount(t, e.a, RoleAgent, n); c != 0 {
				t.Fatalf("%d certificates issued to %s", c, n)
			}
		}
	})
}

func TestUserTokenCannotYieldAgent(t *testing.T) {
	forEachDB(t, func(t *testing.T, dsn string) {
		e := startEnv(t, t.TempDir(), dsn, nil)
		// A genuine user token, with a CSR asking for an agent identity.
		tok := mustToken(t, e.a, RoleUser, "mallory")
		err := signCSR(t, e, tok, "mallory", []string{"spiffe://wicket.local/agent/mallory"}, nil)
		wantErr(t, err, ErrRequestRefused)
		// A token signed by the user provisioner's key that names an agent identity
		// (as if MintToken had a bug): the user provisioner's template refuses it.
		forged := signToken(t, e.a, RoleUser, func(c *tokenClaims) {
			c.Subject = "mallory"
			c.SANs = []string{"spiffe://wicket.local/agent/mallory"}
		})
		err = signCSR(t, e, forged, "mallory", []string{"spiffe://wicket.local/agent/mallory"}, nil)
		wantErr(t, err, ErrRequestRefused)
		// A user-provisioner token that claims to be from the agent provisioner.
		swapped := signToken(t, e.a, RoleUser, func(c *tokenClaims) {
			c.Issuer = agentProvisionerName
			c.Subject = "mallory"
			c.SANs = []string{"spiffe://wicket.local/agent/mallory"}
		})
		err = signCSR(t, e, swapped, "mallory", []string{"spiffe://wicket.local/agent/mallory"}, nil)
		if err == nil {
			t.Fatal("token with swapped issuer accepted")
		}
		if n := issuedCount(t, e.a, RoleAgent, "mallory"); n != 0 {
			t.Fatalf("%d agent certificates issued from user tokens", n)
		}
		if _, err := e.a.MintToken(RoleGateway, "gw", 0); err == nil {
			t.Fatal("MintToken issued a gateway token")
		}
	})
}

// race runs try in n goroutines released at the same instant and returns how many returned
// true.
func race(n int, try func() bool) int {
	var wg sync.WaitGroup
	var wins atomic.Int64
	start := make(chan struct{})
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			if try() {
				wins.Add(1)
			}
		}()
	}
	close(start)
	wg.Wait()
	return int(wins.Load())
}
