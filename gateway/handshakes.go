package gateway

import (
	"net"
	"sync"
	"time"
)

// Limits on TLS handshakes in progress (see the package doc, "Handshake limits").
const (
	// maxHandshakes bounds TLS handshakes in progress at once, over all sources.
	maxHandshakes = 1024
	// maxHandshakesPerSource bounds those from one source IP address; a connection beyond it
	// is closed at once.
	maxHandshakesPerSource = 64
	// firstBytesTimeout bounds the wait for the first bytes of a ClientHello; the whole
	// handshake is bounded by Config.HandshakeTimeout.
	firstBytesTimeout = 2 * time.Second
)

// handshakeLimiter tracks the handshakes in progress per source address. When the global
// limit is full, the oldest handshake of the source with the most in progress is closed to
// make room, so that one source cannot starve the others by holding the slots first.
type handshakeLimiter struct {
	max, perSource int

	mu    sync.Mutex
	total int
	bySrc map[string]*srcHandshakes
}

// srcHandshakes is one source's handshakes in progress, oldest first.
type srcHandshakes struct {
	conns []*pendingHandshake
}

// pendingHandshake is one handshake holding a slot.
type pendingHandshake struct {
	src  string
	conn net.Conn
	done bool
}

func newHandshakeLimiter(max, perSource int) *handshakeLimiter {
	return &handshakeLimiter{max: max, perSource: perSource, bySrc: map[string]*srcHandshakes{}}
}

// sourceOf is the IP address a connection comes from (its port dropped).
func sourceOf(c net.Conn) string {
	if a, ok := c.RemoteAddr().(*net.TCPAddr); ok {
		return a.IP.String()
	}
	host, _, err := net.SplitHostPort(c.RemoteAddr().String())
	if err != nil {
		return c.RemoteAddr().String()
	}
	return host
}

// admit takes a slot for c. It returns nil when c's source already has perSource
// handshakes in progress (the caller closes c). When all slots are taken, it first closes
// the oldest handshake of the source with the most in progress; that handshake fails and
// releases its slot as any failed one does.
func (l *handshakeLimiter) admit(c net.Conn) *pendingHandshake {
	src := sourceOf(c)
	l.mu.Lock()
	defer l.mu.Unlock()
	s := l.bySrc[src]
	if s != nil && len(s.conns) >= l.perSource {
		return nil
	}
	if l.total >= l.max {
		var most *srcHandshakes
		for _, o := range l.bySrc {
			if most == nil || len(o.conns) > len(most.conns) {
				most = o
			}
		}
		if most != nil && len(most.conns) > 0 {
			victim := most.conns[0]
			l.removeLocked(victim)
			_ = victim.conn.Close()
		}
	}
	if s == nil {
		s = &srcHandshakes{}
		l.bySrc[src] = s
	}
	p := &pendingHandshake{src: src, conn: c}
	s.conns = append(s.conns, p)
	l.total++
	return p
}

// release frees p's slot; it may be called after p was evicted, and more than once.
func (l *handshakeLimiter) release(p *pendingHandshake) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.removeLocked(p)
}

func (l *handshakeLimiter) removeLocked(p *pendingHandshake) {
	if p.done {
		return
	}
	p.done = true
	l.total--
	s := l.bySrc[p.src]
	for i, o := range s.conns {
		if o == p {
			s.conns = append(s.conns[:i], s.conns[i+1:]...)
			break
		}
	}
	if len(s.conns) == 0 {
		delete(l.bySrc, p.src)
	}
}

// inProgress returns the handshakes in progress, in total and from src.
func (l *handshakeLimiter) inProgress(src string) (total, fromSrc int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if s := l.bySrc[src]; s != nil {
		fromSrc = len(s.conns)
	}
	return l.total, fromSrc
}

// firstBytesConn bounds the wait for a peer's first bytes: the read deadline set before the
// handshake is lifted by the first read that returns data (the handshake's context bounds the
// rest).
type firstBytesConn struct {
	net.Conn
	got bool
}

func (c *firstBytesConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	if n > 0 && !c.got {
		c.got = true
		_ = c.Conn.SetReadDeadline(time.Time{})
	}
	return n, err
}
