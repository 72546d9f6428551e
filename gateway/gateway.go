// Package gateway is Wicket's gateway: the one TLS 1.3 port with its ALPN router (agents on
// wicket-agent/1, users on wicket-client/1, the built-in CA's HTTP API on h2/http/1.1), the
// registry of connected agents, the handler that relays each user stream to an agent, the
// enforcement of identity on live sessions (closed at certificate expiry, and at once on
// revocation), the audit trail of all of it, and the admin API on <data-dir>/admin.sock.
//
// The gateway never reaches a resource itself: it only opens streams toward agents, which dial
// the resources they were started with. It must not relay a stream the policy does not allow
// (default deny: without a policy file nobody is allowed), must not keep a session whose
// certificate is expired or revoked, and must never write a token or a payload to a log or to
// the audit trail.
//
// # Where this departs from DESIGN.md, and why
//
//   - The gateway answers an agent's Hello with its own, sent only once the session is
//     registered: the agent then knows its new session is routable before it drains the old
//     one (no stream lost in a renewal).
//   - A later Hello (the agent's resources changed) comes on a new control stream rather than
//     on the first one, so the gateway serves everything an agent opens from one loop and an
//     idle agent session costs one gateway goroutine, that loop (serveAgent, agentLoop), which
//     sits in tunnel.Session.AcceptStream; a stream's header is read by a goroutine that lives
//     only while it reads (tunnel/PROTOCOL.md).
//   - Agents and users present their leaf certificate only; the gateway, being the CA, verifies
//     against its own intermediate (ca.Authority.VerifyPeer).
//   - The CA API's port requests a client certificate without requiring it, and the gateway
//     checks the chain itself, so a refused /renew says why instead of failing with a TLS alert.
//   - The last known state of every agent survives a restart in <data-dir>/agents.json
//     (AgentsFileName), and the audit log's head is logged as an anchor (logAuditAnchor).
//
// # Resource ownership
//
// Which agent names may serve which resources is decided at the gateway by an administrator,
// never by what an agent announces: holding an agent certificate must not let anyone capture
// the users of another agent's resource. The grants live in <data-dir>/grants.json
// (GrantsFileName; 0600, written atomically), keyed by agent name (the name in the agent's
// certificate), each value the list of resource names granted to it (grants.go):
//
//   - bound when the token is minted: `wicket token create agent NAME --resources a,b` adds a
//     and b to NAME's grant before the token is returned; without --resources the agent is
//     granted nothing and serves nothing (default deny);
//   - changed later through the admin socket without re-enrolling, `wicket agents allow|disallow
//     NAME --resources R` (audited grant.changed with the actor, the local user on the other end
//     of the socket by its peer credentials); a change applies to live sessions at once (a
//     disallowed resource gets no new streams; streams open now run on);
//   - each resource an agent's Hello (first or later) announces that is not granted to its
//     name is refused for that resource only (the others are served): it is not routed to
//     that session, it is counted (ClaimsRefused, wicket_agent_claims_refused_total), audited
//     as agent.claim_refused once per session and resource and at most once per
//     claimAuditEvery per agent name and resource across sessions, and sent back in the
//     gateway's Hello (tunnel.Hello.Refused) with the sentence the agent logs, which names
//     the command to run. Sessions of the same agent name share a granted resource,
//     round-robin, as before;
//   - an upgrade: a data dir without grants.json gets one at start, granting each agent known
//     from AgentsFileName the resources it was last seen serving, audited as one
//     grants.migrated record (migrateGrants). An agent with no recorded resources gets nothing.
//
// # When the audit log cannot be written
//
// Audit is part of access (DESIGN.md, "Failing closed"): the record of every access-creating
// event is written before the access exists, and the event is refused when it cannot be.
// While the audit log cannot be written (auditstate.go):
//
//   - a token is not minted: token.created is written before the token is returned, and the
//     admin gets one sentence naming the data directory's disk;
//   - an enrollment or renewal through the CA API is refused before step-ca signs (a token is
//     not spent), and a certificate signed just before the log broke is revoked when its
//     record fails, so none is valid without its record (caaudit.go); ACME finalize likewise;
//   - a new user stream is refused before the agent is asked to dial, and session.started is
//     on disk before the user is told OK, so no byte is relayed without it (users.go);
//   - `wicket agents allow` (a grant creates access) is refused, and a grant whose record
//     fails after the file was saved is taken back; `agents disallow` only removes access and
//     is never refused (its record is counted as lost);
//   - /readyz reports the "audit" check, and the metrics count the records not written.
//
// Sessions and connections already open are not cut: their start is on record. Records of
// events that cannot be refused (a session ending, a refused handshake) are lost and counted.
// The audit log reopens itself every second and, once it can write, states what was
// refused and lost in a log.gap record (gateway/audit's package doc has the trade-offs).
//
// # Handshake limits
//
// What an unauthenticated peer can hold on the port is bounded (handshakes.go):
//
//   - the first bytes of a ClientHello must arrive within 2 s of the connection
//     (firstBytesTimeout), the whole handshake within Config.HandshakeTimeout (10 s);
//   - at most 64 handshakes are in progress per source IP address (maxHandshakesPerSource):
//     a connection beyond that is closed at once and counted as refused ("too many
//     handshakes from one address");
//   - at most 1,024 are in progress in all (maxHandshakes); when that is full, a new
//     connection is still taken and the oldest handshake of the source with the most in
//     progress is closed to make room, so silent connections from a few sources cannot
//     keep agents, users and renewals from others out.
//
// On an established session, each stream's header is read in a goroutine of its own
// (bounded by the handshake timeout, at most 64 pending per session), so a stream whose
// header never arrives does not hold up the next stream on that session.
//
// At start, the gateway ends in the audit log what its previous run left open if that run
// stopped without a gateway.stopped record (killed, power lost): session.ended,
// user.disconnected and agent.disconnected with outcome gateway_crashed, then a
// gateway.crashed record (endPreviousRun), so every session.started has an end.
package gateway

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/wicketgw/wicket/ca"
	"github.com/wicketgw/wicket/gateway/audit"
	"github.com/wicketgw/wicket/gateway/policy"
	"github.com/wicketgw/wicket/gateway/public"
)

