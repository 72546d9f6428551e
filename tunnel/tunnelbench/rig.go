// Package tunnelbench is the measuring rig behind tunnel's Go benchmarks and
// cmd/wicket-bench. It builds, on loopback and in one process, the two paths
// the targets compare:
//
//	tunnel: client -TLS-> gateway relay -yamux stream over one mTLS session-> agent relay -TCP-> sink
//	raw:    client -TLS-> front relay   -one new mTLS connection per stream-> back relay  -TCP-> sink
//
// Both use the same TLS settings (tunnel.ClientTLSConfig/ServerTLSConfig), the
// same tunnel.Relay, and the same sink, so their ratio isolates what the
// multiplexed session costs. The raw pair is the ceiling for anything
// tunnel-shaped.
//
// It is a measuring tool: it must NOT be used as a server, and its
// certificates are throwaway, generated in memory at start.
package tunnelbench

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/url"
	"sync"
	"syscall"
	"time"

	"github.com/wicketgw/wicket/tunnel"
)

// Path selects which of the two compared paths a measurement uses.
type Path int

const (
	// Tunnel is the multiplexed path through a yamux session.
	Tunnel Path = iota
	// Raw is the pair of TLS relays with one TLS connection per stream.
	Raw
)

// String names the path in reports.
func (p Path) String() string {
	if p == Tunnel {
		return "tunnel"
	}
	return "raw-tls"
}

// Sink modes: the first payload byte a client sends picks what the sink does.
const (
	modeDiscard = 'D' // read to EOF, answer with the 8-byte count, close
	modeEcho    = 'E' // copy everything back
)

// PKI is an in-memory CA with one server and one client certificate.
type PKI struct {
	Roots  *x509.CertPool
	Server *tls.Certificate
	Client *tls.Certificate
}

// NewPKI generates a throwaway ECDSA P-256 CA and two leaves.
func NewPKI() (*PKI, error) {
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "wicket-bench root"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		KeyUsage: x509.KeyUsageCertSign, BasicConstraintsValid: true, IsCA: true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return nil, err
	}
	caCert, err := x509.ParseCertificate(caDER)
	if err != nil {
		return nil, err
	}
	leaf := func(serial int64, path string) (*tls.Certificate, error) {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return nil, err
		}
		tmpl := &x509.Certificate{
			SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: path},
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
			KeyUsage:    x509.KeyUsageDigitalSignature,
			ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
			URIs:        []*url.URL{{Scheme: "spiffe", Host: "wicket.bench", Path: "/" + path}},
			DNSNames:    []string{"localhost"}, IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)},
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, &key.PublicKey, caKey)
		if err != nil {
			return nil, err
		}
		return &tls.Certificate{Certificate: [][]byte{der, caDER}, PrivateKey: key}, nil
	}
	p := &PKI{Roots: x509.NewCertPool()}
	p.Roots.AddCert(caCert)
	if p.Server, err = leaf(2, "gateway/bench"); err != nil {
		return nil, err
	}
	if p.Client, err = leaf(3, "agent/bench"); err != nil {
		return nil, err
	}
	return p, nil
}

// ServerTLS is the mTLS config of the tunnel listeners.
func (p *PKI) ServerTLS() *tls.Config {
	return tunnel.ServerTLSConfig(func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return p.Server, nil },
		p.Roots, []string{tunnel.ALPNAgent, tunnel.ALPNClient}, nil)
}

// ClientTLS is the config an agent (or the raw front relay) dials with.
func (p *PKI) ClientTLS(alpn string) *tls.Config {
	return tunnel.ClientTLSConfig(alpn, p.Roots, "localhost",
		func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return p.Client, nil })
}

// frontTLS is the server config of the client-facing listeners (server auth
// only, TLS 1.3, same curves).
func (p *PKI) frontTLS() *tls.Config {
	c := &tls.Config{Certificates: []tls.Certificate{*p.Server}}
	tunnel.HardenServerTLS(c)
	return c
}

