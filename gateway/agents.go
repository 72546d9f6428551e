package gateway

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/wicketgw/wicket/ca"
	"github.com/wicketgw/wicket/gateway/audit"
	"github.com/wicketgw/wicket/tunnel"
)

// startPeer wraps a handshaken Wicket connection in a tunnel session and starts enforcing its
// certificate: indexed for revocation, and closed when it expires. It returns nil (having
// closed everything) if the gateway is shutting down or the session cannot start.
func (g *Gateway) startPeer(conn *tls.Conn, ident ca.Identity, remote string) *peer {
	cs := conn.ConnectionState()
	if len(cs.PeerCertificates) == 0 {
		_ = conn.Close()
		return nil
	}
	sess, err := tunnel.Server(conn, g.cfg.Tunnel)
	if err != nil {
		g.log.Warn("could not start a session", "remote", remote, "identity", ident.String(), "err", err)
		_ = conn.Close()
		return nil
	}
	leaf := cs.PeerCertificates[0]
	p := newPeer(newID(), ident, leaf, sess, remote, g.clock.Now())
	p.tlsVer, p.cipher = tls.VersionName(cs.Version), tls.CipherSuiteName(cs.CipherSuite)
	g.rememberSerial(p.serial, ident, p.notAfter)
	if !g.peers.add(p) {
		_ = sess.Close()
		return nil
	}
	p.stopTimer = g.clock.AfterFunc(p.notAfter.Sub(g.clock.Now()), func() {
		if p.closeWith(reasonExpired) {
			g.counters.closedExpired.Add(1)
			g.log.Info("closed session: certificate expired", "identity", ident.String(), "serial", p.serial)
		}
	})
	return p
}

// stopPeer undoes startPeer once the session has ended.
func (g *Gateway) stopPeer(p *peer) {
	p.stopTimer()
	g.peers.remove(p)
	_ = p.sess.Close()
}

// Closing is the control message the gateway sends an agent right before it closes the
// session for a reason of its own (certificate revoked or expired, shutdown).
type Closing struct {
	Closing string `json:"closing"`
}

// notifyTimeout bounds the Closing message, so a peer that does not read cannot delay the
// close (revocation must take effect within a second).
const notifyTimeout = 200 * time.Millisecond

// serveAgent starts one agent session on the connection's goroutine: the hello exchange on
// the control stream and registration. It then hands the session to a fresh goroutine
// (agentLoop) and returns. The reason is memory: this goroutine ran the TLS handshake, and its
// stack grew for it; the runtime shrinks an idle stack only by halves and only while three
// quarters of it are unused, so a session parked here would keep about 8 KiB of stack for its
// whole life, where a fresh goroutine parks on 2 to 4 KiB. An idle agent session therefore
// costs one gateway goroutine plus yamux's two; docs/BENCHMARKS.md has the measured figure.
func (g *Gateway) serveAgent(conn *tls.Conn, ident ca.Identity, remote string) {
	p := g.startPeer(conn, ident, remote)
	if p == nil {
		return
	}
	log := g.log.With("agent", ident.Name, "remote", remote, "session", p.id)

	ctx, cancel := context.WithTimeout(g.bgCtx, g.cfg.HandshakeTimeout)
	st, hello, err := g.agentHello(ctx, p)
	cancel()
	if err != nil {
		log.Warn("agent session refused", "err", err)
		g.stopPeer(p)
		return
	}
	ctl := st.Control()
	if hello.Name != "" && hello.Name != ident.Name {
		log.Warn("agent hello names another agent; the certificate's name is used", "hello_name", hello.Name)
	}
	as := &agentSession{
		id: p.id, name: ident.Name, instance: hello.Instance, version: hello.Version,
		announced: g.validResources(log, hello.Resources), remote: remote,
		protocols: hello.Protocols, recordText: hello.RecordText,
		since: p.since, expires: p.notAfter, sess: p.sess, peer: p, ctl: ctl,
	}
	notify := func(reason string) {
		_ = ctl.Stream().SetWriteDeadline(time.Now().Add(notifyTimeout))
		_ = ctl.Send(Closing{Closing: reason})
	}
	p.notify.Store(&notify)
	newlyRefused := g.registry.add(as)
	g.agentsChanged()
	g.counters.agentSessions.Add(1)
	g.claimsRefused(log, ident, p, newlyRefused, "")
	acmeRefused := g.acmeHostsDeclared(log, ident, p, as, hello.ACMEHosts)
	ack := tunnel.Hello{Name: gatewayID, Instance: p.id, Version: g.cfg.Version,
		Refused: append(refusals(ident.Name, g.registry.refusedOf(as)), acmeRefused...)}
	if err := ctl.Send(ack); err != nil {
		g.acmeRoutes.drop(as)
		g.registry.remove(as, g.clock.Now())
		log.Warn("could not acknowledge the agent hello", "err", err)
		_ = st.Close()
		g.stopPeer(p)
		return
	}
	served := g.registry.servedOf(as)
	log.Info("agent connected", "resources", served, "version", as.version, "instance", as.instance,
		"cert_expires", p.notAfter.UTC().Format(time.RFC3339))
	r := audit.Record{Type: audit.TypeAgentConnected, Remote: remote, SessionID: p.id, Serial: p.serial,
		TLSVersion: p.tlsVer, Cipher: p.cipher,
		Extra: map[string]string{"resources": fmt.Sprint(served), "version": as.version, "instance": as.instance}}
	if len(ack.Refused) > 0 {
		r.Extra["refused"] = fmt.Sprint(g.registry.refusedOf(as))
	}
	setIdentity(&r, ident)
	g.record(r)
	g.goFunc(func() { g.agentLoop(log, ident, p, as, st) })
}