// Files inside the data directory.
const (
	AdminSocketName = "admin.sock"
	AuditLogName    = "audit.log"
	caDirName       = "ca"
)

// auditNoSyncForTests turns off the audit log's fsync per record. Only this package's tests
// set it (to keep them fast on a shared disk); production always syncs.
var auditNoSyncForTests = false

// auditFileForTests, when set, opens the audit log's file: this package's tests make it
// fail as a full disk would.
var auditFileForTests func(name string, flag int, perm os.FileMode) (audit.File, error)

// Limits on what unauthenticated peers can cost.
const (
	// refusedAuditRate and refusedAuditBurst bound the audit records (and log lines) of
	// refused handshakes: a burst of 100, then 10 per second. Every refusal is counted.
	refusedAuditRate  = 10
	refusedAuditBurst = 100
)

// gatewayID names the gateway's own certificate (spiffe://<td>/gateway/<id>) and its hello.
const gatewayID = "gateway"

// Gateway is a running gateway. Create it with New, serve with Run.
type Gateway struct {
	cfg        Config
	log        *slog.Logger
	clock      Clock
	publicAddr string

	authority *ca.Authority
	serverTLS *tls.Config // the port's TLS config, built once (see newServerTLS)

	agentsDirty chan struct{} // the registry changed: save the agents file (saveAgentsLoop)
	lastAnchor  atomic.Uint64 // the audit seq last logged as an anchor (logAuditAnchor)
	audit       *audit.Log
	auditState  auditState      // the audit log's last logged availability (auditstate.go)
	policy      *policy.Watcher // nil: deny everyone
	public      *public.Server  // nil: no public listener
	// publicStorage holds the public listener's certificates when the database is PostgreSQL.
	publicStorage *public.PostgresStorage

	ln      net.Listener
	httpLn  *memListener
	httpSrv *http.Server
	adminLn net.Listener
	admin   *http.Server

	registry *Registry
	// grants says which agent names may serve which resources (grants.go).
	grants *grantStore
	// claimLimit bounds the agent.claim_refused records across sessions (claimAuditEvery).
	claimLimit claimLimiter
	// acmeBinds holds agents' ACME validation connections (acmebind.go).
	acmeBinds acmeBinds
	peers     *peerIndex
	sessions  *sessionTable
	counters  counters
	// pgCancels maps the cancel keys given to PostgreSQL clients to their sessions (pgsessions.go).
	pgCancels cancelTable

	// The ACME server for internal names (acmeserver.go, acmehosts.go): its allow-list, who
	// may vouch for which names, and where their validations are routed.
	acmeNames      []string
	acmeHostGrants *grantStore
	acmeRoutes     acmeRoutes

	bgCtx    context.Context
	bgCancel context.CancelFunc
	wg       sync.WaitGroup // every goroutine the gateway starts
	draining atomic.Bool
	// handshakes bounds concurrent TLS handshakes, in all and per source (handshakes.go).
	handshakes *handshakeLimiter
	// refusedLimit rate-limits the log lines and audit records of refused handshakes.
	refusedLimit *rateLimit
	// caRefusedLimit does the same for refused CA requests (sign, renew).
	caRefusedLimit *rateLimit
	active         activeCount // user streams being relayed
	dbHealth       dbHealth    // the readiness check of the CA database

	revokeMu      sync.Mutex
	knownSerials  map[string]knownSerial // serial -> holder, to name who a revoked serial belonged to
	revokeAudited map[string]time.Time   // serials whose cert.revoked record is written, and when

	runOnce   sync.Once
	ran       atomic.Bool
	closeOnce sync.Once
	closeErr  error
}

