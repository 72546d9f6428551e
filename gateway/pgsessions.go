package gateway

import (
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/wicketgw/wicket/gateway/audit"
	"github.com/wicketgw/wicket/gateway/policy"
	"github.com/wicketgw/wicket/tunnel"
	"github.com/wicketgw/wicket/tunnel/pgwire"
)

// PostgreSQL sessions: statement-level audit.
//
// A session to a PostgreSQL resource (one pinned by Config.PostgresResources, or announced
// by its agent as postgres://) is not relayed blindly: the gateway reads the client's
// startup itself (answering its SSLRequest with N: the user's leg is inside Wicket's mTLS
// already, and the agent's leg to the database is TLS as the resource URL asks), then
// follows the protocol with pgwire.Follow and writes every statement to the session's own
// chained statement log (audit.StatementLog), whose seal goes into session.ended. Parsing
// runs here, not on the agent, so what the user sent is recorded from the user's own
// stream: a compromised agent can lie about results (it plays the server), not about the
// statements (tunnel/pgwire's package doc has the whole analysis). The statement log
// batches its writes off the reply path (audit.StatementLog): a log that cannot be written
// (a full disk) ends the session at its next statement, at most about a second after the
// first line it lost, and the session.ended seal covers what is in the file.
//
// Cancel keys: the client is given a key the gateway minted, never the server's, so a
// CancelRequest must come back through the gateway, from the same user, for the same
// resource; the gateway then sends the server's own key through the agent session that
// carries the statement's backend.

// pgHandshakeTimeout bounds the time a client has for its startup packets once the
// gateway answered OK.
const pgHandshakeTimeout = 30 * time.Second

// errorWriteTimeout bounds the write of a closing ErrorResponse to a client.
const errorWriteTimeout = time.Second

// checkPostgresResources validates Config.PostgresResources.
func checkPostgresResources(patterns []string) error {
	for _, p := range patterns {
		if _, err := path.Match(p, ""); err != nil || p == "" {
			return fmt.Errorf("gateway: --postgres-resources %q is not a resource name or pattern (path.Match syntax, e.g. pg-*)", p)
		}
	}
	return nil
}

// followsPostgres reports whether sessions to resource are followed as PostgreSQL: it is
// pinned by the configuration, or a live agent serving it announces it so.
func (g *Gateway) followsPostgres(resource string) bool {
	for _, p := range g.cfg.PostgresResources {
		if ok, _ := path.Match(p, resource); ok {
			return true
		}
	}
	return g.registry.protocolOf(resource) == tunnel.ProtocolPostgres
}

