package tunnelbench

import (
	"context"
	"crypto/tls"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"sync"
	"time"

	"github.com/wicketgw/wicket/tunnel"
)

// delayProxy forwards TCP both ways, holding every chunk for oneWay before
// passing it on, with unbounded buffering: it adds latency but no bandwidth
// limit, so what limits a stream through it is the yamux window (window/RTT).
type delayProxy struct {
	ln     net.Listener
	target string
	delay  time.Duration
	wg     sync.WaitGroup
	mu     sync.Mutex
	conns  []net.Conn
}

func startDelayProxy(target string, oneWay time.Duration) (*delayProxy, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	p := &delayProxy{ln: ln, target: target, delay: oneWay}
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			u, err := net.Dial("tcp", target)
			if err != nil {
				c.Close()
				continue
			}
			p.mu.Lock()
			p.conns = append(p.conns, c, u)
			p.mu.Unlock()
			p.pipe(u, c)
			p.pipe(c, u)
		}
	}()
	return p, nil
}

type chunk struct {
	at   time.Time
	data []byte
}

func (p *delayProxy) pipe(dst, src net.Conn) {
	ch := make(chan chunk, 1<<16)
	p.wg.Add(2)
	go func() {
		defer p.wg.Done()
		defer close(ch)
		for {
			buf := make([]byte, 64<<10)
			n, err := src.Read(buf)
			if n > 0 {
				ch <- chunk{time.Now().Add(p.delay), buf[:n]}
			}
			if err != nil {
				return
			}
		}
	}()
	go func() {
		defer p.wg.Done()
		defer dst.Close()
		for c := range ch {
			if d := time.Until(c.at); d > 0 {
				time.Sleep(d) // this IS the injected latency
			}
			if _, err := dst.Write(c.data); err != nil {
				src.Close()
				return
			}
		}
	}()
}

func (p *delayProxy) close() {
	p.ln.Close()
	p.mu.Lock()
	for _, c := range p.conns {
		c.Close()
	}
	p.mu.Unlock()
	p.wg.Wait()
}

// WindowThroughput sends n bytes on one stream from the gateway side to the
// agent side of a session whose connection has round-trip time rtt added by
// a delay proxy, and returns bytes/second. It shows what MaxStreamWindowSize
// does to one stream over a long path.
func WindowThroughput(cfg tunnel.Config, rtt time.Duration, n int64) (float64, error) {
	p, err := NewPKI()
	if err != nil {
		return 0, err
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	px, err := startDelayProxy(ln.Addr().String(), rtt/2)
	if err != nil {
		return 0, err
	}
	defer px.close()
	gwCh := make(chan *tunnel.Session, 1)
	errCh := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			errCh <- err
			return
		}
		s, err := tunnel.Server(tls.Server(c, p.ServerTLS()), cfg)
		if err != nil {
			errCh <- err
			return
		}
		gwCh <- s
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	agent, err := tunnel.Dial(ctx, tunnel.DialConfig{Addr: px.ln.Addr().String(), TLS: p.ClientTLS(tunnel.ALPNAgent), Config: cfg})
	if err != nil {
		return 0, err
	}
	defer agent.Close()
	var gw *tunnel.Session
	select {
	case gw = <-gwCh:
	case err := <-errCh:
		return 0, err
	}
	defer gw.Close()
	done := make(chan error, 1)
	go func() {
		st, err := agent.AcceptStream(ctx)
		if err != nil {
			done <- err
			return
		}
		defer st.Close()
		st.Reply(tunnel.StatusOK, "")
		got, err := io.Copy(io.Discard, st)
		if err != nil {
			done <- err
			return
		}
		var b [8]byte
		binary.BigEndian.PutUint64(b[:], uint64(got))
		_, err = st.Write(b[:])
		done <- err
	}()
	st, err := gw.OpenStream(ctx, tunnel.Header{Kind: tunnel.KindData, Resource: "sink"})
	if err != nil {
		return 0, err
	}
	defer st.Close()
	buf := make([]byte, 32<<10)
	start := time.Now()
	for left := n; left > 0; left -= int64(len(buf)) {
		if _, err := st.Write(buf[:min(int64(len(buf)), left)]); err != nil {
			return 0, err
		}
	}
	st.CloseWrite()
	var b [8]byte
	if _, err := io.ReadFull(st, b[:]); err != nil {
		return 0, err
	}
	elapsed := time.Since(start)
	if err := <-done; err != nil {
		return 0, err
	}
	if got := int64(binary.BigEndian.Uint64(b[:])); got != n {
		return 0, fmt.Errorf("agent got %d of %d bytes", got, n)
	}
	return float64(n) / elapsed.Seconds(), nil
}
