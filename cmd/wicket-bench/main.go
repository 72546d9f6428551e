// Command wicket-bench measures Wicket's tunnel against a raw TLS relay pair
// in the same run (see tunnel/tunnelbench for the two paths): throughput with
// 1 and 8 streams, 64-byte echo round trip, stream-open latency, and the
// gateway-side memory of idle agent sessions. It prints each figure, its
// ratio to the raw pair, and whether it meets the target.
//
// Then (pgbench.go, -pgbench DURATION, 0 skips it) it runs pgbench against
// the PostgreSQL at 127.0.0.1:5432 directly, through a raw TCP resource and
// through a postgres:// resource with statement audit, with the real wicket
// binary built into a temporary directory and run as separate processes, and
// reports TPS, the ratios, the statements audited per second and the
// statement log's bytes per statement. It creates and drops the database
// wicket_bench.
//
// It listens on 127.0.0.1 only and uses throwaway certificates and data
// directories. It must NOT be pointed at a real gateway. The defaults took
// three and a half minutes on a 2-core machine, all but a few seconds of it
// pgbench:
//
//	go run ./cmd/wicket-bench
//	go run ./cmd/wicket-bench -pgbench-only -pgbench 20s
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strings"
	"time"

	"github.com/wicketgw/wicket/tunnel"
	"github.com/wicketgw/wicket/tunnel/tunnelbench"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "wicket-bench:", err)
		os.Exit(1)
	}
}