// New prepares a gateway: it creates the data directory (0700) on first start, binds the TLS
// port and the admin socket, loads or creates the CA, opens the audit log and the policy. It
// serves nothing until Run. Call Close if Run is never called.
func New(ctx context.Context, cfg Config) (_ *Gateway, err error) {
	cfg, err = cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	// g is not the named result: a failing return sets that to nil before the deferred
	// release runs, which must still see what was acquired.
	g := &Gateway{
		cfg:            cfg,
		log:            cfg.Logger,
		clock:          cfg.Clock,
		registry:       NewRegistry(),
		agentsDirty:    make(chan struct{}, 1),
		peers:          newPeerIndex(),
		sessions:       newSessionTable(),
		knownSerials:   map[string]knownSerial{},
		handshakes:     newHandshakeLimiter(maxHandshakes, maxHandshakesPerSource),
		refusedLimit:   newRateLimit(refusedAuditRate, refusedAuditBurst),
		caRefusedLimit: newRateLimit(refusedAuditRate, refusedAuditBurst),
		revokeAudited:  map[string]time.Time{},
	}
	g.bgCtx, g.bgCancel = context.WithCancel(context.WithoutCancel(ctx))
	defer func() {
		if err != nil {
			g.release()
		}
	}()

	// What does not touch the data directory comes first, so that a start refused for a bad
	// address or policy leaves the data directory as it was (not even created).
	if err := checkListen(cfg.Listen); err != nil {
		return nil, err
	}
	if cfg.PolicyFile != "" {
		// Checked here, watched below once the audit log can record its reloads.
		if _, err := policy.Load(cfg.PolicyFile); err != nil {
			return nil, policyStartError(cfg.PolicyFile, err)
		}
	}
	g.ln, err = net.Listen("tcp", cfg.Listen)
	if err != nil {
		return nil, listenStartError(cfg.Listen, err)
	}

	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return nil, dataDirStartError(cfg.DataDir, err)
	}
	if fi, err := os.Stat(cfg.DataDir); err == nil && fi.Mode().Perm()&0o077 != 0 {
		g.log.Warn("data directory is readable by others; it holds the CA keys and the audit log, consider chmod 700",
			"dir", cfg.DataDir, "mode", fi.Mode().Perm().String())
	}

	g.publicAddr, err = publicAddress(cfg.PublicAddr, g.ln.Addr())
	if err != nil {
		return nil, err
	}
	host, _, _ := net.SplitHostPort(g.publicAddr)
	names := []string{host}
	if lh, _, _ := net.SplitHostPort(cfg.Listen); lh == "" || net.ParseIP(lh) != nil && net.ParseIP(lh).IsUnspecified() {
		names = append(names, "localhost", "127.0.0.1", "::1")
	}

	var (
		published   map[string]public.Host
		acmeAllowed []string
	)
	if cfg.Public != nil {
		if published, acmeAllowed, err = cfg.Public.publishedHosts(); err != nil {
			return nil, err
		}
	}

	g.audit, err = audit.OpenWithOptions(filepath.Join(cfg.DataDir, AuditLogName),
		audit.Options{Now: cfg.Clock.Now, NoSync: auditNoSyncForTests, OpenFile: auditFileForTests,
			OnStateChange: g.auditStateChanged})
	if err != nil {
		return nil, auditStartError(cfg.DataDir, err)
	}
	g.endPreviousRun()
	if err := g.prepareACMEServer(acmeAllowed); err != nil {
		return nil, err
	}

	g.authority, err = ca.New(ctx, ca.Config{
		DataDir:       filepath.Join(cfg.DataDir, caDirName),
		DB:            cfg.DB,
		Password:      cfg.CAPassword,
		PasswordFile:  cfg.CAPasswordFile,
		TrustDomain:   cfg.TrustDomain,
		URL:           "https://" + g.publicAddr,
		ServerNames:   names,
		GatewayID:     gatewayID,
		AgentLifetime: cfg.AgentLifetime,
		UserLifetime:  cfg.UserLifetime,
		Logger:        cfg.Logger.With("component", "ca"),
		Now:           cfg.Clock.Now,
		OnRevoke:      g.onRevoke,
		ACME: g.withACMEServer(ca.ACMEConfig{AllowedNames: acmeAllowed, DialContext: g.validationDialer(published),
			OnIssued: g.onACMEIssued}, published),
		OnGatewayCertificate: g.onGatewayCertificate,
		AgentACME: &ca.AgentACMEConfig{
			Dial: g.acmeDial, OnRefusal: g.onAgentACMERefusal, OnIssued: g.onAgentACMEIssued,
		},
	})
	if err != nil {
		return nil, fmt.Errorf("start the certificate authority: %w", err)
	}
	g.serverTLS = g.newServerTLS()
	g.loadAgents()
	var grantsExist bool
	if g.grants, grantsExist, err = loadGrants(cfg.DataDir); err != nil {
		return nil, err
	}
	g.registry.allowed = g.grants.allowed
	if !grantsExist {
		if err := g.migrateGrants(); err != nil {
			return nil, err
		}
	}

	if cfg.PolicyFile != "" {
		g.policy, err = policy.NewWatcher(g.bgCtx, policy.WatchConfig{
			Path:     cfg.PolicyFile,
			Interval: cfg.PolicyInterval,
			Logger:   cfg.Logger.With("component", "policy"),
			OnReload: g.policyReloaded,
		})
		if err != nil {
			return nil, policyStartError(cfg.PolicyFile, err)
		}
	} else {
		g.log.Warn("no policy file (--policy): every user is denied every resource (default deny)")
	}

	if cfg.Public != nil {
		if g.public, err = g.newPublic(published); err != nil {
			return nil, err
		}
	}

	g.adminLn, err = listenAdmin(filepath.Join(cfg.DataDir, AdminSocketName))
	if err != nil {
		return nil, err
	}

	g.httpLn = newMemListener(g.ln.Addr())
	g.httpSrv = &http.Server{
		Handler:           g.caAudit(g.authority.Handler()),
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       2 * time.Minute,
		ErrorLog:          slog.NewLogLogger(g.log.With("component", "ca-http").Handler(), slog.LevelDebug),
		BaseContext:       func(net.Listener) context.Context { return g.bgCtx },
	}
	g.admin = &http.Server{
		Handler: g.adminHandler(),
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			return context.WithValue(ctx, actorKey{}, peerActor(c))
		},
		ReadHeaderTimeout: 10 * time.Second,
		ErrorLog:          slog.NewLogLogger(g.log.With("component", "admin").Handler(), slog.LevelDebug),
	}
	return g, nil
}

