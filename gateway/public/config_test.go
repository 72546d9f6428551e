package public

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestParsePublish(t *testing.T) {
	got, err := ParsePublish([]string{"web=Web.Example.com", "docs=docs.example.com,public", "admin=admin.example.com,users"})
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]Host{
		"web.example.com":   {Resource: "web", Access: AccessUsers},
		"docs.example.com":  {Resource: "docs", Access: AccessPublic},
		"admin.example.com": {Resource: "admin", Access: AccessUsers},
	}
	if len(got) != len(want) {
		t.Fatalf("got %v", got)
	}
	for k, v := range want {
		if got[k] != v {
			t.Fatalf("%s: got %+v, want %+v", k, got[k], v)
		}
	}
	for _, bad := range [][]string{{"web"}, {"=x.example.com"}, {"web="}, {"web=x.example.com,everyone"}, {"a=x.example.com", "b=X.example.com"}} {
		if _, err := ParsePublish(bad); !errors.Is(err, ErrConfig) {
			t.Errorf("ParsePublish(%q) = %v, want ErrConfig", bad, err)
		}
	}
}

// Invalid configurations are refused with a sentence naming the field, before anything binds.
func TestConfigValidation(t *testing.T) {
	dialer := StreamDialerFunc(func(context.Context, string, Meta) (net.Conn, error) { return nil, errors.New("unused") })
	base := func() Config {
		return Config{Listen: "127.0.0.1:0", HTTPListen: "127.0.0.1:0", StorageDir: filepath.Join(t.TempDir(), "cm"),
			Hosts: map[string]Host{"web.example.com": {Resource: "web", Access: AccessPublic}}, Dialer: dialer}
	}
	cases := map[string]func(*Config){
		"no storage":           func(c *Config) { c.StorageDir = "" },
		"no hosts":             func(c *Config) { c.Hosts = nil },
		"no dialer":            func(c *Config) { c.Dialer = nil },
		"plain http CA":        func(c *Config) { c.ACMECA = "http://ca.example.com/dir" },
		"internal without dir": func(c *Config) { c.ACMECA = ACMECAInternal },
		"wildcard host":        func(c *Config) { c.Hosts = map[string]Host{"*.example.com": {Resource: "web"}} },
		"ip host":              func(c *Config) { c.Hosts = map[string]Host{"127.0.0.1": {Resource: "web"}} },
		"host with port":       func(c *Config) { c.Hosts = map[string]Host{"web.example.com:443": {Resource: "web"}} },
		"bad resource":         func(c *Config) { c.Hosts = map[string]Host{"web.example.com": {Resource: "Web!"}} },
		"bad access":           func(c *Config) { c.Hosts = map[string]Host{"web.example.com": {Resource: "web", Access: "all"}} },
		"users without verify": func(c *Config) { c.Hosts = map[string]Host{"web.example.com": {Resource: "web"}} },
		"http-01 without http": func(c *Config) { c.HTTPListen = ListenOff; c.Challenges = []string{ChallengeHTTP01} },
		"unknown challenge":    func(c *Config) { c.Challenges = []string{"dns-01"} },
		"ratio":                func(c *Config) { c.RenewalWindowRatio = 1.5 },
	}
	for name, mod := range cases {
		t.Run(name, func(t *testing.T) {
			c := base()
			mod(&c)
			s, err := New(c)
			if err == nil {
				s.Close()
				t.Fatal("accepted")
			}
			if !errors.Is(err, ErrConfig) || !strings.HasPrefix(err.Error(), "public: ") {
				t.Fatalf("error %q is not a public ErrConfig", err)
			}
		})
	}
}

// The storage directory is created 0700 (it holds certificate keys and the ACME account key),
// and an existing one is tightened; New then Close without Serve leaves nothing running.
func TestStoragePermissions(t *testing.T) {
	checkLeaks(t)
	dir := filepath.Join(t.TempDir(), "certmagic")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	s, err := New(Config{Listen: "127.0.0.1:0", HTTPListen: ListenOff, StorageDir: dir,
		Hosts:  map[string]Host{"web.example.com": {Resource: "web", Access: AccessPublic}},
		Dialer: StreamDialerFunc(func(context.Context, string, Meta) (net.Conn, error) { return nil, errors.New("unused") })})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	fi, err := os.Stat(dir)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o700 {
		t.Fatalf("storage mode %v, want 0700", fi.Mode().Perm())
	}
	if s.HTTPAddr() != nil {
		t.Fatal("HTTP listener bound although off")
	}
	if s.cfg.ACMECA != LetsEncryptProduction || len(s.cfg.Challenges) != 1 || s.cfg.Challenges[0] != ChallengeTLSALPN01 {
		t.Fatalf("defaults: CA %s, challenges %v", s.cfg.ACMECA, s.cfg.Challenges)
	}
}