func run() error {
	runtime.MemProfileRate = 512 // fine-grained enough to attribute per-session bytes
	mib := flag.Int("mib", 128, "MiB pushed per throughput run (split across the streams)")
	reps := flag.Int("reps", 5, "throughput repetitions per configuration, alternating paths; the median is reported")
	echoN := flag.Int("echo", 3000, "64-byte echo round trips per path")
	opens := flag.Int("opens", 1000, "stream opens to time")
	idle := flag.Int("idle", 200, "idle agent sessions for the memory figure (max 1000)")
	window := flag.Uint("window", 0, "override tunnel MaxStreamWindowSize in bytes (0 = default)")
	memProfile := flag.String("memprofile", "", "write a heap profile of the real gateway with its idle agent sessions up to this file")
	idleChild := flag.Bool("idle-agents", false, "internal: play the idle agents in a child process")
	gatewayChild := flag.Bool("gateway-agents", false, "internal: play the real gateway's idle agents in a child process")
	var pg pgbenchConfig
	flag.DurationVar(&pg.Duration, "pgbench", 10*time.Second, "length of each pgbench run against PostgreSQL at 127.0.0.1:5432: direct, through a raw TCP resource and through a postgres:// resource with statement audit (0 = skip)")
	flag.IntVar(&pg.Rounds, "pgbench-rounds", 3, "pgbench rounds per workload, each running the three paths in a rotated order; the median is reported")
	flag.IntVar(&pg.Clients, "pgbench-clients", 8, "pgbench -c (clients)")
	pgOnly := flag.Bool("pgbench-only", false, "run only the PostgreSQL benchmark")
	flag.Parse()

	cfg := tunnel.DefaultConfig()
	if *window != 0 {
		cfg.MaxStreamWindowSize = uint32(*window)
	}
	if *idleChild {
		return idleAgents(cfg)
	}
	if *gatewayChild {
		return gatewayAgents()
	}
	if *idle > 1000 || *idle < 1 {
		return errors.New("-idle must be between 1 and 1000")
	}

	fmt.Printf("wicket-bench: %s, GOMAXPROCS=%d, nproc=%d, cpu=%q\n", runtime.Version(), runtime.GOMAXPROCS(0), runtime.NumCPU(), cpuModel())
	fmt.Printf("tunnel config: window=%d KiB backlog=%d keepalive=%s write-timeout=%s\n",
		cfg.MaxStreamWindowSize>>10, cfg.AcceptBacklog, cfg.KeepAliveInterval, cfg.ConnectionWriteTimeout)
	fmt.Printf("command: %s\n\n", strings.Join(os.Args, " "))

	type result struct {
		name   string
		value  string
		ratio  string
		target string
		ok     bool
	}
	var results []result
	add := func(name, value, ratio, target string, ok bool) {
		results = append(results, result{name, value, ratio, target, ok})
		mark := "MET"
		if !ok {
			mark = "MISSED"
		}
		if target == "" {
			mark = ""
		}
		fmt.Printf("%-28s %-34s %-16s %s %s\n", name, value, ratio, target, mark)
	}
	summary := func() {
		met, targets := 0, 0
		for _, r := range results {
			if r.target != "" {
				targets++
				if r.ok {
					met++
				}
			}
		}
		fmt.Printf("\n%d of %d targets met\n", met, targets)
	}
	if *pgOnly {
		if pg.Duration <= 0 {
			return errors.New("-pgbench-only needs a -pgbench duration above 0")
		}
		if err := runPgbench(pg, add); err != nil {
			return err
		}
		summary()
		return nil
	}

	rig, err := tunnelbench.NewRig(cfg)
	if err != nil {
		return err
	}
	defer rig.Close()

	// Throughput: paired runs, alternating which path goes first. The CPU
	// cost per byte is reported too: it does not depend on how much of the
	// machine other work leaves us.
	total := int64(*mib) << 20
	for _, streams := range []int{1, 8} {
		var raw, tun, ratios, cpuRatios, tunCPU, rawCPU []float64
		for rep := range *reps {
			order := []tunnelbench.Path{tunnelbench.Raw, tunnelbench.Tunnel}
			if rep%2 == 1 {
				order = []tunnelbench.Path{tunnelbench.Tunnel, tunnelbench.Raw}
			}
			var got, cpu [2]float64
			for _, p := range order {
				bps, c, err := rig.ThroughputCPU(p, streams, total/int64(streams))
				if err != nil {
					return err
				}
				got[p], cpu[p] = bps, c
			}
			tun = append(tun, got[tunnelbench.Tunnel])
			raw = append(raw, got[tunnelbench.Raw])
			tunCPU = append(tunCPU, cpu[tunnelbench.Tunnel])
			rawCPU = append(rawCPU, cpu[tunnelbench.Raw])
			ratios = append(ratios, got[tunnelbench.Tunnel]/got[tunnelbench.Raw])
			cpuRatios = append(cpuRatios, cpu[tunnelbench.Raw]/cpu[tunnelbench.Tunnel])
		}
		target := 0.8
		if streams > 1 {
			target = 0.9
		}
		r := median(ratios)
		add(fmt.Sprintf("throughput %d stream(s)", streams),
			fmt.Sprintf("tunnel %.0f MB/s, raw %.0f MB/s", median(tun)/1e6, median(raw)/1e6),
			fmt.Sprintf("ratio %.2f", r), fmt.Sprintf(">= %.1fx", target), r >= target)
		add(fmt.Sprintf("  CPU/byte %d stream(s)", streams),
			fmt.Sprintf("tunnel %.2f ns/B, raw %.2f ns/B", median(tunCPU), median(rawCPU)),
			fmt.Sprintf("ratio %.2f", median(cpuRatios)), "", true)
		fmt.Printf("  per-rep wall ratios %s\n", fmtRatios(ratios))
	}

	// Echo round trip. Collect the throughput phase's garbage first so its
	// GC work does not land in the latency figures of either path.
	runtime.GC()
	tunRTT, err := rig.EchoRTT(tunnelbench.Tunnel, *echoN)
	if err != nil {
		return fmt.Errorf("echo through the tunnel: %w", err)
	}
	rawRTT, err := rig.EchoRTT(tunnelbench.Raw, *echoN)
	if err != nil {
		return fmt.Errorf("echo through the raw pair: %w", err)
	}
	add("echo 64B p50", fmt.Sprintf("tunnel %s, raw %s", pct(tunRTT, 50), pct(rawRTT, 50)),
		fmt.Sprintf("ratio %.2f", float64(pct(tunRTT, 50))/float64(pct(rawRTT, 50))), "", true)
	p99 := pct(tunRTT, 99)
	add("echo 64B p99", fmt.Sprintf("tunnel %s, raw %s", p99, pct(rawRTT, 99)),
		fmt.Sprintf("ratio %.2f", float64(p99)/float64(pct(rawRTT, 99))), "<= 700us", p99 <= 700*time.Microsecond)

	// Stream open vs a new mTLS connection.
	op, err := rig.OpenLatency(*opens)
	if err != nil {
		return fmt.Errorf("stream opens: %w", err)
	}
	rawOp, err := rig.RawOpenLatency(min(*opens, 300))
	if err != nil {
		return fmt.Errorf("raw connection opens: %w", err)
	}
	p50 := pct(op, 50)
	add("stream open p50", fmt.Sprintf("tunnel %s (p99 %s), new mTLS conn %s", p50, pct(op, 99), pct(rawOp, 50)),
		fmt.Sprintf("ratio %.2f", float64(p50)/float64(pct(rawOp, 50))), "<= 800us", p50 <= 800*time.Microsecond)
	rig.Close()

	// Memory per idle session, gateway side only: the agents run in a child.
	// First the tunnel alone (what any server of sessions pays), then the
	// real gateway holding enrolled agents' sessions.
	type idleRow struct {
		name                   string
		heap, stack, goroutine float64
	}
	var rows []idleRow
	heap, stack, gor, err := idleMemory(cfg, *idle)
	if err != nil {
		return fmt.Errorf("idle memory: %w", err)
	}
	rows = append(rows, idleRow{"idle session, tunnel only", heap, stack, gor})
	heap, stack, gor, err = realGatewayIdle(*idle, *memProfile)
	if err != nil {
		return fmt.Errorf("idle memory of the real gateway: %w", err)
	}
	rows = append(rows, idleRow{"idle session, real gateway", heap, stack, gor})
	for _, r := range rows {
		per := r.heap + r.stack
		add(r.name, fmt.Sprintf("%.1f KiB (heap %.1f + stacks %.1f, %.1f goroutines; n=%d)", per/1024, r.heap/1024, r.stack/1024, r.goroutine, *idle),
			"", "<= 30 KiB", per <= 30*1024)
	}

	if pg.Duration > 0 {
		if err := runPgbench(pg, add); err != nil {
			return fmt.Errorf("pgbench: %w", err)
		}
	}
	summary()
	return nil
}

