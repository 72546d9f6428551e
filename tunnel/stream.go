package tunnel

import (
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/yamux"
)

// Stream is one multiplexed stream: a net.Conn with half-close.
//
// Close, CloseWrite and Reset, precisely:
//
//   - CloseWrite sends FIN: the peer's Read returns io.EOF once it has read
//     everything we wrote. We can still Read what the peer sends.
//   - Close is CloseWrite plus: our own pending and future Read and Write
//     calls fail with net.ErrClosed, and whatever the peer still sends is
//     dropped. The stream's resources are freed when the peer finishes its
//     direction too, or after Config.StreamCloseTimeout, whichever is first
//     (then the peer's writes fail with ErrStreamReset). A peer whose writes
//     stall on a stream it knows is half-closed must bound them with a write
//     deadline (yamux #133); Relay does.
//   - Reset ends the stream abnormally: the peer's pending and later Reads
//     and Writes fail with ErrStreamReset, never a clean io.EOF, so a relay
//     on the far side can pass the failure on instead of a normal end. Our
//     side is closed as by Close.
//
// Any write error other than a deadline, a closed or a reset stream closes the
// whole session (yamux #142).
type Stream struct {
	ys       *yamux.Stream
	sess     *Session
	hdr      Header
	accepted bool // we accepted it, so we owe the reply

	replied atomic.Bool
	closed  atomic.Bool

	ctlOnce sync.Once
	ctl     *Control
}

func newStream(s *Session, ys *yamux.Stream, h Header, accepted bool) *Stream {
	st := &Stream{ys: ys, sess: s, hdr: h, accepted: accepted}
	if !accepted {
		st.replied.Store(true) // the reply was the peer's to send
	}
	return st
}

// Header is the header the stream was opened with.
func (st *Stream) Header() Header { return st.hdr }

// Session is the session the stream belongs to.
func (st *Stream) Session() *Session { return st.sess }

// Reply answers the peer's stream-open header. It must be called exactly once
// on every accepted stream, before any payload is written. A status other
// than StatusOK also closes the stream. reason is for a person reading the
// opener's error: at most MaxReasonLen bytes, no secrets.
func (st *Stream) Reply(status Status, reason string) error {
	if !st.accepted || !st.replied.CompareAndSwap(false, true) {
		return ErrAlreadyReplied
	}
	st.ys.SetWriteDeadline(time.Now().Add(st.sess.cfg.ConnectionWriteTimeout))
	_, err := st.ys.Write(appendReply(nil, status, reason))
	st.ys.SetWriteDeadline(time.Time{})
	if err != nil {
		err = st.fail(err)
		st.Close()
		return fmt.Errorf("reply to %s stream: %w", st.hdr.Kind, err)
	}
	if status != StatusOK {
		st.Close()
	}
	return nil
}

// Read reads payload. It returns io.EOF after the peer's FIN, and an error
// matching ErrSessionClosed if the session died (never a clean io.EOF, so a
// relay does not mistake a broken tunnel for a finished stream).
func (st *Stream) Read(b []byte) (int, error) {
	if st.closed.Load() {
		return 0, net.ErrClosed
	}
	n, err := st.ys.Read(b)
	if err != nil {
		if st.closed.Load() {
			return n, net.ErrClosed
		}
		if err == io.EOF {
			if st.sess.ys.IsClosed() {
				return n, fmt.Errorf("read stream: %w", ErrSessionClosed)
			}
			return n, io.EOF
		}
		return n, st.fail(err)
	}
	return n, nil
}

// Write writes payload. On an accepted stream Reply must come first.
func (st *Stream) Write(b []byte) (int, error) {
	if !st.replied.Load() {
		return 0, ErrNotReplied
	}
	if st.closed.Load() {
		return 0, net.ErrClosed
	}
	n, err := st.ys.Write(b)
	if err != nil {
		if st.closed.Load() {
			return n, net.ErrClosed
		}
		return n, st.fail(err)
	}
	return n, nil
}

// fail maps a yamux error and closes the session when the error means the
// connection can no longer be trusted to carry every byte.
func (st *Stream) fail(err error) error {
	st.sess.writeFailed(err)
	return mapErr(err)
}

// CloseWrite half-closes: it sends FIN after everything written so far.
func (st *Stream) CloseWrite() error {
	if err := st.ys.Close(); err != nil {
		return fmt.Errorf("close stream write side: %w", mapErr(err))
	}
	return nil
}

// Close closes both directions (see the Stream doc). Idempotent.
func (st *Stream) Close() error {
	if !st.closed.CompareAndSwap(false, true) {
		return nil
	}
	// Wake any goroutine blocked in Read or Write: yamux's Close alone leaves
	// a blocked Read waiting, because the peer may still send.
	past := time.Unix(1, 0)
	st.ys.SetDeadline(past)
	err := st.ys.Close()
	st.ys.Shrink()
	return mapErr(err)
}

// Reset closes the stream and tells the peer it ended abnormally (a yamux
// RST frame, queued behind what was already written), so that whoever reads
// the other end sees ErrStreamReset instead of a clean end of stream: a cut
// transfer must not look complete. After Close, Reset does nothing.
//
// yamux has no API for a reset, so the frame goes onto the session's
// connection between two of yamux's own frames; our side of the stream is
// then closed by yamux's Close, whose FIN the peer drops (it has already
// forgotten the stream). Our side's bookkeeping is freed when the session
// ends or after Config.StreamCloseTimeout.
func (st *Stream) Reset() error {
	if !st.closed.CompareAndSwap(false, true) {
		return nil
	}
	err := st.sess.wc.writeReset(st.ys.StreamID())
	past := time.Unix(1, 0)
	st.ys.SetDeadline(past)
	st.ys.Close()
	st.ys.Shrink()
	if err != nil {
		return fmt.Errorf("reset stream: %w", mapErr(err))
	}
	return nil
}

// LocalAddr is the session's local address.
func (st *Stream) LocalAddr() net.Addr { return st.sess.LocalAddr() }

// RemoteAddr is the session's remote address.
func (st *Stream) RemoteAddr() net.Addr { return st.sess.RemoteAddr() }

// SetDeadline sets both read and write deadlines.
func (st *Stream) SetDeadline(t time.Time) error {
	if st.closed.Load() {
		return net.ErrClosed
	}
	return st.ys.SetDeadline(t)
}

// SetReadDeadline bounds pending and future Reads.
func (st *Stream) SetReadDeadline(t time.Time) error {
	if st.closed.Load() {
		return net.ErrClosed
	}
	return st.ys.SetReadDeadline(t)
}

// SetWriteDeadline bounds pending and future Writes.
func (st *Stream) SetWriteDeadline(t time.Time) error {
	if st.closed.Load() {
		return net.ErrClosed
	}
	return st.ys.SetWriteDeadline(t)
}

var _ net.Conn = (*Stream)(nil)

// isClosedErr reports errors that mean "this side or the peer is gone".
func isClosedErr(err error) bool {
	return errors.Is(err, net.ErrClosed) || errors.Is(err, ErrSessionClosed) || errors.Is(err, ErrStreamReset)
}
