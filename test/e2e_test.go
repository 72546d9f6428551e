package test

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"
)

const allowAlice = `
rules:
  - users: ["alice"]
    resources: ["*"]
`

// transfer sends n random bytes through addr to an echo target and checks
// that every byte comes back in order. It half-closes after writing, so it
// also checks that half-close crosses the tunnel both ways.
func transfer(addr string, n int) error {
	c, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(waitTimeout))
	payload := make([]byte, n)
	if _, err := rand.Read(payload); err != nil {
		return err
	}
	want := sha256.Sum256(payload)
	werr := make(chan error, 1)
	go func() {
		_, err := c.Write(payload)
		if err == nil {
			err = c.(*net.TCPConn).CloseWrite()
		}
		werr <- err
	}()
	h := sha256.New()
	got, err := io.Copy(h, c)
	if err != nil {
		return fmt.Errorf("read after %d bytes: %w", got, err)
	}
	if err := <-werr; err != nil {
		return fmt.Errorf("write: %w", err)
	}
	if got != int64(n) {
		return fmt.Errorf("got %d bytes back, sent %d", got, n)
	}
	if !bytes.Equal(h.Sum(nil), want[:]) {
		return errors.New("bytes came back altered")
	}
	return nil
}

// TestFullPath is the README's path: gateway, agent, login, connect, and a
// byte-checked bulk transfer on several concurrent connections.
func TestFullPath(t *testing.T) {
	h := NewHarness(t)
	gw := h.StartGateway(GatewayOptions{Policy: allowAlice})
	h.StartAgent(gw, "db1", "echo="+echoServer(t))
	user := h.Login(gw, "alice")
	_, local := h.Connect(user, "echo")

	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for i := 0; i < 4; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- transfer(local, 8<<20)
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	gw.WaitAudit(map[string]string{"type": "session.ended", "resource": "echo", "user": "alice", "bytes_up": fmt.Sprint(8 << 20)})

	out := gw.MustAdmin("agents", "list")
	if !strings.Contains(out, "db1") || !strings.Contains(out, "online") {
		t.Errorf("agents list does not show db1 online:\n%s", out)
	}
}

// TestPostgreSQL runs the real psql through the tunnel against the real
// PostgreSQL on 127.0.0.1:5432. It fails (never skips) when either is missing.
func TestPostgreSQL(t *testing.T) {
	psql, err := exec.LookPath("psql")
	if err != nil {
		t.Fatal("psql is not installed; .ci/run installs postgresql-client")
	}
	if c, err := net.DialTimeout("tcp", "127.0.0.1:5432", 5*time.Second); err != nil {
		t.Fatalf("PostgreSQL is not reachable at 127.0.0.1:5432 (start it as .ci/run does): %v", err)
	} else {
		c.Close()
	}
	h := NewHarness(t)
	gw := h.StartGateway(GatewayOptions{Policy: allowAlice})
	h.StartAgent(gw, "pg", "postgres=127.0.0.1:5432")
	user := h.Login(gw, "alice")
	_, local := h.Connect(user, "postgres")
	host, port, _ := net.SplitHostPort(local)
	cmd := exec.Command(psql, "-h", host, "-p", port, "-U", "postgres", "-d", "postgres", "-At", "-c", "select 1")
	cmd.Env = append(os.Environ(), "PGCONNECT_TIMEOUT=20", "PGSSLMODE=disable")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("psql through wicket: %v\n%s", err, out)
	}
	if strings.TrimSpace(string(out)) != "1" {
		t.Fatalf("psql printed %q, want 1", out)
	}
	gw.WaitAudit(map[string]string{"type": "session.ended", "resource": "postgres", "user": "alice"})
}

// expectRefusedConn checks that a connection through a local connect listener
// is closed without data: the gateway or agent refused the stream.
func expectRefusedConn(t *testing.T, local string) {
	t.Helper()
	c, err := net.DialTimeout("tcp", local, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(waitTimeout))
	_, _ = c.Write([]byte("hello"))
	n, err := io.Copy(io.Discard, c)
	if n != 0 {
		t.Fatalf("read %d bytes through a refused stream", n)
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatal("refused stream hung until the deadline instead of closing")
	}
}

