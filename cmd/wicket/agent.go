package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/wicketgw/wicket/agent"
	agentmetrics "github.com/wicketgw/wicket/agent/metrics"
)

func init() {
	register("agent", "wicket agent --token TOKEN --data-dir DIR --expose NAME=HOST:PORT [--expose ...]   (later: wicket agent --data-dir DIR: the expose list is kept in DIR/agent.json)", runAgent)
}

// agentOpts are the values of `wicket agent`'s flags.
type agentOpts struct {
	printCfg                                      *bool
	dataDir, token, tokenFile                     *string
	expose                                        stringList
	acmeHosts                                     stringList
	dialTimeout, drainTimeout, grace, renewPeriod *time.Duration
	metricsListen, logFormat, logLevel            *string
}

// agentFlags defines the flags of `wicket agent`. Every flag is also WICKET_<FLAG> in the
// environment and <flag>: in the --config file (parseFlags, config.go).
func agentFlags() (*flag.FlagSet, *agentOpts) {
	fs := newFlagSet("agent")
	o := &agentOpts{}
	fs.String("config", "", "YAML file with any of these flags as keys (env WICKET_CONFIG); on SIGHUP the agent re-reads it and applies a changed expose list")
	o.printCfg = fs.Bool("print-config", false, "print the effective configuration (secrets redacted) and exit")
	o.dataDir = dataDirFlag(fs)
	o.token = fs.String("token", "", "one-time agent token from `wicket token create agent NAME` (or an ACME enrollment credential from `... --acme`: the agent then enrolls and renews by ACME); needed only for the first start (prefer WICKET_TOKEN or --token-file: a flag is visible to every local user in ps)")
	o.tokenFile = fs.String("token-file", "", "file holding the one-time agent token")
	fs.Var(&o.expose, "expose", "NAME=HOST:PORT (raw TCP) or NAME=postgres://HOST:PORT[?sslmode=disable|prefer|require|verify-ca|verify-full&sslrootcert=FILE&record=statements] (PostgreSQL, audited statement by statement): a resource this agent serves and the only address it dials for it (repeatable; comma-separated in WICKET_EXPOSE); kept in DATA-DIR/agent.json, so a restart without --expose serves the same list")
	fs.Var(&o.acmeHosts, "acme-host", "NAME=ADDR: vouch for DNS name NAME in the gateway's ACME validation, which then reaches ADDR through this agent (HOST for ports 80 and 443, or HOST:HTTP01PORT[:TLSALPN01PORT]); the gateway's administrator must allow it: wicket agents allow AGENT --acme-hosts NAME (repeatable)")
	o.dialTimeout = fs.Duration("dial-timeout", 10*time.Second, "how long to wait when connecting to a resource")
	o.drainTimeout = fs.Duration("drain-timeout", 0, "after a renewal, how long the previous session may keep its streams (0: until they end or its certificate expires)")
	o.grace = fs.Duration("grace-period", 10*time.Second, "on SIGTERM, how long streams in flight may finish (new ones go to other agents of the same name)")
	o.renewPeriod = fs.Duration("renew-period", 0, "renew the certificate every DUR instead of at about 2/3 of its lifetime (tests, demos); 0: off")
	o.metricsListen = fs.String("metrics-listen", "", "HOST:PORT for Prometheus /metrics and the /healthz, /readyz probes (plain HTTP, no authentication: use loopback); empty = off")
	o.logFormat, o.logLevel = logFlags(fs)
	return fs, o
}

func runAgent(ctx context.Context, args []string) error {
	fs, o := agentFlags()
	pos, err := parseFlags(fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return fmt.Errorf("unexpected argument %q; see `wicket agent -h`", pos[0])
	}
	if *o.printCfg {
		return printConfig(os.Stdout, fs)
	}
	tok, err := readToken(*o.token, *o.tokenFile)
	if err != nil {
		return err
	}
	resources, err := parseExpose(o.expose)
	if err != nil {
		return err
	}
	acmeHosts, err := parseACMEHosts(o.acmeHosts)
	if err != nil {
		return err
	}
	logger, err := newLogger(*o.logFormat, *o.logLevel)
	if err != nil {
		return err
	}
	stats := &agent.Stats{}
	stopMetrics := func() error { return nil }
	if *o.metricsListen != "" {
		ms, err := agentmetrics.Listen(*o.metricsListen, stats, logger.With("component", "metrics"))
		if err != nil {
			return err
		}
		logger.Info("metrics listening", "addr", ms.Addr().String())
		mctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- ms.Serve(mctx) }()
		stopMetrics = func() error { cancel(); return <-done }
	}
	// SIGHUP re-reads the configuration (flags, WICKET_* and the --config file, in that order,
	// as at start) and hands the agent the expose list it now says.
	updates := make(chan map[string]string)
	stopReload := reloadExposeOnHUP(ctx, args, updates, logger)
	defer stopReload()
	// ctx ends on SIGINT/SIGTERM (main.go): the agent drains up to --grace-period and returns nil.
	runErr := agent.Run(ctx, agent.Config{
		ExposeUpdates: updates,
		Stats:         stats,
		DataDir:       *o.dataDir,
		Token:         tok,
		Expose:        resources,
		ACMEHosts:     acmeHosts,
		DialTimeout:   *o.dialTimeout,
		DrainTimeout:  *o.drainTimeout,
		GracePeriod:   *o.grace,
		RenewPeriod:   *o.renewPeriod,
		Version:       versionString(),
		Logger:        logger,
	})
	if err := stopMetrics(); err != nil && runErr == nil {
		runErr = err
	}
	return runErr
}