// publicAddress derives HOST:PORT that agents and users dial.
func publicAddress(public string, ln net.Addr) (string, error) {
	_, lport, err := net.SplitHostPort(ln.String())
	if err != nil {
		return "", fmt.Errorf("listener address %s: %w", ln, err)
	}
	if public == "" {
		host := ln.(*net.TCPAddr).IP
		if host == nil || host.IsUnspecified() {
			return net.JoinHostPort("localhost", lport), nil
		}
		return net.JoinHostPort(host.String(), lport), nil
	}
	if h, p, err := net.SplitHostPort(public); err == nil {
		if h == "" {
			return "", fmt.Errorf("public address %q has no host", public)
		}
		if _, err := strconv.ParseUint(p, 10, 16); err != nil {
			return "", fmt.Errorf("public address %q has an invalid port", public)
		}
		return public, nil
	}
	return net.JoinHostPort(public, lport), nil
}

// listenAdmin binds the admin socket (0600), removing a stale one left by a crash but refusing
// to take over the socket of a gateway still running.
func listenAdmin(path string) (net.Listener, error) {
	if _, err := os.Lstat(path); err == nil {
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			_ = c.Close()
			return nil, fmt.Errorf("another gateway is already running with this data directory (%s answers)", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("remove stale admin socket %s: %w", path, err)
		}
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("listen on admin socket %s: %w", path, err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		_ = ln.Close()
		return nil, fmt.Errorf("restrict admin socket %s: %w", path, err)
	}
	return ln, nil
}

// Addr is the address the TLS port listens on.
func (g *Gateway) Addr() net.Addr { return g.ln.Addr() }

// PublicAddr is HOST:PORT written into tokens as the gateway's address.
func (g *Gateway) PublicAddr() string { return g.publicAddr }

// AdminSocket is the path of the admin API socket.
func (g *Gateway) AdminSocket() string { return filepath.Join(g.cfg.DataDir, AdminSocketName) }

// Authority is the gateway's built-in CA.
func (g *Gateway) Authority() *ca.Authority { return g.authority }

// Registry is the gateway's agent registry.
func (g *Gateway) Registry() *Registry { return g.registry }

// Counters returns a snapshot of the gateway's running totals.
func (g *Gateway) Counters() Counters { return g.counters.snapshot() }

// Sessions lists the user sessions being relayed now.
func (g *Gateway) Sessions() []SessionInfo { return g.sessions.list() }

// Run serves until ctx ends, then stops accepting, lets user streams finish for up to
// GracePeriod, closes every session and returns nil. Run may be called once.
func (g *Gateway) Run(ctx context.Context) error {
	started := false
	g.runOnce.Do(func() { started = true; g.ran.Store(true) })
	if !started {
		return errors.New("gateway: Run called twice")
	}
	acceptDone := make(chan struct{})
	g.goFunc(func() { defer close(acceptDone); g.acceptLoop() })
	g.goFunc(func() { _ = g.httpSrv.Serve(g.httpLn) })
	g.goFunc(func() { _ = g.admin.Serve(g.adminLn) })
	g.goFunc(g.sweepRevoked)
	g.goFunc(g.saveAgentsLoop)
	publicCtx, stopPublic := context.WithCancel(g.bgCtx)
	defer stopPublic()
	if g.public != nil {
		g.goFunc(func() {
			if err := g.public.Serve(publicCtx); err != nil {
				g.log.Error("public listener stopped", "err", err)
			}
		})
	}
	g.log.Info("listening", "addr", g.ln.Addr().String(), "public", g.publicAddr,
		"admin", g.AdminSocket(), "trust_domain", g.authority.TrustDomain())
	g.record(audit.Record{Type: audit.TypeGatewayStarted, Outcome: audit.OutcomeOK, Extra: map[string]string{
		"listen": g.ln.Addr().String(), "public": g.publicAddr, "version": g.cfg.Version,
		"policy": g.cfg.PolicyFile, "root_sha256": g.authority.RootFingerprint()}})
	g.logAuditAnchor()

	select {
	case <-ctx.Done():
	case <-g.bgCtx.Done(): // Close was called
	}
	g.log.Info("shutting down: no new connections, waiting for streams to finish", "grace", g.cfg.GracePeriod.String())
	// Close the port before refusing streams, so that anyone who sees a refusal for
	// shutdown also finds the port closed.
	_ = g.ln.Close()
	g.draining.Store(true)
	stopPublic() // it drains its own requests, for up to GracePeriod too
	<-acceptDone

	graceCtx, cancel := context.WithTimeout(context.Background(), g.cfg.GracePeriod)
	defer cancel()
	httpDone := make(chan struct{})
	go func() { defer close(httpDone); _ = g.httpSrv.Shutdown(graceCtx) }()
	select {
	case <-g.active.zero():
	case <-graceCtx.Done():
		g.log.Warn("grace period over: closing the streams still open", "streams", g.active.n())
	}
	cancel()
	<-httpDone
	return g.Close()
}

// Close stops everything at once: sessions, listeners, the CA, the audit log. Run calls it at
// the end; call it directly only if Run was never called.
func (g *Gateway) Close() error {
	g.closeOnce.Do(func() {
		g.draining.Store(true)
		g.bgCancel()
		_ = g.ln.Close()
		if g.public != nil {
			_ = g.public.Close()
		}
		g.peers.closeAll(reasonShutdown)
		g.acmeBinds.closeAll()
		_ = g.httpSrv.Close()
		_ = g.httpLn.Close()
		_ = g.admin.Close()
		_ = g.adminLn.Close()
		g.wg.Wait()
		if g.ran.Load() {
			if err := g.saveAgents(); err != nil {
				g.log.Warn("could not save the list of known agents", "file", AgentsFileName, "err", err)
			}
			g.record(audit.Record{Type: audit.TypeGatewayStopped, Outcome: audit.OutcomeOK})
			g.logAuditAnchor()
		}
		g.closeErr = g.release()
	})
	return g.closeErr
}

// release frees what New acquired; it runs once no goroutine of the gateway is left.
func (g *Gateway) release() error {
	g.bgCancel()
	var errs []error
	if g.public != nil {
		_ = g.public.Close()
	}
	if g.publicStorage != nil {
		g.publicStorage.Close()
	}
	if g.policy != nil {
		if err := g.policy.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close policy watcher: %w", err))
		}
	}
	if g.adminLn != nil {
		_ = g.adminLn.Close()
		_ = os.Remove(filepath.Join(g.cfg.DataDir, AdminSocketName))
	}
	if g.ln != nil {
		_ = g.ln.Close()
	}
	if g.authority != nil {
		if err := g.authority.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close the CA: %w", err))
		}
	}
	if g.audit != nil {
		if err := g.audit.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close the audit log: %w", err))
		}
	}
	return errors.Join(errs...)
}

