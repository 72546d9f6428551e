package gateway

import (
	"errors"
	"fmt"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"github.com/wicketgw/wicket/gateway/audit"
)

// auditState remembers the audit log's last reported availability, so that a state change
// is logged once however many writers see it.
type auditState struct {
	mu   sync.Mutex
	down bool
}

// auditStateChanged is the audit log's OnStateChange: one log line when it becomes
// unavailable, one when it is back.
func (g *Gateway) auditStateChanged(h audit.Health) {
	g.auditState.mu.Lock()
	defer g.auditState.mu.Unlock()
	if g.auditState.down == !h.OK {
		return
	}
	g.auditState.down = !h.OK
	if !h.OK {
		g.log.Error("the audit log cannot be written: refusing tokens, enrollments, renewals and new sessions until it can",
			"file", g.audit.Path(), "err", h.Err)
		return
	}
	g.log.Warn("the audit log is writable again: access is no longer refused; its log.gap record says what was refused and lost",
		"file", g.audit.Path())
}

// recordAccess writes the record of an access-creating event; the caller refuses (or
// undoes) the event when it returns an error.
func (g *Gateway) recordAccess(r audit.Record) error {
	if err := g.audit.WriteAccess(r); err != nil {
		g.logAuditFailure(r, err)
		return err
	}
	return nil
}

// logAuditFailure logs a record that could not be written. During an outage every write
// fails and auditStateChanged has said so loudly once; each record is then only a debug
// line (the disk that is full may hold the operational log too).
func (g *Gateway) logAuditFailure(r audit.Record, err error) {
	if errors.Is(err, audit.ErrUnavailable) {
		g.log.Debug("audit record not written: the audit log cannot be written", "type", r.Type, "err", err)
		return
	}
	g.log.Error("audit log write failed", "type", r.Type, "err", err)
}

// tokenRefusal is the admin's sentence for a token not minted because of the audit log.
func (g *Gateway) tokenRefusal() string {
	return fmt.Sprintf("the audit log cannot be written (is the disk of %s full?): no token was minted; retry when it is writable", g.cfg.DataDir)
}

// grantRefusal is the sentence `wicket agents allow` prints while the audit log cannot be
// written.
func (g *Gateway) grantRefusal() string {
	return fmt.Sprintf("the audit log cannot be written (is the disk of %s full?): the grant was not changed; retry when it is writable", g.cfg.DataDir)
}

// sessionRefusal is the user's sentence for a stream refused because of the audit log
// (`wicket connect` prints it after "resource NAME is unavailable: ").
const sessionRefusal = "the gateway cannot write its audit log, so it opens no new session until it can; retry later or tell the gateway's administrator"

// endPreviousRun ends in the audit log what the previous run of the gateway left open
// when it stopped without a gateway.stopped record (killed, lost power, or its audit log
// could not be written at the end): every session.started gets a session.ended, every
// user.connected and agent.connected its disconnect, with outcome gateway_crashed; then
// a gateway.crashed record says so. The ends go first so that the recovery is safe to
// interrupt: a start that dies half-way leaves the rest to the next one (what was ended
// stays ended, and the crash counts as recorded only once gateway.crashed is written).
// A run that did stop but lost end records in an audit outage gets its ends too, with
// outcome error. It runs once at start and reads only the previous run.
func (g *Gateway) endPreviousRun() {
	run, err := audit.ScanLastRun(g.audit.Path())
	if err != nil {
		g.log.Warn("could not read the previous run from the audit log; sessions it left open stay without an end record", "err", err)
		return
	}
	if run.Open == 0 && !run.Crashed() {
		return
	}
	crashed := run.Crashed()
	lastAt := run.Last.Time.UTC().Format(time.RFC3339Nano)
	var sessions, connections int
	err = run.EachOpen(func(start audit.Record) error {
		end := audit.Record{User: start.User, Agent: start.Agent, Identity: start.Identity,
			Resource: start.Resource, SessionID: start.SessionID, Remote: start.Remote, Serial: start.Serial,
			Outcome: audit.OutcomeGatewayCrashed,
			Reason:  "the gateway stopped without ending it (killed or lost power): it ended at the latest when the last record of that run was written (ended_by)",
			Extra:   map[string]string{"started_seq": strconv.FormatUint(start.Seq, 10), "ended_by": lastAt}}
		if !crashed {
			end.Outcome = audit.OutcomeError
			end.Reason = "its end was not recorded: the audit log could not be written then (see the log.gap record); it ended before the gateway stopped (ended_by)"
		}
		switch start.Type {
		case audit.TypeSessionStarted:
			end.Type = audit.TypeSessionEnded
			sessions++
			if start.Extra["statements_log"] != "" {
				g.sealStatementLog(start, &end)
			}
		case audit.TypeUserConnected:
			end.Type = audit.TypeUserDisconnected
			connections++
		case audit.TypeAgentConnected:
			end.Type = audit.TypeAgentDisconnected
			connections++
		default:
			return nil
		}
		return g.audit.Write(end)
	})
	if err != nil {
		g.log.Error("could not end in the audit log the sessions the previous run left open", "err", err)
		return
	}
	if !crashed {
		g.log.Warn("ended in the audit log the sessions whose end records an audit outage lost", "sessions", sessions, "connections", connections)
		return
	}
	extra := map[string]string{
		"previous_started_seq": strconv.FormatUint(run.Started.Seq, 10),
		"previous_started_at":  run.Started.Time.UTC().Format(time.RFC3339Nano),
		"last_seq":             strconv.FormatUint(run.Last.Seq, 10),
		"last_at":              lastAt,
		"sessions_ended":       strconv.Itoa(sessions),
		"connections_ended":    strconv.Itoa(connections),
	}
	reason := fmt.Sprintf("the previous run (started %s) has no gateway.stopped record: it was killed, lost power, or could not write its audit log when it stopped; %d sessions and %d connections it left open were ended with outcome gateway_crashed",
		extra["previous_started_at"], sessions, connections)
	if run.Untracked > 0 {
		extra["untracked"] = strconv.Itoa(run.Untracked)
		reason += fmt.Sprintf("; %d more were open at once than this check tracks (%d) and stay without an end record", run.Untracked, audit.MaxOpenTracked)
	}
	if err := g.audit.Write(audit.Record{Type: audit.TypeGatewayCrashed, Outcome: audit.OutcomeError, Reason: reason, Extra: extra}); err != nil {
		g.log.Error("could not record the previous run's unclean stop in the audit log", "err", err)
		return
	}
	g.log.Warn("the previous run of the gateway did not stop cleanly; the sessions it left open are ended in the audit log",
		"previous_started", extra["previous_started_at"], "sessions", sessions, "connections", connections)
}

// sealStatementLog closes the statement log a crashed run left open for the session of
// start, and puts its seal into end, the session.ended that recovery writes; a log that
// cannot be recovered is named in end instead, so verify reports it.
func (g *Gateway) sealStatementLog(start audit.Record, end *audit.Record) {
	seal, err := audit.RecoverStatementLog(filepath.Dir(g.audit.Path()), start.SessionID, g.clock.Now)
	if err != nil {
		g.log.Error("could not seal the statement log of a session the previous run left open", "session", start.SessionID, "err", err)
		end.Extra["statements_error"] = err.Error()
		return
	}
	seal.Put(end)
	end.Extra["protocol"] = start.Extra["protocol"]
}
