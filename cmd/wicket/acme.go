package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/wicketgw/wicket/agent"
	"github.com/wicketgw/wicket/gateway"
)

// splitList flattens a repeatable flag whose values may also be comma-separated.
func splitList(vals []string) []string {
	var out []string
	for _, v := range vals {
		for _, x := range strings.Split(v, ",") {
			if x = strings.TrimSpace(x); x != "" {
				out = append(out, x)
			}
		}
	}
	return out
}

// acmeServerConfig checks the --acme-* flags of `wicket gateway`.
func acmeServerConfig(on bool, names []string, eab bool, challenges []string, lifetime time.Duration) (*gateway.ACMEServerConfig, error) {
	names, challenges = splitList(names), splitList(challenges)
	if !on {
		if len(names) > 0 || eab || len(challenges) > 0 {
			return nil, errors.New("--acme-names, --acme-eab and --acme-challenges need --acme-server")
		}
		return nil, nil
	}
	if len(names) == 0 {
		return nil, errors.New("--acme-server needs --acme-names: the DNS names or *.suffix patterns it may issue for, e.g. --acme-names '*.svc.example.internal,grafana.corp'")
	}
	return &gateway.ACMEServerConfig{Names: names, RequireEAB: eab, Challenges: challenges, CertLifetime: lifetime}, nil
}

// createACMEEAB is `wicket token create acme PATTERN[,PATTERN]`: it prints the key id and
// the HMAC key of a one-time EAB key, for certbot and lego.
func createACMEEAB(ctx context.Context, dataDir, patterns string) error {
	names := splitList([]string{patterns})
	if len(names) == 0 {
		return errors.New("usage: wicket token create acme NAME-PATTERN (a DNS name or *.suffix the account may order)")
	}
	c, err := adminClient(dataDir)
	if err != nil {
		return err
	}
	defer c.Close()
	k, err := c.CreateACMEEAB(ctx, names)
	if err != nil {
		if errors.Is(err, gateway.ErrGatewayUnreachable) {
			return err
		}
		return fmt.Errorf("create an ACME EAB key for %s: %w", strings.Join(names, ","), err)
	}
	_, err = fmt.Fprintf(os.Stdout, "eab-kid: %s\neab-hmac-key: %s\n", k.KeyID, k.HMACKey)
	return err
}

// changeACMEHosts is `wicket agents allow|disallow NAME --acme-hosts H1,H2`.
func changeACMEHosts(ctx context.Context, dataDir, action, agent string, names []string) error {
	c, err := adminClient(dataDir)
	if err != nil {
		return err
	}
	defer c.Close()
	var gr gateway.GrantResult
	if action == "allow" {
		gr, err = c.AllowACMEHosts(ctx, agent, names)
	} else {
		gr, err = c.DisallowACMEHosts(ctx, agent, names)
	}
	if err != nil {
		if errors.Is(err, gateway.ErrGatewayUnreachable) {
			return err
		}
		return fmt.Errorf("%s ACME hosts for agent %s: %w", action, agent, err)
	}
	note := ""
	if !gr.Changed {
		note = " (unchanged)"
	}
	_, err = fmt.Printf("agent %s may vouch for ACME hosts: %s%s\n", gr.Agent, dash(strings.Join(gr.Allowed, ",")), note)
	return err
}

// parseACMEHosts turns --acme-host NAME=ADDR values into a map; agent.Run validates them.
func parseACMEHosts(values []string) (map[string]string, error) {
	out := map[string]string{}
	for _, v := range values {
		name, addr, ok := strings.Cut(v, "=")
		if !ok || name == "" || addr == "" {
			return nil, fmt.Errorf("--acme-host %q: want NAME=ADDR, e.g. grafana.corp=127.0.0.1", v)
		}
		if _, _, err := agent.ParseACMEHostAddr(addr); err != nil {
			return nil, fmt.Errorf("--acme-host %s: %w", name, err)
		}
		out[name] = addr
	}
	return out, nil
}