// agentLoop is the one goroutine the gateway spends on a registered agent session (besides
// yamux's reader and writer): it serves the streams the agent opens until the session ends,
// then unregisters and audits the end. A later control stream carries a Hello that replaces
// the exposed resources; anything else is refused. The first control stream (ctl) is not read
// again; it stays open for the gateway's messages.
func (g *Gateway) agentLoop(log *slog.Logger, ident ca.Identity, p *peer, as *agentSession, ctl *tunnel.Stream) {
	defer g.stopPeer(p)
	defer ctl.Close()
	var limit *rateLimit // made at the agent's first stream: an idle session carries none
	for {
		st, err := p.sess.AcceptStream(g.bgCtx)
		if err == nil {
			if limit == nil {
				limit = newRateLimit(agentStreamRate, agentStreamBurst)
			}
			if ok, _ := limit.allow(g.clock.Now()); !ok {
				// Each later hello is audited: an agent may not flood the audit log.
				_ = st.Reply(tunnel.StatusRefused, "too many streams toward the gateway: at most one per second")
				_ = st.Close()
				continue
			}
			g.agentStream(log, ident, p, as, st)
			continue
		}
		if sessionOver(p.sess, g.bgCtx) {
			break
		}
		// A stream with a malformed header: the tunnel refused it already.
	}
	<-p.sess.Done()
	now := g.clock.Now()
	g.acmeRoutes.drop(as)
	g.registry.remove(as, now)
	g.agentsChanged()
	reason := p.reason()
	log.Info("agent disconnected", "reason", reason)
	r := audit.Record{Type: audit.TypeAgentDisconnected, Remote: as.remote, SessionID: p.id, Serial: p.serial,
		DurationMS: now.Sub(p.since).Milliseconds(), Reason: reason}
	setIdentity(&r, ident)
	g.record(r)
}

// The streams an agent opens toward the gateway (later hellos, and refused data streams) are
// limited to agentStreamRate per second with bursts of agentStreamBurst; more are refused
// without a log line or an audit record of their own.
const (
	agentStreamRate  = 1
	agentStreamBurst = 5
)

// sessionOver says whether an AcceptStream error means there will be no more streams.
func sessionOver(sess *tunnel.Session, ctx context.Context) bool {
	select {
	case <-sess.Done():
		return true
	case <-ctx.Done():
		return true
	default:
		return false
	}
}

// agentStream serves one stream an agent opened after its hello: a control stream with a
// later Hello updates the agent's resources; any other stream is refused. It runs on the
// session's goroutine, so a slow Hello only delays that agent, for at most HandshakeTimeout.
func (g *Gateway) agentStream(log *slog.Logger, ident ca.Identity, p *peer, as *agentSession, st *tunnel.Stream) {
	defer st.Close()
	if st.Header().Kind != tunnel.KindControl {
		_ = st.Reply(tunnel.StatusRefused, "agents may not open data streams toward the gateway")
		log.Warn("refused a data stream the agent opened toward the gateway", "resource", st.Header().Resource)
		return
	}
	if err := st.Reply(tunnel.StatusOK, ""); err != nil {
		return
	}
	_ = st.SetReadDeadline(time.Now().Add(g.cfg.HandshakeTimeout)) // a real deadline, not the injectable clock
	var h tunnel.Hello
	if err := st.Control().Recv(&h); err != nil {
		log.Warn("agent opened a control stream but sent no hello on it", "err", err)
		return
	}
	newlyRefused := g.registry.update(as, g.validResources(log, h.Resources), h.Version, h)
	g.agentsChanged()
	g.claimsRefused(log, ident, p, newlyRefused, "")
	served, refused := g.registry.servedOf(as), g.registry.refusedOf(as)
	acmeRefused := g.acmeHostsDeclared(log, ident, p, as, h.ACMEHosts)
	// The answer carries the refusals; an agent that does not read it loses only those.
	_ = st.Control().Send(tunnel.Hello{Refused: append(refusals(ident.Name, refused), acmeRefused...)})
	log.Info("agent updated its resources", "resources", served, "refused", refused, "version", h.Version)
	r := audit.Record{Type: audit.TypeAgentUpdated, Remote: as.remote, SessionID: p.id, Serial: p.serial,
		Extra: map[string]string{"resources": fmt.Sprint(served), "version": h.Version}}
	if len(refused) > 0 {
		r.Extra["refused"] = fmt.Sprint(refused)
	}
	setIdentity(&r, ident)
	g.record(r)
}

