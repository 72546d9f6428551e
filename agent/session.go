package agent

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/wicketgw/wicket/agent/internal/closed"
	"github.com/wicketgw/wicket/agent/internal/track"
	"github.com/wicketgw/wicket/tunnel"
	"github.com/wicketgw/wicket/tunnel/pgwire"
)

// Stages of establishing a session, so that a failure can be classified.
type stage int

const (
	stageTCP   stage = iota // TCP connect, TLS handshake: the gateway may be down
	stageHello              // control stream and hello exchange: the gateway may have refused us
)

// sessionError is a failure to establish a session.
type sessionError struct {
	stage stage
	err   error
}

func (e *sessionError) Error() string { return e.err.Error() }
func (e *sessionError) Unwrap() error { return e.err }

// session is one tunnel session to the gateway and the goroutines serving it.
type session struct {
	sess           *tunnel.Session
	ctl            *tunnel.Control
	leaf           *x509.Certificate // the certificate this session authenticated with
	gatewaySession string            // the gateway's id for it, from its hello
	streams        track.Tracker
	cancel         context.CancelFunc
	wg             sync.WaitGroup
	closeOnce      sync.Once
}

// close ends the session and waits for its goroutines (stream handlers end
// when their streams die with the session).
func (s *session) close() {
	s.closeOnce.Do(func() {
		s.cancel()
		s.sess.Close()
		s.wg.Wait()
	})
}

// dialSession dials the gateway with the newest certificate, exchanges
// hellos, and starts serving streams. The session is routable once this
// returns: the gateway sends its hello only after registering the session.
func (a *agent) dialSession(ctx context.Context) (*session, error) {
	getCert, usedCert := a.renewer.RecordingClientCertificate()
	tc := tunnel.ClientTLSConfig(tunnel.ALPNAgent, a.roots, a.host, getCert)
	ts, err := tunnel.Dial(ctx, tunnel.DialConfig{Addr: a.addr, TLS: tc, Config: a.cfg.Tunnel})
	if err != nil {
		st := stageTCP
		if strings.Contains(err.Error(), "remote error: tls") {
			st = stageHello // the gateway refused our certificate during the handshake
		}
		return nil, &sessionError{stage: st, err: err}
	}
	leaf := usedCert()
	if leaf == nil {
		ts.Close()
		return nil, &sessionError{stage: stageHello, err: errors.New("the gateway did not ask for the agent certificate")}
	}
	hctx, cancel := context.WithTimeout(ctx, a.cfg.HelloTimeout)
	defer cancel()
	ctl, ack, err := a.hello(hctx, ts)
	if err != nil {
		ts.Close()
		return nil, &sessionError{stage: stageHello, err: fmt.Errorf("hello with the gateway at %s: %w", a.addr, err)}
	}
	// The session's streams outlive ctx by up to GracePeriod at shutdown, so
	// their context is cut from ctx and ended by session.close.
	sctx, scancel := context.WithCancel(context.WithoutCancel(ctx))
	s := &session{sess: ts, ctl: ctl, leaf: leaf, gatewaySession: ack.Instance, cancel: scancel}
	log := a.log.With("session", s.gatewaySession)
	logRefused(log, ack.Refused)
	a.cfg.Stats.Connects.Add(1)
	a.cfg.Stats.SessionsUp.Add(1)
	s.wg.Add(3)
	go func() {
		defer s.wg.Done()
		<-ts.Done()
		a.cfg.Stats.SessionsUp.Add(-1)
	}()
	go func() {
		defer s.wg.Done()
		a.serve(sctx, s, log)
	}()
	go func() {
		defer s.wg.Done()
		// Later control messages from the gateway: resources withdrawn by a
		// grant change are logged like refusals; the rest (closing) is read so
		// the stream's window never fills, and logged for debugging.
		for {
			var msg struct {
				tunnel.Withdrawn
				Closing string `json:"closing"`
			}
			if err := ctl.Recv(&msg); err != nil {
				ctl.Close()
				return
			}
			if len(msg.Withdrawn.Withdrawn) > 0 {
				logRefused(log, msg.Withdrawn.Withdrawn)
				continue
			}
			log.Debug("control message from the gateway", "closing", msg.Closing)
		}
	}()
	return s, nil
}