// userTLS is what the benchmark's client dials the front with.
func (p *PKI) userTLS() *tls.Config {
	return &tls.Config{MinVersion: tls.VersionTLS13, RootCAs: p.Roots, ServerName: "localhost"}
}

// Rig holds both paths, up and connected. Close it when done.
type Rig struct {
	PKI *PKI
	Cfg tunnel.Config

	sink      net.Listener
	gwAgent   net.Listener // gateway: agents connect here (mTLS, yamux)
	gwFront   net.Listener // gateway: clients connect here
	rawBack   net.Listener // raw back relay (mTLS)
	rawFront  net.Listener // raw front relay
	gwSess    *tunnel.Session
	agentSess *tunnel.Session

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	mu     sync.Mutex
	conns  map[net.Conn]struct{}
}

// NewRig starts the sink, both relay pairs and one agent session.
func NewRig(cfg tunnel.Config) (*Rig, error) {
	p, err := NewPKI()
	if err != nil {
		return nil, err
	}
	r := &Rig{PKI: p, Cfg: cfg, conns: map[net.Conn]struct{}{}}
	r.ctx, r.cancel = context.WithCancel(context.Background())
	listen := func() net.Listener {
		if err != nil {
			return nil
		}
		var ln net.Listener
		ln, err = net.Listen("tcp", "127.0.0.1:0")
		return ln
	}
	r.sink, r.gwAgent, r.gwFront, r.rawBack, r.rawFront = listen(), listen(), listen(), listen(), listen()
	if err != nil {
		r.Close()
		return nil, err
	}
	r.serve(r.sink, r.handleSink)
	r.serve(r.rawBack, r.handleRawBack)
	r.serve(r.rawFront, r.handleRawFront)
	r.serve(r.gwFront, r.handleGatewayFront)

	// The agent dials the gateway; the gateway side is tunnel.Server.
	gwReady := make(chan error, 1)
	r.wg.Add(1)
	go func() {
		defer r.wg.Done()
		c, err := r.gwAgent.Accept()
		if err != nil {
			gwReady <- err
			return
		}
		s, err := tunnel.Server(tls.Server(c, p.ServerTLS()), cfg)
		if err == nil {
			r.gwSess = s
		}
		gwReady <- err
	}()
	r.agentSess, err = tunnel.Dial(r.ctx, tunnel.DialConfig{Addr: r.gwAgent.Addr().String(), TLS: p.ClientTLS(tunnel.ALPNAgent), Config: cfg})
	if err != nil {
		r.Close()
		return nil, fmt.Errorf("agent dial: %w", err)
	}
	if err := <-gwReady; err != nil {
		r.Close()
		return nil, fmt.Errorf("gateway session: %w", err)
	}
	r.wg.Add(1)
	go func() {
		defer r.wg.Done()
		r.agentAccept()
	}()
	return r, nil
}

// Close stops everything and waits for every goroutine the rig started.
func (r *Rig) Close() {
	r.cancel()
	for _, ln := range []net.Listener{r.sink, r.gwAgent, r.gwFront, r.rawBack, r.rawFront} {
		if ln != nil {
			ln.Close()
		}
	}
	if r.agentSess != nil {
		r.agentSess.Close()
	}
	if r.gwSess != nil {
		r.gwSess.Close()
	}
	r.mu.Lock()
	for c := range r.conns {
		c.Close()
	}
	r.mu.Unlock()
	r.wg.Wait()
}

func (r *Rig) track(c net.Conn) func() {
	r.mu.Lock()
	r.conns[c] = struct{}{}
	r.mu.Unlock()
	return func() {
		r.mu.Lock()
		delete(r.conns, c)
		r.mu.Unlock()
		c.Close()
	}
}

func (r *Rig) serve(ln net.Listener, handle func(net.Conn)) {
	r.wg.Add(1)
	go func() {
		defer r.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			untrack := r.track(c)
			r.wg.Add(1)
			go func() {
				defer r.wg.Done()
				defer untrack()
				handle(c)
			}()
		}
	}()
}

