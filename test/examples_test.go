package test

import (
	"bytes"
	"errors"
	"io"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/wicketgw/wicket/gateway/policy"
	"go.uber.org/goleak"
	"gopkg.in/yaml.v3"
)

// examplesDir is the repository's examples/, relative to this package.
const examplesDir = "../examples"

// cliFlags runs `wicket CMD -h` and returns the flag names it lists.
func cliFlags(t *testing.T, h *Harness, cmd string) []string {
	t.Helper()
	_, errOut, err := h.Run(nil, cmd, "-h")
	if err != nil {
		t.Fatalf("wicket %s -h: %v\n%s", cmd, err, errOut)
	}
	var out []string
	for _, m := range regexp.MustCompile(`(?m)^\s+-([a-z0-9-]+)`).FindAllStringSubmatch(errOut, -1) {
		out = append(out, m[1])
	}
	if len(out) == 0 {
		t.Fatalf("wicket %s -h listed no flags:\n%s", cmd, errOut)
	}
	return out
}

// wicketUse is one use of the wicket CLI found in an example.
type wicketUse struct {
	where string
	cmd   string
	flags []string
}

// flagsOfArgs returns the flag names in args ("--x=y", "--x", "-x").
func flagsOfArgs(args []string) []string {
	var out []string
	for _, a := range args {
		if !strings.HasPrefix(a, "-") {
			continue
		}
		name, _, _ := strings.Cut(strings.TrimLeft(a, "-"), "=")
		out = append(out, name)
	}
	return out
}

