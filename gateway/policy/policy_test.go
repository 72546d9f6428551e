package policy

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

const designExample = `
rules:
  - users: ["alice", "ops-*"]
    resources: ["postgres", "web"]
`

func mustParse(t *testing.T, src string) *Policy {
	t.Helper()
	p, err := Parse([]byte(src))
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	return p
}

func TestDesignExample(t *testing.T) {
	p := mustParse(t, designExample)
	for _, c := range []struct {
		user, resource string
		want           bool
	}{
		{"alice", "postgres", true},
		{"alice", "web", true},
		{"ops-bob", "web", true},
		{"ops-", "web", false}, // not a valid name
		{"bob", "postgres", false},
		{"alice", "ssh", false},
		{"alicex", "postgres", false},
		{"ops-bob", "postgres-replica", false},
	} {
		if got := p.Allow(c.user, c.resource); got != c.want {
			t.Errorf("Allow(%q, %q) = %v, want %v", c.user, c.resource, got, c.want)
		}
	}
}

func TestDefaultDeny(t *testing.T) {
	for _, src := range []string{"rules: []\n", "# nobody, on purpose\nrules: [] # deny all\n", "rules:\n  []\n"} {
		p := mustParse(t, src)
		if p.Allow("alice", "postgres") || p.Len() != 0 {
			t.Errorf("policy %q allows something or has rules", src)
		}
	}
	var nilPolicy *Policy
	if nilPolicy.Allow("alice", "postgres") || nilPolicy.Len() != 0 {
		t.Error("nil policy allows")
	}
	if (&Policy{}).Allow("alice", "postgres") {
		t.Error("zero policy allows")
	}
}

func TestGlobs(t *testing.T) {
	p := mustParse(t, `
rules:
  - users: ["*"]
    resources: ["web"]
  - users: ["db?"]
    resources: ["pg-[0-9]", "cache-[^a]"]
`)
	for _, c := range []struct {
		user, resource string
		want           bool
	}{
		{"anyone", "web", true},
		{"x", "web", true},
		{"db1", "pg-3", true},
		{"db1", "pg-a", false},
		{"db12", "pg-3", false},
		{"db1", "cache-b", true},
		{"db1", "cache-a", false},
		{"anyone", "pg-3", false},
	} {
		if got := p.Allow(c.user, c.resource); got != c.want {
			t.Errorf("Allow(%q, %q) = %v, want %v", c.user, c.resource, got, c.want)
		}
	}
}

func TestInvalidNamesAlwaysDenied(t *testing.T) {
	p := mustParse(t, "rules:\n  - users: [\"*\"]\n    resources: [\"*\"]\n")
	for _, c := range [][2]string{{"", "web"}, {"alice", ""}, {"Alice", "web"}, {"a/b", "web"}, {"alice", "../web"}, {"-a", "web"}, {"a-", "web"}, {"a_b", "web"}, {strings.Repeat("a", 64), "web"}} {
		if p.Allow(c[0], c[1]) {
			t.Errorf("Allow(%q, %q) = true for an invalid name", c[0], c[1])
		}
	}
	for _, n := range []string{"alice", "a", "0", "a-b", strings.Repeat("a", 63)} {
		if !p.Allow(n, "web") {
			t.Errorf("valid name %q denied by a * policy", n)
		}
	}
}

func TestDecide(t *testing.T) {
	p := mustParse(t, `rules:
  - users: [alice]
    resources: [web]
  - users: [bob]
    resources: [postgres]
`)
	d := p.Decide("bob", "postgres")
	if !d.Allowed || d.Rule != 2 || d.Line != 4 || d.Reason() != "allowed by policy rule 2 (line 4)" {
		t.Fatalf("Decide = %+v %q", d, d.Reason())
	}
	d = p.Decide("bob", "web")
	if d.Allowed || d.Rule != 0 || !strings.Contains(d.Reason(), "default deny") {
		t.Fatalf("Decide = %+v %q", d, d.Reason())
	}
}