// idleMemory starts an IdleGateway here, has a child process dial n idle
// agents into it, and returns the growth of live heap + stacks per session.
func idleMemory(cfg tunnel.Config, n int) (heap, stack, goroutines float64, err error) {
	p, err := tunnelbench.NewPKI()
	if err != nil {
		return 0, 0, 0, err
	}
	g, err := tunnelbench.StartIdleGateway(p, cfg)
	if err != nil {
		return 0, 0, 0, err
	}
	defer g.Close()
	creds, err := p.ExportAgent()
	if err != nil {
		return 0, 0, 0, err
	}
	before := tunnelbench.LiveBytes()
	c, err := startChild("-idle-agents")
	if err != nil {
		return 0, 0, 0, err
	}
	defer c.close()
	fmt.Fprintf(c.stdin, "%s %d %s\n", g.Addr(), n, creds)
	if err := c.expect("ready"); err != nil {
		return 0, 0, 0, err
	}
	if err := g.WaitHellos(int64(n), 30*time.Second); err != nil {
		return 0, 0, 0, err
	}
	heap, stack, goroutines = perSession(before, tunnelbench.LiveBytes(), n)
	return heap, stack, goroutines, nil
}

// child is a copy of this program, started with a mode flag, that plays the
// agents of a memory measurement in its own process, so that only the
// server side's memory is counted here. It reads its job from stdin, reports
// progress as lines on stdout, and holds its sessions until stdin closes.
type child struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	out   *bufio.Reader
}

func startChild(mode string) (*child, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(self, mode)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	return &child{cmd: cmd, stdin: stdin, out: bufio.NewReader(stdout)}, nil
}

// expect reads the child's next line and checks it is want.
func (c *child) expect(want string) error {
	line, err := c.out.ReadString('\n')
	if err != nil || strings.TrimSpace(line) != want {
		return fmt.Errorf("%s child: want %q, got %q %v", c.cmd.Args[1], want, line, err)
	}
	return nil
}

// close ends the child's sessions (it exits when stdin closes) and waits for it.
func (c *child) close() {
	c.stdin.Close()
	c.cmd.Wait()
}

// perSession is the growth from before to after divided by n sessions.
func perSession(before, after tunnelbench.Live, n int) (heap, stack, goroutines float64) {
	nf := float64(n)
	return float64(int64(after.Heap)-int64(before.Heap)) / nf, float64(int64(after.Stack)-int64(before.Stack)) / nf,
		float64(after.Goroutines-before.Goroutines) / nf
}

// idleAgents is the child: read "addr n creds", dial, say ready, wait for EOF.
func idleAgents(cfg tunnel.Config) error {
	in := bufio.NewReader(os.Stdin)
	line, err := in.ReadString('\n')
	if err != nil {
		return err
	}
	var addr, creds string
	var n int
	if _, err := fmt.Sscanf(line, "%s %d %s", &addr, &n, &creds); err != nil {
		return fmt.Errorf("idle agents: bad parameters: %w", err)
	}
	p, err := tunnelbench.ImportAgent([]byte(creds))
	if err != nil {
		return err
	}
	closeAll, err := tunnelbench.DialIdleAgents(context.Background(), p, cfg, addr, n)
	if err != nil {
		return err
	}
	defer closeAll()
	fmt.Println("ready")
	io.Copy(io.Discard, in) // until the parent closes our stdin
	return nil
}

func fmtRatios(v []float64) string {
	parts := make([]string, len(v))
	for i, x := range v {
		parts[i] = fmt.Sprintf("%.2f", x)
	}
	return strings.Join(parts, " ")
}

func median(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	return s[len(s)/2]
}

func pct(d []time.Duration, p int) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	i := (len(s)*p + 99) / 100
	if i >= len(s) {
		i = len(s) - 1
	}
	if i > 0 && p < 100 {
		i--
	}
	return s[i].Round(time.Microsecond)
}

func cpuModel() string {
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return "unknown"
	}
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, "model name") {
			if _, v, ok := strings.Cut(l, ":"); ok {
				return strings.TrimSpace(v)
			}
		}
	}
	return "unknown"
}
