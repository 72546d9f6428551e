package main

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/wicketgw/wicket/agent/connect"
)

func init() {
	register("login", "wicket login --token TOKEN [--data-dir DIR]", runLogin)
}

func runLogin(ctx context.Context, args []string) error {
	fs := newFlagSet("login")
	fs.String("config", "", "YAML file with any of these flags as keys (env WICKET_CONFIG)")
	token := fs.String("token", "", "one-time user token from `wicket token create user NAME` (prefer WICKET_TOKEN or --token-file: a flag is visible in ps)")
	tokenFile := fs.String("token-file", "", "file holding the one-time user token")
	dataDir := fs.String("data-dir", "", "where the user identity is stored (env WICKET_DATA_DIR; default $WICKET_HOME, else ~/.wicket)")
	pos, err := parseFlags(fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return fmt.Errorf("unexpected argument %q; see `wicket login -h`", pos[0])
	}
	tok, err := readToken(*token, *tokenFile)
	if err != nil {
		return err
	}
	if tok == "" {
		return fmt.Errorf("a token is required: get one from `wicket token create user NAME` and pass --token or WICKET_TOKEN")
	}
	dir := *dataDir
	if dir == "" {
		if dir, err = connect.DefaultDataDir(); err != nil {
			return err
		}
	}
	s, err := connect.Login(ctx, tok, dir)
	if err != nil {
		return err
	}
	fmt.Fprintf(os.Stdout, "logged in as %s at %s; identity stored in %s, certificate valid until %s (renewed while `wicket connect` runs)\n",
		s.Name, s.URL, dir, s.Leaf().NotAfter.UTC().Format(time.RFC3339))
	return nil
}
