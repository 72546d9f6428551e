package main

import (
	"context"
	"io"
	"os"
	"strings"
	"testing"
	"time"
)

func TestACMEServerFlags(t *testing.T) {
	c, err := acmeServerConfig(true, []string{"*.svc.example.internal,grafana.corp", "x.corp"}, true, []string{"http-01,tls-alpn-01"}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(c.Names, " ") != "*.svc.example.internal grafana.corp x.corp" || !c.RequireEAB ||
		strings.Join(c.Challenges, " ") != "http-01 tls-alpn-01" || c.CertLifetime != time.Hour {
		t.Fatalf("config %+v", c)
	}
	if c, err := acmeServerConfig(false, nil, false, nil, 24*time.Hour); err != nil || c != nil {
		t.Fatalf("off: %+v %v", c, err)
	}
	if _, err := acmeServerConfig(true, nil, false, nil, time.Hour); err == nil || !strings.Contains(err.Error(), "--acme-names") {
		t.Fatalf("--acme-server without names: %v", err)
	}
	if _, err := acmeServerConfig(false, []string{"a.corp"}, false, nil, time.Hour); err == nil {
		t.Fatal("--acme-names without --acme-server accepted")
	}
}

// The gateway's --acme-* flags say the same in a YAML file and in WICKET_* (config.go):
// `wicket gateway --print-config` shows what they became.
func TestACMEServerFlagsFromFileAndEnv(t *testing.T) {
	cfg := writeConfig(t, "acme-server: true\nacme-names: ['*.svc.example.internal', grafana.corp]\nacme-cert-lifetime: 2h\n")
	t.Setenv("WICKET_ACME_CHALLENGES", "http-01,dns-01")
	t.Setenv("WICKET_ACME_EAB", "true")
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	old := os.Stdout
	os.Stdout = w
	runErr := runGateway(context.Background(), []string{"--config", cfg, "--print-config"})
	os.Stdout = old
	w.Close()
	out, _ := io.ReadAll(r)
	if runErr != nil {
		t.Fatal(runErr)
	}
	for _, want := range []string{"acme-server: \"true\"", "acme-eab: \"true\"", "acme-cert-lifetime: 2h0m0s",
		"acme-names:\n  - '*.svc.example.internal'\n  - grafana.corp", "acme-challenges:\n  - http-01\n  - dns-01"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("print-config lacks %q:\n%s", want, out)
		}
	}
}

func TestParseACMEHosts(t *testing.T) {
	m, err := parseACMEHosts([]string{"grafana.corp=127.0.0.1", "db.svc.example.internal=10.0.0.5:5002"})
	if err != nil || m["grafana.corp"] != "127.0.0.1" || m["db.svc.example.internal"] != "10.0.0.5:5002" {
		t.Fatalf("%v %v", m, err)
	}
	for _, bad := range []string{"grafana.corp", "=1.2.3.4", "grafana.corp=", "grafana.corp=h:x"} {
		if _, err := parseACMEHosts([]string{bad}); err == nil {
			t.Errorf("--acme-host %q accepted", bad)
		}
	}
}