// reloadExposeOnHUP re-reads the agent's configuration on each SIGHUP and sends the expose
// list it finds to updates. A configuration that no longer parses is logged and ignored. The
// returned func stops it.
func reloadExposeOnHUP(ctx context.Context, args []string, updates chan<- map[string]string, log *slog.Logger) (stop func()) {
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case <-ctx.Done():
				return
			case <-hup:
			}
			fs, o := agentFlags()
			fs.SetOutput(io.Discard)
			m, err := func() (map[string]string, error) {
				if _, err := parseFlags(fs, args); err != nil {
					return nil, err
				}
				return parseExpose(o.expose)
			}()
			if err != nil {
				log.Warn("SIGHUP: the configuration could not be read again; nothing changed", "err", err)
				continue
			}
			log.Info("SIGHUP: configuration read again", "resources", len(m))
			select {
			case updates <- m:
			case <-ctx.Done():
				return
			}
		}
	}()
	return func() {
		signal.Stop(hup)
		cancel()
		<-done
	}
}

// parseExpose turns NAME=HOST:PORT values into a map; agent.Run validates
// the names and addresses.
func parseExpose(values []string) (map[string]string, error) {
	out := map[string]string{}
	for _, v := range values {
		name, addr, ok := strings.Cut(strings.TrimSpace(v), "=")
		if !ok || name == "" || addr == "" {
			return nil, fmt.Errorf("--expose %q is not NAME=HOST:PORT", v)
		}
		addr, err := exposeAddr(name, addr)
		if err != nil {
			return nil, err
		}
		if prev, dup := out[name]; dup && prev != addr {
			return nil, fmt.Errorf("--expose names resource %s twice (%s and %s)", name, prev, addr)
		}
		out[name] = addr
	}
	return out, nil
}

// exposeAddr accepts HOST:PORT, a postgres:// URL (kept as it is: the agent follows
// its sslmode), or, for an HTTP resource that the gateway
// publishes (--publish on the gateway), http://HOST[:PORT]: the agent only
// carries bytes, so the URL form is the same dial with the scheme's default
// port. https:// is refused: the gateway's proxy speaks plain HTTP inside the
// already encrypted tunnel, and a TLS backend would need its own name checks.
func exposeAddr(name, target string) (string, error) {
	scheme, rest, isURL := strings.Cut(target, "://")
	if !isURL {
		return target, nil
	}
	if scheme == "postgres" || scheme == "postgresql" {
		return target, nil // a PostgreSQL resource; agent.Run parses and checks the URL
	}
	if scheme != "http" {
		return "", fmt.Errorf("--expose %s=%s: only HOST:PORT, http:// and postgres:// can be exposed", name, target)
	}
	rest = strings.TrimSuffix(rest, "/")
	if rest == "" || strings.ContainsAny(rest, "/?#@") {
		return "", fmt.Errorf("--expose %s=%s: give http://HOST[:PORT] without a path", name, target)
	}
	if _, _, err := net.SplitHostPort(rest); err != nil {
		rest = net.JoinHostPort(strings.Trim(rest, "[]"), "80")
	}
	return rest, nil
}

// readToken returns the token from --token or --token-file (not both).
func readToken(token, file string) (string, error) {
	if file == "" {
		return strings.TrimSpace(token), nil
	}
	if token != "" {
		return "", fmt.Errorf("give the token once: --token (or WICKET_TOKEN) or --token-file, not both")
	}
	b, err := os.ReadFile(file)
	if err != nil {
		return "", fmt.Errorf("read the token file: %w", err)
	}
	t := strings.TrimSpace(string(b))
	if t == "" {
		return "", fmt.Errorf("the token file %s is empty", file)
	}
	return t, nil
}
