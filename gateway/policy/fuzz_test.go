package policy

import "testing"

// FuzzParse: Parse never panics, and whatever it accepts is a policy whose
// rules all have users and resources made of valid patterns.
func FuzzParse(f *testing.F) {
	for _, s := range []string{designExample, "", "rules: []", "rules:\n  - users: [\"*\"]\n    resources: [\"db-[0-9]\"]\n", "rules:\n  - users: &a [x]\n", "a: b\n---\nc: d\n", "rules:\n  - users: [[x]]\n"} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		p, err := Parse(data)
		if err != nil {
			return
		}
		for i, r := range p.rules {
			if len(r.users) == 0 || len(r.resources) == 0 {
				t.Fatalf("rule %d accepted with an empty list: %+v", i+1, r)
			}
			for _, pat := range append(append([]string{}, r.users...), r.resources...) {
				if err := validPattern(pat); err != nil {
					t.Fatalf("rule %d accepted an invalid pattern %q: %v", i+1, pat, err)
				}
			}
		}
		p.Allow("alice", "web")
	})
}
