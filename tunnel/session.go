package tunnel

import (
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/yamux"
)

// DialConfig says where and how to Dial.
type DialConfig struct {
	// Addr is the gateway's host:port.
	Addr string
	// TLS is the client configuration, normally from ClientTLSConfig. Its
	// NextProtos[0] is the ALPN protocol the server must select.
	TLS *tls.Config
	// Config holds the session knobs; a zero Config means DefaultConfig().
	Config Config
	// Dialer is optional; nil means a net.Dialer with a 30 s keepalive.
	Dialer *net.Dialer
}

// Dial connects to a gateway: TCP, then a TLS 1.3 handshake bounded by
// Config.HandshakeTimeout (and ctx), then checks the negotiated version and
// ALPN, then starts the yamux client session.
func Dial(ctx context.Context, dc DialConfig) (*Session, error) {
	cfg := dc.Config
	if cfg == (Config{}) {
		cfg = DefaultConfig()
	}
	if err := cfg.Verify(); err != nil {
		return nil, fmt.Errorf("dial %s: %w", dc.Addr, err)
	}
	if dc.TLS == nil || len(dc.TLS.NextProtos) == 0 {
		return nil, fmt.Errorf("dial %s: TLS config with an ALPN protocol is required (use ClientTLSConfig)", dc.Addr)
	}
	d := dc.Dialer
	if d == nil {
		d = &net.Dialer{KeepAlive: 30 * time.Second}
	}
	hctx, cancel := context.WithTimeout(ctx, cfg.HandshakeTimeout)
	defer cancel()
	raw, err := d.DialContext(hctx, "tcp", dc.Addr)
	if err != nil {
		return nil, fmt.Errorf("dial %s: %w", dc.Addr, err)
	}
	tcfg := dc.TLS.Clone()
	if tcfg.ServerName == "" {
		if host, _, err := net.SplitHostPort(dc.Addr); err == nil {
			tcfg.ServerName = host
		}
	}
	conn := tls.Client(raw, tcfg)
	if err := conn.HandshakeContext(hctx); err != nil {
		raw.Close()
		return nil, fmt.Errorf("dial %s: TLS handshake: %w", dc.Addr, handshakeErr(err, cfg.HandshakeTimeout))
	}
	if err := checkConn(conn.ConnectionState(), tcfg.NextProtos[:1]); err != nil {
		conn.Close()
		return nil, fmt.Errorf("dial %s: %w", dc.Addr, err)
	}
	s, err := newSession(conn, cfg, true)
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("dial %s: %w", dc.Addr, err)
	}
	return s, nil
}

// Server starts the gateway side of a session on conn. The gateway's ALPN
// router normally hands over a connection whose handshake (and certificate
// verification, by the router's tls.Config) is complete; if it is not, Server
// runs the handshake bounded by cfg.HandshakeTimeout. Server then requires TLS
// 1.3, a tunnel ALPN (ALPNAgent or ALPNClient) and a peer certificate; on any
// failure it closes conn. A zero cfg means DefaultConfig().
func Server(conn *tls.Conn, cfg Config) (*Session, error) {
	if cfg == (Config{}) {
		cfg = DefaultConfig()
	}
	if err := cfg.Verify(); err != nil {
		conn.Close()
		return nil, fmt.Errorf("tunnel server %s: %w", conn.RemoteAddr(), err)
	}
	if !conn.ConnectionState().HandshakeComplete {
		ctx, cancel := context.WithTimeout(context.Background(), cfg.HandshakeTimeout)
		err := conn.HandshakeContext(ctx)
		cancel()
		if err != nil {
			conn.Close()
			return nil, fmt.Errorf("tunnel server %s: TLS handshake: %w", conn.RemoteAddr(), handshakeErr(err, cfg.HandshakeTimeout))
		}
	}
	if err := checkConn(conn.ConnectionState(), []string{ALPNAgent, ALPNClient}); err != nil {
		conn.Close()
		return nil, fmt.Errorf("tunnel server %s: %w", conn.RemoteAddr(), err)
	}
	// The router may have left a handshake deadline on the connection.
	if err := conn.SetDeadline(time.Time{}); err != nil {
		conn.Close()
		return nil, fmt.Errorf("tunnel server %s: %w", conn.RemoteAddr(), err)
	}
	s, err := newSession(conn, cfg, false)
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("tunnel server %s: %w", conn.RemoteAddr(), err)
	}
	return s, nil
}

