package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/wicketgw/wicket/ca"
	"github.com/wicketgw/wicket/gateway"
)

func init() {
	register("token", "wicket token create agent NAME --resources R1,R2 [--ttl DUR] [--acme] | wicket token create user NAME [--ttl DUR] | wicket token create acme NAME-PATTERN", runToken)
	register("agents", agentsUsage, runAgents)
	register("users", "wicket users revoke NAME", runUsers)
	register("sessions", "wicket sessions list [--json]", runSessions)
}

// adminClient returns a client for the gateway whose data dir is dir.
func adminClient(dir string) (*gateway.AdminClient, error) {
	if dir == "" {
		return nil, errors.New("no data directory: pass --data-dir DIR (the gateway's) or set WICKET_DATA_DIR")
	}
	return gateway.NewAdminClient(dir), nil
}

// agentsUsage is the usage line of `wicket agents`.
const agentsUsage = "wicket agents list [--json] | wicket agents allow|disallow NAME --resources R1,R2 | " +
	"wicket agents allow|disallow NAME --acme-hosts H1,*.suffix | " +
	"wicket agents revoke NAME | wicket agents forget NAME"

// resourcesFlag is the comma-separated --resources list of token create and agents allow.
func resourcesFlag(fs interface {
	String(name, value, usage string) *string
}, usage string) func() ([]string, error) {
	v := fs.String("resources", "", usage)
	return func() ([]string, error) {
		var out []string
		for _, r := range strings.Split(*v, ",") {
			if r = strings.TrimSpace(r); r == "" {
				continue
			}
			if err := ca.ValidName(r); err != nil {
				return nil, fmt.Errorf("--resources: %w", err)
			}
			out = append(out, r)
		}
		return out, nil
	}
}

func runToken(ctx context.Context, args []string) error {
	fs := newFlagSet("token")
	dataDir := dataDirFlag(fs)
	resources := resourcesFlag(fs, "for an agent: the resources `R1,R2` this agent name may serve, "+
		"granted when the token is minted and added to any earlier grant; without it the agent serves nothing "+
		"(default deny) until an administrator runs: wicket agents allow NAME --resources R")
	ttl := fs.Duration("ttl", 15*time.Minute, "how long the token is valid after minting (1s to 24h), checked to the second by the gateway; usable once")
	useACME := fs.Bool("acme", false, "for an agent: an ACME enrollment credential (EAB key bound to the name) instead of a bootstrap token")
	pos, err := parseInterspersed(fs, args)
	if err != nil {
		return err
	}
	if len(pos) == 3 && pos[0] == "create" && pos[1] == "acme" {
		return createACMEEAB(ctx, *dataDir, pos[2])
	}
	if len(pos) != 3 || pos[0] != "create" || (pos[1] != "agent" && pos[1] != "user") {
		return errors.New("usage: wicket token create agent NAME --resources R1,R2 [--ttl DUR] [--acme] | wicket token create user NAME [--ttl DUR]")
	}
	if *useACME && pos[1] != "agent" {
		return errors.New("--acme is for agents only: wicket token create agent NAME --acme")
	}
	res, err := resources()
	if err != nil {
		return err
	}
	if len(res) > 0 && pos[1] != "agent" {
		return errors.New("--resources is for agents only: users are allowed resources by the policy file")
	}
	if len(res) == 0 && pos[1] == "agent" {
		fmt.Fprintf(os.Stderr, "note: no --resources: agent %s will serve nothing until `wicket agents allow %s --resources R`\n", pos[2], pos[2])
	}
	c, err := adminClient(*dataDir)
	if err != nil {
		return err
	}
	defer c.Close()
	var tok string
	if *useACME {
		tok, err = c.CreateACMECredential(ctx, pos[2], *ttl, res...)
	} else {
		tok, err = c.CreateToken(ctx, ca.Role(pos[1]), pos[2], *ttl, res...)
	}
	if err != nil {
		if errors.Is(err, gateway.ErrGatewayUnreachable) {
			return err
		}
		return fmt.Errorf("create a token for %s %s: %w", pos[1], pos[2], err)
	}
	_, err = fmt.Fprintln(os.Stdout, tok)
	return err
}