func TestParseErrors(t *testing.T) {
	tests := []struct {
		name, src string
		want      []string // substrings of the error
	}{
		{"unknown rule key", "rules:\n  - users: [alice]\n    resource: [web]\n", []string{"line 3", `unknown key "resource"`, "users"}},
		{"unknown top key", "rule:\n  - users: [alice]\n", []string{"line 1", `unknown key "rule"`, "top level"}},
		{"scalar instead of list", "rules:\n  - users: alice\n    resources: [web]\n", []string{"line 2", "expected a list of patterns", `"alice"`}},
		{"rules not a list", "rules:\n  users: [alice]\n", []string{"line 2", "expected a list of rules"}},
		{"uppercase", "rules:\n  - users: [Alice]\n    resources: [web]\n", []string{"line 2", `"Alice"`, "lowercase"}},
		{"slash", "rules:\n  - users: [alice]\n    resources:\n      - web\n      - a/b\n", []string{"line 5", `"a/b"`}},
		{"stray bracket", "rules:\n  - users: [\"ops*]\"]\n    resources: [web]\n", []string{"line 2", `"ops*]"`, "cannot appear"}},
		{"caret outside class", "rules:\n  - users: [\"^alice\"]\n    resources: [web]\n", []string{"line 2", "cannot appear"}},
		{"bang class", "rules:\n  - users: [\"[!a]x\"]\n    resources: [web]\n", []string{"line 2", "cannot appear"}},
		{"dot", "rules:\n  - users: [a.b]\n    resources: [web]\n", []string{"line 2", `"a.b"`}},
		{"bad glob", "rules:\n  - users: [\"ops-[\"]\n    resources: [web]\n", []string{"line 2", "not a valid glob"}},
		{"empty pattern", "rules:\n  - users: [\"\"]\n    resources: [web]\n", []string{"line 2", "empty pattern"}},
		{"literal not a name", "rules:\n  - users: [-alice]\n    resources: [web]\n", []string{"line 2", "not a valid name"}},
		{"no users", "rules:\n  - resources: [web]\n", []string{"line 2", "rule 1 has no users"}},
		{"empty users", "rules:\n  - users: []\n    resources: [web]\n", []string{"line 2", "no users"}},
		{"no resources", "rules:\n  - users: [a]\n  - users: [b]\n    resources: []\n", []string{"line 2", "rule 1 has no resources"}},
		{"empty rule", "rules:\n  -\n", []string{"line 2", "rule 1 is empty"}},
		{"two documents", "rules: []\n---\nrules: []\n", []string{"line 2", "second YAML document"}},
		{"alias", "rules:\n  - users: &u [alice]\n    resources: [web]\n  - users: *u\n    resources: [ssh]\n", []string{"line 2", "anchors and aliases"}},
		{"duplicate key", "rules:\n  - users: [a]\n    users: [b]\n    resources: [web]\n", []string{"line 3", "already defined"}},
		{"syntax", "rules:\n  - users: [alice\n    resources: [web]\n", []string{"line"}},
		{"nested list", "rules:\n  - users: [[alice]]\n    resources: [web]\n", []string{"line 2", "expected a single name pattern"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p, err := Parse([]byte(tc.src))
			if err == nil {
				t.Fatalf("Parse accepted %q as %+v", tc.src, p)
			}
			if !errors.Is(err, ErrInvalid) {
				t.Errorf("error %q does not wrap ErrInvalid", err)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not contain %q", err, w)
				}
			}
			if strings.Contains(err.Error(), "\n") {
				t.Errorf("error %q is not one line", err)
			}
		})
	}
}

// A policy that does not list its rules is refused, not read as deny-all: it is
// also what a file caught half-written looks like. "rules: []" says deny-all.
func TestNoRulesRefused(t *testing.T) {
	for _, c := range []struct{ src, want string }{
		{"", "it is empty"},
		{"\n\n", "it is empty"},
		{"# only a comment\n", "it is empty"},
		{"---\n", "the document is empty"},
		{"~\n", "the document is empty"},
		{"{}\n", `no "rules:" key`},
		{"rules:\n", `line 1: "rules:" has no value`},
		{"# header\nrules: ~\n", `line 2: "rules:" has no value`},
		{"rules: null\n", `"rules:" has no value`},
	} {
		p, err := Parse([]byte(c.src))
		if err == nil {
			t.Errorf("Parse(%q) accepted %+v", c.src, p)
			continue
		}
		if !errors.Is(err, ErrNoRules) || !errors.Is(err, ErrInvalid) {
			t.Errorf("Parse(%q) = %q, want ErrNoRules and ErrInvalid", c.src, err)
		}
		msg := err.Error()
		if !strings.Contains(msg, "has no rules: ") || !strings.Contains(msg, c.want) || !strings.Contains(msg, `write "rules: []" to deny everyone on purpose`) || strings.Contains(msg, "\n") {
			t.Errorf("Parse(%q) = %q, want one line saying %q and how to deny all", c.src, msg, c.want)
		}
	}
}

func TestLoad(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "policy.yaml")
	if err := os.WriteFile(good, []byte(designExample), 0o600); err != nil {
		t.Fatal(err)
	}
	p, err := Load(good)
	if err != nil || !p.Allow("alice", "web") {
		t.Fatalf("Load = %v, %v", p, err)
	}

	bad := filepath.Join(dir, "bad.yaml")
	os.WriteFile(bad, []byte("rules:\n  - userz: [a]\n"), 0o600)
	if _, err := Load(bad); err == nil || !strings.Contains(err.Error(), bad) || !strings.Contains(err.Error(), `"userz"`) {
		t.Fatalf("Load(bad) = %v, want an error naming the file and the key", err)
	}

	empty := filepath.Join(dir, "empty.yaml")
	os.WriteFile(empty, nil, 0o600)
	if _, err := Load(empty); !errors.Is(err, ErrNoRules) || !strings.HasPrefix(err.Error(), "policy file "+empty+" has no rules: it is empty") {
		t.Fatalf("Load(empty) = %v, want %q", err, "policy file "+empty+" has no rules: ...")
	}

	if _, err := Load(filepath.Join(dir, "missing.yaml")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("Load(missing) = %v", err)
	}

	big := filepath.Join(dir, "big.yaml")
	os.WriteFile(big, []byte("# "+strings.Repeat("x", MaxFileSize)+"\n"), 0o600)
	if _, err := Load(big); !errors.Is(err, ErrInvalid) {
		t.Fatalf("Load(big) = %v, want ErrInvalid", err)
	}
}