func (g *Gateway) goFunc(f func()) {
	g.wg.Add(1)
	go func() {
		defer g.wg.Done()
		f()
	}()
}

// decide is the policy decision; without a policy file nobody is allowed.
func (g *Gateway) decide(user, resource string) policy.Decision {
	if g.policy == nil {
		return policy.Decision{}
	}
	return g.policy.Decide(user, resource)
}

// policyReloaded audits each change of the policy file: applied, or rejected and why.
func (g *Gateway) policyReloaded(err error) {
	r := audit.Record{Type: audit.TypePolicyReloaded, Outcome: audit.OutcomeOK,
		Extra: map[string]string{"path": g.cfg.PolicyFile}}
	if err != nil {
		r.Outcome, r.Reason = audit.OutcomeError, "the new policy was rejected, the previous one stays in force: "+err.Error()
	}
	g.record(r)
}

// record writes the audit record of an event that has happened or cannot be refused. A
// record the log cannot take is counted as lost in its next log.gap record, and logged;
// access-creating events use recordAccess instead (auditstate.go).
func (g *Gateway) record(r audit.Record) {
	if err := g.audit.Write(r); err != nil {
		g.logAuditFailure(r, err)
	}
}

// sweepRevoked re-checks the certificates of live sessions against the CA's revocation list,
// covering revocations that did not go through OnRevoke.
func (g *Gateway) sweepRevoked() {
	t := time.NewTicker(g.cfg.RevocationSweep)
	defer t.Stop()
	lastPrune, lastAnchor := time.Now(), time.Now()
	for {
		select {
		case <-g.bgCtx.Done():
			return
		case <-t.C:
		}
		if time.Since(lastPrune) > time.Minute {
			lastPrune = time.Now()
			g.pruneSerials(time.Now())
		}
		if time.Since(lastAnchor) > auditAnchorEvery {
			lastAnchor = time.Now()
			g.logAuditAnchor()
		}
		var revoked []string
		serials := g.peers.serials()
		if g.public != nil {
			serials = append(serials, g.public.UserSerials()...)
		}
		for _, s := range serials {
			ok, err := g.authority.IsRevoked(s)
			if err != nil {
				g.log.Warn("revocation check failed", "serial", s, "err", err)
				continue
			}
			if ok {
				revoked = append(revoked, s)
			}
		}
		if len(revoked) > 0 {
			g.onRevoke(revoked)
		}
	}
}

