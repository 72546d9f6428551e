// Package agent is the Wicket agent: it enrolls with a one-time token (or
// restarts from its stored identity), dials OUT to the gateway, keeps one
// mutually authenticated tunnel session up with reconnect backoff, and
// serves the gateway's stream-open requests for the resources it was started
// with, by dialing them. It renews its certificate at about 2/3 of its
// lifetime and moves to a new session make-before-break, so no stream fails
// because of a renewal.
//
// What it must NOT do: dial anything that is not in Config.Expose or the
// latest list from Config.ExposeUpdates (the
// gateway names a resource, never an address, so a compromised gateway
// cannot use an agent to reach anything else); accept inbound connections;
// log a token or a key; keep running on an expired or revoked certificate.
package agent

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/wicketgw/wicket/agent/identity"
	"github.com/wicketgw/wicket/agent/internal/keeper"
	"github.com/wicketgw/wicket/ca"
	"github.com/wicketgw/wicket/tunnel"
	"github.com/wicketgw/wicket/tunnel/pgwire"
)

// Config configures an agent.
type Config struct {
	// DataDir holds the agent's identity (key, certificate chain, pinned root,
	// gateway URL). Required. Created 0700 on enrollment.
	DataDir string
	// Token is a one-time agent token from `wicket token create agent NAME`.
	// Empty: restart from the identity stored in DataDir. With a token and
	// an identity already in DataDir:
	//   - the same token that enrolled it (a restart of a unit file that still
	//     passes --token): the stored identity is used, the token ignored;
	//   - a token for the same agent and gateway: the agent enrolls again and
	//     replaces the stored identity (the way back after revocation or
	//     expiry); if that token turns out to be spent or expired while the
	//     stored certificate is still valid, the stored identity is used;
	//   - a token for another agent or gateway: an error, nothing is touched
	//     (use another DataDir, or delete this one).
	Token string
	// Expose maps a resource name (a DNS label) to the host:port the agent
	// dials for it. The only addresses the agent ever dials. Empty: the list
	// kept in DataDir/agent.json (ConfigFile) by an earlier run. A list given
	// here replaces the kept one.
	Expose map[string]string
	// ExposeUpdates, if set, delivers later versions of Expose (`wicket
	// agent` sends one on SIGHUP after re-reading its configuration). Each
	// replaces the whole list once validated like Expose (an invalid one is
	// logged and ignored): new streams use it at once, streams already open
	// keep their connection, and the gateway learns it from a later Hello on
	// a new control stream, without the session being interrupted.
	ExposeUpdates <-chan map[string]string
	// ACMEHosts maps DNS names this agent vouches for in ACME validation to the address
	// validation connections for them are sent to (ParseACMEHostAddr: HOST, or
	// HOST:HTTP01PORT[:TLSALPN01PORT]). The gateway routes them here only for names its
	// administrator allowed this agent name (`wicket agents allow NAME --acme-hosts`).
	// Default none.
	ACMEHosts map[string]string
	// Tunnel holds the session knobs. Zero: tunnel.DefaultConfig().
	Tunnel tunnel.Config
	// DialTimeout bounds dialing a resource. Default 10s.
	DialTimeout time.Duration
	// HelloTimeout bounds the hello exchange of a new session. Default 15s.
	HelloTimeout time.Duration
	// DrainTimeout bounds how long a session replaced after a renewal keeps
	// serving the streams it already carries. Zero (default): until its last
	// stream ends or its certificate expires, whichever comes first (the
	// gateway closes a session at its certificate's expiry anyway).
	DrainTimeout time.Duration
	// GracePeriod is how long streams in flight may finish when ctx ends:
	// the agent first tells the gateway to open no new streams on its
	// session (go-away, so another agent of the same name takes them), then
	// closes it when its streams have ended or the period has passed. Zero
	// (default): close at once.
	GracePeriod time.Duration
	// RenewPeriod, when > 0, renews the certificate every RenewPeriod
	// instead of at about 2/3 of its lifetime (identity.RenewerConfig.Period).
	// For tests and demos. Default 0: off.
	RenewPeriod time.Duration
	// Reconnect is the backoff between connection attempts. Nil: 500 ms
	// doubling up to 30 s with full jitter, reset as soon as a session is
	// established and the gateway has answered the hello.
	Reconnect *tunnel.Backoff
	// Version is announced in the hello. Default "dev".
	Version string
	// Logger receives the agent's events. Default: discard.
	Logger *slog.Logger

	// Now and After are the clock, for renewal scheduling, backoff waits and
	// drain bounds. Defaults time.Now and time.After; tests inject a fake.
	Now   func() time.Time
	After func(time.Duration) <-chan time.Time
	// Enroll and Renew talk to the CA. Defaults ca.Enroll and ca.Renew.
	Enroll func(ctx context.Context, token string) (*ca.Credentials, error)
	Renew  func(ctx context.Context, baseURL string, cur *ca.Credentials) (*ca.Credentials, error)
	// EnrollACME and RenewACME enroll and renew by ACME, for a Token that is an ACME
	// enrollment credential (`wicket token create agent NAME --acme`) and the
	// identity it enrolled. Defaults ca.EnrollACME and ca.RenewACME.
	EnrollACME func(ctx context.Context, cred ca.ACMECredential) (*ca.Credentials, crypto.Signer, error)
	RenewACME  func(ctx context.Context, baseURL string, accountKey crypto.Signer, cur *ca.Credentials) (*ca.Credentials, error)
	// Stats, when set, receives the agent's counters (for metrics). Default nil: a private
	// one nobody reads.
	Stats *Stats
}