func runAgents(ctx context.Context, args []string) error {
	fs := newFlagSet("agents")
	dataDir := dataDirFlag(fs)
	asJSON := fs.Bool("json", false, "print JSON for scripts")
	resources := resourcesFlag(fs, "for allow and disallow: the resources `R1,R2` to grant to or withdraw from the agent name")
	acmeHosts := fs.String("acme-hosts", "", "for allow and disallow: DNS names or *.suffix patterns `H1,H2` the agent name may vouch for in ACME validation (wicket agent --acme-host)")
	pos, err := parseInterspersed(fs, args)
	if err != nil {
		return err
	}
	switch {
	case len(pos) == 2 && (pos[0] == "allow" || pos[0] == "disallow") && *acmeHosts != "":
		return changeACMEHosts(ctx, *dataDir, pos[0], pos[1], splitList([]string{*acmeHosts}))
	case len(pos) == 2 && (pos[0] == "allow" || pos[0] == "disallow"):
		res, err := resources()
		if err != nil {
			return err
		}
		if len(res) == 0 {
			return fmt.Errorf("name the resources: wicket agents %s %s --resources R1,R2", pos[0], pos[1])
		}
		c, err := adminClient(*dataDir)
		if err != nil {
			return err
		}
		defer c.Close()
		var gr gateway.GrantResult
		if pos[0] == "allow" {
			gr, err = c.AllowResources(ctx, pos[1], res)
		} else {
			gr, err = c.DisallowResources(ctx, pos[1], res)
		}
		if err != nil {
			if errors.Is(err, gateway.ErrGatewayUnreachable) {
				return err
			}
			return fmt.Errorf("%s resources for agent %s: %w", pos[0], pos[1], err)
		}
		note := ""
		if !gr.Changed {
			note = " (unchanged)"
		}
		_, err = fmt.Printf("agent %s may serve: %s%s\n", gr.Agent, dash(strings.Join(gr.Allowed, ",")), note)
		return err
	case len(pos) == 1 && pos[0] == "list":
		c, err := adminClient(*dataDir)
		if err != nil {
			return err
		}
		defer c.Close()
		agents, err := c.Agents(ctx)
		if err != nil {
			return err
		}
		if *asJSON {
			return printJSON(os.Stdout, agents)
		}
		return printAgents(os.Stdout, agents, time.Now())
	case len(pos) == 2 && pos[0] == "revoke":
		return revoke(ctx, *dataDir, ca.RoleAgent, pos[1])
	case len(pos) == 2 && pos[0] == "forget":
		c, err := adminClient(*dataDir)
		if err != nil {
			return err
		}
		defer c.Close()
		if err := c.ForgetAgent(ctx, pos[1]); err != nil {
			return err
		}
		_, err = fmt.Printf("forgot agent %s\n", pos[1])
		return err
	}
	return errors.New("usage: " + agentsUsage)
}

func runUsers(ctx context.Context, args []string) error {
	fs := newFlagSet("users")
	dataDir := dataDirFlag(fs)
	pos, err := parseInterspersed(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 2 || pos[0] != "revoke" {
		return errors.New("usage: wicket users revoke NAME")
	}
	return revoke(ctx, *dataDir, ca.RoleUser, pos[1])
}

func revoke(ctx context.Context, dataDir string, role ca.Role, name string) error {
	c, err := adminClient(dataDir)
	if err != nil {
		return err
	}
	defer c.Close()
	var res gateway.RevokeResult
	if role == ca.RoleAgent {
		res, err = c.RevokeAgent(ctx, name)
	} else {
		res, err = c.RevokeUser(ctx, name)
	}
	if err != nil {
		if errors.Is(err, gateway.ErrGatewayUnreachable) {
			return err
		}
		return fmt.Errorf("revoke %s %s: %w", role, name, err)
	}
	fmt.Printf("revoked %s %s: %d certificate(s), %d live session(s) closed\n", role, name, len(res.RevokedSerials), res.ClosedSessions)
	return nil
}

func runSessions(ctx context.Context, args []string) error {
	fs := newFlagSet("sessions")
	dataDir := dataDirFlag(fs)
	asJSON := fs.Bool("json", false, "print JSON for scripts")
	pos, err := parseInterspersed(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 || pos[0] != "list" {
		return errors.New("usage: wicket sessions list [--json]")
	}
	c, err := adminClient(*dataDir)
	if err != nil {
		return err
	}
	defer c.Close()
	sessions, err := c.Sessions(ctx)
	if err != nil {
		return err
	}
	if *asJSON {
		return printJSON(os.Stdout, sessions)
	}
	return printSessions(os.Stdout, sessions, time.Now())
}

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func printAgents(w io.Writer, agents []gateway.AgentInfo, now time.Time) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tSTATUS\tALLOWED\tSERVED\tREFUSED\tVERSION\tSINCE\tCERT EXPIRES IN")
	for _, a := range agents {
		served := make([]string, len(a.Resources))
		for i, name := range a.Resources {
			served[i] = name
			if p := a.Protocols[name]; p != "" {
				served[i] = name + " (" + p + ")" // followed and audited statement by statement
			}
		}
		res := dash(strings.Join(served, ","))
		allowed, refused := dash(strings.Join(a.Allowed, ",")), dash(strings.Join(a.Refused, ","))
		status := a.Status
		if a.Instances > 1 {
			status = fmt.Sprintf("%s (%d instances)", a.Status, a.Instances)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", a.Name, status, allowed, res, refused, dash(a.Version),
			ago(now, a.Since), until(now, a.CertExpires))
	}
	return tw.Flush()
}

func printSessions(w io.Writer, sessions []gateway.SessionInfo, now time.Time) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tUSER\tRESOURCE\tAGENT\tREMOTE\tSTARTED\tUP\tDOWN")
	for _, s := range sessions {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", s.ID, s.User, s.Resource, s.Agent, s.Remote,
			ago(now, s.Started), bytesHuman(s.BytesUp), bytesHuman(s.BytesDown))
	}
	return tw.Flush()
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func ago(now, t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return roundDuration(now.Sub(t)) + " ago"
}

func until(now, t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	d := t.Sub(now)
	if d <= 0 {
		return "expired"
	}
	return roundDuration(d)
}

func roundDuration(d time.Duration) string {
	switch {
	case d < time.Second:
		return "0s"
	case d < time.Minute:
		return d.Round(time.Second).String()
	case d < time.Hour:
		return fmt.Sprintf("%dm", int(d.Minutes()))
	case d < 48*time.Hour:
		return fmt.Sprintf("%dh%02dm", int(d.Hours()), int(d.Minutes())%60)
	}
	return fmt.Sprintf("%dd", int(d.Hours()/24))
}

func bytesHuman(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}