// refusals builds the Hello's list of refused resources for agent.
func refusals(agent string, refused []string) []tunnel.Refusal {
	var out []tunnel.Refusal
	for _, r := range refused {
		out = append(out, tunnel.Refusal{Resource: r, Reason: claimRefusal(agent, r)})
	}
	return out
}

// claimAuditEvery bounds the agent.claim_refused records of one agent name and resource
// across sessions: an agent that reconnects in a loop gets one record per claimAuditEvery,
// the next one counting the refusals in between ("suppressed"). Every refusal is counted in
// the metrics and each session's first one for a resource is logged.
const claimAuditEvery = time.Minute

// claimLimiter remembers, per agent name and resource, when the last agent.claim_refused
// record was written and how many were suppressed since.
type claimLimiter struct {
	mu   sync.Mutex
	last map[[2]string]claimSeen
}

type claimSeen struct {
	at         time.Time
	suppressed int
}

// admit says whether to write a record now and how many refusals it must say were
// suppressed before it.
func (c *claimLimiter) admit(agent, resource string, now time.Time) (bool, int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.last == nil {
		c.last = map[[2]string]claimSeen{}
	}
	k := [2]string{agent, resource}
	seen, ok := c.last[k]
	if ok && now.Sub(seen.at) < claimAuditEvery {
		seen.suppressed++
		c.last[k] = seen
		return false, 0
	}
	if len(c.last) > 4096 { // bounded: forget them all rather than grow
		clear(c.last)
	}
	c.last[k] = claimSeen{at: now}
	return true, seen.suppressed
}

// claimsRefused logs, counts and audits the refused resources of one agent session (each
// session and resource once; see claimAuditEvery). why is "" for an announcement, or says
// which grant change refused it.
func (g *Gateway) claimsRefused(log *slog.Logger, ident ca.Identity, p *peer, resources []string, why string) {
	for _, res := range resources {
		g.counters.claimsRefused.Add(1)
		sentence := claimRefusal(ident.Name, res)
		if why != "" {
			sentence = why + ": " + sentence
		}
		log.Warn("refused an agent's claim to a resource not granted to it", "resource", res, "reason", sentence)
		ok, suppressed := g.claimLimit.admit(ident.Name, res, g.clock.Now())
		if !ok {
			continue
		}
		r := audit.Record{Type: audit.TypeAgentClaimRefused, Resource: res, Remote: p.remote, SessionID: p.id,
			Serial: p.serial, Outcome: audit.OutcomeDenied, Reason: sentence}
		if suppressed > 0 {
			r.Extra = map[string]string{"suppressed": fmt.Sprint(suppressed)}
		}
		setIdentity(&r, ident)
		g.record(r)
	}
}

// agentHello accepts the agent's control stream and reads its hello.
func (g *Gateway) agentHello(ctx context.Context, p *peer) (*tunnel.Stream, tunnel.Hello, error) {
	var hello tunnel.Hello
	st, err := p.sess.AcceptStream(ctx)
	if err != nil {
		return nil, hello, fmt.Errorf("waiting for the control stream: %w", err)
	}
	if st.Header().Kind != tunnel.KindControl {
		_ = st.Reply(tunnel.StatusRefused, "the first stream of an agent session must be its control stream")
		_ = st.Close()
		return nil, hello, errors.New("the first stream was not a control stream")
	}
	if err := st.Reply(tunnel.StatusOK, ""); err != nil {
		_ = st.Close()
		return nil, hello, fmt.Errorf("reply to the control stream: %w", err)
	}
	deadline, _ := ctx.Deadline()
	_ = st.SetReadDeadline(deadline)
	if err := st.Control().Recv(&hello); err != nil {
		_ = st.Close()
		return nil, hello, fmt.Errorf("read the agent hello: %w", err)
	}
	_ = st.SetReadDeadline(time.Time{})
	return st, hello, nil
}

// validResources keeps the resource names that are valid names, logging the others.
func (g *Gateway) validResources(log interface{ Warn(string, ...any) }, in []string) []string {
	out := make([]string, 0, len(in))
	for _, r := range in {
		if err := ca.ValidName(r); err != nil {
			log.Warn("ignoring an invalid resource name in the agent hello", "resource", r, "err", err)
			continue
		}
		if !slices.Contains(out, r) {
			out = append(out, r)
		}
	}
	slices.Sort(out)
	return out
}
