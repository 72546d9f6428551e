package gateway

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/wicketgw/wicket/ca"
	"github.com/wicketgw/wicket/gateway/audit"
	"github.com/wicketgw/wicket/tunnel"
)

// ALPN protocols served on the gateway port besides Wicket's own.
const (
	alpnH2    = "h2"
	alpnHTTP1 = "http/1.1"
)

// Reasons a handshake is refused, as counted and audited.
const (
	refusedVersion     = "unsupported TLS version"
	refusedUnknownCA   = "unknown CA"
	refusedExpired     = "certificate expired"
	refusedRevoked     = "certificate revoked"
	refusedWrongRole   = "wrong role"
	refusedNoCert      = "no client certificate"
	refusedBadALPN     = "unsupported ALPN"
	refusedTimeout     = "handshake timeout"
	refusedNotTLS      = "not TLS"
	refusedBadCert     = "invalid certificate"
	refusedOther       = "handshake failed"
	refusedShuttingDwn = "gateway shutting down"
	refusedBusy        = "too many handshakes from one address"
)

// RefusalReasons lists every reason a handshake can be refused for, as counted in
// Counters.HandshakesRefused; metrics export each at zero before its first refusal, so a
// rate() over it sees the first one.
func RefusalReasons() []string {
	return []string{refusedVersion, refusedUnknownCA, refusedExpired, refusedRevoked, refusedWrongRole,
		refusedNoCert, refusedBadALPN, refusedTimeout, refusedNotTLS, refusedBadCert, refusedOther, refusedShuttingDwn, refusedBusy}
}

// acceptLoop accepts TCP connections until the listener closes.
func (g *Gateway) acceptLoop() {
	var delay time.Duration
	for {
		raw, err := g.ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) || g.draining.Load() {
				return
			}
			// Out of file descriptors and the like: back off instead of spinning.
			if delay == 0 {
				delay = 5 * time.Millisecond
			} else if delay *= 2; delay > time.Second {
				delay = time.Second
			}
			g.log.Warn("accept failed, retrying", "err", err, "in", delay.String())
			select {
			case <-time.After(delay):
			case <-g.bgCtx.Done():
				return
			}
			continue
		}
		delay = 0
		// Bound the handshakes in progress, per source and in all (handshakes.go): a source
		// over its share is refused at once, and a full table makes room at the expense of
		// the source holding the most, never of the new arrival.
		slot := g.handshakes.admit(raw)
		if slot == nil {
			_ = raw.Close()
			g.refused(raw.RemoteAddr().String(), refusedBusy, errors.New("too many handshakes in progress from this address"))
			continue
		}
		g.goFunc(func() { g.handleConn(raw, slot) })
	}
}

// refusal is the error our own handshake checks return. The reason recorded in the audit log
// travels inside it, out of crypto/tls (which returns these errors from Handshake as they
// are), to handleConn.
type refusal struct {
	reason string
	err    error
}

func (r *refusal) Error() string { return r.err.Error() }
func (r *refusal) Unwrap() error { return r.err }

// newServerTLS builds the TLS config of the gateway's port. The config actually used is chosen
// per ClientHello by the ALPNs the client offers: each Wicket ALPN requires a client
// certificate of its own role, checked in the handshake, so a certificate of the other role
// never gets a session. All of these configs are built once and shared: crypto/tls keeps the
// chosen one for the connection's whole life, so a config per connection would cost every
// idle session its own copy.
func (g *Gateway) newServerTLS() *tls.Config {
	agent := g.peerTLS(tunnel.ALPNAgent, ca.RoleAgent)
	user := g.peerTLS(tunnel.ALPNClient, ca.RoleUser)

	// An agent enrolling or renewing by ACME: no certificate here; it proves possession of its
	// ACME account key after the handshake (serveACMEBind).
	acme := &tls.Config{GetCertificate: g.authority.GetCertificate}
	tunnel.HardenServerTLS(acme)
	acme.NextProtos = []string{ca.ACMEBindALPN}
	acme.ClientAuth = tls.NoClientCert

	// The CA API: /renew and mTLS /revoke authenticate by the client certificate, so one is
	// requested and, when given, must chain to our root (step-ca trusts the TLS layer for
	// that). Expiry and revocation are left to the CA's handlers so that a refused renewal says
	// why instead of failing with a TLS alert.
	api := &tls.Config{GetCertificate: g.authority.GetCertificate}
	tunnel.HardenServerTLS(api)
	api.NextProtos = []string{alpnH2, alpnHTTP1}
	api.ClientAuth = tls.RequestClientCert
	api.VerifyConnection = func(cs tls.ConnectionState) error {
		if len(cs.PeerCertificates) == 0 {
			return nil
		}
		if err := g.verifyChainIgnoringExpiry(cs.PeerCertificates); err != nil {
			return &refusal{classifyX509(err), err}
		}
		return nil
	}

	// refuse makes crypto/tls itself refuse a hello, which sends the alert naming why (an
	// error returned by GetConfigForClient would send internal_error): a client without TLS
	// 1.3 gets protocol_version, one whose ALPNs are not ours no_application_protocol (its
	// only protocol is the agent's, which such a client did not offer, or it would not be
	// here). classifyHandshake names the refusal from crypto/tls's error.
	refuse := &tls.Config{GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
		return nil, errors.New("refused before the certificate")
	}}
	tunnel.HardenServerTLS(refuse)
	refuse.NextProtos = []string{tunnel.ALPNAgent}

	base := &tls.Config{}
	tunnel.HardenServerTLS(base)
	base.GetConfigForClient = func(hello *tls.ClientHelloInfo) (*tls.Config, error) {
		if !slices.Contains(hello.SupportedVersions, tls.VersionTLS13) {
			return refuse, nil
		}
		protos := hello.SupportedProtos
		switch {
		case slices.Contains(protos, tunnel.ALPNAgent):
			return agent, nil
		case slices.Contains(protos, tunnel.ALPNClient):
			return user, nil
		case slices.Contains(protos, ca.ACMEBindALPN):
			return acme, nil
		case len(protos) == 0 || slices.Contains(protos, alpnH2) || slices.Contains(protos, alpnHTTP1):
			return api, nil
		}
		return refuse, nil
	}
	return base
}