// handshakeErr names a handshake that ran out of time as such.
func handshakeErr(err error, limit time.Duration) error {
	if errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("not completed within the %s handshake timeout: %w", limit, err)
	}
	return err
}

func checkConn(cs tls.ConnectionState, alpns []string) error {
	if cs.Version != tls.VersionTLS13 {
		return fmt.Errorf("%w (negotiated %s)", ErrTLSVersion, tls.VersionName(cs.Version))
	}
	ok := false
	for _, p := range alpns {
		if cs.NegotiatedProtocol == p {
			ok = true
		}
	}
	if !ok {
		return fmt.Errorf("%w: want %q, got %q", ErrALPN, alpns, cs.NegotiatedProtocol)
	}
	if len(cs.PeerCertificates) == 0 {
		return ErrNoPeerCertificate
	}
	return nil
}

// Session is one tunnel connection: a TLS 1.3 connection carrying a yamux
// session. It is safe for concurrent use.
type Session struct {
	ys     *yamux.Session
	conn   *tls.Conn
	wc     *frameConn // what yamux writes to; Stream.Reset puts its RST frame here
	cfg    Config
	log    *slog.Logger
	client bool

	rejected atomic.Uint64 // streams refused because their header was bad

	errMu sync.Mutex
	err   error // why we closed the session, if we did

	kaMu      sync.Mutex
	kaTimer   *time.Timer
	kaStopped bool
	kaWG      sync.WaitGroup

	// AcceptStream accepts the peer's streams on its caller's goroutine and reads each
	// header in a goroutine of its own, which lives only while it reads, so that a stream
	// whose header is late does not hold up the next one and an idle session costs no
	// goroutine for it. AcceptStream is called by one goroutine at a time.
	acceptMu      sync.Mutex         // orders header readers' start against Close's wait
	acceptClosing bool               // Close is waiting for the header readers
	acceptCancel  context.CancelFunc // ends the yamux accept AcceptStream is in, when a header is done
	ready         []*Stream          // streams whose header was read, oldest first (acceptMu)
	headerDone    chan struct{}      // a header reader finished (capacity 1: a wake-up, not a count)
	headerSlots   chan struct{}      // one per stream being read or waiting in accepted
	acceptWG      sync.WaitGroup     // the header readers
}

// maxPendingHeaders bounds, per session, the accepted streams whose header is being read or
// that wait for AcceptStream; beyond it the peer's new streams wait in yamux's backlog.
const maxPendingHeaders = 64

func newSession(conn *tls.Conn, cfg Config, client bool) (*Session, error) {
	s := &Session{
		conn:   conn,
		cfg:    cfg,
		log:    cfg.logger().With("remote", conn.RemoteAddr().String()),
		client: client,

		headerDone:  make(chan struct{}, 1),
		headerSlots: make(chan struct{}, maxPendingHeaders),
	}
	wc := newFrameConn(conn, cfg.ConnectionWriteTimeout, s.writeTimedOut)
	s.wc = wc
	var err error
	if client {
		s.ys, err = yamux.Client(wc, cfg.yamuxConfig())
	} else {
		s.ys, err = yamux.Server(wc, cfg.yamuxConfig())
	}
	if err != nil {
		return nil, fmt.Errorf("start yamux: %w", err)
	}
	s.kaTimer = time.AfterFunc(cfg.KeepAliveInterval, s.keepalive)
	return s, nil
}

