// Package policy decides which user may reach which resource through the
// gateway. It is default deny: a user reaches a resource only when some rule
// lists both.
//
// A policy file is YAML (DESIGN.md, "CLI contract"):
//
//	rules:
//	  - users: ["alice", "ops-*"]
//	    resources: ["postgres", "web"]
//
// A policy must say what it allows: a file that is empty (or only comments),
// has no "rules:" key, or leaves "rules:" without a value is refused
// ([ErrNoRules]), because that is also what a file caught half-written looks
// like, and enforcing it would deny everyone. Denying everyone on purpose is
// written "rules: []".
//
// Names (users and resources) are Wicket names: lowercase letters, digits and
// '-', 1 to 63 characters, starting and ending with a letter or digit. A
// pattern is a name, or a glob with path.Match semantics over those
// characters: "*" matches any name (names contain no '/'), "?" one character,
// "[a-c]" / "[^x]" a class. Patterns are checked when the file is parsed, so a
// typo fails the load instead of silently matching nothing: an unknown key, an
// uppercase letter, a malformed glob, an empty list, or a second YAML document
// is an error naming the line.
//
// Rules are tried in order and the first match allows. A decision costs
// about 0.3-0.6 µs against a one-rule policy and 16-22 µs against 100 rules
// when only the last one matches (BenchmarkDecide, several runs on 2 vCPU
// shared with other builds).
//
// [Watcher] keeps a policy current while the file changes, and keeps the last
// good policy when a change is invalid.
//
// What this package must not do: it knows nothing about certificates,
// sessions or the audit log; it answers "may this user reach this resource"
// and nothing else. Authentication is the gateway's job, and auditing a
// reload is the caller's (through [WatchConfig.OnReload]).
package policy

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"regexp"
	"strings"

	"gopkg.in/yaml.v3"
)

// MaxFileSize bounds a policy file. Real policies are a few kilobytes; the
// cap keeps a wrong --policy path (a log, a binary) from being read whole on
// every poll.
const MaxFileSize = 1 << 20

// ErrInvalid is wrapped by every error about the content of a policy.
var ErrInvalid = errors.New("invalid policy")

// ErrNoRules is wrapped (with ErrInvalid) by the error for a policy that does
// not list its rules: empty, without a "rules:" key, or with "rules:" left
// without a value. An explicit deny-all is "rules: []".
var ErrNoRules = errors.New("no rules")

// noRulesError is the error of a policy without rules; path is set once the
// file is known, so the sentence reads "policy file F has no rules: ...".
type noRulesError struct{ path, why string }

func (e *noRulesError) Error() string {
	if e.path == "" {
		return "invalid policy: it has no rules: " + e.why
	}
	return "policy file " + e.path + " has no rules: " + e.why
}

func (e *noRulesError) Is(target error) bool { return target == ErrInvalid || target == ErrNoRules }

// denyOnPurpose ends every no-rules sentence: what to write instead.
const denyOnPurpose = `; list the rules, or write "rules: []" to deny everyone on purpose`

// inFile puts the file name into a content error.
func inFile(path string, err error) error {
	if nr := (*noRulesError)(nil); errors.As(err, &nr) {
		return &noRulesError{path: path, why: nr.why}
	}
	return fmt.Errorf("policy file %s: %w", path, err)
}

// Policy is a parsed, validated policy. The zero value and nil deny
// everything. A Policy is immutable and safe for concurrent use.
type Policy struct {
	rules []rule
}

type rule struct {
	line      int
	users     []string
	resources []string
}

// Decision is the outcome of [Policy.Decide], with enough detail for an
// audit record.
type Decision struct {
	// Allowed is true when a rule lets the user reach the resource.
	Allowed bool
	// Rule is the 1-based index of the first rule that allowed it, 0 when denied.
	Rule int
	// Line is that rule's line in the policy file, 0 when denied.
	Line int
}

