// Command wicket is the single Wicket binary: the gateway, the agent, the user
// client and the admin commands.
//
// It is deliberately thin. Each command parses its flags (with WICKET_*
// environment variables as defaults) and hands over to the packages that do
// the work: gateway/, agent/, agent/connect, ca/ and tunnel/. It must not hold
// logic of its own beyond wiring, so that everything it does is testable in
// those packages and the end-to-end tests in test/ only have to run the binary.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"runtime/debug"
	"sort"
	"strings"
	"syscall"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

// commands maps a subcommand name to its implementation. Each command file
// registers itself in an init function. args excludes the command name.
var commands = map[string]func(ctx context.Context, args []string) error{}

// usageLine is a short summary per command, shown by `wicket help`.
var usageLine = map[string]string{}

// register adds a command. It panics on a duplicate name, which is a
// programming error caught by any test that runs the binary.
func register(name, usage string, run func(ctx context.Context, args []string) error) {
	if _, dup := commands[name]; dup {
		panic("wicket: command registered twice: " + name)
	}
	commands[name] = run
	usageLine[name] = usage
}

func init() {
	register("version", "wicket version", func(ctx context.Context, args []string) error {
		fmt.Println(versionString())
		return nil
	})
}

// versionString is the version with the Go toolchain, as `wicket version`
// prints it and as the agent announces itself in its hello.
func versionString() string {
	v := version
	if v == "dev" {
		if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
			v = bi.Main.Version
		}
	}
	return fmt.Sprintf("wicket %s (%s)", v, goVersion())
}

func goVersion() string {
	if bi, ok := debug.ReadBuildInfo(); ok {
		return bi.GoVersion
	}
	return "unknown"
}

func main() {
	os.Exit(run(os.Args[1:], os.Stderr))
}

// run executes one command and returns the process exit code. Errors are
// printed as one line on stderr: the sentence the error carries says what
// failed and what to do.
func run(args []string, stderr io.Writer) int {
	if len(args) == 0 || args[0] == "help" || args[0] == "-h" || args[0] == "--help" {
		printUsage(stderr)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	cmd, ok := commands[args[0]]
	if !ok {
		fmt.Fprintf(stderr, "wicket: unknown command %q; run `wicket help` for the list\n", args[0])
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := cmd(ctx, args[1:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		fmt.Fprintf(stderr, "wicket %s: %s\n", args[0], oneLine(err.Error()))
		return 1
	}
	return 0
}

// oneLine folds a multi-line error into one line so scripts can grep it.
func oneLine(s string) string {
	return strings.Join(strings.Fields(s), " ")
}

func printUsage(w io.Writer) {
	fmt.Fprintln(w, "usage: wicket COMMAND [flags]")
	fmt.Fprintln(w)
	names := make([]string, 0, len(commands))
	for n := range commands {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		fmt.Fprintf(w, "  %s\n", usageLine[n])
	}
	fmt.Fprintln(w)
	fmt.Fprintln(w, "Run `wicket COMMAND -h` for the flags of a command.")
}

// newLogger builds the slog logger of long-running commands. format is
// "text" or "json"; level is debug, info, warn or error. Logs go to stderr so
// stdout stays clean for machine-readable output.
func newLogger(format, level string) (*slog.Logger, error) {
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("log level %q is not one of debug, info, warn, error", level)
	}
	opts := &slog.HandlerOptions{Level: lv}
	switch format {
	case "text", "":
		return slog.New(slog.NewTextHandler(os.Stderr, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(os.Stderr, opts)), nil
	default:
		return nil, fmt.Errorf("log format %q is not one of text, json", format)
	}
}

// logFlags adds --log-format and --log-level (env WICKET_LOG_FORMAT,
// WICKET_LOG_LEVEL) to fs.
func logFlags(fs *flag.FlagSet) (format, level *string) {
	format = fs.String("log-format", envOr("WICKET_LOG_FORMAT", "text"), "log format: text or json (env WICKET_LOG_FORMAT)")
	level = fs.String("log-level", envOr("WICKET_LOG_LEVEL", "info"), "log level: debug, info, warn, error (env WICKET_LOG_LEVEL)")
	return format, level
}

// dataDirFlag adds --data-dir with WICKET_DATA_DIR as its default.
func dataDirFlag(fs *flag.FlagSet) *string {
	return fs.String("data-dir", os.Getenv("WICKET_DATA_DIR"), "state directory (env WICKET_DATA_DIR)")
}

// envOr returns the environment variable key, or def when it is unset or empty.
func envOr(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}

// newFlagSet returns a FlagSet that reports errors instead of exiting, so
// run() prints them in the one-line format.
func newFlagSet(name string) *flag.FlagSet {
	fs := flag.NewFlagSet("wicket "+name, flag.ContinueOnError)
	fs.SetOutput(os.Stderr)
	if flagSetHook != nil {
		flagSetHook(fs) // `wicket completion` collecting the flags (completion.go)
	}
	return fs
}

// parseInterspersed parses flags that may come before or after positional
// arguments (`wicket connect postgres --listen ADDR` and
// `wicket connect --listen ADDR postgres` both work) and returns the
// positional arguments.
func parseInterspersed(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		args = fs.Args()
		if len(args) == 0 {
			return pos, nil
		}
		if args[0] == "--" {
			return append(pos, args[1:]...), nil
		}
		pos = append(pos, args[0])
		args = args[1:]
	}
}
