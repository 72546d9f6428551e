package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/wicketgw/wicket/gateway"
	"github.com/wicketgw/wicket/gateway/metrics"
)

func init() {
	register("gateway", "wicket gateway [--data-dir DIR] [--listen ADDR] [--public-addr HOST[:PORT]] [--db DSN] [--policy FILE]", runGateway)
}

func runGateway(ctx context.Context, args []string) error {
	// Every flag is also WICKET_<FLAG> in the environment and <flag>: in the --config
	// file (parseFlags, config.go); defaults here are the built-in ones.
	fs := newFlagSet("gateway")
	fs.String("config", "", "YAML file with any of these flags as keys (env WICKET_CONFIG)")
	printCfg := fs.Bool("print-config", false, "print the effective configuration (secrets redacted) and exit")
	dataDir := dataDirFlag(fs)
	listen := fs.String("listen", gateway.DefaultListen, "TLS address agents, users and the CA API share")
	publicAddr := fs.String("public-addr", "", "HOST[:PORT] agents and users dial, written into tokens (default: the listen address, localhost if its host is unspecified)")
	db := fs.String("db", "", "CA database: empty for a bbolt file in the data dir, or postgresql://...")
	policyFile := fs.String("policy", "", "policy file (YAML), reloaded when it changes; without one every user is denied")
	trustDomain := fs.String("trust-domain", "", "SPIFFE trust domain (default wicket.local)")
	caPasswordFile := fs.String("ca-password-file", "", "file holding the CA key password; else $WICKET_CA_PASSWORD; else one is generated into the data dir on first start")
	agentLifetime := fs.Duration("agent-cert-lifetime", time.Hour, "lifetime of agent certificates (5m..24h)")
	userLifetime := fs.Duration("user-cert-lifetime", 8*time.Hour, "lifetime of user certificates (5m..24h)")
	grace := fs.Duration("grace-period", gateway.DefaultGracePeriod, "on SIGTERM, how long open streams may finish")
	var publish stringList
	fs.Var(&publish, "publish", "serve an HTTP resource on the public HTTPS listener: RESOURCE=HOST[,public|users] (repeatable; users, the default, requires a Wicket user certificate)")
	publicListen := fs.String("public-listen", ":443", "HTTPS address of the public listener (only with --publish)")
	publicHTTPListen := fs.String("public-http-listen", ":80", "plain HTTP address for http-01 challenges and redirects, or off (only with --publish)")
	acmeCA := fs.String("acme-ca", "", "ACME directory URL for public certificates; empty for Let's Encrypt, internal for the built-in CA")
	acmeEmail := fs.String("acme-email", "", "contact e-mail of the ACME account")
	acmeServer := fs.Bool("acme-server", false, "open the built-in CA's ACME server (/acme/acme/directory on the gateway's port) to the organization, for --acme-names")
	var acmeNames stringList
	fs.Var(&acmeNames, "acme-names", "with --acme-server: DNS names and *.suffix patterns (one label under suffix) it issues for, comma-separated or repeated; anything else is refused as not in --acme-names")
	acmeEAB := fs.Bool("acme-eab", false, "with --acme-server: require External Account Binding; keys come from `wicket token create acme PATTERN`")
	var acmeChallenges stringList
	fs.Var(&acmeChallenges, "acme-challenges", "with --acme-server: challenge types offered, of http-01, tls-alpn-01, dns-01 (default all three)")
	acmeLifetime := fs.Duration("acme-cert-lifetime", 24*time.Hour, "with --acme-server: lifetime of the certificates it issues (5m..24h)")
	var pgResources stringList
	fs.Var(&pgResources, "postgres-resources", "resource names or patterns (comma-separated or repeated) that are PostgreSQL whatever their agent announces: every session is followed and each statement audited")
	metricsListen := fs.String("metrics-listen", "", "HOST:PORT for Prometheus /metrics and the /healthz, /readyz probes (plain HTTP, no authentication: use loopback, e.g. 127.0.0.1:9090); empty = off")
	logFormat, logLevel := logFlags(fs)
	pos, err := parseFlags(fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return fmt.Errorf("unexpected argument %q; see `wicket gateway -h`", pos[0])
	}
	if *printCfg {
		return printConfig(os.Stdout, fs)
	}
	if *dataDir == "" {
		return errors.New("no data directory: pass --data-dir DIR or set WICKET_DATA_DIR")
	}
	logger, err := newLogger(*logFormat, *logLevel)
	if err != nil {
		return err
	}
	if *grace == 0 {
		// "--grace-period 0" means no grace; in gateway.Config zero means the default.
		*grace = time.Nanosecond
	}
	var pub *gateway.PublicConfig
	if len(publish) > 0 {
		pub = &gateway.PublicConfig{Publish: publish, Listen: *publicListen, HTTPListen: *publicHTTPListen,
			ACMECA: *acmeCA, Email: *acmeEmail}
	}
	acmeSrv, err := acmeServerConfig(*acmeServer, acmeNames, *acmeEAB, acmeChallenges, *acmeLifetime)
	if err != nil {
		return err
	}
	g, err := gateway.New(ctx, gateway.Config{
		ACMEServer:        acmeSrv,
		PostgresResources: splitList(pgResources),
		Public:            pub,
		DataDir:           *dataDir,
		Listen:            *listen,
		PublicAddr:        *publicAddr,
		DB:                *db,
		PolicyFile:        *policyFile,
		TrustDomain:       *trustDomain,
		CAPasswordFile:    *caPasswordFile,
		AgentLifetime:     *agentLifetime,
		UserLifetime:      *userLifetime,
		GracePeriod:       *grace,
		Version:           versionString(),
		Logger:            logger,
	})
	if err != nil {
		return err
	}
	var ms *metrics.Server
	if *metricsListen != "" {
		if ms, err = metrics.Listen(*metricsListen, g, logger.With("component", "metrics")); err != nil {
			_ = g.Close()
			return err
		}
	}
	// ctx ends on SIGINT/SIGTERM (main.go); Run then drains and returns. The metrics
	// listener stops with it: /readyz answers "shutting down" while the gateway drains.
	runCtx, stop := context.WithCancel(ctx)
	defer stop()
	metricsDone := make(chan error, 1)
	if ms != nil {
		logger.Info("metrics listening", "addr", ms.Addr().String())
		go func() { metricsDone <- ms.Serve(runCtx) }()
	} else {
		metricsDone <- nil
	}
	runErr := g.Run(ctx)
	stop()
	if err := <-metricsDone; err != nil && runErr == nil {
		runErr = err
	}
	if runErr != nil {
		return runErr
	}
	logger.Info("gateway stopped")
	return nil
}