// servePostgres runs a user stream to a PostgreSQL resource after the policy allowed it and
// the audit log admitted it. The stream is answered OK before the agent is reached, so every
// later failure reaches the client as a PostgreSQL ErrorResponse it prints (psql: "FATAL:
// wicket: ..."), not as a bare closed connection.
func (g *Gateway) servePostgres(p *peer, st *tunnel.Stream, base audit.Record, decision policy.Decision, started time.Time) {
	if err := st.Reply(tunnel.StatusOK, ""); err != nil {
		g.counters.streamInc("error")
		return
	}
	// deny records a session refused before it started; refuse also tells the client why,
	// as a PostgreSQL error with SQLSTATE code. status says how it counts (see denied).
	deny := func(status tunnel.Status, kind, agent, reason string) {
		r := base
		r.Extra = map[string]string{"protocol": tunnel.ProtocolPostgres}
		g.denied(p, r, status, kind, agent, reason)
	}
	refuse := func(code string, status tunnel.Status, kind, agent, reason string) {
		writeClient(st, pgwire.ErrorMessage(code, reason))
		deny(status, kind, agent, reason)
	}
	_ = st.SetReadDeadline(time.Now().Add(pgHandshakeTimeout)) // a real deadline, not the injectable clock
	su, err := pgwire.ReadStartup(st)
	_ = st.SetReadDeadline(time.Time{})
	if err != nil {
		reason := "the client broke the PostgreSQL protocol in its startup: " + err.Error()
		if errors.Is(err, pgwire.ErrDirectTLS) {
			// ReadStartup has answered with a TLS alert; an ErrorResponse would be noise.
			deny(tunnel.StatusRefused, "protocol violation", "", reason+"; connect with sslmode=disable or prefer: the tunnel is the encryption")
			return
		}
		refuse("08P01", tunnel.StatusRefused, "protocol violation", "", reason)
		return
	}
	if su.Cancel != nil {
		g.cancelStatement(p, base, su.Cancel)
		return
	}

	as, up, err := g.openToAgent(g.bgCtx, base.Resource, base.SessionID)
	if err != nil {
		status, kind, agent, reason := openRefusal(as, err)
		refuse("08006", status, kind, agent, reason)
		return
	}
	defer up.Close()
	recordText := g.registry.recordsText(as, base.Resource)
	stmts, err := audit.OpenStatementLog(filepath.Dir(g.audit.Path()), audit.StatementBegin{
		Session: base.SessionID, User: base.User, Identity: base.Identity, Resource: base.Resource, Agent: as.name,
		DBUser: su.User, Database: su.Database, RecordsText: recordText,
	}, audit.StatementLogOptions{Now: g.clock.Now, NoSync: auditNoSyncForTests})
	if err != nil {
		g.log.Error("cannot open a statement log: refusing the PostgreSQL session", "session", base.SessionID, "err", err)
		refuse("58030", tunnel.StatusUnavailable, "audit unavailable", as.name, "the gateway cannot open the session's statement log, so the session is refused; tell the gateway's administrator")
		return
	}
	r := base
	r.Agent, r.Type, r.Outcome = as.name, audit.TypeSessionStarted, audit.OutcomeOK
	r.Extra = map[string]string{"agent_session": as.id, "policy_rule": strconv.Itoa(decision.Rule),
		"policy_line": strconv.Itoa(decision.Line), "protocol": tunnel.ProtocolPostgres,
		"db_user": su.User, "database": su.Database, "statements_log": audit.StatementLogName(base.SessionID),
		"record_text": strconv.FormatBool(recordText)}
	if err := g.recordAccess(r); err != nil {
		// No session.started names the log: it must not stay behind as an orphan.
		_, _ = stmts.Close()
		_ = os.Remove(stmts.Path())
		writeClient(st, pgwire.ErrorMessage("58030", sessionRefusal))
		g.unaudited(p, base.Resource, base.SessionID, err)
		return
	}
	g.log.Info("session started", "user", base.User, "resource", base.Resource, "agent", as.name, "session", base.SessionID,
		"remote", p.remote, "protocol", tunnel.ProtocolPostgres, "db_user", su.User, "database", su.Database)

	var minted *pgCancel
	userConn, agentConn, untrack := g.trackSession(SessionInfo{ID: base.SessionID, User: base.User, Agent: as.name,
		Resource: base.Resource, Remote: p.remote, Started: started}, st, up)
	upBytes, downBytes, err := pgwire.Follow(g.bgCtx, userConn, agentConn, su, pgwire.Options{
		Now: g.clock.Now,
		OnStatement: func(s pgwire.Statement) error {
			err := stmts.Append(audit.Statement{Time: s.Start, Kind: s.Kind, SHA256: hex.EncodeToString(s.Hash[:]),
				Len: len(s.Text), Text: s.Text, Tag: s.Tag, Rows: s.Rows, SQLState: s.SQLState, Status: s.Status,
				Duration: s.Duration})
			if err == nil {
				g.counters.statements.inc(base.Resource, s.Status)
			}
			return err
		},
		OnBackendKey: func(pid, secret uint32) (uint32, uint32) {
			if minted != nil {
				// A server sends one key; a hostile one sending more must not grow the table.
				g.pgCancels.drop(minted)
			}
			minted = &pgCancel{pid: pid, secret: secret, as: as, user: base.User, resource: base.Resource, session: base.SessionID}
			return g.pgCancels.mint(minted)
		},
	})
	untrack(upBytes, downBytes)
	if minted != nil {
		g.pgCancels.drop(minted)
	}
	seal, serr := stmts.Close()
	if serr != nil {
		g.log.Error("the statement log could not be completed; its seal covers what was written", "session", base.SessionID, "err", serr)
		if err == nil {
			err = fmt.Errorf("the statement log could not be completed: %w", serr)
		}
	}
	g.sessionEnded(p, as, base, started, upBytes, downBytes, err, func(r *audit.Record) {
		seal.Put(r)
		r.Extra["protocol"] = tunnel.ProtocolPostgres
	})
}

