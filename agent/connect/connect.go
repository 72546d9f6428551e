// Package connect is the user side of Wicket: `wicket login` stores a user
// identity obtained with a one-time user token, and `wicket connect` turns
// every local TCP connection (or the process's stdin/stdout) into one stream
// to a resource through the gateway, over a single mutually authenticated
// tunnel session that reconnects when it drops. The user certificate renews
// itself while connect runs; after a renewal new streams go over a new
// session while the old one drains (make-before-break). A stream that ends
// abnormally resets its local connection (RST), so a cut transfer never
// looks complete, and a local client that gave up before its stream opened
// is never forwarded.
//
// What it must NOT do: listen on anything but the address it is given (a
// non-loopback address is allowed but warned about: whoever reaches it acts
// as this user); log a token or a key; keep going on an expired or revoked
// certificate.
package connect

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/wicketgw/wicket/agent/identity"
	"github.com/wicketgw/wicket/agent/internal/closed"
	"github.com/wicketgw/wicket/agent/internal/keeper"
	"github.com/wicketgw/wicket/agent/internal/track"
	"github.com/wicketgw/wicket/ca"
	"github.com/wicketgw/wicket/tunnel"
)

// DefaultDataDir is where a user identity lives by default: $WICKET_HOME,
// else ~/.wicket.
func DefaultDataDir() (string, error) {
	if d := os.Getenv("WICKET_HOME"); d != "" {
		return d, nil
	}
	home, err := os.UserHomeDir()
	if err != nil {
		return "", fmt.Errorf("find the home directory for ~/.wicket (set WICKET_HOME or --data-dir): %w", err)
	}
	return filepath.Join(home, ".wicket"), nil
}

// Login enrolls a user with a one-time user token and stores the identity
// in dataDir (default DefaultDataDir), replacing any identity stored there
// once the new one is safely obtained (a failed login leaves the old one).
func Login(ctx context.Context, token, dataDir string) (*identity.Stored, error) {
	return login(ctx, token, dataDir, ca.Enroll, time.Now)
}

func login(ctx context.Context, token, dataDir string,
	enroll func(context.Context, string) (*ca.Credentials, error), now func() time.Time) (*identity.Stored, error) {
	if strings.TrimSpace(token) == "" {
		return nil, errors.New("a token is required: get one from `wicket token create user NAME` and pass --token or WICKET_TOKEN")
	}
	if dataDir == "" {
		d, err := DefaultDataDir()
		if err != nil {
			return nil, err
		}
		dataDir = d
	}
	info, err := ca.InspectToken(token)
	if err != nil {
		return nil, fmt.Errorf("the token cannot be used: %w", err)
	}
	switch info.Identity.Role {
	case ca.RoleUser:
	case ca.RoleAgent:
		return nil, errors.New("this is an agent token; use `wicket agent --token`")
	default:
		return nil, fmt.Errorf("this is a %s token; `wicket login` needs one from `wicket token create user NAME`", info.Identity.Role)
	}
	creds, err := enroll(ctx, token)
	if err != nil {
		return nil, fmt.Errorf("log in as %s at %s: %w", info.Identity.Name, info.URL, identity.CAReason(err))
	}
	s := &identity.Stored{
		Meta: identity.Meta{URL: info.URL, Role: ca.RoleUser, Name: info.Identity.Name,
			TrustDomain: info.Identity.TrustDomain, TokenSHA256: identity.TokenHash(token), Enrolled: now().UTC()},
		Creds: creds,
	}
	if err := identity.Save(dataDir, s); err != nil {
		return nil, fmt.Errorf("logged in as %s but could not store the identity: %w", info.Identity.Name, err)
	}
	return s, nil
}

