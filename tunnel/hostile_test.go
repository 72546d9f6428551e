package tunnel

import (
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/yamux"
)

// Every hostile input below is refused, counted, and the server goes on
// serving a well-behaved client afterwards.

func TestHostileTLS(t *testing.T) {
	checkLeaks(t)
	p := newPKI(t)
	cfg := testConfig()
	cfg.HandshakeTimeout = 300 * time.Millisecond
	srv := startServer(t, p, cfg, echo)
	other := newTestCA(t, "some other root")

	tlsDial := func(c *tls.Config) error {
		conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", srv.addr(), c)
		if err != nil {
			return err
		}
		defer conn.Close()
		// In TLS 1.3 the server checks the client certificate after the
		// client's handshake returns; the refusal arrives as an alert on the
		// first read.
		conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err = conn.Read(make([]byte, 1))
		return err
	}
	good := func() *tls.Config { return p.clientTLS(ALPNAgent, p.client) }

	cases := []struct {
		name   string
		attack func() error
		want   string // in the server's refusal
	}{
		{"tls12", func() error {
			c := good()
			c.MinVersion, c.MaxVersion = tls.VersionTLS12, tls.VersionTLS12
			return tlsDial(c)
		}, "unsupported versions"},
		{"cert-from-other-ca", func() error {
			return tlsDial(p.clientTLS(ALPNAgent, other.valid("agent/evil")))
		}, "certificate"},
		{"expired-cert", func() error {
			return tlsDial(p.clientTLS(ALPNAgent, p.ca.issue("agent/old", time.Now().Add(-2*time.Hour), time.Now().Add(-time.Hour))))
		}, "expired"},
		{"no-client-cert", func() error {
			c := good()
			c.GetClientCertificate = nil
			return tlsDial(c)
		}, "certificate"},
		{"wrong-alpn", func() error {
			c := good()
			c.NextProtos = []string{"wicket-bogus/1"}
			return tlsDial(c)
		}, "application protocol"},
		{"no-alpn", func() error {
			c := good()
			c.NextProtos = nil
			return tlsDial(c)
		}, "ALPN"},
		{"plaintext", func() error {
			conn, err := net.Dial("tcp", srv.addr())
			if err != nil {
				return err
			}
			defer conn.Close()
			conn.Write([]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
			conn.SetReadDeadline(time.Now().Add(5 * time.Second))
			_, err = io.ReadAll(conn)
			return err
		}, "does not look like a TLS handshake"},
		{"silent-tcp", func() error {
			conn, err := net.Dial("tcp", srv.addr())
			if err != nil {
				return err
			}
			defer conn.Close()
			start := time.Now()
			conn.SetReadDeadline(time.Now().Add(5 * time.Second))
			_, err = io.ReadAll(conn) // the server hangs up after HandshakeTimeout
			if d := time.Since(start); d > cfg.HandshakeTimeout+2*time.Second {
				t.Errorf("silent peer dropped after %s, HandshakeTimeout is %s", d, cfg.HandshakeTimeout)
			}
			return err
		}, "handshake timeout"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			before := srv.refused.Load()
			tc.attack()
			err := srv.waitRefusal(t, 5*time.Second)
			if !strings.Contains(err.Error(), tc.want) && !strings.Contains(strings.ToLower(err.Error()), tc.want) {
				t.Errorf("server refusal %q does not mention %q", err, tc.want)
			}
			if srv.refused.Load() != before+1 {
				t.Errorf("refusals counted %d, want %d", srv.refused.Load(), before+1)
			}
			// The server still serves a good client.
			s := dialTest(t, p, srv.addr(), cfg)
			roundTrip(t, s, "after "+tc.name)
			s.Close()
		})
	}
	srv.close()
}

func TestDialRefusesWrongServer(t *testing.T) {
	checkLeaks(t)
	p := newPKI(t)
	srv := startServer(t, p, testConfig(), echo)
	other := newTestCA(t, "other")
	ctx := context.Background()
	// A gateway whose certificate is not from our root.
	c := ClientTLSConfig(ALPNAgent, other.pool, "localhost",
		func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return p.client, nil })
	if _, err := Dial(ctx, DialConfig{Addr: srv.addr(), TLS: c, Config: testConfig()}); err == nil ||
		!strings.Contains(err.Error(), "certificate") {
		t.Fatalf("dial to untrusted server: %v", err)
	}
	srv.waitRefusal(t, 5*time.Second)
	srv.close()
}