// writeClient writes a closing message to the client, bounded in time.
func writeClient(st *tunnel.Stream, msg []byte) {
	_ = st.SetWriteDeadline(time.Now().Add(errorWriteTimeout))
	_, _ = st.Write(msg)
}

// pgCancel is one live session's cancel key: the server's, and where to send it.
type pgCancel struct {
	pid, secret uint32 // the server's BackendKeyData
	as          *agentSession
	user        string
	resource    string
	session     string
	minted      uint64 // the key the client was given: pid<<32 | secret
}

// cancelTable maps the cancel keys the gateway minted to the sessions they cancel.
type cancelTable struct {
	mu sync.Mutex
	m  map[uint64]*pgCancel
}

// mint gives c a fresh random key, unique among the live ones, and returns it.
func (t *cancelTable) mint(c *pgCancel) (pid, secret uint32) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.m == nil {
		t.m = map[uint64]*pgCancel{}
	}
	for {
		var b [8]byte
		_, _ = rand.Read(b[:])
		k := binary.BigEndian.Uint64(b[:])
		if _, taken := t.m[k]; taken || k == 0 {
			continue
		}
		c.minted = k
		t.m[k] = c
		return uint32(k >> 32), uint32(k)
	}
}

func (t *cancelTable) lookup(pid, secret uint32) *pgCancel {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.m[uint64(pid)<<32|uint64(secret)]
}

func (t *cancelTable) drop(c *pgCancel) {
	t.mu.Lock()
	defer t.mu.Unlock()
	delete(t.m, c.minted)
}

// cancelStatement handles a CancelRequest that came as its own stream: a key the gateway
// minted, for a live session of the same user on the same resource, is replaced by the
// server's key and sent through the agent session that carries that backend. Anything
// else is refused and recorded; as PostgreSQL does, the client hears nothing either way.
func (g *Gateway) cancelStatement(p *peer, base audit.Record, req *pgproto3.CancelRequest) {
	r := base
	r.Type = audit.TypeStatementCancel
	c := g.pgCancels.lookup(req.ProcessID, req.SecretKey)
	if c == nil || c.user != base.User || c.resource != base.Resource {
		r.Outcome, r.Reason = audit.OutcomeDenied, fmt.Sprintf("the cancel key matches no live PostgreSQL session of user %s on resource %s", base.User, base.Resource)
		g.record(r)
		g.counters.streamInc("denied")
		g.log.Warn("cancel request refused", "user", base.User, "resource", base.Resource, "reason", r.Reason, "remote", p.remote)
		return
	}
	r.Agent = c.as.name
	r.Extra = map[string]string{"cancelled_session": c.session}
	err := g.forwardCancel(c, base.SessionID)
	r.Outcome = audit.OutcomeOK
	if err != nil {
		r.Outcome, r.Reason = audit.OutcomeError, err.Error()
	}
	g.record(r)
	if err != nil {
		g.counters.streamInc("error")
	} else {
		g.counters.streamInc("ok")
	}
	g.log.Info("cancel request forwarded", "user", base.User, "resource", base.Resource, "agent", c.as.name,
		"cancelled_session", c.session, "err", err)
}

// forwardCancel sends the server's cancel key for c on a new stream of the agent session
// that carries c's backend (the database behind another agent may be another server).
func (g *Gateway) forwardCancel(c *pgCancel, id string) error {
	msg, err := (&pgproto3.CancelRequest{ProcessID: c.pid, SecretKey: c.secret}).Encode(nil)
	if err != nil {
		return err
	}
	st, err := c.as.sess.OpenStream(g.bgCtx, tunnel.Header{Version: tunnel.ProtocolVersion, Kind: tunnel.KindData,
		Resource: c.resource, SessionID: id})
	if err != nil {
		return fmt.Errorf("agent %s: open a stream for the cancel request: %w", c.as.name, err)
	}
	defer st.Close()
	_ = st.SetDeadline(time.Now().Add(g.cfg.HandshakeTimeout))
	if _, err := st.Write(msg); err != nil {
		return fmt.Errorf("agent %s: send the cancel request: %w", c.as.name, err)
	}
	_ = st.CloseWrite()
	// The server closes the connection once it has read the request.
	var b [1]byte
	_, _ = st.Read(b[:])
	return nil
}
