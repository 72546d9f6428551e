package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/wicketgw/wicket/gateway/audit"
)

// pgbenchConfig is what the -pgbench* flags set: pgbench runs against the
// local PostgreSQL directly, through a raw TCP resource and through a
// postgres:// resource with statement audit, all in one run.
type pgbenchConfig struct {
	// Duration is the length of one pgbench run (pgbench -T); 0 skips the
	// PostgreSQL benchmark.
	Duration time.Duration
	// Rounds is how many times each path runs per workload, rotating which
	// path goes first; the median is reported.
	Rounds int
	// Clients is pgbench -c; the thread count (-j) is 2, or 1 for one client.
	Clients int
}

// pgPath is one way pgbench reaches PostgreSQL.
type pgPath int

const (
	pgDirect pgPath = iota // 127.0.0.1:5432, no Wicket in between
	pgRaw                  // wicket connect to a NAME=HOST:PORT resource: bytes only
	pgAudit                // wicket connect to a postgres:// resource: every statement audited
)

var pgPathNames = [...]string{"direct", "raw", "audit"}

// The PostgreSQL the benchmark uses, and the database it creates and drops.
const (
	pgHost     = "127.0.0.1"
	pgPort     = "5432"
	pgUser     = "postgres"
	pgBenchDB  = "wicket_bench"
	pgRawName  = "raw" // the agent's raw TCP resource
	pgAuditRes = "pg"  // the agent's postgres:// resource
)

// pgWorkload is one pgbench transaction script.
type pgWorkload struct {
	name string   // as the results table names it
	args []string // pgbench flags that select it
}

var pgWorkloads = []pgWorkload{
	{"-S", []string{"-S"}}, // SELECT only: one statement per transaction
	{"tpcb", nil},          // the default TPC-B-like mix: 7 statements per transaction
}

// pgRun is what one pgbench run measured.
type pgRun struct {
	tps          float64       // excluding connection time
	transactions int64         // processed
	gatewayCPU   time.Duration // user+system time the gateway process used during the run
	agentCPU     time.Duration // the same for the agent process
	statements   int64         // audited statements (audit path only)
	logBytes     int64         // bytes those statements added to the statement logs
}

// cpuPerTx is the gateway's and the agent's CPU time per transaction.
func (r pgRun) cpuPerTx() (gateway, agent time.Duration) {
	if r.transactions == 0 {
		return 0, 0
	}
	return r.gatewayCPU / time.Duration(r.transactions), r.agentCPU / time.Duration(r.transactions)
}