// Reason is one sentence for logs and audit records.
func (d Decision) Reason() string {
	if d.Allowed {
		return fmt.Sprintf("allowed by policy rule %d (line %d)", d.Rule, d.Line)
	}
	return "no policy rule allows this user to reach this resource (default deny)"
}

// Allow reports whether user may reach resource. Names that are not valid
// Wicket names are always denied, whatever the patterns say.
func (p *Policy) Allow(user, resource string) bool {
	return p.Decide(user, resource).Allowed
}

// Decide is Allow with the rule that decided.
func (p *Policy) Decide(user, resource string) Decision {
	if p == nil || !validName(user) || !validName(resource) {
		return Decision{}
	}
	for i, r := range p.rules {
		if matchAny(r.users, user) && matchAny(r.resources, resource) {
			return Decision{Allowed: true, Rule: i + 1, Line: r.line}
		}
	}
	return Decision{}
}

// Len returns the number of rules.
func (p *Policy) Len() int {
	if p == nil {
		return 0
	}
	return len(p.rules)
}

func matchAny(patterns []string, name string) bool {
	for _, pat := range patterns {
		// Patterns were validated by Parse, so Match cannot fail here.
		if ok, _ := path.Match(pat, name); ok {
			return true
		}
	}
	return false
}

// Load reads and parses the policy file at path.
func Load(path string) (*Policy, error) {
	data, err := readFile(path)
	if err != nil {
		return nil, err
	}
	p, err := Parse(data)
	if err != nil {
		return nil, inFile(path, err)
	}
	return p, nil
}

func readFile(name string) ([]byte, error) {
	data, _, err := readFileStat(name)
	return data, err
}

// readFileStat reads the file and stats the same open file, so that the
// modification time belongs to the content read.
func readFileStat(name string) ([]byte, os.FileInfo, error) {
	f, err := os.Open(name)
	if err != nil {
		return nil, nil, fmt.Errorf("read policy file: %w", err)
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, MaxFileSize+1))
	if err != nil {
		return nil, nil, fmt.Errorf("read policy file %s: %w", name, err)
	}
	if len(data) > MaxFileSize {
		return nil, nil, fmt.Errorf("policy file %s: %w: larger than %d bytes; is --policy pointing at the right file?", name, ErrInvalid, MaxFileSize)
	}
	fi, err := f.Stat()
	if err != nil {
		return nil, nil, fmt.Errorf("read policy file %s: %w", name, err)
	}
	return data, fi, nil
}

// The on-disk shape, decoded with KnownFields so that a misspelt key is an
// error rather than a silently ignored (and so silently denying) rule.
type fileFormat struct {
	Rules []fileRule `yaml:"rules"`
}

type fileRule struct {
	Users     []string `yaml:"users"`
	Resources []string `yaml:"resources"`
}

// Parse parses and validates a policy. "rules: []" is a valid policy that
// denies everything; empty input (or only comments), a document without a
// "rules:" key, or "rules:" without a value is refused with ErrNoRules.
// Errors wrap ErrInvalid and name the line.
func Parse(data []byte) (*Policy, error) {
	if len(data) > MaxFileSize {
		return nil, fmt.Errorf("%w: larger than %d bytes", ErrInvalid, MaxFileSize)
	}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	var f fileFormat
	if err := dec.Decode(&f); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, &noRulesError{why: "it is empty (or only comments)" + denyOnPurpose}
		}
		return nil, fmt.Errorf("%w: %s", ErrInvalid, yamlMessage(err))
	}
	var more yaml.Node
	if err := dec.Decode(&more); !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("%w: line %d: a second YAML document (---); a policy file holds exactly one", ErrInvalid, more.Line)
	}
	// The struct decode validated keys and types; the node tree gives the
	// line numbers that rules and error messages carry.
	var doc yaml.Node
	if err := yaml.Unmarshal(data, &doc); err != nil {
		return nil, fmt.Errorf("%w: %s", ErrInvalid, yamlMessage(err))
	}
	rules, err := rulesFromNode(&doc)
	if err != nil {
		if nr := (*noRulesError)(nil); errors.As(err, &nr) {
			return nil, err
		}
		return nil, fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	return &Policy{rules: rules}, nil
}

