package gateway

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"strconv"
	"sync"
	"time"

	"github.com/wicketgw/wicket/ca"
	"github.com/wicketgw/wicket/gateway/audit"
)

// Agent enrollment by ACME: an agent has no certificate yet (or is renewing one by
// ACME), so the CA's tls-alpn-01 validation of <name>.agents.<td> cannot reach it.
// Instead the agent opens a TLS 1.3 connection to this port on ca.ACMEBindALPN and
// proves possession of its ACME account key (a signature over this TLS session's
// exporter). The gateway asks the CA which agent that account's EAB key was created
// for, and keeps the connection, bound to (account, name), for one validation. The
// CA's validation dialer asks for a connection to a name FOR the account whose
// challenge it validates (step-ca checked that the account owns the challenge), and
// gets only a connection bound to exactly that account and name.

// acmeBindTTL is how long a bound connection waits for its validation.
const acmeBindTTL = time.Minute

// acmeBindHelloTimeout bounds reading the bind proof from a peer without a certificate.
const acmeBindHelloTimeout = 10 * time.Second

// maxACMEBinds caps connections waiting for a validation (unauthenticated peers
// cannot bind: each needs a valid agents-ACME account).
const maxACMEBinds = 256

type boundConn struct {
	name string
	conn *tls.Conn
	stop func() bool // cancels the expiry timer
}

// acmeBinds holds the bound connections, by ACME account ID.
type acmeBinds struct {
	mu      sync.Mutex
	n       int
	pending int // connections still sending their bind proof
	m       map[string][]*boundConn
	closed  bool
}

func (b *acmeBinds) add(account string, bc *boundConn) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return errors.New("the gateway is shutting down")
	}
	if b.n >= maxACMEBinds {
		return errors.New("too many ACME validation connections waiting")
	}
	if b.m == nil {
		b.m = map[string][]*boundConn{}
	}
	b.m[account] = append(b.m[account], bc)
	b.n++
	return nil
}

// maxACMEBindPending caps connections without a certificate that are still sending
// their bind proof (each for at most acmeBindHelloTimeout).
const maxACMEBindPending = 64

func (b *acmeBinds) startPending() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.pending >= maxACMEBindPending {
		return false
	}
	b.pending++
	return true
}

func (b *acmeBinds) endPending() {
	b.mu.Lock()
	b.pending--
	b.mu.Unlock()
}

// take removes and returns the oldest connection bound to account for name.
func (b *acmeBinds) take(account, name string) *boundConn {
	b.mu.Lock()
	defer b.mu.Unlock()
	list := b.m[account]
	for i, bc := range list {
		if bc.name == name {
			b.m[account] = append(list[:i:i], list[i+1:]...)
			if len(b.m[account]) == 0 {
				delete(b.m, account)
			}
			b.n--
			bc.stop()
			return bc
		}
	}
	return nil
}

// drop removes bc if it is still waiting, and closes it.
func (b *acmeBinds) drop(account string, bc *boundConn) {
	b.mu.Lock()
	list := b.m[account]
	for i, x := range list {
		if x == bc {
			b.m[account] = append(list[:i:i], list[i+1:]...)
			if len(b.m[account]) == 0 {
				delete(b.m, account)
			}
			b.n--
			break
		}
	}
	b.mu.Unlock()
	_ = bc.conn.Close()
}

func (b *acmeBinds) closeAll() {
	b.mu.Lock()
	all := b.m
	b.m, b.n, b.closed = nil, 0, true
	b.mu.Unlock()
	for _, list := range all {
		for _, bc := range list {
			bc.stop()
			_ = bc.conn.Close()
		}
	}
}