// TestRefusals covers the hostile cases that must end in a clear refusal
// while everyone else keeps working.
func TestRefusals(t *testing.T) {
	h := NewHarness(t)
	gw := h.StartGateway(GatewayOptions{Policy: allowAlice})
	_, agentDir := h.StartAgent(gw, "db1", "echo="+echoServer(t), "dead="+closedPort(t))
	alice := h.Login(gw, "alice")
	_, aliceEcho := h.Connect(alice, "echo")

	t.Run("token replayed on a second agent", func(t *testing.T) {
		tok := gw.AgentToken("twice", []string{"echo"})
		first := h.StartAgentWith(tok, h.Dir("twice-1"), nil, "echo="+echoServer(t))
		gw.WaitAgentOnline("twice", "echo")
		second := h.StartAgentWith(tok, h.Dir("twice-2"), nil, "echo="+echoServer(t))
		err := second.Exited()
		if err == nil {
			t.Fatalf("second agent with a used token exited 0:\n%s", second.Output())
		}
		if !strings.Contains(strings.ToLower(second.Output()), "token") {
			t.Errorf("second agent's error does not mention the token:\n%s", second.Output())
		}
		if !first.Running() {
			t.Errorf("first agent stopped when the token was replayed:\n%s", first.Output())
		}
		gw.WaitAudit(map[string]string{"type": "agent.connected", "agent": "twice"})
	})

	t.Run("agent token used to log in", func(t *testing.T) {
		_, errOut, err := h.Run(nil, "login", "--token", gw.Token("agent", "sneaky"), "--data-dir", h.Dir("sneaky"))
		if err == nil {
			t.Fatal("login with an agent token succeeded")
		}
		if lines := strings.Count(strings.TrimSpace(errOut), "\n"); lines != 0 || !strings.Contains(errOut, "agent token") {
			t.Errorf("want one sentence naming the agent token, got %q", errOut)
		}
	})

	t.Run("user certificate on the agent ALPN and agent certificate on the client ALPN", func(t *testing.T) {
		// handshake reports whether the gateway accepted the identity in dir
		// on alpn. TLS 1.3 client certificates are checked after the
		// client's Finished, so a refusal arrives on the first read; an
		// accepted session stays silent until the read deadline.
		host, _, _ := net.SplitHostPort(gw.Addr)
		handshake := func(dir, alpn string) error {
			conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 10 * time.Second}, "tcp", gw.Addr, clientTLS(t, dir, alpn, host))
			if err != nil {
				return err
			}
			defer conn.Close()
			_ = conn.SetReadDeadline(time.Now().Add(2 * time.Second))
			_, err = conn.Read(make([]byte, 1))
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				return nil
			}
			return err
		}
		// Control: each certificate is accepted on its own ALPN, so the
		// refusals below come from the role check, not from the TLS setup.
		for _, c := range []struct{ dir, alpn string }{{alice, "wicket-client/1"}, {agentDir, "wicket-agent/1"}} {
			if err := handshake(c.dir, c.alpn); err != nil {
				t.Fatalf("%s certificate refused on its own ALPN %s: %v", filepath.Base(c.dir), c.alpn, err)
			}
		}
		for _, c := range []struct{ dir, alpn string }{{alice, "wicket-agent/1"}, {agentDir, "wicket-client/1"}} {
			if handshake(c.dir, c.alpn) == nil {
				t.Fatalf("%s certificate accepted on %s", filepath.Base(c.dir), c.alpn)
			}
		}
		gw.WaitAudit(map[string]string{"type": "tls.refused", "reason": "wrong role"})
	})

	t.Run("user the policy does not allow", func(t *testing.T) {
		bob := h.Login(gw, "bob")
		p, local := h.Connect(bob, "echo")
		expectRefusedConn(t, local)
		gw.WaitAudit(map[string]string{"type": "session.denied", "user": "bob", "resource": "echo"})
		p.WaitFor(`(?i)policy|denied|not allow`)
	})

	t.Run("resource no agent exposes", func(t *testing.T) {
		p, local := h.Connect(alice, "nosuch")
		expectRefusedConn(t, local)
		p.WaitFor(`(?i)no agent|unavailable|unknown resource`)
	})

	t.Run("target refuses the connection", func(t *testing.T) {
		p, local := h.Connect(alice, "dead")
		expectRefusedConn(t, local)
		p.WaitFor(`(?i)dial|refused`)
	})

	// Everyone else kept working through all of the above.
	if err := transfer(aliceEcho, 1<<20); err != nil {
		t.Fatalf("alice's connection after the refusals: %v", err)
	}
}

