// Package test holds Wicket's end-to-end tests: they build the real wicket
// binary once and run the gateway, agents and user clients as separate
// processes on loopback, the way an operator would.
//
// The harness reads like the README: StartGateway, Token, StartAgent, Login,
// Connect, each one call. Every process a test starts is stopped when the
// test ends (SIGTERM, then SIGKILL after a grace period), so a test leaves no
// process behind.
package test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/wicketgw/wicket/tunnel/loopback"
)

// wicketBin is the binary built once by TestMain.
var wicketBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "wicket-e2e-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	wicketBin = filepath.Join(dir, "wicket")
	build := exec.Command("go", "build", "-o", wicketBin, "../cmd/wicket")
	build.Stdout, build.Stderr = os.Stdout, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "building wicket:", err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// waitTimeout bounds every wait in these tests. It is generous because CI
// machines are slow and shared; no test depends on the machine being fast.
const waitTimeout = 60 * time.Second

// Harness starts Wicket processes for one test.
type Harness struct {
	t   *testing.T
	dir string
}

// NewHarness returns a harness whose processes and files live for the test.
func NewHarness(t *testing.T) *Harness {
	t.Helper()
	return &Harness{t: t, dir: t.TempDir()}
}

// Dir returns a new directory under the test's temp dir.
func (h *Harness) Dir(name string) string {
	d := filepath.Join(h.dir, name)
	if err := os.MkdirAll(d, 0o700); err != nil {
		h.t.Fatal(err)
	}
	return d
}

// Process is one running wicket command with its output captured.
type Process struct {
	t    *testing.T
	name string
	cmd  *exec.Cmd

	mu     sync.Mutex
	lines  []string // stderr and stdout lines, in arrival order
	notify chan struct{}

	done    chan struct{}
	waitErr error
}

// Start runs wicket with args and env (added to the test's environment).
func (h *Harness) Start(name string, env []string, args ...string) *Process {
	h.t.Helper()
	return h.start(name, env, nil, args)
}

// StartWithStdin is Start with the process's stdin a pipe the test writes to
// (and closes, or leaves open).
func (h *Harness) StartWithStdin(name string, env []string, args ...string) (*Process, io.WriteCloser) {
	h.t.Helper()
	var stdin io.WriteCloser
	p := h.start(name, env, func(cmd *exec.Cmd) {
		w, err := cmd.StdinPipe()
		if err != nil {
			h.t.Fatal(err)
		}
		stdin = w
	}, args)
	h.t.Cleanup(func() { stdin.Close() })
	return p, stdin
}

func (h *Harness) start(name string, env []string, prepare func(*exec.Cmd), args []string) *Process {
	h.t.Helper()
	cmd := exec.Command(wicketBin, args...)
	cmd.Env = append(os.Environ(), env...)
	if prepare != nil {
		prepare(cmd)
	}
	p := &Process{t: h.t, name: name, cmd: cmd, notify: make(chan struct{}), done: make(chan struct{})}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		h.t.Fatal(err)
	}
	stderr, err := cmd.StderrPipe()
	if err != nil {
		h.t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		h.t.Fatalf("start %s: %v", name, err)
	}
	var readers sync.WaitGroup
	readers.Add(2)
	go p.collect(stdout, &readers)
	go p.collect(stderr, &readers)
	go func() {
		readers.Wait()
		p.waitErr = cmd.Wait()
		close(p.done)
	}()
	h.t.Cleanup(func() { p.Stop() })
	return p
}

func (p *Process) collect(r io.Reader, wg *sync.WaitGroup) {
	defer wg.Done()
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64*1024), 1<<20)
	for sc.Scan() {
		p.mu.Lock()
		p.lines = append(p.lines, sc.Text())
		close(p.notify)
		p.notify = make(chan struct{})
		p.mu.Unlock()
	}
}

// Output returns everything the process printed so far.
func (p *Process) Output() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return strings.Join(p.lines, "\n")
}

