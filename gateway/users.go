package gateway

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/wicketgw/wicket/ca"
	"github.com/wicketgw/wicket/gateway/audit"
	"github.com/wicketgw/wicket/tunnel"
)

// SessionInfo describes one user stream being relayed, as `wicket sessions list` shows it.
type SessionInfo struct {
	ID        string    `json:"id"`
	User      string    `json:"user"`
	Agent     string    `json:"agent"`
	Resource  string    `json:"resource"`
	Remote    string    `json:"remote"`
	Started   time.Time `json:"started"`
	BytesUp   int64     `json:"bytes_up"`   // user to resource, so far
	BytesDown int64     `json:"bytes_down"` // resource to user, so far
}

type liveSession struct {
	info     SessionInfo
	up, down *atomic.Int64
}

type sessionTable struct {
	mu sync.Mutex
	m  map[string]*liveSession
}

func newSessionTable() *sessionTable { return &sessionTable{m: map[string]*liveSession{}} }

func (t *sessionTable) add(s *liveSession) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.m[s.info.ID] = s
}

func (t *sessionTable) remove(id string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	delete(t.m, id)
}

func (t *sessionTable) len() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.m)
}

func (t *sessionTable) list() []SessionInfo {
	t.mu.Lock()
	defer t.mu.Unlock()
	out := make([]SessionInfo, 0, len(t.m))
	for _, s := range t.m {
		i := s.info
		i.BytesUp, i.BytesDown = s.up.Load(), s.down.Load()
		out = append(out, i)
	}
	sort.Slice(out, func(i, j int) bool {
		if !out[i].Started.Equal(out[j].Started) {
			return out[i].Started.Before(out[j].Started)
		}
		return out[i].ID < out[j].ID
	})
	return out
}

// serveUser runs one user connection: every stream it opens names a resource and becomes one
// relayed session.
func (g *Gateway) serveUser(conn *tls.Conn, ident ca.Identity, remote string) {
	p := g.startPeer(conn, ident, remote)
	if p == nil {
		return
	}
	defer g.stopPeer(p)
	g.counters.userSessions.Add(1)
	r := audit.Record{Type: audit.TypeUserConnected, Remote: remote, SessionID: p.id, Serial: p.serial,
		TLSVersion: p.tlsVer, Cipher: p.cipher}
	setIdentity(&r, ident)
	g.record(r)

	var (
		streams sync.WaitGroup
		open    atomic.Int64
	)
	for {
		st, err := p.sess.AcceptStream(g.bgCtx)
		if err != nil {
			select {
			case <-p.sess.Done():
			case <-g.bgCtx.Done():
			default:
				g.log.Debug("refused a malformed stream", "user", ident.Name, "remote", remote, "err", err)
				continue
			}
			break
		}
		if n := open.Add(1); n > int64(g.cfg.MaxStreamsPerUser) {
			open.Add(-1)
			_ = st.Reply(tunnel.StatusUnavailable, fmt.Sprintf("more than %d streams open on this connection; close some and retry", g.cfg.MaxStreamsPerUser))
			_ = st.Close()
			g.counters.streamInc("too many streams")
			continue
		}
		streams.Add(1)
		go func() {
			defer streams.Done()
			defer open.Add(-1)
			g.handleUserStream(p, st)
		}()
	}
	_ = p.sess.Close()
	streams.Wait()
	r = audit.Record{Type: audit.TypeUserDisconnected, Remote: remote, SessionID: p.id, Serial: p.serial,
		DurationMS: g.clock.Now().Sub(p.since).Milliseconds(), Reason: p.reason()}
	setIdentity(&r, ident)
	g.record(r)
}