// logRefused logs, one line each, the resources the gateway refused to route to this agent
// (not granted to its name); the gateway's sentence names the command that allows them.
func logRefused(log *slog.Logger, refused []tunnel.Refusal) {
	for _, r := range refused {
		log.Warn(r.Reason, "resource", r.Resource)
	}
}

// hello opens the control stream, sends the agent's hello and waits for the
// gateway's.
func (a *agent) hello(ctx context.Context, ts *tunnel.Session) (*tunnel.Control, tunnel.Hello, error) {
	var ack tunnel.Hello
	ctl, err := ts.OpenControl(ctx)
	if err != nil {
		return nil, ack, err
	}
	if err := ctl.Send(a.helloMsg()); err != nil {
		return nil, ack, err
	}
	stop := context.AfterFunc(ctx, func() { ctl.Stream().SetReadDeadline(time.Unix(1, 0)) })
	err = ctl.Recv(&ack)
	stopped := stop()
	if err != nil {
		if ctx.Err() != nil {
			return nil, ack, fmt.Errorf("no hello from the gateway within %s", a.cfg.HelloTimeout)
		}
		return nil, ack, err
	}
	if !stopped {
		// The deadline fired just as the hello arrived; clear it.
		ctl.Stream().SetReadDeadline(time.Time{})
	}
	return ctl, ack, nil
}

// serve accepts the gateway's streams on s until it ends.
func (a *agent) serve(ctx context.Context, s *session, log *slog.Logger) {
	var handlers sync.WaitGroup
	defer handlers.Wait()
	for {
		st, err := s.sess.AcceptStream(ctx)
		if err != nil {
			return // session closed or ctx done
		}
		s.streams.Add()
		handlers.Add(1)
		go func() {
			defer handlers.Done()
			defer s.streams.Done()
			a.handle(ctx, st, log)
		}()
	}
}

// handle answers one stream-open request: only a resource from Expose is
// dialed, with DialTimeout; the gateway learns OK, unknown resource, or
// dial failed with a reason that names no address.
func (a *agent) handle(ctx context.Context, st *tunnel.Stream, log *slog.Logger) {
	h := st.Header()
	log = log.With("resource", h.Resource, "stream", h.SessionID)
	if h.Kind != tunnel.KindData {
		a.cfg.Stats.StreamsRefused.Add(1)
		log.Warn("refused a stream that is not a data stream", "kind", h.Kind.String())
		_ = st.Reply(tunnel.StatusRefused, "the agent accepts only data streams")
		st.Close()
		return
	}
	target, ok, why := a.target(h)
	if !ok {
		a.cfg.Stats.StreamsRefused.Add(1)
		log.Warn("refused a stream for a resource this agent does not expose", "reason", why)
		// The gateway prefixes reasons with the agent's name; keep them short.
		_ = st.Reply(tunnel.StatusUnknownResource, why)
		st.Close()
		return
	}
	start := time.Now()
	conn, derr := a.dial(ctx, target)
	if derr != nil {
		a.cfg.Stats.StreamsDialFailed.Add(1)
		log.Warn("could not reach the resource", "target", target.addr, "err", derr)
		_ = st.Reply(tunnel.StatusDialFailed, derr.reason)
		st.Close()
		return
	}
	if err := st.Reply(tunnel.StatusOK, ""); err != nil {
		log.Warn("could not answer the gateway", "err", err)
		conn.Close()
		st.Close()
		return
	}
	log.Debug("stream opened", "target", target.addr)
	// A stream that dies (the gateway or its session gone, the agent
	// stopping) resets the resource's connection instead of ending it with
	// FIN, so the resource cannot take a cut request for a complete one.
	toTarget, fromTarget, err := tunnel.Relay(ctx, st, closed.Held(conn))
	closed.End(conn, err)
	a.cfg.Stats.StreamsOK.Add(1)
	a.cfg.Stats.BytesToResource.Add(toTarget)
	a.cfg.Stats.BytesFromResource.Add(fromTarget)
	attrs := []any{"bytes_to_resource", toTarget, "bytes_from_resource", fromTarget,
		"duration", time.Since(start).Round(time.Millisecond)}
	switch {
	case err == nil:
		log.Info("stream ended", attrs...)
	case closed.ByPeer(err):
		log.Info("stream ended", append(attrs, "closed_by_peer", err.Error())...)
	default:
		log.Warn("stream ended with an error", append(attrs, "err", err)...)
	}
}