func TestKeepaliveDetectsBlackhole(t *testing.T) {
	checkLeaks(t)
	p := newPKI(t)
	cfg := testConfig()
	cfg.KeepAliveInterval = 100 * time.Millisecond
	cfg.ConnectionWriteTimeout = 200 * time.Millisecond
	srv := startServer(t, p, cfg, echo)
	px := startProxy(t, srv.addr())
	s := dialTest(t, p, px.addr(), cfg)
	roundTrip(t, s, "before the blackhole")

	px.blackhole.Store(true)
	start := time.Now()
	bound := cfg.KeepAliveInterval + 2*cfg.ConnectionWriteTimeout
	select {
	case <-s.Done():
	case <-time.After(bound + 2*time.Second):
		t.Fatalf("session still up %s after the peer went silent (bound %s)", time.Since(start), bound)
	}
	d := time.Since(start)
	t.Logf("blackhole detected after %s (bound %s)", d, bound)
	if d > bound+250*time.Millisecond {
		t.Errorf("detection took %s, bound %s", d, bound)
	}
	if !errors.Is(s.Err(), ErrKeepaliveTimeout) {
		t.Errorf("Err = %v, want ErrKeepaliveTimeout", s.Err())
	}
	px.close()
	srv.close()
}

func TestWriteStallClosesSession(t *testing.T) {
	checkLeaks(t)
	p := newPKI(t)
	cfg := testConfig()
	cfg.KeepAliveInterval = time.Hour // isolate the write timeout
	cfg.ConnectionWriteTimeout = 300 * time.Millisecond
	srv := startServer(t, p, cfg, func(st *Stream) {
		st.Reply(StatusOK, "")
		io.Copy(io.Discard, st)
		st.Close()
	})
	px := startProxy(t, srv.addr())
	ctx := context.Background()
	dialer := &net.Dialer{Control: func(_, _ string, c syscall.RawConn) error {
		return c.Control(func(fd uintptr) {
			syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_SNDBUF, 4096)
		})
	}}
	s, err := Dial(ctx, DialConfig{Addr: px.addr(), TLS: p.clientTLS(ALPNAgent, p.client), Config: cfg, Dialer: dialer})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	st, err := s.OpenStream(ctx, Header{Kind: KindData, Resource: "sink"})
	if err != nil {
		t.Fatal(err)
	}
	px.stall.Store(true) // the proxy stops reading: our socket buffer fills
	start := time.Now()
	buf := make([]byte, 64<<10)
	var werr error
	for time.Since(start) < 10*time.Second {
		if _, werr = st.Write(buf); werr != nil {
			break
		}
	}
	select {
	case <-s.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("session survived a stalled connection write")
	}
	t.Logf("stalled write ended the session after %s: %v", time.Since(start), werr)
	if !errors.Is(s.Err(), ErrWriteTimeout) {
		t.Errorf("Err = %v, want ErrWriteTimeout", s.Err())
	}
	s.Close()
	px.close()
	srv.close()
}

// rawSession is a well-authenticated client that writes arbitrary bytes on
// yamux streams, bypassing the header encoder.
func rawSession(t *testing.T, p *pki, addr string, cfg Config) *Session {
	t.Helper()
	return dialTest(t, p, addr, cfg)
}