// Config configures Connect.
type Config struct {
	// DataDir holds the user identity. Default DefaultDataDir().
	DataDir string
	// Resource is the resource name to reach. Required.
	Resource string
	// Listen is the local TCP address to accept connections on. Default
	// "127.0.0.1:0" (a free port; OnListen learns which). Ignored with Stdio.
	Listen string
	// Stdio relays Stdin/Stdout as one stream instead of listening (for ssh
	// ProxyCommand); Connect returns when that stream ends.
	Stdio bool
	// Stdin and Stdout for Stdio. Defaults os.Stdin and os.Stdout.
	Stdin  io.Reader
	Stdout io.Writer
	// OnListen is called once with the listening address. Optional.
	OnListen func(net.Addr)
	// Tunnel holds the session knobs. Zero: tunnel.DefaultConfig().
	Tunnel tunnel.Config
	// OpenTimeout bounds how long a new local connection waits for a
	// session to the gateway before it is closed. Default 30s.
	OpenTimeout time.Duration
	// DrainTimeout bounds how long a session replaced after a renewal keeps
	// its streams. Zero (default): until they end or its certificate
	// expires (the gateway closes it then anyway).
	DrainTimeout time.Duration
	// RenewPeriod, when > 0, renews the certificate every RenewPeriod
	// instead of at about 2/3 of its lifetime (identity.RenewerConfig.Period).
	// For tests and demos. Default 0: off.
	RenewPeriod time.Duration
	// Reconnect is the backoff between connection attempts. Nil: 500 ms
	// doubling up to 30 s with full jitter, reset as soon as a session is
	// established and the gateway has answered.
	Reconnect *tunnel.Backoff
	// Logger receives events. Default: discard.
	Logger *slog.Logger
	// Now, After: the clock (renewal, backoff, drain). Defaults time.Now, time.After.
	Now   func() time.Time
	After func(time.Duration) <-chan time.Time
	// Renew talks to the CA. Default ca.Renew.
	Renew func(ctx context.Context, baseURL string, cur *ca.Credentials) (*ca.Credentials, error)
}