// peerTLS is the config for a Wicket ALPN: a client certificate of role is required and
// verified (chain, role, expiry, revocation) in the handshake.
func (g *Gateway) peerTLS(alpn string, role ca.Role) *tls.Config {
	c := &tls.Config{GetCertificate: g.authority.GetCertificate}
	tunnel.HardenServerTLS(c)
	c.NextProtos = []string{alpn}
	c.ClientAuth = tls.RequireAnyClientCert
	c.VerifyConnection = func(cs tls.ConnectionState) error {
		if _, err := g.authority.VerifyPeer(cs.PeerCertificates, role); err != nil {
			return &refusal{classifyVerify(err), err}
		}
		return nil
	}
	return c
}

// verifyChainIgnoringExpiry checks that chain was issued by our CA for client auth, at a
// moment inside the leaf's validity: a genuine but expired certificate passes here and is
// refused, with its reason, by the CA handler it is presented to.
func (g *Gateway) verifyChainIgnoringExpiry(chain []*x509.Certificate) error {
	leaf := chain[0]
	t := g.clock.Now()
	if t.After(leaf.NotAfter) {
		t = leaf.NotAfter
	}
	if t.Before(leaf.NotBefore) {
		t = leaf.NotBefore
	}
	inters := x509.NewCertPool()
	inters.AddCert(g.authority.Intermediate())
	for _, c := range chain[1:] {
		inters.AddCert(c)
	}
	_, err := leaf.Verify(x509.VerifyOptions{Roots: g.authority.RootPool(), Intermediates: inters,
		CurrentTime: t, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}})
	if err != nil {
		return fmt.Errorf("client certificate: %w", err)
	}
	return nil
}

// classifyVerify maps a peer verification error to a refusal reason.
func classifyVerify(err error) string {
	switch {
	case errors.Is(err, ca.ErrRevoked):
		return refusedRevoked
	case errors.Is(err, ca.ErrExpired):
		return refusedExpired
	case errors.Is(err, ca.ErrWrongRole):
		return refusedWrongRole
	case errors.Is(err, ca.ErrUnknownCA):
		return refusedUnknownCA
	}
	return classifyX509(err)
}

func classifyX509(err error) string {
	var ua x509.UnknownAuthorityError
	if errors.As(err, &ua) {
		return refusedUnknownCA
	}
	var ci x509.CertificateInvalidError
	if errors.As(err, &ci) && ci.Reason == x509.Expired {
		return refusedExpired
	}
	return refusedBadCert
}

// classifyHandshake names the reason of a failed handshake our callbacks did not refuse.
func classifyHandshake(err error, ctxErr error) string {
	if errors.Is(ctxErr, context.DeadlineExceeded) {
		return refusedTimeout
	}
	var cv *tls.CertificateVerificationError
	if errors.As(err, &cv) {
		return classifyX509(cv.Err)
	}
	var rh tls.RecordHeaderError
	if errors.As(err, &rh) {
		return refusedNotTLS
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return refusedTimeout
	}
	msg := err.Error()
	switch {
	case strings.Contains(msg, "didn't provide a certificate"):
		return refusedNoCert
	case strings.Contains(msg, "unsupported versions"), strings.Contains(msg, "protocol version"):
		return refusedVersion
	case strings.Contains(msg, "application protocol"):
		return refusedBadALPN
	}
	return refusedOther
}

