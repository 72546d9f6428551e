package agent

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/wicketgw/wicket/agent/identity"
	"github.com/wicketgw/wicket/agent/internal/testpki"
	"github.com/wicketgw/wicket/ca"
)

const gwURL = "https://127.0.0.1:8443"

// fakeEnroll issues a certificate for whatever the token names, or fails with err.
type fakeEnroll struct {
	p     *testpki.PKI
	calls int
	err   error
	life  time.Duration
}

func (f *fakeEnroll) enroll(ctx context.Context, token string) (*ca.Credentials, error) {
	f.calls++
	if f.err != nil {
		return nil, f.err
	}
	info, err := ca.InspectToken(token)
	if err != nil {
		return nil, err
	}
	now := time.Now()
	life := f.life
	if life == 0 {
		life = time.Hour
	}
	return f.p.Issue(info.Identity.Role, info.Identity.Name, now.Add(-time.Minute), now.Add(life)), nil
}

func enrollConfig(t *testing.T, dir, token string, f *fakeEnroll) *Config {
	t.Helper()
	cfg := &Config{DataDir: dir, Token: token, Expose: map[string]string{"pg": "127.0.0.1:5432"}, Enroll: f.enroll, Logger: testLogger(t)}
	if err := cfg.setDefaults(); err != nil {
		t.Fatal(err)
	}
	return cfg
}

func TestEnrollmentRules(t *testing.T) {
	p := testpki.New("example.test")
	exp := time.Now().Add(15 * time.Minute)
	tok1 := p.Token(ca.RoleAgent, "db1", gwURL, exp)
	ctx := context.Background()

	t.Run("user token refused", func(t *testing.T) {
		dir := t.TempDir()
		f := &fakeEnroll{p: p}
		_, err := obtainIdentity(ctx, enrollConfig(t, dir, p.Token(ca.RoleUser, "alice", gwURL, exp), f))
		if err == nil || err.Error() != "this is a user token; use `wicket login`" {
			t.Fatalf("err = %v", err)
		}
		if f.calls != 0 {
			t.Fatal("a user token was sent to the CA")
		}
		if entries, _ := os.ReadDir(dir); len(entries) != 0 {
			t.Fatal("files written for a refused token")
		}
	})

	t.Run("garbage token", func(t *testing.T) {
		_, err := obtainIdentity(ctx, enrollConfig(t, t.TempDir(), "not-a-token", &fakeEnroll{p: p}))
		if !errors.Is(err, ca.ErrTokenInvalid) {
			t.Fatalf("err = %v", err)
		}
	})

	dir := t.TempDir()
	f := &fakeEnroll{p: p}
	first, err := obtainIdentity(ctx, enrollConfig(t, dir, tok1, f))
	if err != nil {
		t.Fatal(err)
	}
	if f.calls != 1 || first.Name != "db1" || first.URL != gwURL || first.TokenSHA256 != identity.TokenHash(tok1) {
		t.Fatalf("first enrollment: calls %d, meta %+v", f.calls, first.Meta)
	}
	raw, _ := os.ReadFile(filepath.Join(dir, identity.IdentityFile))
	if bytes.Contains(raw, []byte(tok1)) {
		t.Fatal("the token itself was stored")
	}

	t.Run("restart with the same spent token keeps the identity", func(t *testing.T) {
		f := &fakeEnroll{p: p}
		s, err := obtainIdentity(ctx, enrollConfig(t, dir, tok1, f))
		if err != nil {
			t.Fatal(err)
		}
		if f.calls != 0 || !s.Leaf().Equal(first.Leaf()) {
			t.Fatalf("calls %d; identity replaced: %v", f.calls, !s.Leaf().Equal(first.Leaf()))
		}
	})

	t.Run("restart without a token", func(t *testing.T) {
		s, err := obtainIdentity(ctx, enrollConfig(t, dir, "", &fakeEnroll{p: p}))
		if err != nil || !s.Leaf().Equal(first.Leaf()) {
			t.Fatalf("s, err = %v, %v", s, err)
		}
	})

	t.Run("a spent new token falls back to the valid identity", func(t *testing.T) {
		f := &fakeEnroll{p: p, err: ca.ErrTokenUsed}
		s, err := obtainIdentity(ctx, enrollConfig(t, dir, p.Token(ca.RoleAgent, "db1", gwURL, exp), f))
		if err != nil || f.calls != 1 || !s.Leaf().Equal(first.Leaf()) {
			t.Fatalf("calls %d, err %v", f.calls, err)
		}
	})

	t.Run("a token for another agent is refused and nothing changes", func(t *testing.T) {
		before, _ := os.ReadFile(filepath.Join(dir, identity.ChainFile))
		f := &fakeEnroll{p: p}
		_, err := obtainIdentity(ctx, enrollConfig(t, dir, p.Token(ca.RoleAgent, "db2", gwURL, exp), f))
		if err == nil || !strings.Contains(err.Error(), "already holds the identity of agent db1") {
			t.Fatalf("err = %v", err)
		}
		after, _ := os.ReadFile(filepath.Join(dir, identity.ChainFile))
		if f.calls != 0 || !bytes.Equal(before, after) {
			t.Fatal("a token for another agent enrolled or changed the stored identity")
		}
	})

	t.Run("a new token for the same agent enrolls again", func(t *testing.T) {
		tok2 := p.Token(ca.RoleAgent, "db1", gwURL, exp)
		f := &fakeEnroll{p: p}
		s, err := obtainIdentity(ctx, enrollConfig(t, dir, tok2, f))
		if err != nil || f.calls != 1 || s.Leaf().Equal(first.Leaf()) || s.TokenSHA256 != identity.TokenHash(tok2) {
			t.Fatalf("calls %d, err %v", f.calls, err)
		}
		disk, err := identity.Load(dir)
		if err != nil || !disk.Leaf().Equal(s.Leaf()) {
			t.Fatal("the new identity was not stored")
		}
	})

	t.Run("expired identity: the spent token cannot revive it, a new one can", func(t *testing.T) {
		dir := t.TempDir()
		f := &fakeEnroll{p: p, life: -time.Second} // issues already-expired certificates
		tok := p.Token(ca.RoleAgent, "db1", gwURL, exp)
		if _, err := obtainIdentity(ctx, enrollConfig(t, dir, tok, f)); err != nil {
			t.Fatal(err)
		}
		if _, err := obtainIdentity(ctx, enrollConfig(t, dir, "", f)); !errors.Is(err, identity.ErrExpired) {
			t.Fatalf("no token: err = %v, want ErrExpired", err)
		}
		if _, err := obtainIdentity(ctx, enrollConfig(t, dir, tok, f)); !errors.Is(err, identity.ErrExpired) {
			t.Fatalf("spent token: err = %v, want ErrExpired", err)
		}
		f.life = time.Hour
		s, err := obtainIdentity(ctx, enrollConfig(t, dir, p.Token(ca.RoleAgent, "db1", gwURL, exp), f))
		if err != nil || identity.CheckValid(s, time.Now()) != nil {
			t.Fatalf("new token: err = %v", err)
		}
	})

	t.Run("a corrupt store is replaced by a new enrollment", func(t *testing.T) {
		dir := t.TempDir()
		f := &fakeEnroll{p: p}
		if _, err := obtainIdentity(ctx, enrollConfig(t, dir, p.Token(ca.RoleAgent, "db1", gwURL, exp), f)); err != nil {
			t.Fatal(err)
		}
		os.WriteFile(filepath.Join(dir, identity.KeyFile), []byte("garbage"), 0o600)
		if _, err := obtainIdentity(ctx, enrollConfig(t, dir, "", f)); !errors.Is(err, identity.ErrCorrupt) {
			t.Fatalf("no token: err = %v, want ErrCorrupt", err)
		}
		if _, err := obtainIdentity(ctx, enrollConfig(t, dir, p.Token(ca.RoleAgent, "db1", gwURL, exp), f)); err != nil {
			t.Fatal(err)
		}
		if _, err := identity.Load(dir); err != nil {
			t.Fatal(err)
		}
	})
}