// onRevoke closes the live sessions of revoked serials at once, cuts the public listener's
// requests authorized by them, and audits each revocation.
// The CA calls it after every successful revocation, whatever the path.
func (g *Gateway) onRevoke(serials []string) {
	for _, p := range g.peers.closeSerials(serials, reasonRevoked) {
		g.counters.closedRevoked.Add(1)
		g.log.Info("closed session: certificate revoked", "identity", p.ident.String(), "serial", p.serial)
	}
	if g.public != nil {
		if n := g.public.Cut(serials); n > 0 {
			g.log.Info("cut public requests: user certificate revoked", "requests", n)
		}
	}
	for _, s := range serials {
		g.auditRevoked(s, ca.Identity{}, "certificate revoked")
	}
}

// auditRevoked writes one cert.revoked record per serial.
func (g *Gateway) auditRevoked(serial string, id ca.Identity, reason string) {
	g.revokeMu.Lock()
	if _, done := g.revokeAudited[serial]; done {
		g.revokeMu.Unlock()
		return
	}
	g.revokeAudited[serial] = time.Now()
	if id == (ca.Identity{}) {
		id = g.knownSerials[serial].id
	}
	g.revokeMu.Unlock()
	if id == (ca.Identity{}) {
		id, _ = g.peers.identityOf(serial)
	}
	g.counters.certs.inc("revoked", roleLabel(id.Role))
	r := audit.Record{Type: audit.TypeCertRevoked, Serial: serial, Reason: reason}
	setIdentity(&r, id)
	g.record(r)
}