// runPgbench starts the real wicket binaries (gateway, agent, two connects)
// as separate processes on loopback, runs each workload over each path
// cfg.Rounds times, and reports TPS, the audit/raw and raw/direct ratios,
// the statements audited per second and the statement log's bytes per
// statement through add.
func runPgbench(cfg pgbenchConfig, add func(name, value, ratio, target string, ok bool)) error {
	if cfg.Rounds < 1 || cfg.Clients < 1 {
		return errors.New("-pgbench-rounds and -pgbench-clients must be at least 1")
	}
	for _, tool := range []string{"pgbench", "psql"} {
		if _, err := exec.LookPath(tool); err != nil {
			return fmt.Errorf("%s is not installed; install postgresql-client or run with -pgbench 0", tool)
		}
	}
	if c, err := net.DialTimeout("tcp", net.JoinHostPort(pgHost, pgPort), 5*time.Second); err != nil {
		return fmt.Errorf("PostgreSQL is not reachable at %s:%s (start it, or run with -pgbench 0): %w", pgHost, pgPort, err)
	} else {
		c.Close()
	}
	fmt.Printf("\npgbench: %s per run, %d rounds, -c %d -j %d, paths rotated each round; machine before: %s\n",
		cfg.Duration, cfg.Rounds, cfg.Clients, pgThreads(cfg.Clients), uptime())

	r, err := startPgRig()
	if err != nil {
		return err
	}
	dropDB := func() { psql("postgres", "DROP DATABASE IF EXISTS "+pgBenchDB+" WITH (FORCE)") }
	// An interrupted run still stops its processes, drops its database and
	// removes its directory (the data dir of a gateway is not left in /tmp).
	stopCleanup := onInterrupt(func() {
		r.close()
		dropDB()
	})
	defer stopCleanup()
	defer r.close()
	if err := psql("postgres", "DROP DATABASE IF EXISTS "+pgBenchDB+" WITH (FORCE)", "CREATE DATABASE "+pgBenchDB); err != nil {
		return err
	}
	defer dropDB()
	initCtx, cancelInit := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancelInit()
	if out, err := pgCommand(initCtx, pgPort, "pgbench", "-i", "-q", pgBenchDB).CombinedOutput(); err != nil {
		return fmt.Errorf("pgbench -i %s failed: %v\n%s", pgBenchDB, err, out)
	}
	ports := map[pgPath]string{pgDirect: pgPort, pgRaw: r.port[pgRaw], pgAudit: r.port[pgAudit]}
	var audited int64 // statements of every audit run, to check against wicket audit verify

	for _, w := range pgWorkloads {
		var tps [3][]float64
		var auditRaw, rawDirect, stmtRate, bytesPerStmt, stmtPerTx []float64
		var gwCPU, agentCPU [3][]float64 // microseconds per transaction
		for round := range cfg.Rounds {
			var got [3]pgRun
			for i := range 3 {
				p := pgPath((round + i) % 3)
				run, err := r.pgbench(w, p, ports[p], cfg)
				if err != nil {
					return err
				}
				got[p] = run
				audited += run.statements
				tps[p] = append(tps[p], run.tps)
				g, a := run.cpuPerTx()
				gwCPU[p] = append(gwCPU[p], float64(g)/1e3)
				agentCPU[p] = append(agentCPU[p], float64(a)/1e3)
			}
			fmt.Printf("  %s round %d: direct %.0f, raw %.0f, audit %.0f TPS; %d statements audited, %d log bytes\n",
				w.name, round+1, got[pgDirect].tps, got[pgRaw].tps, got[pgAudit].tps, got[pgAudit].statements, got[pgAudit].logBytes)
			auditRaw = append(auditRaw, got[pgAudit].tps/got[pgRaw].tps)
			rawDirect = append(rawDirect, got[pgRaw].tps/got[pgDirect].tps)
			stmtRate = append(stmtRate, float64(got[pgAudit].statements)/cfg.Duration.Seconds())
			if got[pgAudit].statements == 0 {
				return fmt.Errorf("the pgbench %s run through the postgres:// resource left no statement in %s: is statement audit on?", w.name, r.statementDir())
			}
			bytesPerStmt = append(bytesPerStmt, float64(got[pgAudit].logBytes)/float64(got[pgAudit].statements))
			stmtPerTx = append(stmtPerTx, float64(got[pgAudit].statements)/float64(max(1, got[pgAudit].transactions)))
		}
		ar := median(auditRaw)
		add("pgbench "+w.name+" TPS", fmt.Sprintf("direct %.0f, raw %.0f, audit %.0f", median(tps[pgDirect]), median(tps[pgRaw]), median(tps[pgAudit])), "", "", true)
		add("  audit/raw", fmtRatios(auditRaw), fmt.Sprintf("ratio %.2f", ar), ">= 0.9x", ar >= 0.9)
		add("  raw/direct", fmtRatios(rawDirect), fmt.Sprintf("ratio %.2f", median(rawDirect)), "", true)
		add("  statements audited", fmt.Sprintf("%.0f stmt/s, %.0f B/stmt, %.2f stmt/tx", median(stmtRate), median(bytesPerStmt), median(stmtPerTx)), "", "", true)
		add("  gateway CPU/tx", fmt.Sprintf("raw %.0f us, audit %.0f us", median(gwCPU[pgRaw]), median(gwCPU[pgAudit])), fmt.Sprintf("ratio %.2f", median(gwCPU[pgAudit])/median(gwCPU[pgRaw])), "", true)
		add("  agent CPU/tx", fmt.Sprintf("raw %.0f us, audit %.0f us", median(agentCPU[pgRaw]), median(agentCPU[pgAudit])), fmt.Sprintf("ratio %.2f", median(agentCPU[pgAudit])/median(agentCPU[pgRaw])), "", true)
	}
	logs, verified, took, err := r.verify()
	if err != nil {
		return err
	}
	if verified != audited {
		return fmt.Errorf("wicket audit verify checked %d statements but the pgbench runs added %d to the statement logs: one of the counts is wrong, which is a bug to report", verified, audited)
	}
	add("audit verify", fmt.Sprintf("ok, %d statements in %d logs, %.1f s", verified, logs, took.Seconds()), "", "", true)
	fmt.Printf("pgbench: machine after: %s\n", uptime())
	return nil
}