// clientTLS builds a TLS config from a stored identity directory, to present
// a certificate on an ALPN it was not issued for.
func clientTLS(t *testing.T, dir, alpn, serverName string) *tls.Config {
	t.Helper()
	cert, err := tls.LoadX509KeyPair(filepath.Join(dir, "chain.pem"), filepath.Join(dir, "key.pem"))
	if err != nil {
		t.Fatalf("load identity from %s: %v", dir, err)
	}
	rootPEM, err := os.ReadFile(filepath.Join(dir, "root.pem"))
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	block, _ := pem.Decode(rootPEM)
	root, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	pool.AddCert(root)
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		RootCAs:      pool,
		ServerName:   serverName,
		NextProtos:   []string{alpn},
		Certificates: []tls.Certificate{cert},
	}
}

// TestRevocation: revoking an agent closes its live session within a second,
// and its reconnects are refused.
func TestRevocation(t *testing.T) {
	h := NewHarness(t)
	gw := h.StartGateway(GatewayOptions{Policy: allowAlice})
	agent, _ := h.StartAgent(gw, "doomed", "echo="+echoServer(t))
	user := h.Login(gw, "alice")
	_, local := h.Connect(user, "echo")

	c, err := net.DialTimeout("tcp", local, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4)
	_ = c.SetReadDeadline(time.Now().Add(waitTimeout))
	if _, err := io.ReadFull(c, buf); err != nil {
		t.Fatalf("echo before revocation: %v", err)
	}

	start := time.Now()
	gw.MustAdmin("agents", "revoke", "doomed")
	_ = c.SetReadDeadline(time.Now().Add(waitTimeout))
	_, err = c.Read(buf)
	closedAfter := time.Since(start)
	if err == nil {
		t.Fatal("live stream still delivers data after revocation")
	}
	// The figure includes the admin command's process start and the
	// user-side close propagating through connect; the gateway's own bound
	// is checked in gateway/ tests with the session itself.
	t.Logf("live stream closed %s after `wicket agents revoke` was started", closedAfter)
	if closedAfter > 5*time.Second {
		t.Errorf("stream closed %s after revocation", closedAfter)
	}
	gw.WaitAudit(map[string]string{"type": "cert.revoked", "agent": "doomed"})

	// The agent cannot come back with the revoked certificate.
	agent.WaitFor(`(?i)revoked`)
	eventually(t, "agent doomed offline", func() bool {
		for _, a := range gw.Agents() {
			if a.Name == "doomed" && a.Status == "online" {
				return false
			}
		}
		return true
	})
}

// TestGatewayRestart: a gateway restarted under load drops its streams with
// an error (not a hang); agents reconnect by themselves; new connections work.
func TestGatewayRestart(t *testing.T) {
	h := NewHarness(t)
	gw := h.StartGateway(GatewayOptions{Policy: allowAlice, Args: []string{"--grace-period", "1s"}})
	h.StartAgent(gw, "db1", "echo="+echoServer(t))
	user := h.Login(gw, "alice")
	_, local := h.Connect(user, "echo")

	// A few long-lived connections in flight when the gateway goes away.
	var conns []net.Conn
	for i := 0; i < 3; i++ {
		c, err := net.DialTimeout("tcp", local, 10*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if _, err := c.Write([]byte("x")); err != nil {
			t.Fatal(err)
		}
		_ = c.SetReadDeadline(time.Now().Add(waitTimeout))
		if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
	}
	if err := gw.Stop(); err != nil {
		t.Fatalf("gateway did not exit 0 on SIGTERM: %v\n%s", err, gw.Output())
	}
	for _, c := range conns {
		_ = c.SetReadDeadline(time.Now().Add(waitTimeout))
		_, err := c.Read(make([]byte, 1))
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			t.Fatal("a stream of the stopped gateway hung instead of failing")
		}
		if err == nil {
			t.Fatal("a stream of the stopped gateway still delivered data")
		}
	}

	gw2 := h.StartGateway(GatewayOptions{DataDir: gw.DataDir, Listen: gw.Addr, Policy: allowAlice})
	gw2.WaitAgentOnline("db1", "echo")
	eventually(t, "a new connection through the restarted gateway", func() bool {
		return transfer(local, 64<<10) == nil
	})
}

