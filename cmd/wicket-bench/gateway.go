package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"runtime/pprof"
	"strings"
	"time"

	"github.com/wicketgw/wicket/agent/identity"
	"github.com/wicketgw/wicket/ca"
	"github.com/wicketgw/wicket/gateway"
	"github.com/wicketgw/wicket/tunnel"
	"github.com/wicketgw/wicket/tunnel/tunnelbench"
)

// gatewayAgentsJob is what the parent sends the child that plays the agents
// of the real-gateway idle measurement.
type gatewayAgentsJob struct {
	Addr       string   `json:"addr"`        // the gateway's listener
	ServerName string   `json:"server_name"` // the name its certificate carries
	Tokens     []string `json:"tokens"`      // one-time enrollment tokens, one per agent
}

// realGatewayIdle measures the gateway-side memory of idle agent sessions on
// the real gateway: gateway.New with its embedded CA in a temporary data dir,
// n agents enrolled with one-time tokens (each its own identity), each holding
// one session with its control stream and hello, as `wicket agent` does. The
// agents run in a child process so that only the gateway's memory is counted;
// the baseline is taken after enrollment and before the sessions connect.
func realGatewayIdle(n int, profile string) (heap, stack, goroutines float64, err error) {
	dir, err := os.MkdirTemp("", "wicket-bench-gw-")
	if err != nil {
		return 0, 0, 0, err
	}
	defer os.RemoveAll(dir)
	pol := filepath.Join(dir, "policy.yaml")
	if err := os.WriteFile(pol, []byte("rules: []\n"), 0o600); err != nil {
		return 0, 0, 0, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	g, err := gateway.New(ctx, gateway.Config{
		DataDir:    filepath.Join(dir, "gw"),
		Listen:     "127.0.0.1:0",
		PolicyFile: pol,
		CAPassword: []byte("wicket-bench throwaway CA"),
		Logger:     slog.New(slog.DiscardHandler),
	})
	if err != nil {
		return 0, 0, 0, fmt.Errorf("start the gateway: %w", err)
	}
	runErr := make(chan error, 1)
	go func() { runErr <- g.Run(ctx) }()
	defer func() {
		cancel()
		<-runErr
	}()

	job := gatewayAgentsJob{Addr: g.Addr().String()}
	job.ServerName, _, _ = net.SplitHostPort(g.PublicAddr())
	for i := range n {
		tok, err := g.Authority().MintToken(ca.RoleAgent, fmt.Sprintf("idle-%03d", i), 0)
		if err != nil {
			return 0, 0, 0, err
		}
		job.Tokens = append(job.Tokens, tok)
	}
	c, err := startChild("-gateway-agents")
	if err != nil {
		return 0, 0, 0, err
	}
	defer c.close()
	if err := json.NewEncoder(c.stdin).Encode(job); err != nil {
		return 0, 0, 0, err
	}
	if err := c.expect("enrolled"); err != nil {
		return 0, 0, 0, err
	}
	before := tunnelbench.LiveBytes()
	fmt.Fprintln(c.stdin, "go")
	if err := c.expect("ready"); err != nil {
		return 0, 0, 0, err
	}
	deadline := time.Now().Add(30 * time.Second)
	for g.Counters().AgentSessions < int64(n) {
		if time.Now().After(deadline) {
			return 0, 0, 0, fmt.Errorf("only %d of %d agent sessions registered", g.Counters().AgentSessions, n)
		}
		time.Sleep(10 * time.Millisecond) // polling with a deadline, in a measuring tool
	}
	after := tunnelbench.LiveBytes()
	if profile != "" {
		f, err := os.Create(profile)
		if err != nil {
			return 0, 0, 0, err
		}
		pprof.Lookup("heap").WriteTo(f, 0)
		f.Close()
	}
	heap, stack, goroutines = perSession(before, after, n)
	return heap, stack, goroutines, nil
}

// gatewayAgents is the child of realGatewayIdle: enroll every token, say
// "enrolled", wait for "go", open one agent session per identity with its
// control stream and hello, say "ready", and hold them until stdin closes.
func gatewayAgents() error {
	in := bufio.NewReader(os.Stdin)
	line, err := in.ReadString('\n')
	if err != nil {
		return err
	}
	var job gatewayAgentsJob
	if err := json.Unmarshal([]byte(line), &job); err != nil {
		return fmt.Errorf("gateway agents: bad job: %w", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	creds := make([]*ca.Credentials, len(job.Tokens))
	for i, tok := range job.Tokens {
		if creds[i], err = ca.Enroll(ctx, tok); err != nil {
			return err
		}
	}
	fmt.Println("enrolled")
	if line, err := in.ReadString('\n'); err != nil || strings.TrimSpace(line) != "go" {
		return fmt.Errorf("gateway agents: want go, got %q %v", line, err)
	}
	var sessions []*tunnel.Session
	defer func() {
		for _, s := range sessions {
			s.Close()
		}
	}()
	for i, c := range creds {
		pool := x509.NewCertPool()
		pool.AddCert(c.Root)
		tc := tunnel.ClientTLSConfig(tunnel.ALPNAgent, pool, job.ServerName, func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			return identity.ClientCertificate(c), nil // as wicket agent presents it
		})
		s, err := tunnel.Dial(ctx, tunnel.DialConfig{Addr: job.Addr, TLS: tc, Config: tunnel.DefaultConfig()})
		if err != nil {
			return fmt.Errorf("agent %d: %w", i, err)
		}
		sessions = append(sessions, s)
		ctl, err := s.OpenControl(ctx)
		if err != nil {
			return fmt.Errorf("agent %d control: %w", i, err)
		}
		id, _ := c.Identity()
		if err := ctl.Send(tunnel.Hello{Name: id.Name, Instance: fmt.Sprint(i), Version: "bench", Resources: []string{"postgres"}}); err != nil {
			return fmt.Errorf("agent %d hello: %w", i, err)
		}
		var ack tunnel.Hello
		if err := ctl.Recv(&ack); err != nil {
			return fmt.Errorf("agent %d: the gateway did not answer the hello: %w", i, err)
		}
	}
	fmt.Println("ready")
	io.Copy(io.Discard, in) // until the parent closes our stdin
	return nil
}