// handleConn runs the handshake of one connection and hands it to its ALPN's handler.
func (g *Gateway) handleConn(raw net.Conn, slot *pendingHandshake) {
	remote := raw.RemoteAddr().String()
	_ = raw.SetReadDeadline(time.Now().Add(min(firstBytesTimeout, g.cfg.HandshakeTimeout)))
	conn := tls.Server(&firstBytesConn{Conn: raw}, g.serverTLS)
	ctx, cancel := context.WithTimeout(g.bgCtx, g.cfg.HandshakeTimeout)
	err := conn.HandshakeContext(ctx)
	ctxErr := ctx.Err()
	cancel()
	g.handshakes.release(slot)
	_ = raw.SetReadDeadline(time.Time{})
	if err != nil {
		_ = conn.Close()
		if errors.Is(err, context.Canceled) && g.bgCtx.Err() != nil {
			return // shutting down
		}
		var rf *refusal
		reason := ""
		if errors.As(err, &rf) {
			reason = rf.reason
		} else {
			reason = classifyHandshake(err, ctxErr)
		}
		g.refused(remote, reason, err)
		return
	}
	g.counters.handshakesOK.Add(1)
	cs := conn.ConnectionState()
	switch cs.NegotiatedProtocol {
	case tunnel.ALPNAgent, tunnel.ALPNClient:
		role := ca.RoleAgent
		if cs.NegotiatedProtocol == tunnel.ALPNClient {
			role = ca.RoleUser
		}
		// The handshake verified the certificate; this takes the identity out of the same
		// (cached) verification. It fails only if the certificate was revoked in between.
		ident, err := g.authority.VerifyPeer(cs.PeerCertificates, role)
		if err != nil {
			_ = conn.Close()
			g.refused(remote, classifyVerify(err), err)
			return
		}
		if role == ca.RoleAgent {
			g.serveAgent(conn, ident, remote)
		} else {
			g.serveUser(conn, ident, remote)
		}
	case ca.ACMEBindALPN:
		g.serveACMEBind(conn, remote)
	default:
		if !g.httpLn.push(conn) {
			_ = conn.Close()
		}
	}
}

// refused counts, logs and audits a refused handshake. Anyone on the network can cause one,
// so beyond a burst the log lines and audit records are rate-limited (every refusal is still
// counted), and the next record written says how many were left out.
func (g *Gateway) refused(remote, reason string, err error) {
	g.counters.refusedInc(reason)
	ok, suppressed := g.refusedLimit.allow(time.Now())
	if !ok {
		return
	}
	g.log.Info("refused TLS handshake", "remote", remote, "reason", reason, "err", err)
	extra := map[string]string{"error": err.Error()}
	if suppressed > 0 {
		extra["suppressed_before"] = strconv.FormatInt(suppressed, 10)
	}
	g.record(audit.Record{Type: audit.TypeTLSRefused, Remote: remote, Reason: reason,
		Outcome: audit.OutcomeDenied, Extra: extra})
}

// rateLimit is a token bucket: burst events at once, then rate per second.
type rateLimit struct {
	mu         sync.Mutex
	burst      float64
	rate       float64
	tokens     float64
	last       time.Time
	suppressed int64
}

func newRateLimit(rate, burst float64) *rateLimit {
	return &rateLimit{rate: rate, burst: burst, tokens: burst}
}

// allow reports whether an event may go through now and, if so, how many were suppressed
// since the last one that went through.
func (l *rateLimit) allow(now time.Time) (bool, int64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.last.IsZero() {
		l.tokens = min(l.burst, l.tokens+now.Sub(l.last).Seconds()*l.rate)
	}
	l.last = now
	if l.tokens < 1 {
		l.suppressed++
		return false, 0
	}
	l.tokens--
	s := l.suppressed
	l.suppressed = 0
	return true, s
}

// memListener is a net.Listener fed with connections the router already handshook, so the CA's
// http.Server serves them (HTTP/2 included: net/http picks h2 from the *tls.Conn's
// negotiated protocol).
type memListener struct {
	addr net.Addr
	ch   chan net.Conn
	once sync.Once
	done chan struct{}
}

func newMemListener(addr net.Addr) *memListener {
	return &memListener{addr: addr, ch: make(chan net.Conn), done: make(chan struct{})}
}

func (l *memListener) push(c net.Conn) bool {
	select {
	case l.ch <- c:
		return true
	case <-l.done:
		return false
	}
}

func (l *memListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.ch:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *memListener) Close() error {
	l.once.Do(func() { close(l.done) })
	return nil
}

func (l *memListener) Addr() net.Addr { return l.addr }
