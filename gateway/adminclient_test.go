package gateway

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// TestAdminUnreachableSentence checks that a permission error on admin.sock says so and
// names the socket, instead of asking whether the gateway is running (issue 10, item 11).
func TestAdminUnreachableSentence(t *testing.T) {
	sock := "/var/lib/wicket/admin.sock"
	for _, errno := range []syscall.Errno{syscall.EACCES, syscall.EPERM} {
		err := &net.OpError{Op: "dial", Net: "unix", Err: os.NewSyscallError("connect", errno)}
		got := unreachableSentence(sock, "/var/lib/wicket", fmt.Errorf("wrapped: %w", err))
		if !strings.Contains(got, "permission denied on "+sock) || !strings.Contains(got, "run as the gateway's user") ||
			strings.Contains(got, "running?") {
			t.Errorf("%v: %q", errno, got)
		}
	}
	got := unreachableSentence(sock, "/var/lib/wicket", &net.OpError{Op: "dial", Net: "unix",
		Err: os.NewSyscallError("connect", syscall.ECONNREFUSED)})
	if !strings.Contains(got, "is `wicket gateway --data-dir /var/lib/wicket` running?") {
		t.Errorf("connection refused: %q", got)
	}
}

// TestAdminClientPermissionDenied dials a real socket whose mode forbids the caller. Root
// ignores file modes, so this part runs only as another user; the sentence itself is
// covered by TestAdminUnreachableSentence.
func TestAdminClientPermissionDenied(t *testing.T) {
	if os.Geteuid() == 0 {
		t.Skip("running as root, which connects to a mode 000 socket anyway; TestAdminUnreachableSentence covers the message")
	}
	dir := t.TempDir()
	ln, err := net.Listen("unix", filepath.Join(dir, AdminSocketName))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	if err := os.Chmod(filepath.Join(dir, AdminSocketName), 0); err != nil {
		t.Fatal(err)
	}
	c := NewAdminClient(dir)
	defer c.Close()
	_, err = c.Agents(context.Background())
	if !errors.Is(err, ErrGatewayUnreachable) || !strings.Contains(err.Error(), "permission denied on ") {
		t.Fatalf("Agents on a mode 000 socket: %v", err)
	}
}