// handleSink reads the mode byte, then discards (answering with the count)
// or echoes.
func (r *Rig) handleSink(c net.Conn) {
	var mode [1]byte
	if _, err := io.ReadFull(c, mode[:]); err != nil {
		return
	}
	switch mode[0] {
	case modeDiscard:
		n, err := io.Copy(io.Discard, c)
		if err != nil {
			return
		}
		var b [8]byte
		binary.BigEndian.PutUint64(b[:], uint64(n))
		c.Write(b[:])
	case modeEcho:
		io.Copy(c, c)
	}
}

func (r *Rig) dialSink() (net.Conn, error) {
	return net.Dial("tcp", r.sink.Addr().String())
}

// handleRawBack: an mTLS connection per stream, relayed to the sink.
func (r *Rig) handleRawBack(c net.Conn) {
	tc := tls.Server(c, r.PKI.ServerTLS())
	if err := tc.HandshakeContext(r.ctx); err != nil {
		return
	}
	s, err := r.dialSink()
	if err != nil {
		return
	}
	tunnel.Relay(r.ctx, tc, s)
}

// handleRawFront: the client's TLS connection, relayed over a NEW mTLS
// connection to the back relay.
func (r *Rig) handleRawFront(c net.Conn) {
	tc := tls.Server(c, r.PKI.frontTLS())
	if err := tc.HandshakeContext(r.ctx); err != nil {
		return
	}
	d := tls.Dialer{Config: r.PKI.ClientTLS(tunnel.ALPNAgent)}
	up, err := d.DialContext(r.ctx, "tcp", r.rawBack.Addr().String())
	if err != nil {
		return
	}
	tunnel.Relay(r.ctx, tc, up)
}

// handleGatewayFront: the client's TLS connection, relayed over a stream of
// the agent's session (the gateway opens it, the agent dials the sink).
func (r *Rig) handleGatewayFront(c net.Conn) {
	tc := tls.Server(c, r.PKI.frontTLS())
	if err := tc.HandshakeContext(r.ctx); err != nil {
		return
	}
	st, err := r.gwSess.OpenStream(r.ctx, tunnel.Header{Kind: tunnel.KindData, Resource: "sink"})
	if err != nil {
		return
	}
	tunnel.Relay(r.ctx, tc, st)
}

// agentAccept is the agent: for every stream, dial the sink, reply, relay.
func (r *Rig) agentAccept() {
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		st, err := r.agentSess.AcceptStream(r.ctx)
		if err != nil {
			return
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			s, err := r.dialSink()
			if err != nil {
				st.Reply(tunnel.StatusDialFailed, err.Error())
				return
			}
			if err := st.Reply(tunnel.StatusOK, ""); err != nil {
				s.Close()
				return
			}
			tunnel.Relay(r.ctx, st, s)
		}()
	}
}