// WaitFor waits until a printed line matches re and returns its submatches.
func (p *Process) WaitFor(re string) []string {
	p.t.Helper()
	m, err := p.waitFor(regexp.MustCompile(re), waitTimeout)
	if err != nil {
		p.t.Fatalf("%s: %v\noutput:\n%s", p.name, err, p.Output())
	}
	return m
}

func (p *Process) waitFor(re *regexp.Regexp, d time.Duration) ([]string, error) {
	deadline := time.NewTimer(d)
	defer deadline.Stop()
	seen := 0
	for {
		p.mu.Lock()
		lines, notify := p.lines[seen:], p.notify
		seen = len(p.lines)
		p.mu.Unlock()
		for _, l := range lines {
			if m := re.FindStringSubmatch(l); m != nil {
				return m, nil
			}
		}
		select {
		case <-notify:
		case <-p.done:
			// Read what arrived before exit, then give up.
			p.mu.Lock()
			rest := p.lines[seen:]
			p.mu.Unlock()
			for _, l := range rest {
				if m := re.FindStringSubmatch(l); m != nil {
					return m, nil
				}
			}
			return nil, fmt.Errorf("exited (%v) before printing a line matching %q", p.waitErr, re)
		case <-deadline.C:
			return nil, fmt.Errorf("no line matching %q within %s", re, d)
		}
	}
}

// Exited waits for the process to exit on its own and returns its error.
func (p *Process) Exited() error {
	p.t.Helper()
	select {
	case <-p.done:
		return p.waitErr
	case <-time.After(waitTimeout):
		p.t.Fatalf("%s did not exit within %s\noutput:\n%s", p.name, waitTimeout, p.Output())
		return nil
	}
}

// Running reports whether the process has not exited yet.
func (p *Process) Running() bool {
	select {
	case <-p.done:
		return false
	default:
		return true
	}
}

