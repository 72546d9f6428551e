package test

import (
	"context"
	"net"
	"os"
	"os/exec"
	"strings"
	"testing"
)

// TestDemo runs `make demo`'s script in one-shot mode, so the newcomer's
// first command is known to work.
func TestDemo(t *testing.T) {
	port := func() string {
		_, p, _ := net.SplitHostPort(closedPort(t))
		return p
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*waitTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "bash", "../examples/demo.sh")
	cmd.Env = append(os.Environ(),
		"WICKET_BIN="+wicketBin,
		"WICKET_DEMO_DIR="+t.TempDir(),
		"WICKET_DEMO_ONESHOT=1",
		"WICKET_DEMO_GATEWAY="+port(),
		"WICKET_DEMO_TARGET="+port(),
		"WICKET_DEMO_LOCAL="+port(),
	)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("demo failed: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "hello from the private demo target") || !strings.Contains(string(out), "demo: ok") {
		t.Fatalf("demo output lacks the reply:\n%s", out)
	}
}