// Connect relays local connections to cfg.Resource until ctx ends (it then
// returns nil), the stdio stream ends, or the identity becomes unusable
// (expired or revoked: an error saying to log in again).
func Connect(ctx context.Context, cfg Config) error {
	if err := ca.ValidName(cfg.Resource); err != nil {
		return fmt.Errorf("resource: %w", err)
	}
	if cfg.DataDir == "" {
		d, err := DefaultDataDir()
		if err != nil {
			return err
		}
		cfg.DataDir = d
	}
	if cfg.Listen == "" {
		cfg.Listen = "127.0.0.1:0"
	}
	if cfg.Stdin == nil {
		cfg.Stdin = os.Stdin
	}
	if cfg.Stdout == nil {
		cfg.Stdout = os.Stdout
	}
	if cfg.Tunnel == (tunnel.Config{}) {
		cfg.Tunnel = tunnel.DefaultConfig()
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Tunnel.Logger == nil {
		cfg.Tunnel.Logger = cfg.Logger
	}
	if cfg.OpenTimeout <= 0 {
		cfg.OpenTimeout = 30 * time.Second
	}
	if cfg.Reconnect == nil {
		cfg.Reconnect = &tunnel.Backoff{}
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.After == nil {
		cfg.After = time.After
	}
	if cfg.Renew == nil {
		cfg.Renew = ca.Renew
	}

	s, err := identity.Load(cfg.DataDir)
	if errors.Is(err, identity.ErrNotFound) {
		return fmt.Errorf("not logged in (no identity in %s): run `wicket login --token TOKEN` first", cfg.DataDir)
	}
	if err != nil {
		return err
	}
	if s.Role != ca.RoleUser {
		return fmt.Errorf("%s holds the identity of %s %s, not of a user: use `wicket login` with a user token, or another --data-dir", cfg.DataDir, s.Role, s.Name)
	}
	if err := identity.CheckValid(s, cfg.Now()); err != nil {
		return fmt.Errorf("the user certificate expired at %s: log in again with a new token (`wicket login --token TOKEN`)",
			s.Leaf().NotAfter.UTC().Format(time.RFC3339))
	}
	c, err := newClient(cfg, s)
	if err != nil {
		return err
	}

	var ln net.Listener
	if !cfg.Stdio {
		ln, err = net.Listen("tcp", cfg.Listen)
		if err != nil {
			return fmt.Errorf("listen on %s: %w", cfg.Listen, err)
		}
		if tcp, ok := ln.Addr().(*net.TCPAddr); ok && !tcp.IP.IsLoopback() {
			c.log.Warn("listening on a non-loopback address: anyone who can reach it uses this identity", "addr", ln.Addr().String())
		}
	}
	return c.run(ctx, ln)
}

// client is one running `wicket connect`.
type client struct {
	cfg     Config
	log     *slog.Logger
	meta    identity.Meta
	renewer *identity.Renewer
	addr    string
	host    string
	roots   *x509.CertPool

	mu      sync.Mutex
	cur     *session
	changed chan struct{} // closed and replaced whenever cur changes
	lastErr error

	wg           sync.WaitGroup // local connections, drains
	lastDiagnose time.Time
}

func newClient(cfg Config, s *identity.Stored) (*client, error) {
	addr, host, roots, err := s.Gateway()
	if err != nil {
		return nil, fmt.Errorf("%w (in %s): log in again", err, cfg.DataDir)
	}
	log := cfg.Logger.With("user", s.Name, "resource", cfg.Resource)
	return &client{
		cfg: cfg, log: log, meta: s.Meta, addr: addr, host: host, roots: roots,
		renewer: identity.NewRenewer(s, identity.RenewerConfig{Dir: cfg.DataDir, Renew: cfg.Renew, Logger: log,
			Now: cfg.Now, After: cfg.After, Period: cfg.RenewPeriod}),
		changed: make(chan struct{}),
	}, nil
}

// session is one tunnel session to the gateway.
type session struct {
	sess    *tunnel.Session
	leaf    *x509.Certificate
	streams track.Tracker
}

// Done, Err and Cert make a session a keeper.Session.
func (s *session) Done() <-chan struct{}   { return s.sess.Done() }
func (s *session) Err() error              { return s.sess.Err() }
func (s *session) Cert() *x509.Certificate { return s.leaf }

func (c *client) setCurrent(s *session, err error) {
	c.mu.Lock()
	c.cur = s
	if err != nil {
		c.lastErr = err
	}
	close(c.changed)
	c.changed = make(chan struct{})
	c.mu.Unlock()
}

func (c *client) run(ctx context.Context, ln net.Listener) error {
	rctx, stop := context.WithCancelCause(ctx)
	defer stop(nil)
	var bg sync.WaitGroup
	bg.Add(2)
	go func() {
		defer bg.Done()
		if err := c.renewer.Run(rctx); err != nil && rctx.Err() == nil {
			stop(err)
		}
	}()
	go func() {
		defer bg.Done()
		if err := keeper.Run(rctx, c.keeperConfig()); err != nil {
			stop(err)
		}
	}()

	var runErr error
	if ln == nil {
		runErr = c.stdio(rctx)
	} else {
		if c.cfg.OnListen != nil {
			c.cfg.OnListen(ln.Addr())
		}
		c.log.Info("listening", "addr", ln.Addr().String(), "gateway", c.meta.URL)
		stopLn := context.AfterFunc(rctx, func() { ln.Close() })
		for {
			conn, err := ln.Accept()
			if err != nil {
				if rctx.Err() == nil {
					runErr = fmt.Errorf("accept local connections: %w", err)
				}
				break
			}
			c.wg.Add(1)
			go func() {
				defer c.wg.Done()
				c.relay(rctx, conn)
			}()
		}
		stopLn()
		ln.Close()
	}
	stop(nil)
	bg.Wait()
	c.wg.Wait()
	if err := context.Cause(rctx); ctx.Err() == nil && err != nil && !errors.Is(err, context.Canceled) {
		return err
	}
	return runErr
}

// stdio relays stdin/stdout as one stream. A stream that ends abnormally
// ends it at once with an error, without waiting for stdin to close.
func (c *client) stdio(ctx context.Context) error {
	st, s, err := c.open(ctx, nil)
	if err != nil {
		return err
	}
	defer s.streams.Done()
	in := newStdioConn(c.cfg.Stdin, c.cfg.Stdout)
	_, _, err = tunnel.Relay(ctx, in, st)
	if err != nil && ctx.Err() == nil {
		return fmt.Errorf("stream to resource %s: %w", c.cfg.Resource, err)
	}
	return nil
}

// relay carries one local connection. Until its stream is open the
// connection is watched: what the client sends meanwhile is kept and sent
// first, and a client that closes while the gateway is unreachable, or
// resets its connection, is never forwarded. Every abnormal end
// (a refusal, a reset stream, a lost session, connect stopping) resets the
// local connection; only a clean end closes it with FIN.
func (c *client) relay(ctx context.Context, conn net.Conn) {
	log := c.log.With("local", conn.RemoteAddr().String())
	w := watchEarly(conn)
	st, s, err := c.open(ctx, w)
	early, how := w.stop()
	if err != nil {
		switch {
		case errors.Is(err, errClientGone):
			log.Info("the client closed its connection before the stream opened; nothing was forwarded",
				"bytes_dropped", len(early), "how", closeHow(how))
		case ctx.Err() == nil:
			log.Error(err.Error())
		}
		closed.Reset(conn)
		return
	}
	defer s.streams.Done()
	if how != nil && how != io.EOF {
		// Reset by the client just as the stream opened: forward nothing.
		log.Info("the client reset its connection before the stream opened; nothing was forwarded", "bytes_dropped", len(early))
		st.Close()
		closed.Reset(conn)
		return
	}
	start := time.Now()
	log.Debug("stream opened", "early_bytes", len(early))
	var up, down int64
	if len(early) > 0 {
		n, err := st.Write(early)
		up = int64(n)
		if err != nil {
			log.Warn("connection ended with an error", "bytes_up", up, "err", err)
			st.Close()
			closed.Reset(conn)
			return
		}
	}
	// After a FIN the local reads return EOF again, so the relay half-closes
	// the stream as if the FIN came now.
	u, down, err := tunnel.Relay(ctx, closed.Held(conn), st)
	up += u
	closed.End(conn, err)
	attrs := []any{"bytes_up", up, "bytes_down", down, "duration", time.Since(start).Round(time.Millisecond)}
	switch {
	case err == nil:
		log.Info("connection ended", attrs...)
	case closed.ByPeer(err):
		log.Info("connection ended", append(attrs, "closed_by_peer", err.Error())...)
	default:
		log.Warn("connection ended with an error; the local connection was reset", append(attrs, "err", err)...)
	}
}

// closeHow words how the client's side ended for a log line.
func closeHow(err error) string {
	if err == io.EOF {
		return "closed"
	}
	return "reset"
}

// errClientGone: the local client went away before its stream opened.
var errClientGone = errors.New("the client closed its connection before the stream opened")

// earlyMax bounds what is kept of a client's bytes sent before its stream
// opens; beyond it the client waits (TCP flow control) like any slow link.
const earlyMax = 64 << 10

// early watches a local connection while its stream is being opened.
type early struct {
	conn  net.Conn
	buf   []byte
	err   error         // how the client's side ended: io.EOF (closed or half-closed) or a reset; nil: open
	ended chan struct{} // closed once err is set
	done  chan struct{} // the reading goroutine returned
}

func watchEarly(conn net.Conn) *early {
	w := &early{conn: conn, ended: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(w.done)
		b := make([]byte, 4<<10)
		for len(w.buf) < earlyMax {
			n, err := conn.Read(b[:min(len(b), earlyMax-len(w.buf))])
			w.buf = append(w.buf, b[:n]...)
			if err != nil {
				var ne net.Error
				if errors.As(err, &ne) && ne.Timeout() {
					return // stop's deadline, not the client
				}
				w.err = err
				close(w.ended)
				return
			}
		}
	}()
	return w
}

// gone is closed when the client closed or reset its side.
func (w *early) gone() <-chan struct{} {
	if w == nil {
		return nil
	}
	return w.ended
}

// reset reports, once gone is closed, whether the client reset its side
// (rather than closing or half-closing it).
func (w *early) reset() bool { return w.err != nil && w.err != io.EOF }

// stop ends the watch; it returns what the client sent and how its side
// ended (nil: it is still open).
func (w *early) stop() ([]byte, error) {
	_ = w.conn.SetReadDeadline(time.Unix(1, 0))
	<-w.done
	_ = w.conn.SetReadDeadline(time.Time{})
	return w.buf, w.err
}

// open opens a stream to the resource over the newest session. A stream
// that fails because its session is going away is retried on the next one;
// an answer from the gateway (refused, no agent, dial failed) is final.
//
// w (nil for stdio) is the local client being watched: if it goes away
// while the gateway is unreachable, open gives up with errClientGone (see
// session); if it resets its connection while the stream opens, the open is
// cancelled. A client that merely half-closes while the stream opens is
// still served.
func (c *client) open(ctx context.Context, w *early) (*tunnel.Stream, *session, error) {
	st, s, err := c.openStream(ctx, w)
	if err != nil && w != nil && ctx.Err() == nil {
		select {
		case <-w.gone():
			if w.reset() || errors.Is(err, errClientGone) {
				return nil, nil, errClientGone
			}
		default:
		}
	}
	return st, s, err
}

func (c *client) openStream(ctx context.Context, w *early) (*tunnel.Stream, *session, error) {
	deadline := time.Now().Add(c.cfg.OpenTimeout)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	if w != nil {
		stop := make(chan struct{})
		defer close(stop)
		go func() {
			select {
			case <-w.gone():
				if w.reset() {
					cancel()
				}
			case <-stop:
			}
		}()
	}
	var lastErr error
	for attempt := 0; attempt < 3; attempt++ {
		s, err := c.session(ctx, deadline, w)
		if err != nil {
			if lastErr != nil {
				err = fmt.Errorf("%w (last stream error: %v)", err, lastErr)
			}
			return nil, nil, err
		}
		if !s.streams.TryAdd() {
			// Replaced after a renewal an instant ago: the newest session is current.
			continue
		}
		st, err := s.sess.OpenStream(ctx, tunnel.Header{Kind: tunnel.KindData, Resource: c.cfg.Resource})
		if err == nil {
			return st, s, nil
		}
		s.streams.Done()
		var re *tunnel.ReplyError
		if errors.As(err, &re) {
			return nil, nil, replyError(c.cfg.Resource, re)
		}
		if ctx.Err() != nil {
			return nil, nil, ctx.Err()
		}
		lastErr = err
		// The session is closing or draining: wait until it is replaced.
		select {
		case <-s.sess.Done():
		case <-time.After(50 * time.Millisecond):
		}
	}
	return nil, nil, fmt.Errorf("could not open a stream to resource %s: %w", c.cfg.Resource, lastErr)
}

// replyError turns the gateway's answer into one sentence.
func replyError(resource string, re *tunnel.ReplyError) error {
	var what string
	switch re.Status {
	case tunnel.StatusRefused:
		what = "access to resource " + resource + " was refused"
	case tunnel.StatusUnknownResource:
		what = "no agent serves resource " + resource
	case tunnel.StatusUnavailable:
		what = "resource " + resource + " is unavailable"
	case tunnel.StatusDialFailed:
		what = "the agent could not reach resource " + resource
	default:
		what = "the gateway did not open resource " + resource
	}
	if re.Reason != "" {
		what += ": " + re.Reason
	}
	return &openError{msg: what, re: re}
}

// openError is the gateway's refusal in one sentence; errors.Is still
// matches tunnel.ErrRefused and friends through the wrapped *ReplyError.
type openError struct {
	msg string
	re  *tunnel.ReplyError
}

func (e *openError) Error() string { return e.msg }
func (e *openError) Unwrap() error { return e.re }

// session returns the current open session, waiting for one until
// deadline. A watched client (w, nil for stdio) that resets its connection
// meanwhile, or closes it while the gateway is known to be unreachable (an
// attempt failed or the session was lost), has given up: errClientGone. One
// that closes while connect is still making its first session may only have
// half-closed after its request, and keeps waiting.
func (c *client) session(ctx context.Context, deadline time.Time, w *early) (*session, error) {
	gone, closedEarly := w.gone(), false
	for {
		c.mu.Lock()
		s, changed, lastErr := c.cur, c.changed, c.lastErr
		c.mu.Unlock()
		if s != nil {
			select {
			case <-s.sess.Done():
			default:
				return s, nil
			}
		}
		if closedEarly && lastErr != nil {
			return nil, errClientGone
		}
		wait := time.Until(deadline)
		if wait <= 0 {
			if lastErr == nil {
				lastErr = errors.New("still connecting")
			}
			return nil, fmt.Errorf("no session to the gateway at %s within %s: %v", c.addr, c.cfg.OpenTimeout, lastErr)
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, ctx.Err()
		case <-gone:
			if w.reset() || lastErr != nil {
				t.Stop()
				return nil, errClientGone
			}
			gone, closedEarly = nil, true
		case <-changed:
		case <-t.C:
		}
		t.Stop()
	}
}

// keeperConfig wires the client into the keep-a-session loop: a session
// is established once the gateway has answered a ping, becomes the one new
// streams use, and is replaced make-before-break after each renewal.
func (c *client) keeperConfig() keeper.Config[*session] {
	return keeper.Config[*session]{
		Check: func() error {
			if err := identity.CheckValid(&identity.Stored{Creds: c.renewer.Current()}, c.cfg.Now()); err != nil {
				return userExpired(err)
			}
			return nil
		},
		Dial: c.dial,
		DialFailed: func(ctx context.Context, err error) error {
			c.setCurrent(nil, err)
			return c.diagnose(ctx, err)
		},
		Up: func(s *session) {
			c.setCurrent(s, nil)
			c.log.Info("connected to the gateway", "gateway", c.addr, "cert_expires", s.leaf.NotAfter.UTC().Format(time.RFC3339))
		},
		Switched: func(ctx context.Context, old, next *session) {
			c.setCurrent(next, nil)
			c.log.Info("moved to a new session with the renewed certificate", "draining_streams", old.streams.Active(),
				"cert_expires", next.leaf.NotAfter.UTC().Format(time.RFC3339))
			c.wg.Add(1)
			go func() {
				defer c.wg.Done()
				c.drain(ctx, old)
			}()
		},
		SwitchFailed: func(err error) {
			c.log.Warn("could not open a session with the renewed certificate; the current session keeps serving", "err", err)
		},
		Down: func(s *session, cause error) {
			if errors.Is(cause, context.Canceled) {
				cause = nil
			}
			c.setCurrent(nil, cause)
			s.sess.Close()
		},
		Retrying: func(err error, wait time.Duration) {
			c.log.Warn(fmt.Sprintf("no session to the gateway; reconnecting in %s", wait.Round(time.Millisecond)),
				"reason", err, "gateway", c.addr)
		},
		Renewed: c.renewer.Updates(),
		Backoff: c.cfg.Reconnect,
		After:   c.cfg.After,
	}
}

// drain closes a replaced session once its streams have ended, its
// certificate has expired, DrainTimeout has passed, or ctx ended.
func (c *client) drain(ctx context.Context, s *session) {
	s.streams.Seal()
	bound := s.leaf.NotAfter.Sub(c.cfg.Now())
	if c.cfg.DrainTimeout > 0 && c.cfg.DrainTimeout < bound {
		bound = c.cfg.DrainTimeout
	}
	select {
	case <-s.streams.Idle():
	case <-s.sess.Done():
	case <-ctx.Done():
	case <-c.cfg.After(bound):
	}
	left := s.streams.Active()
	s.sess.Close()
	c.log.Debug("closed the replaced session", "streams_cut", left)
}

// sessionError marks a failure after the TCP connection was made: the
// gateway may have refused the certificate.
type sessionError struct{ err error }

func (e *sessionError) Error() string { return e.err.Error() }
func (e *sessionError) Unwrap() error { return e.err }

// dial opens a session with the newest certificate and proves the gateway
// accepted it with one ping (in TLS 1.3 a refused client certificate shows
// only after the handshake).
func (c *client) dial(ctx context.Context) (*session, error) {
	getCert, usedCert := c.renewer.RecordingClientCertificate()
	tc := tunnel.ClientTLSConfig(tunnel.ALPNClient, c.roots, c.host, getCert)
	ts, err := tunnel.Dial(ctx, tunnel.DialConfig{Addr: c.addr, TLS: tc, Config: c.cfg.Tunnel})
	if err != nil {
		if strings.Contains(err.Error(), "remote error: tls") {
			return nil, &sessionError{err}
		}
		return nil, err
	}
	pinged := make(chan error, 1)
	go func() {
		_, err := ts.Ping()
		pinged <- err
	}()
	waiting := true
	select {
	case err = <-pinged:
		waiting = false
	case <-time.After(c.cfg.Tunnel.HandshakeTimeout):
		err = errors.New("no answer from the gateway")
	case <-ctx.Done():
		err = ctx.Err()
	}
	if err != nil {
		ts.Close()
		if waiting {
			<-pinged // Close makes Ping return
		}
		return nil, &sessionError{fmt.Errorf("session with the gateway at %s: %w", c.addr, err)}
	}
	leaf := usedCert()
	if leaf == nil {
		ts.Close()
		return nil, &sessionError{errors.New("the gateway did not ask for the user certificate")}
	}
	return &session{sess: ts, leaf: leaf}, nil
}

// diagnose asks the CA why the gateway refused the session (see the agent's
// counterpart): a revoked or expired certificate ends Connect (it returns
// that error).
func (c *client) diagnose(ctx context.Context, dialErr error) error {
	var se *sessionError
	if !errors.As(dialErr, &se) {
		return nil
	}
	now := c.cfg.Now()
	if !c.lastDiagnose.IsZero() && now.Sub(c.lastDiagnose) < time.Minute {
		return nil
	}
	c.lastDiagnose = now
	err := c.renewer.RenewNow(ctx)
	switch {
	case err == nil:
		c.log.Info("the gateway refused the session; the certificate was renewed, retrying with it")
	case errors.Is(err, identity.ErrRevoked):
		return err
	case errors.Is(err, identity.ErrExpired):
		return userExpired(err)
	}
	return nil
}

// userExpired words an expiry for a user, who logs in rather than enrolls.
func userExpired(err error) error {
	var ee *identity.ExpiredError
	if errors.As(err, &ee) {
		return fmt.Errorf("the user certificate expired at %s: log in again with a new token (`wicket login --token TOKEN`): %w",
			ee.NotAfter.UTC().Format(time.RFC3339), identity.ErrExpired)
	}
	return err
}

// stdioConn is stdin/stdout as a net.Conn for tunnel.Relay. Stdin is read
// by a goroutine of its own, so that Close makes a pending Read return even
// when stdin cannot be interrupted (a terminal, a blocking pipe): a stream
// that died ends connect at once rather than at the next line typed.
type stdioConn struct {
	r       io.Reader
	w       io.Writer
	chunks  chan stdinChunk
	closed  chan struct{}
	once    sync.Once
	pending []byte // the rest of a chunk larger than a Read
	rerr    error  // stdin's end, once reached
}

type stdinChunk struct {
	b   []byte
	err error
}

func newStdioConn(r io.Reader, w io.Writer) *stdioConn {
	s := &stdioConn{r: r, w: w, chunks: make(chan stdinChunk), closed: make(chan struct{})}
	go s.pump()
	return s
}

// pump reads stdin until it ends or the connection is closed (then a Read
// still blocked in stdin is left to the process's exit).
func (s *stdioConn) pump() {
	for {
		b := make([]byte, 32<<10)
		n, err := s.r.Read(b)
		select {
		case s.chunks <- stdinChunk{b[:n], err}:
		case <-s.closed:
			return
		}
		if err != nil {
			return
		}
	}
}

func (s *stdioConn) Read(p []byte) (int, error) {
	for len(s.pending) == 0 {
		if s.rerr != nil {
			return 0, s.rerr
		}
		select {
		case c := <-s.chunks:
			s.pending, s.rerr = c.b, c.err
		case <-s.closed:
			return 0, net.ErrClosed
		}
	}
	n := copy(p, s.pending)
	s.pending = s.pending[n:]
	return n, nil
}

func (s *stdioConn) Write(p []byte) (int, error) { return s.w.Write(p) }

// CloseWrite ends our output (the remote side finished).
func (s *stdioConn) CloseWrite() error {
	if c, ok := s.w.(io.Closer); ok {
		return c.Close()
	}
	return nil
}

func (s *stdioConn) Close() error {
	s.once.Do(func() { close(s.closed) })
	if c, ok := s.r.(io.Closer); ok {
		c.Close()
	}
	return s.CloseWrite()
}

func (s *stdioConn) LocalAddr() net.Addr  { return stdioAddr{} }
func (s *stdioConn) RemoteAddr() net.Addr { return stdioAddr{} }

func (s *stdioConn) SetDeadline(t time.Time) error {
	if d, ok := s.w.(interface{ SetDeadline(time.Time) error }); ok {
		return d.SetDeadline(t)
	}
	return nil
}

// SetReadDeadline is not supported on stdin; the relay does not need it.
func (s *stdioConn) SetReadDeadline(time.Time) error { return nil }

func (s *stdioConn) SetWriteDeadline(t time.Time) error {
	if d, ok := s.w.(interface{ SetWriteDeadline(time.Time) error }); ok {
		_ = d.SetWriteDeadline(t) // a terminal or a regular file has no deadlines
	}
	return nil
}

type stdioAddr struct{}

func (stdioAddr) Network() string { return "stdio" }
func (stdioAddr) String() string  { return "stdio" }