// TestExamples parses every file under examples/ (but the demo), checks that each wicket
// flag they use exists in the real binary, that the config files are accepted by
// --print-config, that the policy parses, that the systemd units are hardened, and that
// every metric an alert rule uses is one a real gateway or agent exports.
func TestExamples(t *testing.T) {
	t.Cleanup(func() { goleak.VerifyNone(t) })
	h := NewHarness(t)
	known := map[string][]string{}
	flagsOf := func(cmd string) []string {
		if known[cmd] == nil {
			known[cmd] = cliFlags(t, h, cmd)
		}
		return known[cmd]
	}

	var uses []wicketUse
	var alertExprs []string
	checked := map[string]bool{}
	err := filepath.WalkDir(examplesDir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(examplesDir, path)
		if d.IsDir() {
			if rel == "demo" {
				return filepath.SkipDir
			}
			return nil
		}
		if rel == "demo.sh" {
			return nil
		}
		data, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		switch {
		case strings.HasSuffix(rel, ".service"):
			uses = append(uses, checkUnit(t, rel, data)...)
		case rel == "gateway.yaml" || rel == "agent.yaml":
			cmd := strings.TrimSuffix(rel, ".yaml")
			keys := yamlKeys(t, rel, data)
			uses = append(uses, wicketUse{where: rel, cmd: cmd, flags: keys})
			// The binary itself must accept the file: unknown keys and bad values fail here.
			args := []string{cmd, "--config", path, "--print-config"}
			if _, errOut, err := h.Run(nil, args...); err != nil {
				t.Errorf("%s: wicket %s rejects it: %v\n%s", rel, strings.Join(args, " "), err, errOut)
			}
		case rel == "policy.yaml":
			p, err := policy.Parse(data)
			if err != nil {
				t.Errorf("%s: %v", rel, err)
			} else if p.Len() == 0 {
				t.Errorf("%s has no rules", rel)
			}
		case rel == filepath.Join("kubernetes", "agent.yaml"):
			uses = append(uses, checkKubernetes(t, rel, data)...)
		case rel == filepath.Join("prometheus", "scrape.yml"):
			checkScrapeConfig(t, rel, data)
		case rel == filepath.Join("prometheus", "alerts.yml"):
			alertExprs = checkAlerts(t, rel, data)
		default:
			t.Errorf("examples/%s is not checked by this test: add a case for it", rel)
		}
		checked[rel] = true
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"systemd/wicket-gateway.service", "systemd/wicket-agent.service", "kubernetes/agent.yaml",
		"policy.yaml", "prometheus/scrape.yml", "prometheus/alerts.yml"} {
		if !checked[filepath.FromSlash(want)] {
			t.Errorf("examples/%s is missing", want)
		}
	}

	for _, u := range uses {
		have := flagsOf(u.cmd)
		for _, f := range u.flags {
			if !slices.Contains(have, f) {
				t.Errorf("%s: `wicket %s --%s` is not a flag of the binary (wicket %s -h lists %v)", u.where, u.cmd, f, u.cmd, have)
			}
		}
	}

	// The metric names the alerts use must be exported by a real gateway with an agent.
	gw := h.StartGateway(GatewayOptions{Args: metricsArgs})
	ag := h.StartAgentWith(gw.AgentToken("db1", []string{"echo"}), h.Dir("agent-db1"), metricsArgs, "echo="+echoServer(t))
	gw.WaitAgentOnline("db1", "echo")
	// A refused handshake, so that the refusal counter has a series: a client speaking
	// plain HTTP to the TLS port.
	c, err := net.DialTimeout("tcp", gw.Addr, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	_ = c.SetDeadline(time.Now().Add(waitTimeout))
	_, _ = c.Write([]byte("GET / HTTP/1.0\r\n\r\n"))
	_, _ = io.Copy(io.Discard, c)
	c.Close()
	maddr := gw.MetricsAddr()
	var s Scrape
	eventually(t, "a refused handshake counted", func() bool {
		s = scrape(t, maddr)
		return s.Families["wicket_tls_handshakes_refused_total"]
	})
	exported := map[string]bool{"up": true} // Prometheus' own, per target
	for f := range s.Families {
		exported[f] = true
	}
	for f := range scrape(t, ag.WaitFor(`msg="metrics listening" addr=(\S+)`)[1]).Families {
		exported[f] = true
	}
	metricName := regexp.MustCompile(`\b(wicket_[a-z0-9_]+|up)\b`)
	for _, expr := range alertExprs {
		for _, m := range metricName.FindAllString(expr, -1) {
			if !exported[m] {
				t.Errorf("alert expression %q uses %s, which the gateway does not export", expr, m)
			}
		}
	}
	if len(alertExprs) == 0 {
		t.Error("no alert expressions found")
	}
}

// checkUnit checks a systemd unit's hardening and returns its wicket invocations.
func checkUnit(t *testing.T, rel string, data []byte) []wicketUse {
	t.Helper()
	settings := map[string][]string{}
	for _, line := range strings.Split(string(data), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") || strings.HasPrefix(line, "[") {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			t.Errorf("%s: line %q is not KEY=VALUE", rel, line)
			continue
		}
		settings[k] = append(settings[k], v)
	}
	for k, want := range map[string]string{"NoNewPrivileges": "yes", "ProtectSystem": "strict", "PrivateTmp": "yes",
		"CapabilityBoundingSet": "", "ProtectHome": "yes", "UMask": "0077", "StateDirectoryMode": "0700"} {
		if v := settings[k]; len(v) != 1 || v[0] != want {
			t.Errorf("%s: %s=%v, want %s=%s", rel, k, v, k, want)
		}
	}
	for _, k := range []string{"User", "StateDirectory", "ExecStart"} {
		if len(settings[k]) == 0 {
			t.Errorf("%s: no %s=", rel, k)
		}
	}
	var uses []wicketUse
	for _, exec := range settings["ExecStart"] {
		f := strings.Fields(exec)
		if len(f) < 2 || filepath.Base(f[0]) != "wicket" {
			t.Errorf("%s: ExecStart=%s does not run wicket", rel, exec)
			continue
		}
		uses = append(uses, wicketUse{where: rel, cmd: f[1], flags: flagsOfArgs(f[2:])})
	}
	return uses
}

// yamlKeys returns the top-level keys of a YAML mapping.
func yamlKeys(t *testing.T, rel string, data []byte) []string {
	t.Helper()
	var m map[string]any
	if err := yaml.Unmarshal(data, &m); err != nil {
		t.Fatalf("%s: %v", rel, err)
	}
	var keys []string
	for k := range m {
		keys = append(keys, k)
	}
	return keys
}

// checkKubernetes decodes every document and returns the wicket invocations of the
// Deployment's containers; it checks the data dir is on a PersistentVolumeClaim and the
// token comes from a Secret.
func checkKubernetes(t *testing.T, rel string, data []byte) []wicketUse {
	t.Helper()
	type container struct {
		Command []string `yaml:"command"`
		Args    []string `yaml:"args"`
	}
	type doc struct {
		Kind string `yaml:"kind"`
		Spec struct {
			Template struct {
				Spec struct {
					Containers []container `yaml:"containers"`
					Volumes    []struct {
						PVC    *struct{} `yaml:"persistentVolumeClaim"`
						Secret *struct{} `yaml:"secret"`
					} `yaml:"volumes"`
				} `yaml:"spec"`
			} `yaml:"template"`
		} `yaml:"spec"`
	}
	kinds := map[string]bool{}
	var uses []wicketUse
	dec := yaml.NewDecoder(bytes.NewReader(data))
	for {
		var d doc
		err := dec.Decode(&d)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("%s: %v", rel, err)
		}
		kinds[d.Kind] = true
		if d.Kind != "Deployment" {
			continue
		}
		var pvc, secret bool
		for _, v := range d.Spec.Template.Spec.Volumes {
			pvc = pvc || v.PVC != nil
			secret = secret || v.Secret != nil
		}
		if !pvc || !secret {
			t.Errorf("%s: the Deployment needs a PVC for the data dir (%v) and a Secret for the token (%v)", rel, pvc, secret)
		}
		for _, c := range d.Spec.Template.Spec.Containers {
			args := append(slices.Clone(c.Command), c.Args...)
			if len(args) > 0 && filepath.Base(args[0]) == "wicket" {
				args = args[1:]
			}
			if len(args) == 0 {
				t.Errorf("%s: a container runs no wicket command", rel)
				continue
			}
			uses = append(uses, wicketUse{where: rel, cmd: args[0], flags: flagsOfArgs(args[1:])})
		}
	}
	for _, k := range []string{"Deployment", "Secret", "PersistentVolumeClaim"} {
		if !kinds[k] {
			t.Errorf("%s: no %s", rel, k)
		}
	}
	return uses
}