// Stop sends SIGTERM and waits; SIGKILL after a grace period. It returns the
// process's exit error.
func (p *Process) Stop() error {
	select {
	case <-p.done:
		return p.waitErr
	default:
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(20 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.done
	}
	return p.waitErr
}

// Gateway is a running `wicket gateway`.
type Gateway struct {
	*Process
	h       *Harness
	DataDir string
	Addr    string // host:port of the TLS port
}

// GatewayOptions are the knobs tests turn; zero values mean defaults.
type GatewayOptions struct {
	DataDir string   // reuse a data dir (restart); default a new one
	Listen  string   // default 127.0.0.1:0
	Policy  string   // policy YAML; written to a file and passed with --policy
	Args    []string // extra flags
}

// StartGateway starts a gateway and waits until it listens.
func (h *Harness) StartGateway(o GatewayOptions) *Gateway {
	h.t.Helper()
	if o.DataDir == "" {
		o.DataDir = h.Dir("gateway")
	}
	if o.Listen == "" {
		o.Listen = "127.0.0.1:0"
	}
	args := []string{"gateway", "--data-dir", o.DataDir, "--listen", o.Listen}
	if o.Policy != "" {
		pf := filepath.Join(o.DataDir, "..", filepath.Base(o.DataDir)+"-policy.yaml")
		if err := os.WriteFile(pf, []byte(o.Policy), 0o600); err != nil {
			h.t.Fatal(err)
		}
		args = append(args, "--policy", pf)
	}
	args = append(args, o.Args...)
	p := h.Start("gateway", []string{"WICKET_CA_PASSWORD=e2e-test-password"}, args...)
	m := p.WaitFor(`msg=listening.*addr=(\S+)`)
	return &Gateway{Process: p, h: h, DataDir: o.DataDir, Addr: m[1]}
}

// Admin runs an admin command (`wicket token ...`, `wicket agents ...`) against
// this gateway and returns stdout, stderr and the error.
func (g *Gateway) Admin(args ...string) (string, string, error) {
	return g.h.Run(nil, append(args, "--data-dir", g.DataDir)...)
}

// MustAdmin is Admin that fails the test on error and returns stdout.
func (g *Gateway) MustAdmin(args ...string) string {
	g.h.t.Helper()
	out, errOut, err := g.Admin(args...)
	if err != nil {
		g.h.t.Fatalf("wicket %s: %v\nstderr: %s", strings.Join(args, " "), err, errOut)
	}
	return out
}

// Token mints a one-time token for role ("agent" or "user") and name.
func (g *Gateway) Token(role, name string, extra ...string) string {
	g.h.t.Helper()
	out := g.MustAdmin(append([]string{"token", "create", role, name}, extra...)...)
	tok := strings.TrimSpace(out)
	if tok == "" || strings.ContainsAny(tok, " \n") {
		g.h.t.Fatalf("token create printed %q, want only the token", out)
	}
	return tok
}

// AgentToken mints a one-time agent token for name that grants it resources (`wicket
// token create agent NAME --resources R1,R2`); an agent serves only what its name is granted.
func (g *Gateway) AgentToken(name string, resources []string, extra ...string) string {
	g.h.t.Helper()
	return g.Token("agent", name, append([]string{"--resources", strings.Join(resources, ",")}, extra...)...)
}

// AgentInfo is one row of `wicket agents list --json`; only the fields the
// tests read are declared.
type AgentInfo struct {
	Name      string   `json:"name"`
	Status    string   `json:"status"`
	Resources []string `json:"resources"`
	Allowed   []string `json:"allowed"`
	Refused   []string `json:"refused"`
}

// Agents returns `wicket agents list --json`.
func (g *Gateway) Agents() []AgentInfo {
	g.h.t.Helper()
	out := g.MustAdmin("agents", "list", "--json")
	var list []AgentInfo
	if err := json.Unmarshal([]byte(out), &list); err != nil {
		g.h.t.Fatalf("agents list --json printed %q: %v", out, err)
	}
	return list
}

// WaitAgentOnline polls the admin API until the agent is online with resource.
func (g *Gateway) WaitAgentOnline(name, resource string) {
	g.h.t.Helper()
	eventually(g.h.t, fmt.Sprintf("agent %s online with %s", name, resource), func() bool {
		for _, a := range g.Agents() {
			if a.Name == name && a.Status == "online" {
				for _, r := range a.Resources {
					if r == resource {
						return true
					}
				}
			}
		}
		return false
	})
}

// AuditRecords reads the gateway's audit log.
func (g *Gateway) AuditRecords() []map[string]any {
	g.h.t.Helper()
	data, err := os.ReadFile(filepath.Join(g.DataDir, "audit.log"))
	if err != nil {
		g.h.t.Fatal(err)
	}
	var recs []map[string]any
	for _, line := range bytes.Split(data, []byte("\n")) {
		if len(line) == 0 {
			continue
		}
		var r map[string]any
		if err := json.Unmarshal(line, &r); err != nil {
			g.h.t.Fatalf("audit line %q: %v", line, err)
		}
		recs = append(recs, r)
	}
	return recs
}

// WaitAudit polls the audit log until a record matches all key=value pairs.
func (g *Gateway) WaitAudit(kv map[string]string) map[string]any {
	g.h.t.Helper()
	var found map[string]any
	eventually(g.h.t, fmt.Sprintf("audit record %v", kv), func() bool {
		for _, r := range g.AuditRecords() {
			ok := true
			for k, v := range kv {
				if auditValue(r[k]) != v {
					ok = false
					break
				}
			}
			if ok {
				found = r
				return true
			}
		}
		return false
	})
	return found
}

// auditValue formats a decoded JSON value for comparison: numbers without
// exponent, everything else as fmt prints it.
func auditValue(v any) string {
	if f, ok := v.(float64); ok {
		return strconv.FormatFloat(f, 'f', -1, 64)
	}
	return fmt.Sprint(v)
}

// Run runs a short wicket command to completion.
func (h *Harness) Run(env []string, args ...string) (string, string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, wicketBin, args...)
	cmd.Env = append(os.Environ(), env...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	return stdout.String(), stderr.String(), err
}

// StartAgent enrolls a new agent with a fresh token granting the resources it
// exposes, and starts it, exposing the given NAME=HOST:PORT resources. It returns when the gateway lists the
// agent online.
func (h *Harness) StartAgent(g *Gateway, name string, expose ...string) (*Process, string) {
	h.t.Helper()
	dir := h.Dir("agent-" + name + "-" + randSuffix())
	var names []string
	for _, e := range expose {
		names = append(names, strings.SplitN(e, "=", 2)[0])
	}
	p := h.StartAgentWith(g.AgentToken(name, names), dir, nil, expose...)
	for _, e := range expose {
		g.WaitAgentOnline(name, strings.SplitN(e, "=", 2)[0])
	}
	return p, dir
}

// StartAgentWith starts `wicket agent` with an explicit token (may be empty
// for a restart from the stored identity) and data dir.
func (h *Harness) StartAgentWith(token, dir string, extra []string, expose ...string) *Process {
	h.t.Helper()
	args := []string{"agent", "--data-dir", dir}
	if token != "" {
		args = append(args, "--token", token)
	}
	for _, e := range expose {
		args = append(args, "--expose", e)
	}
	args = append(args, extra...)
	return h.Start("agent "+filepath.Base(dir), nil, args...)
}

// Login stores a user identity for name in a new directory and returns it.
func (h *Harness) Login(g *Gateway, name string) string {
	h.t.Helper()
	dir := h.Dir("user-" + name + "-" + randSuffix())
	if _, errOut, err := h.Run(nil, "login", "--token", g.Token("user", name), "--data-dir", dir); err != nil {
		h.t.Fatalf("wicket login %s: %v\n%s", name, err, errOut)
	}
	return dir
}

// Connect runs `wicket connect RESOURCE --listen 127.0.0.1:0` for the user
// whose identity is in userDir and returns the process and its local address.
func (h *Harness) Connect(userDir, resource string, extra ...string) (*Process, string) {
	h.t.Helper()
	args := append([]string{"connect", resource, "--listen", "127.0.0.1:0", "--data-dir", userDir}, extra...)
	p := h.Start("connect "+resource, nil, args...)
	m := p.WaitFor(`listening on (\S+)`)
	return p, strings.TrimRight(m[1], ",")
}

// eventually polls cond until it holds or waitTimeout passes.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(waitTimeout)
	for wait := 10 * time.Millisecond; ; wait = min(wait*2, 500*time.Millisecond) {
		if cond() {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", waitTimeout, what)
		}
		time.Sleep(wait) // polling interval, not a wait for an event
	}
}