func TestHostileStreamHeaders(t *testing.T) {
	checkLeaks(t)
	p := newPKI(t)
	cfg := testConfig()
	cfg.HandshakeTimeout = 300 * time.Millisecond
	var srvSess atomic.Pointer[Session]
	srv := startServer(t, p, cfg, echo)
	s := rawSession(t, p, srv.addr(), cfg)
	roundTrip(t, s, "warm-up")
	select {
	case ss := <-srv.sessCh:
		srvSess.Store(ss)
	case <-time.After(5 * time.Second):
		t.Fatal("no server session")
	}

	cases := []struct {
		name     string
		bytes    []byte
		closeW   bool   // FIN after the bytes
		inReason string // in the refusal reason sent back
	}{
		{"oversized", []byte{1, 0xff, 0xff}, false, "too large"},
		{"truncated-prefix", []byte{1, 0}, true, "truncated"},
		{"truncated-body", []byte{1, 0, 20, 1, 5, 'a'}, true, "truncated"},
		{"stalled-body", []byte{1, 0, 20, 1, 5, 'a'}, false, "deadline"},
		{"unknown-version", []byte{9, 0, 3, 1, 0, 0}, false, "unsupported"},
		{"unknown-kind", []byte{1, 0, 3, 7, 0, 0}, false, "kind"},
		{"data-without-resource", []byte{1, 0, 3, 1, 0, 0}, false, "resource"},
		{"control-char", []byte{1, 0, 5, 1, 2, 'a', '\n', 0}, false, "control character"},
		{"bad-field", []byte{1, 0, 7, 2, 0, 0, 1, 'k', 0, 9}, false, "truncated value"},
		{"empty", nil, true, "truncated"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			before := srvSess.Load().RejectedStreams()
			ys, err := s.ys.OpenStream()
			if err != nil {
				t.Fatal(err)
			}
			defer ys.Close()
			if len(tc.bytes) > 0 {
				if _, err := ys.Write(tc.bytes); err != nil {
					t.Fatal(err)
				}
			}
			if tc.closeW {
				ys.Close()
			}
			ys.SetReadDeadline(time.Now().Add(5 * time.Second))
			status, reason, err := readReply(ys)
			if err != nil {
				t.Fatalf("no reply: %v", err)
			}
			if status != StatusRefused || !strings.Contains(reason, tc.inReason) {
				t.Fatalf("reply %s %q, want refused mentioning %q", status, reason, tc.inReason)
			}
			if _, err := io.ReadAll(ys); err != nil {
				t.Fatalf("stream not closed after refusal: %v", err)
			}
			waitFor(t, 5*time.Second, "rejection count", func() bool {
				return srvSess.Load().RejectedStreams() == before+1
			})
			// The same session serves the next stream.
			roundTrip(t, s, "after "+tc.name)
		})
	}
	s.Close()
	srv.close()
}

func TestStreamFloodIsBounded(t *testing.T) {
	checkLeaks(t)
	p := newPKI(t)
	cfg := testConfig()
	cfg.AcceptBacklog = 16
	gate := make(chan struct{})
	var srvSess atomic.Pointer[Session]
	srv := newTestServer(t, p, cfg, echo)
	srv.onSess = func(sess *Session) {
		if srvSess.CompareAndSwap(nil, sess) { // the flooder: accept nothing until the gate opens
			select {
			case <-gate:
			case <-sess.Done():
				return
			}
		}
		var wg sync.WaitGroup
		defer wg.Wait()
		for {
			st, err := sess.AcceptStream(context.Background())
			if err != nil {
				return
			}
			wg.Add(1)
			go func() { defer wg.Done(); echo(st) }()
		}
	}
	srv.start()

	// The flooder's own yamux allows many un-acknowledged opens, so it can
	// open far faster than the server accepts, and it reads nothing.
	floodCfg := cfg
	floodCfg.AcceptBacklog = 4096
	flood := dialTest(t, p, srv.addr(), floodCfg)
	waitFor(t, 5*time.Second, "server session", func() bool { return srvSess.Load() != nil })
	hdr, _ := appendHeader(nil, Header{Kind: KindData, Resource: "echo"}, 4096)
	const n = 2000
	streams := make([]*yamux.Stream, 0, n)
	for range n {
		ys, err := flood.ys.OpenStream()
		if err != nil {
			t.Fatalf("flood open: %v", err)
		}
		ys.Write(hdr)
		streams = append(streams, ys)
	}
	// The server holds at most its backlog of un-accepted streams; the rest
	// are reset.
	var reset int
	for i := len(streams) - 1; i >= 0; i-- { // the newest were refused
		ys := streams[i]
		ys.SetReadDeadline(time.Now().Add(2 * time.Second))
		if _, err := ys.Read(make([]byte, 1)); errors.Is(err, yamux.ErrConnectionReset) {
			reset++
		}
		if reset >= n-cfg.AcceptBacklog {
			break
		}
	}
	held := srvSess.Load().NumStreams()
	t.Logf("flood of %d streams: %d reset, server holds %d", n, reset, held)
	if held > cfg.AcceptBacklog {
		t.Errorf("server holds %d streams, backlog is %d", held, cfg.AcceptBacklog)
	}
	if reset < n-cfg.AcceptBacklog {
		t.Errorf("only %d of %d flood streams were reset", reset, n)
	}
	// Meanwhile a different client is served normally.
	good := dialTest(t, p, srv.addr(), cfg)
	roundTrip(t, good, "served during the flood")
	close(gate)
	for _, ys := range streams {
		ys.Close()
	}
	good.Close()
	flood.Close()
	srv.close()
}

