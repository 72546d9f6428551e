package tunnel

import (
	"context"
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// relayBufSize is the copy buffer: two TLS records' worth, so one Read from a
// TLS connection never needs a second buffer, and large enough that a yamux
// frame carries real payload relative to its 12-byte header.
const relayBufSize = 32 << 10

var relayBufs = sync.Pool{New: func() any { b := make([]byte, relayBufSize); return &b }}

// halfCloseWriteTimeout bounds each write in the direction that is still
// open once the other direction has ended. A peer that closed a stream
// completely (not just its write side) stops reading; without this bound our
// writes to it would stall forever (yamux #133). While the peer keeps reading,
// every write completes and the bound is renewed, so a long download after a
// half-close is fine.
const halfCloseWriteTimeout = 60 * time.Second

// Relay copies a->b and b->a until both directions have ended, then closes
// both connections and returns the byte counts and the first error (nil if
// both directions ended with a clean EOF).
//
// Half-close is propagated: when one side's reads reach EOF, the other side's
// write half is closed (CloseWrite on *net.TCPConn, *tls.Conn, *Stream, or
// anything with CloseWrite() error; a connection without it is closed
// completely), and the opposite direction keeps flowing. An error in either
// direction, or ctx ending, closes both connections at once, which unblocks
// the other direction, so Relay never leaves a goroutine behind. On such an
// abnormal end a *Stream is Reset rather than closed, so a relay on the far
// side of the tunnel sees the cut too and passes it on: a transfer cut
// anywhere on the path never reaches a client as a clean end of file.
func Relay(ctx context.Context, a, b net.Conn) (aToB, bToA int64, err error) {
	return relay(ctx, a, b, halfCloseWriteTimeout)
}

func relay(ctx context.Context, a, b net.Conn, stall time.Duration) (aToB, bToA int64, err error) {
	r := &relayState{a: a, b: b, stall: stall}
	stop := context.AfterFunc(ctx, func() { r.abort(ctx.Err()) })
	done := make(chan struct{})
	go func() {
		defer close(done)
		aToB = r.copy(b, a)
	}()
	bToA = r.copy(a, b)
	<-done
	stop()
	err = r.err()
	if err != nil {
		endAbnormally(a)
		endAbnormally(b)
	} else {
		a.Close()
		b.Close()
	}
	return aToB, bToA, err
}

type relayState struct {
	a, b     net.Conn
	stall    time.Duration
	halfDone atomic.Int32 // directions that ended cleanly
	mu       sync.Mutex
	first    error
	aborted  bool
}

func (r *relayState) err() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.first
}

// abort records the first error and closes both sides, so the other
// direction's blocked Read or Write returns.
func (r *relayState) abort(err error) {
	r.mu.Lock()
	if r.first == nil {
		r.first = err
	}
	already := r.aborted
	r.aborted = true
	r.mu.Unlock()
	if !already {
		endAbnormally(r.a)
		endAbnormally(r.b)
	}
}

// Resetter is a connection that can end abnormally, as *Stream does with
// Reset. Relay resets such a connection, instead of closing it, when the
// relay fails; a wrapper around a *Stream implements it to keep that.
type Resetter interface {
	Reset() error
}

// endAbnormally closes c after a failure on either side: a Resetter (a
// tunnel Stream) is reset, so the far end sees the cut and not a clean end;
// anything else is closed (a caller that wants a TCP reset passes a
// connection whose Close only wakes it, and resets it after Relay returns).
func endAbnormally(c net.Conn) {
	if r, ok := c.(Resetter); ok {
		r.Reset()
		return
	}
	c.Close()
}

func (r *relayState) copy(dst, src net.Conn) int64 {
	bp := relayBufs.Get().(*[]byte)
	defer relayBufs.Put(bp)
	buf := *bp
	var total int64
	for {
		n, rerr := src.Read(buf)
		if n > 0 {
			if r.halfDone.Load() > 0 {
				dst.SetWriteDeadline(time.Now().Add(r.stall))
			}
			w, werr := dst.Write(buf[:n])
			total += int64(w)
			if werr == nil && w < n {
				werr = io.ErrShortWrite
			}
			if werr != nil {
				r.abort(werr)
				return total
			}
		}
		if rerr != nil {
			if rerr == io.EOF {
				r.halfDone.Add(1)
				// The opposite direction writes to src; a write of it that is
				// already blocked gets its bound now.
				src.SetWriteDeadline(time.Now().Add(r.stall))
				if err := closeWrite(dst); err != nil && !isClosedErr(err) {
					r.abort(err)
				}
				return total
			}
			r.abort(rerr)
			return total
		}
	}
}

// closeWrite half-closes c if it can, and otherwise closes it.
func closeWrite(c net.Conn) error {
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		err := cw.CloseWrite()
		if err != nil && errors.Is(err, net.ErrClosed) {
			return nil
		}
		return err
	}
	return c.Close()
}