// verify runs `wicket audit verify` on the gateway's audit log, which checks
// its chain and every statement log against the seal in its session.ended,
// and returns the logs and statements it checked and how long it took.
func (r *pgRig) verify() (logs, statements int64, took time.Duration, err error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	start := time.Now()
	out, err := exec.CommandContext(ctx, r.bin, "audit", "verify", filepath.Join(r.gwData, "audit.log")).CombinedOutput()
	took = time.Since(start)
	if err != nil {
		return 0, 0, 0, fmt.Errorf("wicket audit verify failed on the benchmark's own logs: %v\n%s", err, out)
	}
	m := regexp.MustCompile(`(?m)^ok: ([0-9]+) statement logs, ([0-9]+) statements$`).FindSubmatch(out)
	if m == nil {
		return 0, 0, 0, fmt.Errorf("wicket audit verify printed no statement count:\n%s", out)
	}
	logs, _ = strconv.ParseInt(string(m[1]), 10, 64)
	statements, _ = strconv.ParseInt(string(m[2]), 10, 64)
	return logs, statements, took, nil
}

// pgThreads is pgbench -j for clients: 2, as the command line has it,
// unless there is only one client.
func pgThreads(clients int) int { return min(2, clients) }

// pgRig is a gateway, an agent exposing the local PostgreSQL twice (raw TCP
// and postgres://) and a user's two `wicket connect` listeners, each a real
// wicket process, in a temporary directory.
type pgRig struct {
	dir    string
	bin    string
	gwData string
	procs  []*benchProc
	gw     *benchProc
	agent  *benchProc
	port   map[pgPath]string // local port of the connect listener per path

	closeOnce sync.Once
}

// startPgRig builds ./cmd/wicket and starts everything as the README does.
// On error, whatever was started is stopped.
func startPgRig() (_ *pgRig, err error) {
	dir, err := os.MkdirTemp("", "wicket-bench-pg-")
	if err != nil {
		return nil, err
	}
	r := &pgRig{dir: dir, bin: filepath.Join(dir, "wicket"), gwData: filepath.Join(dir, "gateway"), port: map[pgPath]string{}}
	defer func() {
		if err != nil {
			r.close()
		}
	}()
	if out, err := exec.Command("go", "build", "-o", r.bin, "github.com/wicketgw/wicket/cmd/wicket").CombinedOutput(); err != nil {
		return nil, fmt.Errorf("build wicket (run wicket-bench from the repository): %v\n%s", err, out)
	}
	policy := filepath.Join(dir, "policy.yaml")
	if err := os.WriteFile(policy, []byte("rules:\n  - users: [\"bench\"]\n    resources: [\""+pgRawName+"\", \""+pgAuditRes+"\"]\n"), 0o600); err != nil {
		return nil, err
	}
	gw, err := r.start("gateway", []string{"WICKET_CA_PASSWORD=wicket-bench throwaway CA"},
		"gateway", "--data-dir", r.gwData, "--listen", "127.0.0.1:0", "--policy", policy)
	if err != nil {
		return nil, err
	}
	r.gw = gw
	if _, err := gw.waitFor(regexp.MustCompile(`msg=listening.*addr=(\S+)`)); err != nil {
		return nil, err
	}
	agentToken, err := r.admin("token", "create", "agent", "bench-agent", "--resources", pgRawName+","+pgAuditRes)
	if err != nil {
		return nil, err
	}
	agent, err := r.start("agent", nil, "agent", "--token", agentToken, "--data-dir", filepath.Join(dir, "agent"),
		"--expose", pgRawName+"="+pgHost+":"+pgPort,
		"--expose", pgAuditRes+"=postgres://"+pgHost+":"+pgPort+"?sslmode=disable")
	if err != nil {
		return nil, err
	}
	r.agent = agent
	if err := r.waitAgentOnline(agent, "bench-agent", pgRawName, pgAuditRes); err != nil {
		return nil, err
	}
	userToken, err := r.admin("token", "create", "user", "bench")
	if err != nil {
		return nil, err
	}
	userDir := filepath.Join(dir, "user")
	if out, err := exec.Command(r.bin, "login", "--token", userToken, "--data-dir", userDir).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("wicket login: %v\n%s", err, out)
	}
	for p, res := range map[pgPath]string{pgRaw: pgRawName, pgAudit: pgAuditRes} {
		c, err := r.start("connect "+res, nil, "connect", res, "--listen", "127.0.0.1:0", "--data-dir", userDir)
		if err != nil {
			return nil, err
		}
		m, err := c.waitFor(regexp.MustCompile(`listening on (\S+)`))
		if err != nil {
			return nil, err
		}
		_, port, err := net.SplitHostPort(strings.TrimRight(m[1], ","))
		if err != nil {
			return nil, fmt.Errorf("wicket connect %s printed an address without a port: %q", res, m[1])
		}
		r.port[p] = port
	}
	return r, nil
}