// handleUserStream decides, opens the agent side, and relays one user stream.
func (g *Gateway) handleUserStream(p *peer, st *tunnel.Stream) {
	defer st.Close()
	h := st.Header()
	user := p.ident.Name
	id := newID()
	base := audit.Record{User: user, Identity: p.ident.String(), Resource: h.Resource, SessionID: id,
		Remote: p.remote, Serial: p.serial, TLSVersion: p.tlsVer, Cipher: p.cipher}
	// deny refuses the stream; kind is the counter label, the audit outcome is "denied" for
	// refusals by policy and "error" for everything operational.
	deny := func(status tunnel.Status, kind, agent, reason string) {
		_ = st.Reply(status, reason)
		g.denied(p, base, status, kind, agent, reason)
	}

	if h.Kind != tunnel.KindData {
		deny(tunnel.StatusRefused, "refused", "", "users may only open data streams")
		return
	}
	if g.draining.Load() {
		deny(tunnel.StatusUnavailable, "unavailable", "", "the gateway is shutting down; retry in a moment")
		return
	}
	decision := g.decide(user, h.Resource)
	if !decision.Allowed {
		deny(tunnel.StatusRefused, "denied", "", fmt.Sprintf("policy does not allow user %s to reach resource %s", user, h.Resource))
		return
	}
	// No new session while its start cannot be recorded: asked before the agent dials,
	// so a known-down audit log keeps the resource from being touched at all. Counted by
	// the audit log as refused, so no session.denied is attempted.
	if err := g.audit.Admit(audit.TypeSessionStarted); err != nil {
		g.refuseUnaudited(st, p, h.Resource, id, err)
		return
	}
	g.active.add(1)
	defer g.active.add(-1)
	started := g.clock.Now()
	if g.followsPostgres(h.Resource) {
		g.servePostgres(p, st, base, decision, started)
		return
	}
	as, up, err := g.openToAgent(g.bgCtx, h.Resource, id)
	if err != nil {
		deny(openRefusal(as, err))
		return
	}
	defer up.Close()
	// session.started is on disk before the user hears OK, so no byte is relayed without
	// it; if it cannot be written, the user is told why and the agent's side is closed.
	r := base
	r.Agent, r.Type, r.Outcome = as.name, audit.TypeSessionStarted, audit.OutcomeOK
	r.Extra = map[string]string{"agent_session": as.id, "policy_rule": strconv.Itoa(decision.Rule),
		"policy_line": strconv.Itoa(decision.Line)}
	if err := g.recordAccess(r); err != nil {
		g.refuseUnaudited(st, p, h.Resource, id, err)
		return
	}
	if err := st.Reply(tunnel.StatusOK, ""); err != nil {
		g.counters.streamInc("error")
		r := base
		r.Agent, r.Type, r.Outcome, r.Reason = as.name, audit.TypeSessionEnded, audit.OutcomeError, "reply to the user: "+err.Error()
		g.record(r)
		return
	}
	g.log.Info("session started", "user", user, "resource", h.Resource, "agent", as.name, "session", id, "remote", p.remote)

	userConn, agentConn, untrack := g.trackSession(SessionInfo{ID: id, User: user, Agent: as.name, Resource: h.Resource,
		Remote: p.remote, Started: started}, st, up)
	upBytes, downBytes, err := tunnel.Relay(g.bgCtx, userConn, agentConn)
	untrack(upBytes, downBytes)
	g.sessionEnded(p, as, base, started, upBytes, downBytes, err, nil)
}

// trackSession lists a relayed session in the live sessions table and wraps its two
// connections to count their bytes as they flow; untrack ends both with the totals.
func (g *Gateway) trackSession(info SessionInfo, user, agent net.Conn) (userConn, agentConn net.Conn, untrack func(up, down int64)) {
	ls := &liveSession{info: info, up: new(atomic.Int64), down: new(atomic.Int64)}
	g.sessions.add(ls)
	rb := g.counters.resources.get(info.Resource)
	return &countingConn{Conn: user, n: ls.up, total: &rb.up}, &countingConn{Conn: agent, n: ls.down, total: &rb.down},
		func(up, down int64) {
			g.sessions.remove(info.ID)
			g.counters.bytesUp.Add(up)
			g.counters.bytesDown.Add(down)
		}
}