func rulesFromNode(doc *yaml.Node) ([]rule, error) {
	if doc.Kind != yaml.DocumentNode || len(doc.Content) == 0 {
		return nil, &noRulesError{why: "it is empty (or only comments)" + denyOnPurpose}
	}
	top := doc.Content[0]
	if err := plain(top); err != nil {
		return nil, err
	}
	if top.Kind != yaml.MappingNode {
		// Only null reaches here: the struct decode rejected anything else.
		return nil, &noRulesError{why: "the document is empty" + denyOnPurpose}
	}
	var key, seq *yaml.Node
	for i := 0; i+1 < len(top.Content); i += 2 {
		if top.Content[i].Value == "rules" {
			key, seq = top.Content[i], top.Content[i+1]
		}
	}
	if seq == nil {
		return nil, &noRulesError{why: `there is no "rules:" key` + denyOnPurpose}
	}
	if err := plain(seq); err != nil {
		return nil, err
	}
	if seq.Kind != yaml.SequenceNode {
		// Only null reaches here. A file cut off after its first line reads so.
		return nil, &noRulesError{why: fmt.Sprintf(`line %d: "rules:" has no value`, key.Line) + denyOnPurpose}
	}
	var rules []rule
	for i, rn := range seq.Content {
		if err := plain(rn); err != nil {
			return nil, err
		}
		r := rule{line: rn.Line}
		if rn.Kind != yaml.MappingNode {
			return nil, fmt.Errorf("line %d: rule %d is empty; a rule needs users and resources", rn.Line, i+1)
		}
		for k := 0; k+1 < len(rn.Content); k += 2 {
			key, val := rn.Content[k], rn.Content[k+1]
			if err := plain(val); err != nil {
				return nil, err
			}
			pats, err := patterns(val, key.Value)
			if err != nil {
				return nil, err
			}
			switch key.Value {
			case "users":
				r.users = pats
			case "resources":
				r.resources = pats
			}
		}
		if len(r.users) == 0 {
			return nil, fmt.Errorf("line %d: rule %d has no users; list at least one user pattern (\"*\" for everyone)", rn.Line, i+1)
		}
		if len(r.resources) == 0 {
			return nil, fmt.Errorf("line %d: rule %d has no resources; list at least one resource pattern (\"*\" for all)", rn.Line, i+1)
		}
		rules = append(rules, r)
	}
	return rules, nil
}

// plain rejects anchors, aliases and merge keys: a security policy should
// read line by line, with nothing defined elsewhere in the file.
func plain(n *yaml.Node) error {
	if n == nil {
		return nil
	}
	if n.Kind == yaml.AliasNode || n.Anchor != "" {
		return fmt.Errorf("line %d: YAML anchors and aliases are not allowed in a policy file; write the names out", n.Line)
	}
	if n.Kind == yaml.MappingNode {
		for i := 0; i < len(n.Content); i += 2 {
			if n.Content[i].Value == "<<" {
				return fmt.Errorf("line %d: YAML merge keys (<<) are not allowed in a policy file; write the names out", n.Content[i].Line)
			}
		}
	}
	return nil
}

func patterns(seq *yaml.Node, key string) ([]string, error) {
	if seq.Kind != yaml.SequenceNode {
		return nil, nil // null; the struct decode rejected other kinds
	}
	out := make([]string, 0, len(seq.Content))
	for _, item := range seq.Content {
		if err := plain(item); err != nil {
			return nil, err
		}
		if err := validPattern(item.Value); err != nil {
			return nil, fmt.Errorf("line %d: %s: %w", item.Line, key, err)
		}
		out = append(out, item.Value)
	}
	return out, nil
}

