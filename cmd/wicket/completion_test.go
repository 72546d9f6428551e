package main

import (
	"os/exec"
	"strings"
	"testing"
)

// TestCompletionCoversEveryCommandAndFlag checks that each script names every registered
// command and every flag of the gateway and agent commands, read from the real FlagSets.
func TestCompletionCoversEveryCommandAndFlag(t *testing.T) {
	flags, err := commandFlags()
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"gateway", "agent"} {
		if len(flags[want]) == 0 {
			t.Fatalf("no flags collected for %s", want)
		}
	}
	if !hasFlag(flags["gateway"], "metrics-listen") || !hasFlag(flags["agent"], "expose") {
		t.Fatalf("gateway or agent flags incomplete: %v %v", flags["gateway"], flags["agent"])
	}
	for shell, script := range map[string]string{"bash": bashCompletion(flags), "zsh": zshCompletion(flags), "fish": fishCompletion(flags)} {
		for name := range commands {
			if !strings.Contains(script, name) {
				t.Errorf("%s completion does not name command %s", shell, name)
			}
		}
		for _, cmd := range []string{"gateway", "agent", "connect", "token"} {
			for _, f := range flags[cmd] {
				w := "--" + f.name
				if shell == "fish" {
					w = "-l " + f.name
				}
				if !strings.Contains(script, w) {
					t.Errorf("%s completion lacks %s of %s", shell, w, cmd)
				}
			}
		}
	}
	if flagSetHook != nil {
		t.Fatal("flagSetHook left set after collecting")
	}
}

// TestCompletionScriptsParse runs each shell's syntax check on its script, for the shells
// installed here (bash always is).
func TestCompletionScriptsParse(t *testing.T) {
	flags, err := commandFlags()
	if err != nil {
		t.Fatal(err)
	}
	checks := map[string][]string{"bash": {"bash", "-n"}, "zsh": {"zsh", "-n"}, "fish": {"fish", "--no-execute"}}
	scripts := map[string]string{"bash": bashCompletion(flags), "zsh": zshCompletion(flags), "fish": fishCompletion(flags)}
	for shell, argv := range checks {
		if _, err := exec.LookPath(argv[0]); err != nil {
			if shell == "bash" {
				t.Fatal("bash is not installed")
			}
			t.Logf("%s not installed: its script is not syntax-checked", shell)
			continue
		}
		cmd := exec.Command(argv[0], argv[1:]...)
		cmd.Stdin = strings.NewReader(scripts[shell])
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Errorf("%s rejects its completion script: %v\n%s", shell, err, out)
		}
	}
}

func hasFlag(fl []cmdFlag, name string) bool {
	for _, f := range fl {
		if f.name == name {
			return true
		}
	}
	return false
}