// start runs the built wicket binary with args, env added to ours.
func (r *pgRig) start(name string, env []string, args ...string) (*benchProc, error) {
	p, err := startBenchProc(name, r.bin, env, args...)
	if err != nil {
		return nil, err
	}
	r.procs = append(r.procs, p)
	return p, nil
}

// admin runs a short wicket admin command against the gateway's data dir
// and returns its trimmed stdout.
func (r *pgRig) admin(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, r.bin, append(args, "--data-dir", r.gwData)...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("wicket %s: %v: %s", strings.Join(args[:min(len(args), 3)], " "), err, strings.TrimSpace(stderr.String()))
	}
	return strings.TrimSpace(string(out)), nil
}

// waitAgentOnline polls `wicket agents list --json` until the agent is
// online with every resource, or the agent process p exits.
func (r *pgRig) waitAgentOnline(p *benchProc, name string, resources ...string) error {
	deadline := time.Now().Add(time.Minute)
	var last string
	for time.Now().Before(deadline) {
		select {
		case <-p.done:
			return fmt.Errorf("wicket agent exited (%v) before it was online:\n%s", p.cmd.ProcessState, p.tail())
		default:
		}
		out, err := r.admin("agents", "list", "--json")
		if err == nil {
			last = out
			var list []struct {
				Name      string   `json:"name"`
				Status    string   `json:"status"`
				Resources []string `json:"resources"`
			}
			if json.Unmarshal([]byte(out), &list) == nil {
				for _, a := range list {
					if a.Name == name && a.Status == "online" && containsAll(a.Resources, resources) {
						return nil
					}
				}
			}
		}
		time.Sleep(100 * time.Millisecond) // polling with a deadline, in a measuring tool
	}
	return fmt.Errorf("agent %s was not online with %v within a minute (agents list: %s); agent output:\n%s",
		name, resources, last, p.tail())
}

func containsAll(have, want []string) bool {
	for _, w := range want {
		found := false
		for _, h := range have {
			found = found || h == w
		}
		if !found {
			return false
		}
	}
	return true
}

// pgbench runs workload w against port for cfg.Duration, after vacuuming
// and checkpointing directly so that every run starts from the same state
// (pgbench -n: its own vacuum would go through the path under test and be
// audited). On the audit path it also counts what the run added to the
// statement logs, once every session of the run has ended.
func (r *pgRig) pgbench(w pgWorkload, p pgPath, port string, cfg pgbenchConfig) (pgRun, error) {
	if err := psql(pgBenchDB, "VACUUM pgbench_branches", "VACUUM pgbench_tellers", "TRUNCATE pgbench_history", "CHECKPOINT"); err != nil {
		return pgRun{}, err
	}
	var before statementLog
	var ended int
	if p == pgAudit {
		var err error
		if before, err = readStatementLog(r.statementDir()); err != nil {
			return pgRun{}, err
		}
		if _, ended, err = r.sessions(pgAuditRes); err != nil {
			return pgRun{}, err
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), cfg.Duration+2*time.Minute)
	defer cancel()
	args := append([]string{"-n", "-c", strconv.Itoa(cfg.Clients), "-j", strconv.Itoa(pgThreads(cfg.Clients)),
		"-T", strconv.Itoa(max(1, int(cfg.Duration.Round(time.Second).Seconds())))}, w.args...)
	gwCPU, agentCPU := r.gw.cpu(), r.agent.cpu()
	out, err := pgCommand(ctx, port, "pgbench", append(args, pgBenchDB)...).CombinedOutput()
	run := pgRun{gatewayCPU: r.gw.cpu() - gwCPU, agentCPU: r.agent.cpu() - agentCPU}
	if err != nil {
		return pgRun{}, fmt.Errorf("pgbench %s on the %s path (port %s) failed: %v\n%s", w.name, pgPathNames[p], port, err, out)
	}
	m := regexp.MustCompile(`(?m)^tps = ([0-9.]+) \((?:without initial connection time|excluding connections establishing)\)`).FindSubmatch(out)
	if m == nil {
		return pgRun{}, fmt.Errorf("pgbench %s on the %s path printed no tps line:\n%s", w.name, pgPathNames[p], out)
	}
	run.tps, _ = strconv.ParseFloat(string(m[1]), 64)
	if m := regexp.MustCompile(`(?m)^number of transactions actually processed: ([0-9]+)`).FindSubmatch(out); m != nil {
		run.transactions, _ = strconv.ParseInt(string(m[1]), 10, 64)
	}
	if p != pgAudit {
		return run, nil
	}
	if err := r.waitSessionsEnded(pgAuditRes, ended); err != nil {
		return pgRun{}, err
	}
	after, err := readStatementLog(r.statementDir())
	if err != nil {
		return pgRun{}, err
	}
	run.statements = after.statements - before.statements
	run.logBytes = after.bytes - before.bytes
	return run, nil
}

