package closed

import (
	"net"
	"sync/atomic"
	"time"
)

// Held wraps a TCP connection for tunnel.Relay so that the relay's Close only
// wakes the connection's pending Read and Write (and refuses later ones): the
// caller closes it with End once it knows how the relay ended. Anything but a
// *net.TCPConn is returned as it is.
func Held(c net.Conn) net.Conn {
	tc, ok := c.(*net.TCPConn)
	if !ok {
		return c
	}
	return &held{TCPConn: tc}
}

type held struct {
	*net.TCPConn // CloseWrite passes through: a half-close stays a half-close
	closed       atomic.Bool
}

// past is a deadline that has passed: it wakes a blocked Read or Write.
var past = time.Unix(1, 0)

func (h *held) Close() error {
	h.closed.Store(true)
	return h.TCPConn.SetDeadline(past)
}

func (h *held) Read(p []byte) (int, error) {
	if h.closed.Load() {
		return 0, net.ErrClosed
	}
	return h.TCPConn.Read(p)
}

func (h *held) Write(p []byte) (int, error) {
	if h.closed.Load() {
		return 0, net.ErrClosed
	}
	return h.TCPConn.Write(p)
}

// The relay renews write deadlines after a half-close; once closed the
// passed deadline must stay.
func (h *held) SetDeadline(t time.Time) error      { return h.set(t, h.TCPConn.SetDeadline) }
func (h *held) SetReadDeadline(t time.Time) error  { return h.set(t, h.TCPConn.SetReadDeadline) }
func (h *held) SetWriteDeadline(t time.Time) error { return h.set(t, h.TCPConn.SetWriteDeadline) }

func (h *held) set(t time.Time, f func(time.Time) error) error {
	if h.closed.Load() {
		return nil
	}
	return f(t)
}

// End closes c after a relay: with FIN when the relay ended cleanly (err is
// nil: both sides said they were done), and with RST otherwise (the other leg
// was reset, its session or process died, or we are stopping), so that a
// peer reading to end-of-file cannot take a cut transfer for a complete one.
func End(c net.Conn, err error) error {
	if err != nil {
		Reset(c)
		return nil
	}
	return c.Close()
}

// Reset closes c with RST when it is a TCP connection (SO_LINGER 0), else
// closes it.
func Reset(c net.Conn) {
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.SetLinger(0)
	}
	_ = c.Close()
}