// goAwayDelay is how long a session replaced after a renewal keeps
// accepting new streams before it tells the gateway to stop opening them.
const goAwayDelay = time.Second

// ErrConfig marks an invalid Config.
var ErrConfig = errors.New("invalid agent configuration")

// validateExpose checks a list of exposed resources: at least one, each a valid name and a
// HOST:PORT (raw TCP) or a postgres:// URL (pgwire.ParseURL).
func validateExpose(expose map[string]string) error {
	_, err := resolveExpose(expose)
	return err
}

// resolveExpose checks a list of exposed resources and parses its postgres:// targets.
func resolveExpose(expose map[string]string) (map[string]*pgwire.Target, error) {
	if len(expose) == 0 {
		return nil, fmt.Errorf("%w: expose at least one resource (--expose NAME=HOST:PORT)", ErrConfig)
	}
	pg := map[string]*pgwire.Target{}
	for name, addr := range expose {
		if err := ca.ValidName(name); err != nil {
			return nil, fmt.Errorf("%w: resource name: %v", ErrConfig, err)
		}
		if pgwire.IsURL(addr) {
			t, err := pgwire.ParseURL(addr)
			if err != nil {
				return nil, fmt.Errorf("%w: resource %s: %v", ErrConfig, name, err)
			}
			pg[name] = t
			continue
		}
		host, port, err := net.SplitHostPort(addr)
		if err != nil || host == "" || port == "" {
			return nil, fmt.Errorf("%w: resource %s: %q is not HOST:PORT or postgres://HOST:PORT", ErrConfig, name, addr)
		}
	}
	return pg, nil
}

// exposure is one version of the exposed resources: what handle dials and hellos announce.
type exposure struct {
	targets map[string]string
	names   []string                  // sorted
	pg      map[string]*pgwire.Target // the PostgreSQL resources, by name
}

// newExposure makes the exposure of a list validateExpose accepted.
func newExposure(m map[string]string) *exposure {
	pg, err := resolveExpose(m)
	if err != nil {
		panic("agent: newExposure of an unchecked list: " + err.Error())
	}
	return &exposure{targets: maps.Clone(m), names: slices.Sorted(maps.Keys(m)), pg: pg}
}

