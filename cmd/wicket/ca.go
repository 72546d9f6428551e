package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"slices"
	"strings"

	"github.com/wicketgw/wicket/gateway"
)

func init() {
	register("ca", "wicket ca status [--json]   (the root to trust and the ACME server's directory URL)", runCA)
}

func runCA(ctx context.Context, args []string) error {
	fs := newFlagSet("ca")
	dataDir := dataDirFlag(fs)
	asJSON := fs.Bool("json", false, "print JSON for scripts")
	pos, err := parseInterspersed(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 || pos[0] != "status" {
		return errors.New("usage: wicket ca status [--json]")
	}
	c, err := adminClient(*dataDir)
	if err != nil {
		return err
	}
	defer c.Close()
	st, err := c.ACMEStatus(ctx)
	if err != nil {
		return err
	}
	if *asJSON {
		return printJSON(os.Stdout, map[string]any{"acme": st})
	}
	return printACMEStatus(os.Stdout, st)
}

func printACMEStatus(w io.Writer, st gateway.ACMEStatus) error {
	var b strings.Builder
	fmt.Fprintf(&b, "root:             %s\n", st.RootFile)
	fmt.Fprintf(&b, "root fingerprint: %s\n", st.RootFingerprint)
	if !st.Enabled {
		b.WriteString("acme:             off (start the gateway with --acme-server --acme-names PATTERNS)\n")
	} else {
		fmt.Fprintf(&b, "acme directory:   %s\n", st.DirectoryURL)
		fmt.Fprintf(&b, "acme names:       %s\n", strings.Join(st.Names, ","))
		fmt.Fprintf(&b, "acme eab:         %v\n", st.RequireEAB)
		fmt.Fprintf(&b, "acme challenges:  %s\n", strings.Join(st.Challenges, ","))
		fmt.Fprintf(&b, "acme lifetime:    %s\n", st.CertLifetime)
	}
	for _, agent := range slices.Sorted(maps.Keys(st.ACMEHosts)) {
		fmt.Fprintf(&b, "acme hosts of agent %s: %s\n", agent, strings.Join(st.ACMEHosts[agent], ","))
	}
	_, err := io.WriteString(w, b.String())
	return err
}
