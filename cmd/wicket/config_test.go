package main

import (
	"bytes"
	"flag"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func testFlagSet() (*flag.FlagSet, *string, *string, *string, *stringList) {
	fs := flag.NewFlagSet("wicket test", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.String("config", "", "config file")
	listen := fs.String("listen", ":8443", "listen address")
	dir := fs.String("data-dir", "", "data dir")
	pw := fs.String("ca-password", "", "secret")
	var expose stringList
	fs.Var(&expose, "expose", "repeatable")
	return fs, listen, dir, pw, &expose
}

func writeConfig(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "wicket.yaml")
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestConfigPrecedence: flag > WICKET_* environment > config file > default.
func TestConfigPrecedence(t *testing.T) {
	cfg := writeConfig(t, "listen: 127.0.0.1:1\ndata-dir: /from/file\nca-password: hunter2\nexpose: [a=1:1, b=2:2]\n")
	t.Setenv("WICKET_DATA_DIR", "/from/env")
	t.Setenv("WICKET_LISTEN", "127.0.0.1:2")
	fs, listen, dir, pw, expose := testFlagSet()
	pos, err := parseFlags(fs, []string{"--config", cfg, "res", "--listen", "127.0.0.1:3"})
	if err != nil {
		t.Fatal(err)
	}
	if *listen != "127.0.0.1:3" {
		t.Errorf("listen = %q, want the flag's value", *listen)
	}
	if *dir != "/from/env" {
		t.Errorf("data-dir = %q, want the environment's value over the file's", *dir)
	}
	if *pw != "hunter2" {
		t.Errorf("ca-password = %q, want the file's value", *pw)
	}
	if got := strings.Join(*expose, " "); got != "a=1:1 b=2:2" {
		t.Errorf("expose = %q, want the file's list", got)
	}
	if len(pos) != 1 || pos[0] != "res" {
		t.Errorf("positional = %q", pos)
	}

	// Without flag and environment, the file's values hold; defaults otherwise.
	t.Setenv("WICKET_DATA_DIR", "")
	t.Setenv("WICKET_LISTEN", "")
	t.Setenv("WICKET_CONFIG", writeConfig(t, "data-dir: /only/file\n"))
	fs, listen, dir, _, _ = testFlagSet()
	if _, err := parseFlags(fs, nil); err != nil {
		t.Fatal(err)
	}
	if *dir != "/only/file" || *listen != ":8443" {
		t.Errorf("data-dir %q listen %q, want the file's and the default", *dir, *listen)
	}
}

func TestConfigEnvRepeatable(t *testing.T) {
	t.Setenv("WICKET_EXPOSE", "a=1:1, b=2:2")
	fs, _, _, _, expose := testFlagSet()
	if _, err := parseFlags(fs, nil); err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(*expose, " "); got != "a=1:1 b=2:2" {
		t.Errorf("expose = %q", got)
	}
}

func TestConfigUnknownKeyNamed(t *testing.T) {
	cfg := writeConfig(t, "listen: :1\nlisten-adress: :2\n")
	fs, _, _, _, _ := testFlagSet()
	_, err := parseFlags(fs, []string{"--config", cfg})
	if err == nil || !strings.Contains(err.Error(), `"listen-adress"`) || !strings.Contains(err.Error(), "line 2") {
		t.Fatalf("err = %v, want it to name the unknown key and its line", err)
	}
}

func TestConfigListForScalarRefused(t *testing.T) {
	cfg := writeConfig(t, "listen: [a, b]\n")
	fs, _, _, _, _ := testFlagSet()
	if _, err := parseFlags(fs, []string{"--config", cfg}); err == nil {
		t.Fatal("a list for a single-value key was accepted")
	}
}

func TestPrintConfigRedacts(t *testing.T) {
	fs, _, _, _, _ := testFlagSet()
	fs.String("db", "", "dsn")
	if _, err := parseFlags(fs, []string{"--ca-password", "hunter2", "--expose", "a=1:1", "--db", "postgresql://wicket:s3cret@db:5432/wicket?sslmode=verify-full&password=p2"}); err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if err := printConfig(&buf, fs); err != nil {
		t.Fatal(err)
	}
	out := buf.String()
	if strings.Contains(out, "s3cret") || strings.Contains(out, "p2") || !strings.Contains(out, "wicket:redacted@db:5432") {
		t.Errorf("DSN password not redacted:\n%s", out)
	}
	if strings.Contains(out, "hunter2") || !strings.Contains(out, "ca-password: <redacted>") {
		t.Errorf("secret not redacted:\n%s", out)
	}
	if !strings.Contains(out, "listen: :8443") || !strings.Contains(out, "- a=1:1") {
		t.Errorf("effective values missing:\n%s", out)
	}
}
