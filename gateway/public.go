package gateway

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"strings"
	"time"

	"github.com/wicketgw/wicket/ca"
	"github.com/wicketgw/wicket/gateway/public"
	"github.com/wicketgw/wicket/tunnel"
)

// PublicConfig turns on the public HTTPS listener (package gateway/public): HTTP resources that
// agents expose, served at public host names with certificates from an ACME CA.
type PublicConfig struct {
	// Publish lists "RESOURCE=HOST[,public|users]" (public.ParsePublish): the resource an
	// agent exposes, the host name it is served at, and who may use it ("users", the default,
	// requires a Wicket user certificate and the policy's consent). Required.
	Publish []string
	// Listen is the HTTPS address. Default ":443".
	Listen string
	// HTTPListen is the plain HTTP address (http-01 challenges, redirects); "off" disables
	// it. Default ":80".
	HTTPListen string
	// ACMECA is the ACME directory URL; "" means Let's Encrypt, "internal" the gateway's
	// built-in CA (whose ACME provisioner is then allowed exactly the published host names).
	ACMECA string
	// Email is the ACME account contact. Default none.
	Email string
	// Listener and HTTPListener, if set, are used instead of binding Listen and HTTPListen
	// (tests, socket activation).
	Listener, HTTPListener net.Listener
}

// publishedHosts parses the published hosts and, for the internal CA, the names its ACME
// provisioner must allow.
func (c *PublicConfig) publishedHosts() (map[string]public.Host, []string, error) {
	hosts, err := public.ParsePublish(c.Publish)
	if err != nil {
		return nil, nil, err
	}
	if len(hosts) == 0 {
		return nil, nil, errors.New("the public listener needs at least one --publish RESOURCE=HOST")
	}
	var names []string
	if strings.EqualFold(c.ACMECA, "internal") {
		for h := range hosts {
			names = append(names, h)
		}
	}
	return hosts, names, nil
}

// newPublic builds the public listener once the CA is up.
func (g *Gateway) newPublic(hosts map[string]public.Host) (*public.Server, error) {
	pc := g.cfg.Public
	cfg := public.Config{
		Listen:       pc.Listen,
		Listener:     pc.Listener,
		HTTPListen:   pc.HTTPListen,
		HTTPListener: pc.HTTPListener,
		ACMECA:       pc.ACMECA,
		Email:        pc.Email,
		StorageDir:   filepath.Join(g.cfg.DataDir, "certmagic"),
		Hosts:        hosts,
		Dialer:       g,
		VerifyUser: func(chain []*x509.Certificate) (string, error) {
			id, err := g.authority.VerifyPeer(chain, ca.RoleUser)
			return id.Name, err
		},
		Allow:         func(user, resource string) bool { return g.decide(user, resource).Allowed },
		Audit:         g.record,
		ShutdownGrace: g.cfg.GracePeriod,
		Logger:        g.log.With("component", "public"),
	}
	if g.cfg.DB != "" {
		// The database is PostgreSQL (the CA accepts nothing else as --db): gateways sharing it
		// share their public certificates, ACME account and locks too.
		ctx, cancel := context.WithTimeout(g.bgCtx, 30*time.Second)
		st, err := public.NewPostgresStorage(ctx, g.cfg.DB)
		cancel()
		if err != nil {
			return nil, err
		}
		g.publicStorage = st
		cfg.Storage = st
	}
	if strings.EqualFold(pc.ACMECA, "internal") {
		cfg.ACMECA = "internal"
		cfg.Internal = public.InternalCA{DirectoryURL: g.authority.ACMEDirectoryURL(), Roots: g.authority.RootPool()}
	}
	s, err := public.New(cfg)
	if err != nil {
		return nil, fmt.Errorf("public listener: %w", err)
	}
	return s, nil
}

// DialResource opens a stream to an agent exposing resource; it is the public listener's
// public.StreamDialer. The public listener has checked who may use the resource.
func (g *Gateway) DialResource(ctx context.Context, resource string, meta public.Meta) (net.Conn, error) {
	if g.draining.Load() {
		return nil, errors.New("the gateway is shutting down")
	}
	_, st, err := g.openToAgent(ctx, resource, newID())
	if err != nil {
		return nil, err
	}
	return st, nil
}

// errNoAgent is returned by openToAgent when no online agent exposes the resource.
type errNoAgent struct {
	resource string
	offline  []string
}

func (e *errNoAgent) Error() string {
	if len(e.offline) > 0 {
		return fmt.Sprintf("resource %s is exposed by agent %s, which is offline", e.resource, strings.Join(e.offline, ", "))
	}
	return fmt.Sprintf("no connected agent exposes resource %s", e.resource)
}

// openToAgent opens a data stream for resource on the first candidate agent session that
// accepts it. An agent's refusal (unknown resource, dial failed) is returned as the
// *tunnel.ReplyError wrapped with the agent's name; a session that is draining or gone is
// skipped for the next candidate.
func (g *Gateway) openToAgent(ctx context.Context, resource, sessionID string) (*agentSession, *tunnel.Stream, error) {
	cands, offline := g.registry.candidates(resource)
	if len(cands) == 0 {
		return nil, nil, &errNoAgent{resource: resource, offline: offline}
	}
	var lastErr error
	start := time.Now()
	tried := map[*agentSession]bool{}
	// Two rounds: a session chosen here may go away (make-before-break renewal) before our
	// stream reaches it; by then the agent's new session is registered, so the candidates
	// are read once more before giving up.
	for round := 0; round < 2; round++ {
		if round == 1 {
			cands, _ = g.registry.candidates(resource)
		}
		for _, c := range cands {
			if tried[c] {
				continue
			}
			tried[c] = true
			st, err := c.sess.OpenStream(ctx, tunnel.Header{Version: tunnel.ProtocolVersion, Kind: tunnel.KindData,
				Resource: resource, SessionID: sessionID})
			if err == nil {
				g.counters.streamOpen.observe(time.Since(start).Seconds())
				return c, st, nil
			}
			var re *tunnel.ReplyError
			if errors.As(err, &re) {
				return c, nil, fmt.Errorf("agent %s: %w", c.name, re)
			}
			// Draining after a renewal (go-away) or gone: try the next candidate.
			lastErr = fmt.Errorf("agent %s: %w", c.name, err)
		}
		if ctx.Err() != nil {
			break
		}
	}
	return nil, nil, fmt.Errorf("could not open a stream for resource %s: %w", resource, lastErr)
}

// validationDialer routes the built-in CA's ACME validation connections for the published
// names to this gateway's own public listener (port 80 to its HTTP listener, anything else to
// its HTTPS listener), so --acme-ca internal works whatever ports the listener uses and
// wherever DNS points; other names are refused (the allow-list refuses them anyway).
func (g *Gateway) validationDialer(published map[string]public.Host) func(ctx context.Context, network, addr string) (net.Conn, error) {
	if len(published) == 0 {
		return nil
	}
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		host, port, err := net.SplitHostPort(addr)
		if err != nil {
			return nil, err
		}
		if _, ok := published[strings.ToLower(host)]; !ok || g.public == nil {
			return nil, fmt.Errorf("ACME validation of %s: not a name this gateway publishes", host)
		}
		to := g.public.Addr()
		if port == "80" && g.public.HTTPAddr() != nil {
			to = g.public.HTTPAddr()
		}
		var d net.Dialer
		return d.DialContext(ctx, "tcp", to.String())
	}
}