var suffixN struct {
	sync.Mutex
	n int
}

func randSuffix() string {
	suffixN.Lock()
	defer suffixN.Unlock()
	suffixN.n++
	return fmt.Sprint(suffixN.n)
}

// load keeps byte-checked transfers running through a local connect
// listener until stop is called.
type load struct {
	done     chan struct{}
	once     sync.Once
	wg       sync.WaitGroup
	mu       sync.Mutex
	streams  int
	failures []error
}

// startLoad runs workers goroutines, each doing transfer(local, size) in a
// loop. The load also stops when the test ends, should it fail first.
func startLoad(t *testing.T, local string, workers, size int) *load {
	l := &load{done: make(chan struct{})}
	t.Cleanup(func() { l.stop() })
	for i := 0; i < workers; i++ {
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			for {
				select {
				case <-l.done:
					return
				default:
				}
				err := transfer(local, size)
				l.mu.Lock()
				l.streams++
				if err != nil {
					l.failures = append(l.failures, err)
				}
				l.mu.Unlock()
			}
		}()
	}
	return l
}

// stop ends the load, waits for the transfers in flight and returns how
// many streams ran and which failed.
func (l *load) stop() (int, []error) {
	l.once.Do(func() { close(l.done) })
	l.wg.Wait()
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.streams, l.failures
}

// echoServer and closedPort are the shared loopback targets.
func echoServer(t testing.TB) string { return loopback.EchoServer(t) }
func closedPort(t testing.TB) string { return loopback.ClosedPort(t) }