// TestTokenNeverLogged runs enrollment paths at debug level and checks that
// neither the token nor the private key reaches the log.
func TestTokenNeverLogged(t *testing.T) {
	p := testpki.New("example.test")
	var buf bytes.Buffer
	logger := slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug}))
	dir := t.TempDir()
	tok := p.Token(ca.RoleAgent, "db1", gwURL, time.Now().Add(time.Minute))
	// A successful enrollment, then a failing one in another directory.
	for i, f := range []*fakeEnroll{{p: p}, {p: p, err: ca.ErrTokenUsed}} {
		d := dir
		if i == 1 {
			d = t.TempDir()
		}
		cfg := &Config{DataDir: d, Token: tok, Expose: map[string]string{"pg": "127.0.0.1:5432"}, Enroll: f.enroll, Logger: logger}
		if err := cfg.setDefaults(); err != nil {
			t.Fatal(err)
		}
		_, err := obtainIdentity(context.Background(), cfg)
		if (i == 0) != (err == nil) {
			t.Fatalf("round %d: err = %v", i, err)
		}
	}
	if buf.Len() == 0 {
		t.Fatal("nothing was logged; the check would prove nothing")
	}
	key, _ := os.ReadFile(filepath.Join(dir, identity.KeyFile))
	if strings.Contains(buf.String(), tok) || strings.Contains(buf.String(), tok[len(tok)-40:]) {
		t.Fatal("the token was logged")
	}
	if len(key) == 0 || strings.Contains(buf.String(), "PRIVATE KEY") {
		t.Fatal("key material was logged (or no key was stored)")
	}
}