// keepalive runs from a timer rather than a dedicated goroutine, so an idle
// session costs no stack for it. A ping that is not answered within
// ConnectionWriteTimeout closes the session.
func (s *Session) keepalive() {
	s.kaMu.Lock()
	if s.kaStopped {
		s.kaMu.Unlock()
		return
	}
	s.kaWG.Add(1)
	s.kaMu.Unlock()
	defer s.kaWG.Done()

	if _, err := s.ys.Ping(); err != nil {
		if !s.ys.IsClosed() {
			s.log.Warn("tunnel peer stopped answering keepalives; closing the session", "err", err)
			s.setErr(ErrKeepaliveTimeout)
			s.shutdown() // not Close: it would wait for this very goroutine
		}
		return
	}
	s.kaMu.Lock()
	if !s.kaStopped {
		s.kaTimer.Reset(s.cfg.KeepAliveInterval)
	}
	s.kaMu.Unlock()
}

// writeTimedOut runs on the connection's flusher when a write hit its
// deadline. The flusher closes the connection, which ends yamux's receive
// loop and with it the session; closing the session from here would deadlock
// (Close waits for the flusher), so only the reason is kept.
func (s *Session) writeTimedOut() {
	s.setErr(ErrWriteTimeout)
	s.log.Warn("tunnel connection write timed out; closing the session", "timeout", s.cfg.ConnectionWriteTimeout)
}

func (s *Session) setErr(reason error) {
	s.errMu.Lock()
	if s.err == nil {
		s.err = reason
	}
	s.errMu.Unlock()
}

// Err says why the session ended (nil while it is open): ErrKeepaliveTimeout,
// ErrWriteTimeout, or ErrSessionClosed for a close by either side.
func (s *Session) Err() error {
	if !s.ys.IsClosed() {
		return nil
	}
	s.errMu.Lock()
	defer s.errMu.Unlock()
	if s.err != nil {
		return s.err
	}
	return ErrSessionClosed
}

// Close ends the session and every stream on it. It waits for the session's
// goroutines to finish. Safe to call more than once.
func (s *Session) Close() error {
	err := s.shutdown()
	s.kaWG.Wait()
	s.acceptMu.Lock()
	s.acceptClosing = true
	s.acceptMu.Unlock()
	s.acceptWG.Wait()
	return err
}

// shutdown stops the keepalive timer and closes yamux (which closes the
// connection and waits for its own goroutines).
func (s *Session) shutdown() error {
	s.kaMu.Lock()
	s.kaStopped = true
	s.kaTimer.Stop()
	s.kaMu.Unlock()
	return s.ys.Close()
}

// Done is closed when the session ends, whichever side ended it.
func (s *Session) Done() <-chan struct{} { return s.ys.CloseChan() }

// GoAway tells the peer to open no new streams on this session (its
// OpenStream fails with ErrGoAway) and makes this side refuse any the peer
// still opens. Streams already open continue: this is how a session drains
// while a newer one takes over (make-before-break).
func (s *Session) GoAway() error {
	if err := s.ys.GoAway(); err != nil {
		return fmt.Errorf("tunnel go away: %w", mapErr(err))
	}
	return nil
}

// NumStreams is the number of streams currently open (including ones this
// side closed while the peer has not finished yet).
func (s *Session) NumStreams() int { return s.ys.NumStreams() }

// RejectedStreams counts streams this side refused because their header was
// malformed, oversized, truncated, of an unknown version, or late.
func (s *Session) RejectedStreams() uint64 { return s.rejected.Load() }

// ConnectionState is the TLS state of the connection (peer certificates,
// ALPN, version, cipher), captured after the handshake.
func (s *Session) ConnectionState() tls.ConnectionState { return s.conn.ConnectionState() }

// RemoteAddr is the peer's network address.
func (s *Session) RemoteAddr() net.Addr { return s.conn.RemoteAddr() }

