package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"time"

	"github.com/wicketgw/wicket/gateway"
)

func init() {
	register("gateway", "wicket gateway [--data-dir DIR] [--listen ADDR] [--public-addr HOST[:PORT]] [--db DSN] [--policy FILE]", runGateway)
}

// durationFlag adds a duration flag whose default comes from the environment variable env.
// A malformed environment value is reported when the command runs, not silently ignored.
func durationFlag(fs *flag.FlagSet, name, env string, def time.Duration, usage string, errs *[]error) *time.Duration {
	if v := os.Getenv(env); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil {
			*errs = append(*errs, fmt.Errorf("%s=%q is not a duration such as 1h or 30s", env, v))
		} else {
			def = d
		}
	}
	return fs.Duration(name, def, usage+" (env "+env+")")
}

func runGateway(ctx context.Context, args []string) error {
	fs := newFlagSet("gateway")
	var envErrs []error
	dataDir := dataDirFlag(fs)
	listen := fs.String("listen", envOr("WICKET_LISTEN", gateway.DefaultListen), "TLS address agents, users and the CA API share (env WICKET_LISTEN)")
	publicAddr := fs.String("public-addr", os.Getenv("WICKET_PUBLIC_ADDR"), "HOST[:PORT] agents and users dial; written into tokens (default: the listen address, localhost if unspecified) (env WICKET_PUBLIC_ADDR)")
	db := fs.String("db", os.Getenv("WICKET_DB"), "CA database: empty for a bbolt file in the data dir, or postgresql://... (env WICKET_DB)")
	policyFile := fs.String("policy", os.Getenv("WICKET_POLICY"), "policy file (YAML); without one every user is denied (env WICKET_POLICY)")
	trustDomain := fs.String("trust-domain", os.Getenv("WICKET_TRUST_DOMAIN"), "SPIFFE trust domain (default wicket.local) (env WICKET_TRUST_DOMAIN)")
	caPasswordFile := fs.String("ca-password-file", os.Getenv("WICKET_CA_PASSWORD_FILE"), "file holding the CA key password; else $WICKET_CA_PASSWORD, else one is generated on first start (env WICKET_CA_PASSWORD_FILE)")
	agentLifetime := durationFlag(fs, "agent-cert-lifetime", "WICKET_AGENT_CERT_LIFETIME", time.Hour, "lifetime of agent certificates (5m..24h)", &envErrs)
	userLifetime := durationFlag(fs, "user-cert-lifetime", "WICKET_USER_CERT_LIFETIME", 8*time.Hour, "lifetime of user certificates (5m..24h)", &envErrs)
	grace := durationFlag(fs, "grace-period", "WICKET_GRACE_PERIOD", gateway.DefaultGracePeriod, "on SIGTERM, how long open streams may finish", &envErrs)
	logFormat, logLevel := logFlags(fs)
	pos, err := parseInterspersed(fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return fmt.Errorf("unexpected argument %q; see `wicket gateway -h`", pos[0])
	}
	if err := errors.Join(envErrs...); err != nil {
		return err
	}
	if *dataDir == "" {
		return errors.New("no data directory: pass --data-dir DIR or set WICKET_DATA_DIR")
	}
	logger, err := newLogger(*logFormat, *logLevel)
	if err != nil {
		return err
	}
	g, err := gateway.New(ctx, gateway.Config{
		DataDir:        *dataDir,
		Listen:         *listen,
		PublicAddr:     *publicAddr,
		DB:             *db,
		PolicyFile:     *policyFile,
		TrustDomain:    *trustDomain,
		CAPasswordFile: *caPasswordFile,
		AgentLifetime:  *agentLifetime,
		UserLifetime:   *userLifetime,
		GracePeriod:    *grace,
		Version:        versionString(),
		Logger:         logger,
	})
	if err != nil {
		return err
	}
	// ctx ends on SIGINT/SIGTERM (main.go); Run then drains and returns.
	if err := g.Run(ctx); err != nil {
		return err
	}
	logger.Info("gateway stopped")
	return nil
}