// knownSerial is who holds a certificate, until when.
type knownSerial struct {
	id       ca.Identity
	notAfter time.Time
}

// rememberSerial notes who holds serial, so a later revocation record can name them.
func (g *Gateway) rememberSerial(serial string, id ca.Identity, notAfter time.Time) {
	g.revokeMu.Lock()
	defer g.revokeMu.Unlock()
	g.knownSerials[serial] = knownSerial{id: id, notAfter: notAfter}
}

// pruneSerials forgets certificates that expired (nobody revokes those) and audited
// revocations older than the longest lifetime, so the maps do not grow for ever.
func (g *Gateway) pruneSerials(now time.Time) {
	g.revokeMu.Lock()
	defer g.revokeMu.Unlock()
	for s, k := range g.knownSerials {
		if now.After(k.notAfter) {
			delete(g.knownSerials, s)
		}
	}
	for s, at := range g.revokeAudited {
		if now.Sub(at) > 25*time.Hour {
			delete(g.revokeAudited, s)
		}
	}
}

// setIdentity fills the identity fields of an audit record.
func setIdentity(r *audit.Record, id ca.Identity) {
	if id == (ca.Identity{}) {
		return
	}
	r.Identity = id.String()
	switch id.Role {
	case ca.RoleAgent:
		r.Agent = id.Name
	case ca.RoleUser:
		r.User = id.Name
	}
}