// LocalAddr is this side's network address.
func (s *Session) LocalAddr() net.Addr { return s.conn.LocalAddr() }

// Ping measures one round trip over the session.
func (s *Session) Ping() (time.Duration, error) {
	d, err := s.ys.Ping()
	if err != nil {
		return 0, fmt.Errorf("tunnel ping: %w", mapErr(err))
	}
	return d, nil
}

// OpenStream opens a stream, sends h and waits for the peer's reply, bounded
// by ctx and Config.StreamOpenTimeout. A reply other than StatusOK comes back
// as a *ReplyError (errors.Is(err, ErrDialFailed) etc.) and the stream is
// closed. On success the stream is ready for payload.
//
// One case is not bounded by ctx: when AcceptBacklog of this side's opens
// are still unacknowledged by the peer, yamux makes the next open wait for a
// slot; a peer that acknowledges nothing within StreamOpenTimeout has its
// session closed, which ends that wait.
func (s *Session) OpenStream(ctx context.Context, h Header) (*Stream, error) {
	if h.Version == 0 {
		h.Version = ProtocolVersion
	}
	hdr, err := appendHeader(nil, h, s.cfg.MaxHeaderSize)
	if err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("open %s stream: %w", h.Kind, err)
	}
	ys, err := s.ys.OpenStream()
	if err != nil {
		return nil, fmt.Errorf("open %s stream: %w", h.Kind, mapErr(err))
	}
	st := newStream(s, ys, h, false)
	deadline := time.Now().Add(s.cfg.StreamOpenTimeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	ys.SetDeadline(deadline)
	stop := context.AfterFunc(ctx, func() { ys.SetDeadline(time.Unix(1, 0)) })
	status, reason, err := func() (Status, string, error) {
		if _, err := ys.Write(hdr); err != nil {
			return 0, "", st.fail(err)
		}
		return readReply(ys)
	}()
	stop()
	if err != nil {
		st.Close()
		if ctx.Err() != nil {
			return nil, fmt.Errorf("open %s stream: %w", h.Kind, ctx.Err())
		}
		if err := mapErr(err); isTimeout(err) {
			// The stream deadline and ctx's own timer fire at the same
			// instant; report whichever limit it was.
			if d, ok := ctx.Deadline(); ok && !time.Now().Before(d) {
				return nil, fmt.Errorf("open %s stream: %w", h.Kind, context.DeadlineExceeded)
			}
			return nil, fmt.Errorf("open %s stream: the peer did not reply within %s: %w", h.Kind, s.cfg.StreamOpenTimeout, err)
		}
		return nil, fmt.Errorf("open %s stream: %w", h.Kind, mapErr(err))
	}
	if status != StatusOK {
		st.Close()
		return nil, &ReplyError{Status: status, Reason: reason}
	}
	ys.SetDeadline(time.Time{})
	return st, nil
}

// AcceptStream waits for the peer to open a stream and returns it once its header is read
// (bounded by Config.HandshakeTimeout). The caller must answer with st.Reply before writing
// payload. A stream whose header is malformed, oversized, truncated, late or of an unknown
// version is answered with StatusRefused and a reason, closed, counted in RejectedStreams and
// logged; it is never returned, so one bad stream never ends the caller's accept loop.
// AcceptStream returns an error only when ctx ends or the session closes
// (errors.Is(err, ErrSessionClosed)).
//
// Headers are read concurrently, one goroutine per stream (at most maxPendingHeaders at
// once): a stream whose header never arrives does not hold up the next stream on the
// session. Streams are returned in the order their headers complete. AcceptStream is meant
// for one accept loop: call it from one goroutine at a time.
func (s *Session) AcceptStream(ctx context.Context) (*Stream, error) {
	for {
		if st := s.popReady(); st != nil {
			<-s.headerSlots
			return st, nil
		}
		select {
		case s.headerSlots <- struct{}{}: // room to read one more header
		default: // as many headers as allowed are in flight: wait for one
			select {
			case <-s.headerDone:
				continue
			case <-ctx.Done():
				return nil, ctx.Err()
			case <-s.ys.CloseChan():
				return nil, fmt.Errorf("accept stream: %w", ErrSessionClosed)
			}
		}
		ys, err := s.acceptYamux(ctx)
		if ys == nil {
			<-s.headerSlots
			if err != nil {
				return nil, err
			}
			continue // a header reader finished meanwhile
		}
		s.acceptMu.Lock()
		if s.acceptClosing {
			s.acceptMu.Unlock()
			ys.Close()
			<-s.headerSlots
			return nil, fmt.Errorf("accept stream: %w", ErrSessionClosed)
		}
		s.acceptWG.Add(1)
		s.acceptMu.Unlock()
		go func() {
			defer s.acceptWG.Done()
			s.readStreamHeader(ys)
		}()
	}
}

