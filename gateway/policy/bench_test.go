package policy

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// BenchmarkDecide measures one decision against a small policy and against
// a 100-rule policy where only the last rule matches (the worst case).
func BenchmarkDecide(b *testing.B) {
	var big strings.Builder
	big.WriteString("rules:\n")
	for i := range 100 {
		fmt.Fprintf(&big, "  - users: [\"team%d-*\", \"user%d\"]\n    resources: [\"db%d\", \"web-*\"]\n", i, i, i)
	}
	for _, bc := range []struct{ name, src, user, resource string }{
		{"1rule", designExample, "ops-bob", "web"},
		{"100rules-last", big.String(), "user99", "db99"},
	} {
		b.Run(bc.name, func(b *testing.B) {
			p, err := Parse([]byte(bc.src))
			if err != nil {
				b.Fatal(err)
			}
			for b.Loop() {
				if !p.Allow(bc.user, bc.resource) {
					b.Fatal("denied")
				}
			}
		})
	}
}

// BenchmarkPoll measures what the watcher does every interval when nothing
// changed: read the file and hash it.
func BenchmarkPoll(b *testing.B) {
	path := filepath.Join(b.TempDir(), "policy.yaml")
	if err := os.WriteFile(path, []byte(designExample), 0o600); err != nil {
		b.Fatal(err)
	}
	w, err := NewWatcher(context.Background(), WatchConfig{Path: path, Interval: time.Hour})
	if err != nil {
		b.Fatal(err)
	}
	defer w.Close()
	for b.Loop() {
		w.poll()
	}
}