// sessionEnded counts, records and logs the end of a relayed session; extra, if not nil,
// adds to the session.ended record (a PostgreSQL session's seal).
func (g *Gateway) sessionEnded(p *peer, as *agentSession, base audit.Record, started time.Time, upBytes, downBytes int64, err error, extra func(*audit.Record)) {
	kind, reason := "ok", ""
	switch {
	case p.closeReason.Load() != nil:
		kind, reason = "closed", "user session closed: "+p.reason()
	case as.peer.closeReason.Load() != nil:
		kind, reason = "closed", "agent session closed: "+as.peer.reason()
	case err != nil && !errors.Is(err, context.Canceled):
		kind, reason = "error", err.Error()
	case err != nil:
		kind, reason = "closed", reasonShutdown
	}
	g.counters.streamInc(kind)
	r := base
	r.Agent, r.Type, r.Outcome, r.Reason = as.name, audit.TypeSessionEnded, audit.OutcomeOK, reason
	if kind != "ok" {
		r.Outcome = audit.OutcomeError
	}
	r.BytesUp, r.BytesDown = upBytes, downBytes
	r.DurationMS = g.clock.Now().Sub(started).Milliseconds()
	if extra != nil {
		extra(&r)
	}
	g.record(r)
	g.log.Info("session ended", "user", base.User, "resource", base.Resource, "agent", as.name, "outcome", kind,
		"reason", reason, "bytes_up", upBytes, "bytes_down", downBytes,
		"duration", g.clock.Now().Sub(started).Round(time.Millisecond).String(), "session", base.SessionID)
}

// denied records, counts and logs a refused session; the caller has told the user. kind is
// the counter label; the audit outcome is "denied" for refusals by policy and "error" for
// everything operational.
func (g *Gateway) denied(p *peer, base audit.Record, status tunnel.Status, kind, agent, reason string) {
	g.counters.streamInc(kind)
	r := base
	r.Agent, r.Type, r.Outcome, r.Reason = agent, audit.TypeSessionDenied, audit.OutcomeError, reason
	if status == tunnel.StatusRefused {
		r.Outcome = audit.OutcomeDenied
	}
	g.record(r)
	g.log.Info("session refused", "user", base.User, "resource", base.Resource, "agent", agent, "outcome", kind,
		"reason", reason, "session", base.SessionID, "remote", p.remote)
}

// openRefusal is how a failed openToAgent is refused: the status, counter label, agent and
// reason for the user.
func openRefusal(as *agentSession, err error) (status tunnel.Status, kind, agent, reason string) {
	var (
		noAgent *errNoAgent
		re      *tunnel.ReplyError
	)
	switch {
	case errors.As(err, &noAgent) && len(noAgent.offline) > 0:
		return tunnel.StatusUnavailable, "unavailable", "", noAgent.Error()
	case errors.As(err, &noAgent):
		return tunnel.StatusUnknownResource, "unknown resource", "", noAgent.Error()
	case errors.As(err, &re):
		// The agent answered: pass its answer through (unknown resource, dial failed + why).
		return re.Status, outcomeOf(re.Status), as.name, fmt.Sprintf("agent %s: %s", as.name, re.Reason)
	}
	return tunnel.StatusUnavailable, "unavailable", "", err.Error()
}

// refuseUnaudited refuses a stream whose session.started cannot be written, with the
// sentence `wicket connect` shows. The audit log counts it as refused.
func (g *Gateway) refuseUnaudited(st *tunnel.Stream, p *peer, resource, id string, err error) {
	_ = st.Reply(tunnel.StatusUnavailable, sessionRefusal)
	g.unaudited(p, resource, id, err)
}

// unaudited counts and logs a session refused because its start could not be recorded;
// the caller has told the user (sessionRefusal).
func (g *Gateway) unaudited(p *peer, resource, id string, err error) {
	g.counters.streamInc("audit unavailable")
	g.log.Warn("session refused: the audit log cannot be written", "user", p.ident.Name, "resource", resource,
		"session", id, "remote", p.remote, "err", err)
}

func outcomeOf(s tunnel.Status) string {
	switch s {
	case tunnel.StatusUnknownResource:
		return "unknown resource"
	case tunnel.StatusDialFailed:
		return "dial failed"
	case tunnel.StatusRefused:
		return "refused"
	case tunnel.StatusUnavailable:
		return "unavailable"
	}
	return "error"
}

// countingConn counts the bytes read from a stream for the live sessions table and for the
// per-resource metrics (as they flow, so a long transfer shows in a scrape before it ends);
// it keeps the half-close of the stream it wraps.
type countingConn struct {
	net.Conn
	n     *atomic.Int64
	total *atomic.Int64
}

func (c *countingConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	c.n.Add(int64(n))
	c.total.Add(int64(n))
	return n, err
}

// Reset passes a relay's abnormal end on to the stream (see tunnel.Resetter).
func (c *countingConn) Reset() error {
	if r, ok := c.Conn.(tunnel.Resetter); ok {
		return r.Reset()
	}
	return c.Conn.Close()
}

func (c *countingConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return c.Conn.Close()
}