// popReady takes the oldest stream whose header was read, or returns nil.
func (s *Session) popReady() *Stream {
	s.acceptMu.Lock()
	defer s.acceptMu.Unlock()
	if len(s.ready) == 0 {
		return nil
	}
	st := s.ready[0]
	s.ready = s.ready[1:]
	if len(s.ready) == 0 {
		s.ready = nil // an idle session keeps no array
	}
	return st
}

// acceptYamux waits for the peer's next yamux stream, and gives up early (nil, nil) when a
// header reader finishes, so that AcceptStream can return its stream.
func (s *Session) acceptYamux(ctx context.Context) (*yamux.Stream, error) {
	actx, cancel := context.WithCancel(ctx)
	defer cancel()
	s.acceptMu.Lock()
	s.acceptCancel = cancel
	s.acceptMu.Unlock()
	defer func() {
		s.acceptMu.Lock()
		s.acceptCancel = nil
		s.acceptMu.Unlock()
	}()
	select {
	case <-s.headerDone: // one finished before the cancel was in place
		return nil, nil
	default:
	}
	ys, err := s.ys.AcceptStreamWithContext(actx)
	switch {
	case err == nil:
		return ys, nil
	case ctx.Err() != nil:
		return nil, ctx.Err()
	case actx.Err() != nil:
		return nil, nil
	}
	return nil, fmt.Errorf("accept stream: %w", mapErr(err))
}

// readStreamHeader reads the header of ys and hands the stream to AcceptStream, or refuses
// it; either way it wakes AcceptStream.
func (s *Session) readStreamHeader(ys *yamux.Stream) {
	defer func() {
		s.acceptMu.Lock()
		if s.acceptCancel != nil {
			s.acceptCancel()
		}
		s.acceptMu.Unlock()
		select {
		case s.headerDone <- struct{}{}:
		default:
		}
	}()
	ys.SetReadDeadline(time.Now().Add(s.cfg.HandshakeTimeout))
	h, err := readHeader(ys, s.cfg.MaxHeaderSize)
	if err != nil {
		<-s.headerSlots
		if s.ys.IsClosed() {
			ys.Close()
			return
		}
		s.reject(ys, err)
		return
	}
	ys.SetReadDeadline(time.Time{})
	st := newStream(s, ys, h, true)
	s.acceptMu.Lock()
	s.ready = append(s.ready, st) // its slot is released when AcceptStream takes it
	s.acceptMu.Unlock()
}

// reject answers a stream whose header could not be read and closes it.
func (s *Session) reject(ys *yamux.Stream, err error) {
	s.rejected.Add(1)
	if s.ys.IsClosed() {
		ys.Close()
		return
	}
	err = mapErr(err)
	s.log.Warn("refused tunnel stream", "stream", ys.StreamID(), "err", err)
	ys.SetWriteDeadline(time.Now().Add(s.cfg.ConnectionWriteTimeout))
	if _, werr := ys.Write(appendReply(nil, StatusRefused, err.Error())); werr != nil {
		s.writeFailed(werr)
	}
	ys.Close()
}