// auditAnchorEvery is how often the audit log's head is logged while it grows.
const auditAnchorEvery = 10 * time.Minute

// logAuditAnchor writes the audit log's head to the operational log as an "audit anchor"
// line: at start, every auditAnchorEvery while records are added, and at stop. The
// operational log usually leaves the host (journald, a log collector), where whoever can
// rewrite the audit file cannot follow; `wicket audit verify --anchor SEQ:HASH` then shows
// whether records were cut off the end or the file rewritten since.
func (g *Gateway) logAuditAnchor() {
	seq, hash := g.audit.Head()
	if seq == 0 || g.lastAnchor.Swap(seq) == seq {
		return
	}
	g.log.Info("audit anchor", "anchor", audit.Anchor{Seq: seq, Hash: hash}.String(), "file", g.audit.Path())
}

// onGatewayCertificate counts and audits the gateway's own server certificate, issued by the
// built-in CA at start and at every in-process renewal.
func (g *Gateway) onGatewayCertificate(serial string, notAfter time.Time, renewal bool) {
	kind, typ := "issued", audit.TypeCertIssued
	if renewal {
		kind, typ = "renewed", audit.TypeCertRenewed
	}
	g.counters.certs.inc(kind, roleLabel(ca.RoleGateway))
	g.record(audit.Record{Type: typ, Outcome: audit.OutcomeOK, Serial: serial,
		Extra: map[string]string{"certificate": "gateway server certificate", "not_after": notAfter.UTC().Format(time.RFC3339)}})
}

// onACMEIssued counts and audits a DNS-name certificate issued by the public ACME provisioner
// (for example the public listener's own, with --acme-ca internal).
func (g *Gateway) onACMEIssued(dnsNames []string, serial string) {
	if g.recordIssued(audit.Record{Type: audit.TypeCertIssued, Outcome: audit.OutcomeOK, Serial: serial,
		Extra: map[string]string{"via": "acme", "dns_names": strings.Join(dnsNames, ",")}}, ca.Identity{}) {
		g.counters.certs.inc("issued", "server")
	}
}

// roleLabel is the metrics label of a role: one of a fixed few, so that nothing a peer
// sends can grow the label set.
func roleLabel(r ca.Role) string {
	switch r {
	case ca.RoleAgent, ca.RoleUser, ca.RoleGateway:
		return string(r)
	}
	return "unknown"
}

// newID returns a random 16-hex-digit id for sessions.
func newID() string {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// activeCount counts user streams being relayed, and signals when none is left.
type activeCount struct {
	mu    sync.Mutex
	count int
	ch    chan struct{} // closed while count == 0
}

func (a *activeCount) add(d int) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.ch == nil {
		a.ch = make(chan struct{})
		close(a.ch)
	}
	before := a.count
	a.count += d
	switch {
	case before == 0 && a.count > 0:
		a.ch = make(chan struct{})
	case before > 0 && a.count == 0:
		close(a.ch)
	}
}

func (a *activeCount) zero() <-chan struct{} {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.ch == nil {
		a.ch = make(chan struct{})
		close(a.ch)
	}
	return a.ch
}

func (a *activeCount) n() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.count
}