// validName is ca.ValidName's rule, ^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$,
// repeated here so that the policy package does not pull in the certificate
// authority, and written out because it runs on every decision.
func validName(s string) bool {
	if len(s) == 0 || len(s) > 63 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= 'a' && c <= 'z', c >= '0' && c <= '9':
		case c == '-' && i > 0 && i < len(s)-1:
		default:
			return false
		}
	}
	return true
}

func validPattern(p string) error {
	if p == "" {
		return errors.New("empty pattern; use \"*\" to match every name")
	}
	if err := globChars(p); err != nil {
		return err
	}
	if _, err := path.Match(p, ""); err != nil {
		return fmt.Errorf("pattern %q is not a valid glob: %w", p, err)
	}
	if !strings.ContainsAny(p, "*?[") && !validName(p) {
		return fmt.Errorf("%q is not a valid name (1-63 lowercase letters, digits or '-', not starting or ending with '-'), so it would never match", p)
	}
	return nil
}

// globChars accepts only what can match a Wicket name: name characters and
// * ? outside a class, name characters (and a leading ^) inside [...].
// Anything else would make the pattern silently match nothing.
func globChars(p string) error {
	inClass, classStart := false, 0
	for i, c := range p {
		nameChar := c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-'
		switch {
		case nameChar:
		case !inClass && (c == '*' || c == '?'):
		case !inClass && c == '[':
			inClass, classStart = true, i+1
		case inClass && c == '^' && i == classStart:
		case inClass && c == ']' && i > classStart:
			inClass = false
		default:
			return fmt.Errorf("pattern %q: %q cannot appear there; names use only lowercase letters, digits and '-', and patterns may add *, ? and classes such as [0-9] or [^x]", p, c)
		}
	}
	return nil
}

var (
	reUnknownField = regexp.MustCompile(`^line (\d+): field (.+) not found in type policy\.(\w+)$`)
	reCannot       = regexp.MustCompile("^line (\\d+): cannot unmarshal !!(\\w+)(?: `(.*)`)? into (.+)$")
)

// yamlMessage turns yaml.v3 errors into sentences about the policy file.
func yamlMessage(err error) string {
	var te *yaml.TypeError
	if !errors.As(err, &te) {
		return strings.TrimPrefix(err.Error(), "yaml: ")
	}
	msgs := make([]string, 0, len(te.Errors))
	for _, e := range te.Errors {
		msgs = append(msgs, rewrite(e))
	}
	return strings.Join(msgs, "; ")
}

func rewrite(e string) string {
	if m := reUnknownField.FindStringSubmatch(e); m != nil {
		where := `in a rule (a rule has only "users" and "resources")`
		if m[3] == "fileFormat" {
			where = `at the top level (a policy has only "rules")`
		}
		return fmt.Sprintf("line %s: unknown key %q %s", m[1], m[2], where)
	}
	if m := reCannot.FindStringSubmatch(e); m != nil {
		want := map[string]string{
			"[]string":          `a list of patterns, e.g. ["alice", "ops-*"]`,
			"string":            "a single name pattern",
			"[]policy.fileRule": "a list of rules (each starting with \"- users:\")",
			"policy.fileRule":   "a rule with users and resources",
			"policy.fileFormat": "a mapping with a \"rules\" key",
		}[m[4]]
		if want == "" {
			return e
		}
		kind := map[string]string{"str": "text", "int": "number", "float": "number", "bool": "boolean", "map": "mapping", "seq": "list", "null": "nothing"}[m[2]]
		if kind == "" {
			kind = m[2]
		}
		found := "a " + kind
		if m[3] != "" {
			found = fmt.Sprintf("%s %q", kind, m[3])
		}
		return fmt.Sprintf("line %s: expected %s, found %s", m[1], want, found)
	}
	return e
}