// writeFailed closes the whole session when a write failed for a reason other
// than a stream deadline or a closed stream: after a connection write timeout
// the peer may wait forever for bytes that were dropped (yamux #142).
func (s *Session) writeFailed(err error) {
	if errors.Is(err, yamux.ErrConnectionWriteTimeout) {
		s.log.Warn("tunnel connection write timed out; closing the session", "timeout", s.cfg.ConnectionWriteTimeout)
		s.setErr(ErrWriteTimeout)
		// Not Close: the caller may be one of the goroutines Close waits for (a header
		// reader refusing a stream); the session's owner closes it and waits.
		_ = s.shutdown()
	}
}

// mapErr turns yamux errors into this package's sentinels.
func mapErr(err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, yamux.ErrSessionShutdown):
		return ErrSessionClosed
	case errors.Is(err, yamux.ErrConnectionReset):
		return ErrStreamReset
	case errors.Is(err, yamux.ErrRemoteGoAway):
		return ErrGoAway
	case errors.Is(err, yamux.ErrStreamClosed):
		return net.ErrClosed
	case errors.Is(err, yamux.ErrConnectionWriteTimeout):
		return ErrWriteTimeout
	case errors.Is(err, yamux.ErrTimeout):
		return timeoutError{}
	case errors.Is(err, yamux.ErrKeepAliveTimeout):
		return ErrKeepaliveTimeout
	}
	return err
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// timeoutError is a deadline expiry: net.Error with Timeout() true and
// errors.Is(err, os.ErrDeadlineExceeded).
type timeoutError struct{}

func (timeoutError) Error() string   { return "tunnel stream: i/o deadline reached" }
func (timeoutError) Timeout() bool   { return true }
func (timeoutError) Temporary() bool { return true }
func (timeoutError) Is(target error) bool {
	return target == os.ErrDeadlineExceeded
}

// frameConn is what yamux writes to: a write-behind buffer in front of the
// TLS connection.
//
// yamux's send goroutine writes every frame as two calls (a 12-byte header,
// then the body) and every window update as one more. Written straight to
// TLS, each call becomes its own TLS record and its own syscall: a 16 KiB
// body leaves as a full record plus a 12-byte one, and the receiver pays
// for both. frameConn instead appends each call to a buffer and returns; a
// flusher goroutine, started when bytes are waiting and gone once none are,
// hands the buffer to TLS in one large write, so records are full and the
// syscall count per byte matches a plain TLS connection. While the flusher
// is inside a write, yamux keeps filling the other buffer, which also lets
// framing and encryption run on different cores. A small frame that finds
// nothing queued skips the buffer (directMax): yamux's goroutine writes it,
// header and body together, at once, so interactive traffic pays no hand-off.
//
// Bounds and failure:
//   - at most writeBehindMax bytes wait; beyond that yamux's send loop waits
//     too, so memory per session is bounded and back-pressure reaches the
//     streams exactly as before;
//   - each write to the connection has a deadline (ConnectionWriteTimeout): a
//     peer that stops reading fails the session instead of pinning it;
//   - the first failed write makes every later Write fail and closes the raw
//     connection, so yamux's receive loop ends and the whole session with it
//     (yamux #142: never carry on after a lost write);
//   - Close first lets the flusher finish what yamux already handed over (a
//     reply or Closing message written just before the session is closed
//     still arrives), for at most closeFlushTimeout;
//   - an idle session holds neither buffers (they go back to a pool) nor the
//     flusher goroutine.
type frameConn struct {
	net.Conn // the TLS connection; Read and the address methods go straight to it

	timeout   time.Duration // bound on each connection write
	onTimeout func()        // told when a write hit its deadline

	mu       sync.Mutex
	cond     sync.Cond // signalled when space frees up, a flush ends, or the conn fails
	buf      []byte    // bytes waiting for the flusher (nil when idle)
	spare    []byte    // the buffer the flusher wrote last, reused for the next batch
	flushing bool      // a flusher goroutine, or a direct write, is writing to the connection
	err      error     // set once: the first failure, or net.ErrClosed after Close
	failed   bool      // a write failed: skip close_notify
	deadline time.Time // the write deadline currently set (used by whoever writes: flusher or direct)

	// frameMu is held by yamux's send goroutine for each Write, so that a frame
	// written from outside yamux (Reset) goes between whole frames, never inside one.
	frameMu sync.Mutex
	// Used only by yamux's send goroutine: a data-frame header waiting for its body.
	held, heldBuf []byte
}