// statementDir is where the gateway writes the per-session statement logs.
func (r *pgRig) statementDir() string { return filepath.Join(r.gwData, audit.StatementsDir) }

// sessions counts the session.started and session.ended records of resource
// in the gateway's audit log.
func (r *pgRig) sessions(resource string) (started, ended int, err error) {
	data, err := os.ReadFile(filepath.Join(r.gwData, "audit.log"))
	if err != nil {
		return 0, 0, fmt.Errorf("read the gateway's audit log: %w", err)
	}
	for _, line := range bytes.Split(data, []byte("\n")) {
		var rec struct {
			Type     string `json:"type"`
			Resource string `json:"resource"`
		}
		if len(line) == 0 || json.Unmarshal(line, &rec) != nil || rec.Resource != resource {
			continue
		}
		switch rec.Type {
		case audit.TypeSessionStarted:
			started++
		case audit.TypeSessionEnded:
			ended++
		}
	}
	return started, ended, nil
}

// waitSessionsEnded waits until the sessions of resource that started after
// the count endedBefore was taken have all ended: by then their statement
// logs are complete and sealed.
func (r *pgRig) waitSessionsEnded(resource string, endedBefore int) error {
	deadline := time.Now().Add(time.Minute)
	for {
		started, ended, err := r.sessions(resource)
		if err != nil {
			return err
		}
		if ended == started && ended > endedBefore {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%d of %d %s sessions ended within a minute of pgbench exiting", ended, started, resource)
		}
		time.Sleep(50 * time.Millisecond) // polling with a deadline, in a measuring tool
	}
}

// statementLog is the size of the statement logs in one directory.
type statementLog struct {
	statements int64 // lines of type "statement": not a log's begin line, nor a recovery line
	bytes      int64 // of every *.log file, all lines
}

// readStatementLog sums dir/*.log; a missing directory is an empty log.
func readStatementLog(dir string) (statementLog, error) {
	var s statementLog
	files, err := filepath.Glob(filepath.Join(dir, "*.log"))
	if err != nil {
		return s, err
	}
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			return s, fmt.Errorf("read statement log: %w", err)
		}
		s.bytes += int64(len(data))
		for _, line := range bytes.Split(data, []byte("\n")) {
			if len(line) == 0 {
				continue
			}
			var rec struct {
				Type string `json:"type"`
			}
			if err := json.Unmarshal(line, &rec); err != nil {
				return s, fmt.Errorf("statement log %s has a line that is not JSON: %w", f, err)
			}
			if rec.Type == audit.TypeStatement {
				s.statements++
			}
		}
	}
	return s, nil
}

// pgCommand is a PostgreSQL client tool against 127.0.0.1:port as the
// postgres user, without TLS on the client's leg: a postgres:// resource
// answers the client's SSLRequest with 'N' (its leg is inside the mTLS
// tunnel), so every path runs the same way.
func pgCommand(ctx context.Context, port, tool string, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, tool, append([]string{"-h", pgHost, "-p", port, "-U", pgUser}, args...)...)
	cmd.Env = append(os.Environ(), "PGSSLMODE=disable", "PGCONNECT_TIMEOUT=10")
	return cmd
}

// psql runs statements, each its own -c, directly against PostgreSQL.
func psql(db string, statements ...string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	args := []string{"-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", db}
	for _, s := range statements {
		args = append(args, "-c", s)
	}
	if out, err := pgCommand(ctx, pgPort, "psql", args...).CombinedOutput(); err != nil {
		return fmt.Errorf("psql %q failed: %v\n%s", statements, err, out)
	}
	return nil
}