// proxy is a fault-injecting TCP proxy: blackhole drops every byte both ways
// while keeping the connections open; stall stops reading from the client.
type proxy struct {
	t         testing.TB
	ln        net.Listener
	target    string
	blackhole atomic.Bool
	stall     atomic.Bool
	wg        sync.WaitGroup
	mu        sync.Mutex
	conns     []net.Conn
}

func startProxy(t testing.TB, target string) *proxy {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	px := &proxy{t: t, ln: ln, target: target}
	px.wg.Add(1)
	go func() {
		defer px.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.(*net.TCPConn).SetReadBuffer(4096)
			u, err := net.Dial("tcp", target)
			if err != nil {
				c.Close()
				continue
			}
			px.mu.Lock()
			px.conns = append(px.conns, c, u)
			px.mu.Unlock()
			px.wg.Add(2)
			go func() { defer px.wg.Done(); px.pipe(u, c, true) }()
			go func() { defer px.wg.Done(); px.pipe(c, u, false) }()
		}
	}()
	return px
}

func (px *proxy) addr() string { return px.ln.Addr().String() }

func (px *proxy) pipe(dst, src net.Conn, fromClient bool) {
	buf := make([]byte, 4096)
	for {
		for fromClient && px.stall.Load() {
			// Stop reading until closed; poll so close() can end us.
			src.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
			if _, err := src.Read(nil); err != nil && !isTimeout(err) {
				return
			}
			time.Sleep(20 * time.Millisecond) // polling interval
			if px.closed() {
				return
			}
		}
		src.SetReadDeadline(time.Time{})
		n, err := src.Read(buf)
		if err != nil {
			if !px.blackhole.Load() { // a black hole does not even pass on a close
				dst.Close()
			}
			return
		}
		if px.blackhole.Load() {
			continue
		}
		if _, err := dst.Write(buf[:n]); err != nil {
			src.Close()
			return
		}
	}
}

var proxyClosed sync.Map

func (px *proxy) closed() bool { _, ok := proxyClosed.Load(px); return ok }

func (px *proxy) close() {
	proxyClosed.Store(px, true)
	px.ln.Close()
	px.mu.Lock()
	for _, c := range px.conns {
		c.Close()
	}
	px.mu.Unlock()
	px.wg.Wait()
}

var _ = binary.BigEndian

// The gateway's router serves other ALPNs (h2, http/1.1) on the same port;
// a connection that negotiated one of those must not become a tunnel.
func TestServerRequiresTunnelALPN(t *testing.T) {
	checkLeaks(t)
	p := newPKI(t)
	srv := newTestServer(t, p, testConfig(), echo)
	srv.tls.NextProtos = []string{"h2", ALPNAgent}
	srv.start()
	c := p.clientTLS("h2", p.client)
	conn, err := tls.Dial("tcp", srv.addr(), c)
	if err != nil {
		t.Fatal(err)
	}
	conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	conn.Read(make([]byte, 1))
	conn.Close()
	if err := srv.waitRefusal(t, 5*time.Second); !errors.Is(err, ErrALPN) {
		t.Fatalf("Server on an h2 connection: %v, want ErrALPN", err)
	}
	s := dialTest(t, p, srv.addr(), testConfig())
	roundTrip(t, s, "tunnel ALPN still served")
	s.Close()
	srv.close()
}