// hello is the Hello that announces this exposure: the resource names and, for each
// PostgreSQL resource, its protocol and whether it records statement texts.
func (e *exposure) hello() tunnel.Hello {
	h := tunnel.Hello{Resources: e.names}
	for _, name := range e.names {
		t, ok := e.pg[name]
		if !ok {
			continue
		}
		if h.Protocols == nil {
			h.Protocols = map[string]string{}
		}
		h.Protocols[name] = tunnel.ProtocolPostgres
		if t.RecordText {
			h.RecordText = append(h.RecordText, name)
		}
	}
	return h
}

func (c *Config) setDefaults() error {
	if c.DataDir == "" {
		return fmt.Errorf("%w: a data directory is required (--data-dir or WICKET_DATA_DIR)", ErrConfig)
	}
	if len(c.Expose) == 0 {
		stored, err := loadStoredExpose(c.DataDir)
		if err != nil {
			return err
		}
		if len(stored) == 0 {
			return fmt.Errorf("%w: expose at least one resource (--expose NAME=HOST:PORT); %s holds no list from an earlier run",
				ErrConfig, filepath.Join(c.DataDir, ConfigFile))
		}
		c.Expose = stored
	}
	if err := validateExpose(c.Expose); err != nil {
		return err
	}
	if _, err := validateACMEHosts(c.ACMEHosts); err != nil {
		return err
	}
	if c.Tunnel == (tunnel.Config{}) {
		c.Tunnel = tunnel.DefaultConfig()
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Tunnel.Logger == nil {
		c.Tunnel.Logger = c.Logger
	}
	if err := c.Tunnel.Verify(); err != nil {
		return fmt.Errorf("%w: %v", ErrConfig, err)
	}
	if c.DialTimeout <= 0 {
		c.DialTimeout = 10 * time.Second
	}
	if c.HelloTimeout <= 0 {
		c.HelloTimeout = 15 * time.Second
	}
	if c.Reconnect == nil {
		c.Reconnect = &tunnel.Backoff{}
	}
	if c.Version == "" {
		c.Version = "dev"
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	if c.After == nil {
		c.After = time.After
	}
	if c.Enroll == nil {
		c.Enroll = ca.Enroll
	}
	if c.EnrollACME == nil {
		c.EnrollACME = ca.EnrollACME
	}
	if c.RenewACME == nil {
		c.RenewACME = ca.RenewACME
	}
	if c.Renew == nil {
		c.Renew = ca.Renew
	}
	return nil
}

// Run runs the agent until ctx ends (then it returns nil) or it cannot go on:
// a configuration or enrollment error, or a terminal certificate state (an
// *identity.ExpiredError or *identity.RevokedError, whose text tells the
// operator to enroll again with a new token). Connection failures are not
// terminal: the agent reconnects with backoff and logs why.
func Run(ctx context.Context, cfg Config) error {
	if err := cfg.setDefaults(); err != nil {
		return err
	}
	stored, err := obtainIdentity(ctx, &cfg)
	if err != nil {
		return err
	}
	a, err := newAgent(cfg, stored)
	if err != nil {
		return err
	}
	return a.run(ctx)
}

// agent is one running agent process.
type agent struct {
	cfg      Config
	log      *slog.Logger
	meta     identity.Meta
	renewer  *identity.Renewer
	addr     string
	roots    *x509.CertPool
	host     string
	instance string
	exposed  atomic.Pointer[exposure]
	announce chan struct{} // the exposed resources changed: send the gateway a later Hello

	drains       sync.WaitGroup // sessions being drained after a switch
	lastDiagnose time.Time

	// acmeHosts are the names declared for ACME validation (Config.ACMEHosts), fixed.
	acmeHosts map[string]acmeTarget
}

func newAgent(cfg Config, stored *identity.Stored) (*agent, error) {
	addr, host, roots, err := stored.Gateway()
	if err != nil {
		return nil, fmt.Errorf("%w (in %s): enroll again with a new token", err, cfg.DataDir)
	}
	var inst [8]byte
	_, _ = rand.Read(inst[:])
	log := cfg.Logger.With("agent", stored.Name)
	if cfg.Stats == nil {
		cfg.Stats = &Stats{}
	}
	stats, renew := cfg.Stats, cfg.Renew
	if stored.ACME {
		accountKey, renewACME := stored.ACMEAccountKey, cfg.RenewACME
		renew = func(ctx context.Context, baseURL string, cur *ca.Credentials) (*ca.Credentials, error) {
			return renewACME(ctx, baseURL, accountKey, cur)
		}
	}
	stats.setCertExpires(stored.Creds.Chain[0].NotAfter)
	countedRenew := func(ctx context.Context, baseURL string, cur *ca.Credentials) (*ca.Credentials, error) {
		c, err := renew(ctx, baseURL, cur)
		if err != nil {
			stats.RenewalsFailed.Add(1)
			return c, err
		}
		stats.RenewalsOK.Add(1)
		if c != nil && len(c.Chain) > 0 {
			stats.setCertExpires(c.Chain[0].NotAfter)
		}
		return c, nil
	}
	acmeHosts, err := validateACMEHosts(cfg.ACMEHosts)
	if err != nil {
		return nil, err
	}
	a := &agent{
		cfg:  cfg,
		log:  log,
		meta: stored.Meta,
		renewer: identity.NewRenewer(stored, identity.RenewerConfig{
			Dir: cfg.DataDir, Renew: countedRenew, Logger: log, Now: cfg.Now, After: cfg.After, Period: cfg.RenewPeriod,
		}),
		addr:     addr,
		roots:    roots,
		host:     host,
		instance: hex.EncodeToString(inst[:]),
		announce: make(chan struct{}, 1),
	}
	a.exposed.Store(newExposure(cfg.Expose))
	a.acmeHosts = acmeHosts
	return a, nil
}

func (a *agent) run(ctx context.Context) error {
	leaf := a.renewer.Current().Chain[0]
	a.saveStoredConfig(a.exposed.Load().targets)
	a.log.Info("agent starting", "gateway", a.meta.URL, "resources", a.exposed.Load().names, "instance", a.instance,
		"cert_expires", leaf.NotAfter.UTC().Format(time.RFC3339))

	rctx, stop := context.WithCancelCause(ctx)
	defer stop(nil)
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		a.watchExpose(rctx)
	}()
	go func() {
		defer wg.Done()
		if err := a.renewer.Run(rctx); err != nil && rctx.Err() == nil {
			stop(err) // expired or revoked: nothing more this process can do
		}
	}()
	if err := keeper.Run(rctx, a.keeperConfig()); err != nil {
		stop(err) // expired or revoked: nothing more this process can do
	}
	stop(nil)
	wg.Wait()
	a.drains.Wait()
	if err := context.Cause(rctx); ctx.Err() == nil && err != nil && !errors.Is(err, context.Canceled) {
		a.log.Error("agent stopped", "err", err)
		return err
	}
	a.log.Info("agent stopped")
	return nil
}

// keeperConfig wires the agent into the keep-a-session loop: a session is
// established once the gateway has answered the hello, it is replaced
// make-before-break after each renewal, and the one replaced drains in the
// background.
func (a *agent) keeperConfig() keeper.Config[*session] {
	return keeper.Config[*session]{
		Check: func() error {
			return identity.CheckValid(&identity.Stored{Creds: a.renewer.Current()}, a.cfg.Now())
		},
		Dial: a.dialSession,
		DialFailed: func(ctx context.Context, err error) error {
			return a.diagnose(ctx, err)
		},
		Up: func(s *session) {
			a.log.Info("connected to the gateway", "gateway", a.addr, "session", s.gatewaySession,
				"local", s.sess.LocalAddr().String(), "cert_expires", s.leaf.NotAfter.UTC().Format(time.RFC3339))
		},
		Switched: func(ctx context.Context, old, next *session) {
			a.log.Info("moved to a new session with the renewed certificate",
				"session", next.gatewaySession, "previous", old.gatewaySession,
				"cert_expires", next.leaf.NotAfter.UTC().Format(time.RFC3339), "draining_streams", old.streams.Active())
			a.drains.Add(1)
			go func() {
				defer a.drains.Done()
				a.drain(ctx, old)
			}()
		},
		SwitchFailed: func(err error) {
			a.log.Warn("could not open a session with the renewed certificate; the current session keeps serving",
				"err", err, "gateway", a.addr)
		},
		Down: func(s *session, cause error) {
			if errors.Is(cause, context.Canceled) && a.cfg.GracePeriod > 0 && s.streams.Active() > 0 {
				a.log.Info("stopping: letting streams in flight finish", "streams", s.streams.Active(), "grace_period", a.cfg.GracePeriod)
				if err := s.sess.GoAway(); err != nil {
					a.log.Debug("go-away failed", "err", err)
				}
				a.waitGrace(s)
			}
			s.close()
		},
		Retrying: func(err error, wait time.Duration) {
			a.cfg.Stats.Reconnects.Add(1)
			a.log.Warn(fmt.Sprintf("no session to the gateway; reconnecting in %s", wait.Round(time.Millisecond)),
				"reason", err, "gateway", a.addr)
		},
		Renewed: a.renewer.Updates(),
		Poke:    a.announce,
		Poked:   a.announceResources,
		Backoff: a.cfg.Reconnect,
		After:   a.cfg.After,
	}
}

// watchExpose applies the lists from Config.ExposeUpdates until ctx ends.
func (a *agent) watchExpose(ctx context.Context) {
	for {
		var m map[string]string
		select {
		case <-ctx.Done():
			return
		case m = <-a.cfg.ExposeUpdates:
		}
		cur := a.exposed.Load()
		if err := validateExpose(m); err != nil {
			a.log.Warn("ignored the new list of resources; the previous one stays in force", "err", err, "resources", cur.names)
			continue
		}
		if maps.Equal(m, cur.targets) {
			a.log.Info("the list of resources is unchanged", "resources", cur.names)
			continue
		}
		next := newExposure(m)
		a.exposed.Store(next)
		a.log.Info("now exposing a new list of resources", "resources", next.names, "previous", cur.names)
		a.saveStoredConfig(next.targets)
		select {
		case a.announce <- struct{}{}:
		default: // an announcement is already pending; it will send the newest list
		}
	}
}

// helloMsg is the Hello this agent sends now: who it is and what it exposes.
func (a *agent) helloMsg() tunnel.Hello {
	h := a.exposed.Load().hello()
	h.Name, h.Instance, h.Version, h.ACMEHosts = a.meta.Name, a.instance, a.cfg.Version, a.acmeHostNames()
	return h
}

// announceResources tells the gateway the current list of resources with a later Hello on a
// new control stream of s (tunnel/PROTOCOL.md section 5). If that fails, the next session
// (after a reconnect or renewal) announces the list in its first Hello.
func (a *agent) announceResources(ctx context.Context, s *session) {
	ctx, cancel := context.WithTimeout(ctx, a.cfg.HelloTimeout)
	defer cancel()
	names := a.exposed.Load().names
	ctl, err := s.sess.OpenControl(ctx)
	if err == nil {
		err = ctl.Send(a.helloMsg())
		if err == nil {
			// The gateway answers with the resources it refuses; an older one closes instead.
			stop := context.AfterFunc(ctx, func() { ctl.Stream().SetReadDeadline(time.Unix(1, 0)) })
			var ack tunnel.Hello
			if ctl.Recv(&ack) == nil {
				logRefused(a.log.With("session", s.gatewaySession), ack.Refused)
			}
			stop()
		}
		ctl.Close()
	}
	if err != nil {
		a.log.Warn("could not tell the gateway the new list of resources; the next session will", "err", err, "session", s.gatewaySession)
		return
	}
	a.log.Info("told the gateway the new list of resources", "resources", names, "session", s.gatewaySession)
}

// drain stops new streams on s and closes it once its streams have ended,
// its certificate has expired, DrainTimeout has passed, or ctx ended.
func (a *agent) drain(ctx context.Context, s *session) {
	// The gateway may have picked s for a stream an instant before it
	// registered the new session; a go-away sent at once would make that
	// stream fail. The old session keeps serving for a moment first.
	select {
	case <-time.After(goAwayDelay):
	case <-s.sess.Done():
	case <-ctx.Done():
	}
	if err := s.sess.GoAway(); err != nil {
		a.log.Debug("go-away on the replaced session failed", "session", s.gatewaySession, "err", err)
	}
	bound := s.leaf.NotAfter.Sub(a.cfg.Now())
	if a.cfg.DrainTimeout > 0 && a.cfg.DrainTimeout < bound {
		bound = a.cfg.DrainTimeout
	}
	reason := "its streams ended"
	timeout := a.cfg.After(bound)
	select {
	case <-a.idle(s):
	case <-s.sess.Done():
		reason = "the gateway closed it"
	case <-ctx.Done():
		reason = "the agent is stopping"
		a.waitGrace(s)
	case <-timeout:
		reason = fmt.Sprintf("the drain bound (%s) passed", bound.Round(time.Second))
	}
	left := s.streams.Active()
	s.close()
	a.log.Info("closed the replaced session", "session", s.gatewaySession, "reason", reason, "streams_cut", left)
}

// idle returns a channel closed once s carries no stream: none being served
// and none that the gateway opened just before our go-away and that is still
// waiting in the session's accept queue or having its header read (those are
// not counted by s.streams yet, but yamux counts them; the control stream is
// the one that stays). It polls yamux's count, only while draining.
func (a *agent) idle(s *session) <-chan struct{} {
	done := make(chan struct{})
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		defer close(done)
		for {
			select {
			case <-s.streams.Idle():
			case <-s.sess.Done():
				return
			}
			if s.sess.NumStreams() <= 1 && s.streams.Active() == 0 {
				return
			}
			select {
			case <-time.After(50 * time.Millisecond):
			case <-s.sess.Done():
				return
			}
		}
	}()
	return done
}