// uptime is what uptime(1) prints, or the load average from /proc.
func uptime() string {
	if out, err := exec.Command("uptime").Output(); err == nil {
		return strings.TrimSpace(string(out))
	}
	b, _ := os.ReadFile("/proc/loadavg")
	return "load average " + strings.TrimSpace(string(b))
}

// close stops the processes, newest first, and removes the directory. It
// may be called more than once, also from onInterrupt's goroutine.
func (r *pgRig) close() {
	r.closeOnce.Do(func() {
		for i := len(r.procs) - 1; i >= 0; i-- {
			r.procs[i].stop()
		}
		os.RemoveAll(r.dir)
	})
}

// onInterrupt runs cleanup and exits with status 130 when SIGINT or SIGTERM
// arrives before the returned stop is called.
func onInterrupt(cleanup func()) (stop func()) {
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, os.Interrupt, syscall.SIGTERM)
	done := make(chan struct{})
	go func() {
		select {
		case <-sig:
			fmt.Fprintln(os.Stderr, "wicket-bench: interrupted; stopping the wicket processes and dropping", pgBenchDB)
			cleanup()
			os.Exit(130)
		case <-done:
		}
	}()
	return func() {
		signal.Stop(sig)
		close(done)
	}
}

// benchProc is one wicket process whose output lines are kept (the last
// benchTail of them) and can be waited for.
type benchProc struct {
	name string
	cmd  *exec.Cmd
	done chan struct{}

	mu     sync.Mutex
	lines  []string
	notify chan struct{} // closed and replaced on each line
}

const benchTail = 200

func startBenchProc(name, bin string, env []string, args ...string) (*benchProc, error) {
	cmd := exec.Command(bin, args...)
	cmd.Env = append(os.Environ(), env...)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	stderr, err := cmd.StderrPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start wicket %s: %w", name, err)
	}
	p := &benchProc{name: name, cmd: cmd, done: make(chan struct{}), notify: make(chan struct{})}
	var readers sync.WaitGroup
	readers.Add(2)
	go p.collect(stdout, &readers)
	go p.collect(stderr, &readers)
	go func() {
		readers.Wait()
		cmd.Wait()
		close(p.done)
	}()
	return p, nil
}

func (p *benchProc) collect(rd io.Reader, wg *sync.WaitGroup) {
	defer wg.Done()
	sc := bufio.NewScanner(rd)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		p.mu.Lock()
		p.lines = append(p.lines, sc.Text())
		if len(p.lines) > 2*benchTail {
			p.lines = append(p.lines[:0], p.lines[len(p.lines)-benchTail:]...)
		}
		close(p.notify)
		p.notify = make(chan struct{})
		p.mu.Unlock()
	}
}

// waitFor waits up to a minute for a line matching re and returns its submatches.
func (p *benchProc) waitFor(re *regexp.Regexp) ([]string, error) {
	deadline := time.NewTimer(time.Minute)
	defer deadline.Stop()
	seen := 0
	for {
		p.mu.Lock()
		if seen > len(p.lines) { // the kept lines were trimmed
			seen = 0
		}
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
			if m := re.FindStringSubmatch(p.tail()); m != nil {
				return m, nil
			}
			return nil, fmt.Errorf("wicket %s exited (%v) before printing a line matching %q:\n%s", p.name, p.cmd.ProcessState, re, p.tail())
		case <-deadline.C:
			return nil, fmt.Errorf("wicket %s printed no line matching %q within a minute:\n%s", p.name, re, p.tail())
		}
	}
}

// cpu is the user+system time the process has used so far, from
// /proc/PID/stat (Linux; 0 elsewhere). Its resolution is a clock tick.
func (p *benchProc) cpu() time.Duration {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p.cmd.Process.Pid))
	if err != nil {
		return 0
	}
	// The fields after the command name in parentheses: state is the first,
	// utime and stime the 12th and 13th.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 13 {
		return 0
	}
	utime, _ := strconv.ParseInt(f[11], 10, 64)
	stime, _ := strconv.ParseInt(f[12], 10, 64)
	const clockTick = 10 * time.Millisecond // USER_HZ is 100 on every Linux architecture Go supports
	return time.Duration(utime+stime) * clockTick
}

func (p *benchProc) tail() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return strings.Join(p.lines[max(0, len(p.lines)-benchTail):], "\n")
}

// stop sends SIGTERM and waits, with SIGKILL after 20 seconds.
func (p *benchProc) stop() {
	select {
	case <-p.done:
		return
	default:
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(20 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.done
	}
}