func checkScrapeConfig(t *testing.T, rel string, data []byte) {
	t.Helper()
	var c struct {
		RuleFiles     []string `yaml:"rule_files"`
		ScrapeConfigs []struct {
			JobName       string `yaml:"job_name"`
			MetricsPath   string `yaml:"metrics_path"`
			StaticConfigs []struct {
				Targets []string `yaml:"targets"`
			} `yaml:"static_configs"`
		} `yaml:"scrape_configs"`
	}
	if err := yaml.Unmarshal(data, &c); err != nil {
		t.Fatalf("%s: %v", rel, err)
	}
	if len(c.ScrapeConfigs) == 0 || c.ScrapeConfigs[0].JobName == "" || len(c.ScrapeConfigs[0].StaticConfigs) == 0 {
		t.Errorf("%s: no scrape job with targets", rel)
	}
	for _, rf := range c.RuleFiles {
		if _, err := os.Stat(filepath.Join(examplesDir, filepath.Dir(rel), rf)); err != nil {
			t.Errorf("%s: rule file %s: %v", rel, rf, err)
		}
	}
}

// checkAlerts parses the rules and returns their expressions.
func checkAlerts(t *testing.T, rel string, data []byte) []string {
	t.Helper()
	var c struct {
		Groups []struct {
			Name  string `yaml:"name"`
			Rules []struct {
				Alert       string            `yaml:"alert"`
				Expr        string            `yaml:"expr"`
				For         string            `yaml:"for"`
				Labels      map[string]string `yaml:"labels"`
				Annotations map[string]string `yaml:"annotations"`
			} `yaml:"rules"`
		} `yaml:"groups"`
	}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(&c); err != nil {
		t.Fatalf("%s: %v", rel, err)
	}
	var exprs []string
	for _, g := range c.Groups {
		for _, r := range g.Rules {
			if r.Alert == "" || r.Expr == "" || r.Labels["severity"] == "" || r.Annotations["summary"] == "" {
				t.Errorf("%s: rule %q needs alert, expr, labels.severity and annotations.summary", rel, r.Alert)
			}
			exprs = append(exprs, r.Expr)
		}
	}
	return exprs
}
