package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"strings"
	"time"

	"github.com/wicketgw/wicket/agent/connect"
)

func init() {
	register("connect", "wicket connect RESOURCE [--listen ADDR | --stdio] [--data-dir DIR]", runConnect)
}

func runConnect(ctx context.Context, args []string) error {
	fs := newFlagSet("connect")
	fs.String("config", "", "YAML file with any of these flags as keys (env WICKET_CONFIG)")
	listen := fs.String("listen", "127.0.0.1:0", "local address to accept connections on; port 0 picks a free one (the address is printed on stdout)")
	stdio := fs.Bool("stdio", false, "relay stdin/stdout as one connection instead of listening (ssh ProxyCommand)")
	dataDir := fs.String("data-dir", "", "where the user identity is stored (env WICKET_DATA_DIR; default $WICKET_HOME, else ~/.wicket)")
	openTimeout := fs.Duration("open-timeout", 30*time.Second, "how long a new connection waits for the session to the gateway")
	renewPeriod := fs.Duration("renew-period", 0, "renew the certificate every DUR instead of at about 2/3 of its lifetime (tests, demos); 0: off")
	logFormat, logLevel := logFlags(fs)
	pos, err := parseFlags(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return fmt.Errorf("name one resource: wicket connect RESOURCE [--listen ADDR | --stdio]")
	}
	if *stdio && onCommandLine(args, "listen") {
		return fmt.Errorf("choose one of --listen and --stdio")
	}
	level := *logLevel
	if *stdio && !onCommandLine(args, "log-level") && os.Getenv("WICKET_LOG_LEVEL") == "" {
		// With --stdio, stderr is usually the terminal of an ssh session:
		// say only what went wrong.
		level = "warn"
	}
	logger, err := newLogger(*logFormat, level)
	if err != nil {
		return err
	}
	resource := pos[0]
	return connect.Connect(ctx, connect.Config{
		DataDir:     *dataDir,
		Resource:    resource,
		Listen:      *listen,
		Stdio:       *stdio,
		OpenTimeout: *openTimeout,
		RenewPeriod: *renewPeriod,
		Logger:      logger,
		OnListen: func(a net.Addr) {
			// One line scripts can read: the port is the last field.
			fmt.Fprintf(os.Stdout, "listening on %s for resource %s\n", a, resource)
		},
	})
}

// onCommandLine reports whether flag name was given in args (not through
// the environment or a config file).
func onCommandLine(args []string, name string) bool {
	for _, a := range args {
		if a == "--" {
			return false
		}
		a = strings.TrimLeft(a, "-")
		if a == name || strings.HasPrefix(a, name+"=") {
			return true
		}
	}
	return false
}