// dialFront opens a client connection through path p and sends the mode.
func (r *Rig) dialFront(p Path, mode byte) (*tls.Conn, error) {
	addr := r.gwFront.Addr().String()
	if p == Raw {
		addr = r.rawFront.Addr().String()
	}
	c, err := tls.Dial("tcp", addr, r.PKI.userTLS())
	if err != nil {
		return nil, err
	}
	if _, err := c.Write([]byte{mode}); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// Throughput pushes bytesPerStream through each of streams concurrent
// connections on path p and returns the delivered rate in bytes/second,
// counted at the sink from the first write to the last sink acknowledgment.
func (r *Rig) Throughput(p Path, streams int, bytesPerStream int64) (float64, error) {
	bps, _, err := r.ThroughputCPU(p, streams, bytesPerStream)
	return bps, err
}

// ThroughputCPU is Throughput that also returns the CPU time (user+system)
// the whole process spent per delivered byte, in nanoseconds. Every stage of
// both paths runs in this process, so on a machine shared with other load,
// where wall-clock rates swing with the CPU share we get, the CPU cost per
// byte is the steadier way to compare the paths.
func (r *Rig) ThroughputCPU(p Path, streams int, bytesPerStream int64) (bps, cpuNsPerByte float64, err error) {
	cpu0 := cpuTime()
	bps, err = r.throughput(p, streams, bytesPerStream)
	if err != nil {
		return 0, 0, err
	}
	return bps, float64(cpuTime()-cpu0) / float64(bytesPerStream*int64(streams)), nil
}

func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func (r *Rig) throughput(p Path, streams int, bytesPerStream int64) (float64, error) {
	conns := make([]*tls.Conn, streams)
	for i := range conns {
		c, err := r.dialFront(p, modeDiscard)
		if err != nil {
			for _, c := range conns[:i] {
				c.Close()
			}
			return 0, fmt.Errorf("%s: dial: %w", p, err)
		}
		conns[i] = c
	}
	// The far side's setup (the tunnel's stream open, the raw pair's second
	// handshake) overlaps the first writes; at tens of MiB per stream it is
	// well under 1% of the timed window.
	errs := make(chan error, streams)
	start := time.Now()
	var wg sync.WaitGroup
	for _, c := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer c.Close()
			buf := make([]byte, 32<<10)
			for i := range buf {
				buf[i] = byte(i * 7)
			}
			left := bytesPerStream
			for left > 0 {
				n := min(int64(len(buf)), left)
				if _, err := c.Write(buf[:n]); err != nil {
					errs <- err
					return
				}
				left -= n
			}
			if err := c.CloseWrite(); err != nil {
				errs <- err
				return
			}
			var b [8]byte
			if _, err := io.ReadFull(c, b[:]); err != nil {
				errs <- fmt.Errorf("sink acknowledgment: %w", err)
				return
			}
			if got := int64(binary.BigEndian.Uint64(b[:])); got != bytesPerStream {
				errs <- fmt.Errorf("sink got %d bytes, sent %d", got, bytesPerStream)
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	close(errs)
	if err := <-errs; err != nil {
		return 0, fmt.Errorf("%s: %w", p, err)
	}
	return float64(bytesPerStream) * float64(streams) / elapsed.Seconds(), nil
}

// EchoRTT sends n 64-byte messages one at a time through path p and returns
// each round trip.
func (r *Rig) EchoRTT(p Path, n int) ([]time.Duration, error) {
	c, err := r.dialFront(p, modeEcho)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	msg := make([]byte, 64)
	got := make([]byte, 64)
	out := make([]time.Duration, 0, n)
	for i := range n + n/10 { // the first tenth warms up and is not kept
		msg[0] = byte(i)
		t0 := time.Now()
		if _, err := c.Write(msg); err != nil {
			return nil, err
		}
		if _, err := io.ReadFull(c, got); err != nil {
			return nil, err
		}
		if got[0] != msg[0] {
			return nil, errors.New("echo mismatch")
		}
		if i >= n/10 {
			out = append(out, time.Since(t0))
		}
	}
	return out, nil
}

// OpenLatency measures n stream opens on the gateway's session: header out,
// the agent accepts, dials the sink and replies OK.
func (r *Rig) OpenLatency(n int) ([]time.Duration, error) {
	out := make([]time.Duration, 0, n)
	for range n {
		t0 := time.Now()
		st, err := r.gwSess.OpenStream(r.ctx, tunnel.Header{Kind: tunnel.KindData, Resource: "sink"})
		if err != nil {
			return nil, err
		}
		out = append(out, time.Since(t0))
		st.Close()
	}
	return out, nil
}

// RawOpenLatency measures the raw pair's equivalent: a new TCP connection
// and mTLS handshake to the back relay, which dials the sink.
func (r *Rig) RawOpenLatency(n int) ([]time.Duration, error) {
	out := make([]time.Duration, 0, n)
	d := tls.Dialer{Config: r.PKI.ClientTLS(tunnel.ALPNAgent)}
	for range n {
		t0 := time.Now()
		c, err := d.DialContext(r.ctx, "tcp", r.rawBack.Addr().String())
		if err != nil {
			return nil, err
		}
		out = append(out, time.Since(t0))
		c.Close()
	}
	return out, nil
}