// waitGrace waits, at shutdown, until s has no stream in flight, s ended,
// or GracePeriod has passed.
func (a *agent) waitGrace(s *session) {
	if a.cfg.GracePeriod <= 0 {
		return
	}
	select {
	case <-a.idle(s):
	case <-s.sess.Done():
	case <-a.cfg.After(a.cfg.GracePeriod):
	}
}

// diagnose is called when a session could not be established; it returns a
// terminal error (revoked, expired) or nil. A gateway
// refuses a revoked or expired certificate with a bare TLS alert, which
// tunnel reports as a closed session; renewing tells why: the CA answers
// "revoked" in words. At most once every 10 s, so a gateway that is merely
// restarting is not asked to renew on every attempt.
func (a *agent) diagnose(ctx context.Context, dialErr error) error {
	var se *sessionError
	if !errors.As(dialErr, &se) || se.stage == stageTCP {
		return nil // the gateway is unreachable: nothing to learn from the CA (it is the gateway)
	}
	now := a.cfg.Now()
	if !a.lastDiagnose.IsZero() && now.Sub(a.lastDiagnose) < 10*time.Second {
		return nil
	}
	a.lastDiagnose = now
	a.log.Info("the gateway refused the session; asking the CA about the certificate", "err", dialErr)
	err := a.renewer.RenewNow(ctx)
	switch {
	case err == nil:
		a.log.Info("the certificate was renewed; retrying with it")
	case errors.Is(err, identity.ErrRevoked), errors.Is(err, identity.ErrExpired):
		return err
	default:
		a.log.Debug("certificate check did not conclude", "err", err)
	}
	return nil
}