// serveACMEBind reads the bind proof of an ACMEBindALPN connection and, if it names
// a valid agents-ACME account, keeps the connection for that account's validation.
func (g *Gateway) serveACMEBind(conn *tls.Conn, remote string) {
	_ = conn.SetDeadline(time.Now().Add(acmeBindHelloTimeout))
	var (
		acc ca.AgentACMEAccount
		err error
	)
	if g.acmeBinds.startPending() {
		acc, err = g.readACMEBind(conn)
		g.acmeBinds.endPending()
	} else {
		err = errors.New("too many ACME validation connections being opened; retry")
	}
	rec := audit.Record{Type: audit.TypeACMEBind, Remote: remote, Outcome: audit.OutcomeOK,
		Extra: map[string]string{"acme_account": acc.ID}}
	rec.SetTLS(conn.ConnectionState())
	if acc.Name != "" {
		setIdentity(&rec, ca.Identity{TrustDomain: g.authority.TrustDomain(), Role: ca.RoleAgent, Name: acc.Name})
	}
	var bc *boundConn
	if err == nil {
		bc = &boundConn{name: acc.Name, conn: conn}
		bc.stop = g.clock.AfterFunc(acmeBindTTL, func() { g.acmeBinds.drop(acc.ID, bc) })
		if err = g.acmeBinds.add(acc.ID, bc); err != nil {
			bc.stop()
		}
	}
	if err != nil {
		rec.Outcome, rec.Reason = audit.OutcomeDenied, err.Error()
		_ = ca.AnswerACMEBind(conn, err)
		_ = conn.Close()
		if ok, suppressed := g.caRefusedLimit.allow(time.Now()); ok {
			if suppressed > 0 {
				rec.Extra["suppressed_before"] = strconv.FormatInt(suppressed, 10)
			}
			g.record(rec)
			g.log.Info("ACME validation connection refused", "remote", remote, "err", err)
		}
		return
	}
	g.record(rec)
	if err := ca.AnswerACMEBind(conn, nil); err != nil {
		g.acmeBinds.drop(acc.ID, bc)
		return
	}
	_ = conn.SetDeadline(time.Time{})
}

func (g *Gateway) readACMEBind(conn *tls.Conn) (ca.AgentACMEAccount, error) {
	pub, err := ca.ReadACMEBind(conn)
	if err != nil {
		return ca.AgentACMEAccount{}, err
	}
	ctx, cancel := context.WithTimeout(g.bgCtx, acmeBindHelloTimeout)
	defer cancel()
	acc, err := g.authority.AgentACMEAccountByKey(ctx, pub)
	if err != nil {
		return ca.AgentACMEAccount{}, fmt.Errorf("not an agent's ACME account: %w", err)
	}
	return acc, nil
}

// acmeDial is the CA's validation dialer for agents: a connection bound to exactly
// this account and name, or an error.
func (g *Gateway) acmeDial(_ context.Context, name, accountID string) (net.Conn, error) {
	bc := g.acmeBinds.take(accountID, name)
	if bc == nil {
		return nil, fmt.Errorf("agent %s has no validation connection bound to ACME account %s", name, accountID)
	}
	return bc.conn, nil
}

// onAgentACMERefusal audits a refused agent ACME request.
func (g *Gateway) onAgentACMERefusal(r ca.AgentACMERefusal) {
	rec := audit.Record{Type: audit.TypeAgentEnrolled, Outcome: audit.OutcomeDenied, Reason: r.Reason,
		Extra: map[string]string{"via": "acme", "acme_action": r.Action, "acme_account": r.AccountID,
			"status": strconv.Itoa(r.Status), "identity_from": "ACME account binding"}}
	if r.Status >= 500 {
		rec.Outcome = audit.OutcomeError
	}
	if len(rec.Reason) > 300 {
		rec.Reason = rec.Reason[:300]
	}
	if r.Name != "" {
		setIdentity(&rec, ca.Identity{TrustDomain: g.authority.TrustDomain(), Role: ca.RoleAgent, Name: r.Name})
	}
	if ok, suppressed := g.caRefusedLimit.allow(time.Now()); ok {
		if suppressed > 0 {
			rec.Extra["suppressed_before"] = strconv.FormatInt(suppressed, 10)
		}
		g.record(rec)
		g.log.Info("agent ACME request refused", "agent", r.Name, "action", r.Action, "reason", rec.Reason)
	}
}

// onAgentACMEIssued audits a certificate issued to an agent by ACME.
func (g *Gateway) onAgentACMEIssued(id ca.Identity, serial string) {
	rec := audit.Record{Type: audit.TypeCertIssued, Outcome: audit.OutcomeOK, Serial: serial,
		Extra: map[string]string{"via": "acme"}}
	setIdentity(&rec, id)
	if !g.recordIssued(rec, id) {
		return
	}
	g.counters.certs.inc("issued", roleLabel(id.Role))
	g.log.Info("certificate issued", "kind", "acme", "identity", id.String(), "serial", serial)
}
