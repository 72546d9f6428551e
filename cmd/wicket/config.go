package main

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/url"
	"os"
	"sort"
	"strings"

	"gopkg.in/yaml.v3"
)

// Configuration layering, shared by every command.
//
// One name per setting, three places to say it: the flag (--data-dir), the
// environment (WICKET_DATA_DIR) and the YAML config file (data-dir: ...).
// A flag on the command line wins over the environment, which wins over the
// file, which wins over the built-in default. The file is named by --config
// (when the command has it) or WICKET_CONFIG. Keys are exactly the flag
// names, so the docs of a flag are the docs of its key, and an unknown key is
// an error that names it: a typo never silently falls back to a default.

// repeatable is implemented by flag values that collect several occurrences
// (--expose a=b --expose c=d). In the environment they are comma-separated;
// in the file they are a YAML list.
type repeatable interface {
	flag.Value
	repeatable()
}

// stringList is a repeatable string flag.
type stringList []string

func (s *stringList) String() string { return strings.Join(*s, ",") }
func (s *stringList) Set(v string) error {
	*s = append(*s, v)
	return nil
}
func (s *stringList) repeatable() {}

// envName is the environment variable for a flag: data-dir -> WICKET_DATA_DIR.
func envName(flagName string) string {
	return "WICKET_" + strings.ToUpper(strings.ReplaceAll(flagName, "-", "_"))
}

// secretFlag reports whether a flag's value must never be printed.
func secretFlag(name string) bool {
	for _, s := range []string{"password", "token", "secret", "key"} {
		if strings.Contains(name, s) && !strings.HasSuffix(name, "-file") {
			return true
		}
	}
	return false
}

// parseFlags parses args into fs and applies the environment and the config
// file to every flag the command line did not set. It returns the positional
// arguments (flags may come before or after them).
func parseFlags(fs *flag.FlagSet, args []string) ([]string, error) {
	pos, err := parseInterspersed(fs, args)
	if err != nil {
		return nil, err
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })

	var envErr error
	fs.VisitAll(func(f *flag.Flag) {
		if set[f.Name] || envErr != nil {
			return
		}
		v, ok := os.LookupEnv(envName(f.Name))
		if !ok || v == "" {
			return
		}
		vals := []string{v}
		if _, rep := f.Value.(repeatable); rep {
			vals = strings.Split(v, ",")
		}
		for _, one := range vals {
			if err := fs.Set(f.Name, strings.TrimSpace(one)); err != nil {
				envErr = fmt.Errorf("environment variable %s: %v", envName(f.Name), err)
				return
			}
		}
		set[f.Name] = true
	})
	if envErr != nil {
		return nil, envErr
	}

	path := os.Getenv("WICKET_CONFIG")
	if f := fs.Lookup("config"); f != nil && f.Value.String() != "" {
		path = f.Value.String()
	}
	if path == "" {
		return pos, nil
	}
	if err := applyConfigFile(fs, path, set); err != nil {
		return nil, err
	}
	return pos, nil
}

// applyConfigFile sets every flag named in the YAML file at path that is not
// in set.
func applyConfigFile(fs *flag.FlagSet, path string, set map[string]bool) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("read config file: %w", err)
	}
	var doc map[string]yaml.Node
	dec := yaml.NewDecoder(bytes.NewReader(data))
	if err := dec.Decode(&doc); err != nil && !errors.Is(err, io.EOF) {
		return fmt.Errorf("config file %s is not valid YAML: %v", path, err)
	}
	keys := make([]string, 0, len(doc))
	for k := range doc {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		node := doc[k]
		f := fs.Lookup(k)
		if f == nil || k == "config" {
			return fmt.Errorf("config file %s: unknown key %q at line %d (keys are the flag names of `%s -h`)", path, k, node.Line, fs.Name())
		}
		if set[k] {
			continue
		}
		var vals []string
		switch node.Kind {
		case yaml.ScalarNode:
			vals = []string{node.Value}
		case yaml.SequenceNode:
			if _, rep := f.Value.(repeatable); !rep {
				return fmt.Errorf("config file %s: key %q at line %d takes one value, not a list", path, k, node.Line)
			}
			for _, item := range node.Content {
				if item.Kind != yaml.ScalarNode {
					return fmt.Errorf("config file %s: key %q at line %d: list items must be plain values", path, k, item.Line)
				}
				vals = append(vals, item.Value)
			}
		default:
			return fmt.Errorf("config file %s: key %q at line %d must be a value or a list", path, k, node.Line)
		}
		for _, v := range vals {
			if err := fs.Set(k, v); err != nil {
				return fmt.Errorf("config file %s: key %q at line %d: %v", path, k, node.Line, err)
			}
		}
	}
	return nil
}

// redactURL hides the password of a URL-shaped value (a postgresql:// DSN)
// and any query parameter named like a secret.
func redactURL(v string) string {
	u, err := url.Parse(v)
	if err != nil {
		return "<redacted: unparsable URL>"
	}
	if _, has := u.User.Password(); has {
		u.User = url.UserPassword(u.User.Username(), "redacted")
	}
	q := u.Query()
	for k := range q {
		if secretFlag(strings.ToLower(k)) {
			q.Set(k, "redacted")
		}
	}
	u.RawQuery = q.Encode()
	return u.String()
}

// printConfig writes the effective configuration of fs as YAML, secrets
// redacted, in flag-name order: what `--print-config` shows.
func printConfig(w io.Writer, fs *flag.FlagSet) error {
	out := map[string]any{}
	fs.VisitAll(func(f *flag.Flag) {
		if f.Name == "print-config" || f.Name == "config" {
			return
		}
		v := f.Value.String()
		switch {
		case secretFlag(f.Name) && v != "":
			out[f.Name] = "<redacted>"
		case strings.Contains(v, "://"):
			out[f.Name] = redactURL(v)
		default:
			if r, ok := f.Value.(repeatable); ok {
				if r.String() == "" {
					out[f.Name] = []string{}
				} else {
					out[f.Name] = strings.Split(r.String(), ",")
				}
				return
			}
			out[f.Name] = v
		}
	})
	enc := yaml.NewEncoder(w)
	enc.SetIndent(2)
	if err := enc.Encode(out); err != nil {
		return err
	}
	return enc.Close()
}