// writeBehindMax is how many bytes yamux may hand over before its send loop
// waits for the flusher: eight full TLS records, enough to keep the
// connection busy while the next batch is framed.
const writeBehindMax = 128 << 10

// closeFlushTimeout bounds how long Close waits for queued bytes to leave.
// It is well under the gateway's one-second revocation bound.
const closeFlushTimeout = 250 * time.Millisecond

var writeBehindBufs = sync.Pool{New: func() any { b := make([]byte, 0, writeBehindMax); return &b }}

func newFrameConn(conn net.Conn, timeout time.Duration, onTimeout func()) *frameConn {
	c := &frameConn{Conn: conn, timeout: timeout, onTimeout: onTimeout}
	c.cond.L = &c.mu
	return c
}

// directMax is the largest frame (header included) that yamux's send goroutine writes to TLS
// itself when nothing is queued: interactive traffic (a keystroke, a query, a reply, a window
// update) then leaves at once, without the hand-off to a flusher goroutine, which costs a
// round trip about 6 us at the median on loopback. Bulk frames (16 KiB and up) always go
// through the buffer.
const directMax = 2 << 10

// yamuxHeaderLen is the size of a yamux frame header.
const yamuxHeaderLen = 12

// Write queues p and returns once all of it is queued, or writes it at once when it is small
// and nothing is queued (directMax). It is called only by yamux's send goroutine.
func (c *frameConn) Write(p []byte) (int, error) {
	c.frameMu.Lock()
	defer c.frameMu.Unlock()
	if c.held == nil && len(p) == yamuxHeaderLen && p[1] == 0 /* data */ &&
		(uint32(p[8])<<24|uint32(p[9])<<16|uint32(p[10])<<8|uint32(p[11])) > 0 {
		// yamux writes the body next, in the following call: keep the two together.
		c.held = append(c.heldBuf[:0], p...)
		return len(p), nil
	}
	held := c.held
	c.held = nil
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil {
		return 0, c.err
	}
	if !c.flushing && len(c.buf) == 0 && len(held)+len(p) <= directMax {
		out := p
		if held != nil {
			out = append(held, p...)
			c.heldBuf = out[:0]
		}
		c.flushing = true // Close waits for this write as for the flusher
		c.mu.Unlock()
		err := c.write(out)
		c.mu.Lock()
		c.flushing = false
		c.cond.Broadcast()
		if err != nil {
			c.fail(err)
			return 0, err
		}
		c.kick()
		return len(p), nil
	}
	if _, err := c.queue(held); err != nil {
		return 0, err
	}
	return c.queue(p)
}

// kick starts a flusher for bytes that were queued (by writeReset) while a direct write held
// the connection. Called with c.mu held.
func (c *frameConn) kick() {
	if len(c.buf) > 0 && !c.flushing && c.err == nil {
		c.flushing = true
		go c.flush()
	}
}

// writeReset queues a yamux RST frame for stream id between two whole frames of yamux's
// own. yamux v0.1.2 sends RST only from inside (a full backlog, a close that timed out)
// and has no API for it; the frame layout is yamux's spec.md: version 0, type window
// update (1), flags RST (8), the stream ID, length 0.
func (c *frameConn) writeReset(id uint32) error {
	c.frameMu.Lock()
	defer c.frameMu.Unlock()
	hdr := [yamuxHeaderLen]byte{0, 1, 0, 8}
	binary.BigEndian.PutUint32(hdr[4:8], id)
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil {
		return c.err
	}
	_, err := c.queue(hdr[:])
	return err
}