// dialError is a failed dial of a resource: the error to log, and the reason to answer the
// gateway, which names no address.
type dialError struct {
	err    error
	reason string
}

func (e *dialError) Error() string { return e.err.Error() }

// dial connects to a stream's target within DialTimeout; for a PostgreSQL resource it also
// runs the TLS negotiation its sslmode asks for, so the relayed bytes leave the agent
// encrypted whenever the database leg can be.
func (a *agent) dial(ctx context.Context, t target) (net.Conn, *dialError) {
	ctx, cancel := context.WithTimeout(ctx, a.cfg.DialTimeout)
	defer cancel()
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", t.addr)
	if err != nil {
		return nil, &dialError{err: err, reason: dialReason(err, a.cfg.DialTimeout)}
	}
	if t.pg == nil {
		return conn, nil
	}
	pc, err := t.pg.Negotiate(ctx, conn)
	if err != nil {
		conn.Close()
		reason := "the database's TLS negotiation failed: " + dialReason(err, a.cfg.DialTimeout)
		if errors.Is(err, pgwire.ErrDatabaseTLS) {
			reason = dbTLSReason(err)
		}
		return nil, &dialError{err: err, reason: reason}
	}
	return pc, nil
}

// dbTLSReason is the gateway's answer for a database TLS failure: the error's own sentence
// names no address, only the mode and what went wrong.
func dbTLSReason(err error) string {
	var ue x509.UnknownAuthorityError
	var he x509.HostnameError
	switch {
	case errors.As(err, &ue):
		return "database TLS: the server's certificate is not signed by the resource's sslrootcert"
	case errors.As(err, &he):
		return "database TLS: the server's certificate does not name the resource's host (sslmode=verify-full)"
	}
	return err.Error()
}

// dialReason says why a dial failed without repeating the address, which
// the gateway (and the user behind it) need not learn.
func dialReason(err error, timeout time.Duration) string {
	var ne net.Error
	switch {
	case errors.Is(err, syscall.ECONNREFUSED):
		return "connection refused"
	case errors.Is(err, syscall.EHOSTUNREACH), errors.Is(err, syscall.ENETUNREACH):
		return "no route to host"
	case errors.As(err, &ne) && ne.Timeout():
		return fmt.Sprintf("timed out after %s", timeout)
	case errors.Is(err, context.Canceled):
		return "the agent is stopping"
	}
	var dnsErr *net.DNSError
	if errors.As(err, &dnsErr) {
		return "the resource's host name does not resolve"
	}
	var se *os.SyscallError
	if errors.As(err, &se) {
		return se.Err.Error()
	}
	if errors.Is(err, io.EOF) {
		return "connection closed"
	}
	return "connection failed"
}

// Done, Err and Cert make a session a keeper.Session.
func (s *session) Done() <-chan struct{}   { return s.sess.Done() }
func (s *session) Err() error              { return s.sess.Err() }
func (s *session) Cert() *x509.Certificate { return s.leaf }
