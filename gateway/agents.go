package gateway

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"slices"
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

// serveAgent runs one agent session: the hello exchange on the control stream, registration,
// later hellos, until the session ends.
func (g *Gateway) serveAgent(conn *tls.Conn, ident ca.Identity, remote string) {
	p := g.startPeer(conn, ident, remote)
	if p == nil {
		return
	}
	defer g.stopPeer(p)
	log := g.log.With("agent", ident.Name, "remote", remote, "session", p.id)

	ctx, cancel := context.WithTimeout(g.bgCtx, g.cfg.HandshakeTimeout)
	st, hello, err := g.agentHello(ctx, p)
	cancel()
	if err != nil {
		log.Warn("agent session refused", "err", err)
		return
	}
	defer st.Close()
	ctl := st.Control()
	if hello.Name != "" && hello.Name != ident.Name {
		log.Warn("agent hello names another agent; the certificate's name is used", "hello_name", hello.Name)
	}
	as := &agentSession{
		id: p.id, name: ident.Name, instance: hello.Instance, version: hello.Version,
		resources: g.validResources(log, hello.Resources), remote: remote,
		since: p.since, expires: p.notAfter, sess: p.sess, peer: p,
	}
	notify := func(reason string) {
		_ = ctl.Stream().SetWriteDeadline(time.Now().Add(notifyTimeout))
		_ = ctl.Send(Closing{Closing: reason})
	}
	p.notify.Store(&notify)
	g.registry.add(as)
	g.counters.agentSessions.Add(1)
	if err := ctl.Send(tunnel.Hello{Name: gatewayID, Instance: p.id, Version: g.cfg.Version}); err != nil {
		g.registry.remove(as, g.clock.Now())
		log.Warn("could not acknowledge the agent hello", "err", err)
		return
	}
	log.Info("agent connected", "resources", as.resources, "version", as.version, "instance", as.instance,
		"cert_expires", p.notAfter.UTC().Format(time.RFC3339))
	r := audit.Record{Type: audit.TypeAgentConnected, Remote: remote, SessionID: p.id, Serial: p.serial,
		TLSVersion: p.tlsVer, Cipher: p.cipher,
		Extra: map[string]string{"resources": fmt.Sprint(as.resources), "version": as.version, "instance": as.instance}}
	setIdentity(&r, ident)
	g.record(r)

	// Later hellos update the exposed resources.
	ctlDone := make(chan struct{})
	go func() {
		defer close(ctlDone)
		for {
			var h tunnel.Hello
			if err := ctl.Recv(&h); err != nil {
				return
			}
			g.registry.update(as, g.validResources(log, h.Resources), h.Version)
			log.Info("agent updated its resources", "resources", h.Resources)
		}
	}()
	// Agents do not open streams toward the gateway; refuse any they try.
	acceptDone := make(chan struct{})
	go func() {
		defer close(acceptDone)
		for {
			s, err := p.sess.AcceptStream(g.bgCtx)
			if err != nil {
				select {
				case <-p.sess.Done():
					return
				case <-g.bgCtx.Done():
					return
				default:
					continue
				}
			}
			_ = s.Reply(tunnel.StatusRefused, "agents may not open streams toward the gateway")
			_ = s.Close()
		}
	}()

	<-p.sess.Done()
	<-ctlDone
	<-acceptDone
	now := g.clock.Now()
	g.registry.remove(as, now)
	reason := p.reason()
	log.Info("agent disconnected", "reason", reason)
	r = audit.Record{Type: audit.TypeAgentDisconnected, Remote: remote, SessionID: p.id, Serial: p.serial,
		DurationMS: now.Sub(p.since).Milliseconds(), Reason: reason}
	setIdentity(&r, ident)
	g.record(r)
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