// queue appends p to the buffer, waiting for space, and makes sure a flusher runs. Called
// with c.mu held.
func (c *frameConn) queue(p []byte) (int, error) {
	n := 0
	for len(p) > 0 {
		for c.err == nil && len(c.buf) == writeBehindMax {
			c.cond.Wait()
		}
		if c.err != nil {
			return n, c.err
		}
		if c.buf == nil {
			c.buf = (*writeBehindBufs.Get().(*[]byte))[:0]
		}
		k := copy(c.buf[len(c.buf):writeBehindMax], p)
		c.buf = c.buf[:len(c.buf)+k]
		p, n = p[k:], n+k
		if !c.flushing {
			c.flushing = true
			go c.flush()
		}
	}
	return n, nil
}

// flush writes queued bytes until none are left or a write fails.
func (c *frameConn) flush() {
	c.mu.Lock()
	for len(c.buf) > 0 && c.err == nil {
		out := c.buf
		c.buf, c.spare = c.spare, nil
		c.cond.Broadcast() // the send loop may be waiting for space
		c.mu.Unlock()
		err := c.write(out)
		c.mu.Lock()
		c.spare = out[:0]
		if err != nil {
			c.fail(err)
		}
	}
	c.flushing = false
	for _, b := range []*[]byte{&c.buf, &c.spare} {
		if *b != nil && len(*b) == 0 {
			buf := *b
			writeBehindBufs.Put(&buf)
			*b = nil
		}
	}
	c.cond.Broadcast()
	c.mu.Unlock()
}

// write sends one batch with a deadline. The deadline is refreshed only when
// half of it has been used: it bounds a stall, not each write, and setting it
// per write costs measurable time.
func (c *frameConn) write(p []byte) error {
	if now := time.Now(); c.deadline.Sub(now) < c.timeout/2 {
		c.deadline = now.Add(c.timeout)
		if err := c.Conn.SetWriteDeadline(c.deadline); err != nil {
			return err
		}
	}
	_, err := c.Conn.Write(p)
	return err
}

// fail records the first failure and closes the raw connection so that
// yamux's receive loop ends the session. Called with c.mu held.
func (c *frameConn) fail(err error) {
	if c.err != nil {
		return
	}
	c.err, c.failed = err, true
	if isTimeout(err) && c.onTimeout != nil {
		c.onTimeout()
	}
	c.rawClose()
	c.cond.Broadcast()
}

// rawClose closes the connection under TLS, without close_notify: used when
// the connection is known not to drain, where tls.Conn.Close would try to
// send the alert with its own 5 s deadline.
func (c *frameConn) rawClose() {
	if tc, ok := c.Conn.(*tls.Conn); ok {
		_ = tc.NetConn().Close()
		return
	}
	_ = c.Conn.Close()
}

// Close lets the flusher finish (at most closeFlushTimeout), refuses later
// writes, and closes the connection: with close_notify if every write
// succeeded, without it otherwise.
func (c *frameConn) Close() error {
	c.mu.Lock()
	if c.flushing && c.err == nil {
		stop := time.AfterFunc(closeFlushTimeout, func() {
			c.mu.Lock()
			c.fail(ErrWriteTimeout)
			c.mu.Unlock()
		})
		for c.flushing {
			c.cond.Wait()
		}
		stop.Stop()
	}
	for c.flushing { // a flusher cut short by a failure is finishing
		c.cond.Wait()
	}
	failed := c.failed
	if c.err == nil {
		c.err = net.ErrClosed
	}
	c.cond.Broadcast()
	c.mu.Unlock()
	if failed {
		c.rawClose()
		return nil
	}
	return c.Conn.Close()
}