// TestAuditChain: after real traffic the audit log verifies, and an edited
// line is reported with its line number.
func TestAuditChain(t *testing.T) {
	h := NewHarness(t)
	gw := h.StartGateway(GatewayOptions{Policy: allowAlice})
	h.StartAgent(gw, "db1", "echo="+echoServer(t))
	user := h.Login(gw, "alice")
	_, local := h.Connect(user, "echo")
	if err := transfer(local, 1<<20); err != nil {
		t.Fatal(err)
	}
	gw.WaitAudit(map[string]string{"type": "session.ended", "user": "alice"})
	if err := gw.Stop(); err != nil {
		t.Fatalf("gateway stop: %v", err)
	}
	logPath := filepath.Join(gw.DataDir, "audit.log")
	out, errOut, err := h.Run(nil, "audit", "verify", logPath)
	if err != nil {
		t.Fatalf("audit verify on an untouched log: %v\n%s%s", err, out, errOut)
	}
	// The anchor verify prints is the one the gateway logged when it stopped (its operational
	// log is what leaves the host), and a later verify against it catches a cut-off tail,
	// which the chain alone cannot.
	m := regexp.MustCompile(`(?m)^anchor: (\d+:[0-9a-f]{64})$`).FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("audit verify printed no anchor:\n%s", out)
	}
	anchor := m[1]
	if !strings.Contains(gw.Output(), anchor) {
		t.Fatalf("the gateway did not log the anchor %s when it stopped:\n%s", anchor, gw.Output())
	}
	if out, errOut, err := h.Run(nil, "audit", "verify", logPath, "--anchor", anchor); err != nil || !strings.Contains(out, "1 anchor(s) hold") {
		t.Fatalf("audit verify against its own anchor: %v\n%s%s", err, out, errOut)
	}
	full, err := os.ReadFile(logPath)
	if err != nil {
		t.Fatal(err)
	}
	kept := strings.SplitAfter(string(full), "\n")
	cut := filepath.Join(t.TempDir(), "cut.log")
	if err := os.WriteFile(cut, []byte(strings.Join(kept[:len(kept)-3], "")), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, _, err := h.Run(nil, "audit", "verify", cut); err != nil {
		t.Fatalf("a log with its tail cut still verifies on its own chain: %v", err)
	}
	if _, errOut, err := h.Run(nil, "audit", "verify", cut, "--anchor", anchor); err == nil || !strings.Contains(errOut, "cut off the end") {
		t.Fatalf("audit verify --anchor accepted a log with its tail cut: %v %q", err, errOut)
	}

	data, err := os.ReadFile(logPath)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(lines) < 3 {
		t.Fatalf("audit log has only %d lines", len(lines))
	}
	// Edit the second line: the alice session's bytes become something else.
	lines[1] = strings.Replace(lines[1], `"type":"`, `"type":"x`, 1)
	edited := filepath.Join(t.TempDir(), "edited.log")
	if err := os.WriteFile(edited, []byte(strings.Join(lines, "\n")+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, errOut, err = h.Run(nil, "audit", "verify", edited)
	if err == nil {
		t.Fatal("audit verify accepted an edited line")
	}
	if !strings.Contains(errOut, "line 2") && !strings.Contains(errOut, "line 3") {
		t.Errorf("audit verify does not name the edited line: %q", errOut)
	}
}
