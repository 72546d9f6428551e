package tunnelbench

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"net"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/wicketgw/wicket/tunnel"
)

// IdleGateway accepts agent sessions and keeps only what the tunnel itself
// needs: the session with its accepted control stream, after the agent's
// Hello and an answer, and no goroutine of its own. It measures the floor any
// server of agent sessions pays; cmd/wicket-bench measures the real gateway
// next to it.
type IdleGateway struct {
	ln       net.Listener
	cfg      tunnel.Config
	tls      *tls.Config
	hellos   atomic.Int64
	wg       sync.WaitGroup
	mu       sync.Mutex
	sessions []*tunnel.Session
}

// StartIdleGateway listens on 127.0.0.1.
func StartIdleGateway(p *PKI, cfg tunnel.Config) (*IdleGateway, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	g := &IdleGateway{ln: ln, cfg: cfg, tls: p.ServerTLS()}
	g.wg.Add(1)
	go func() {
		defer g.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			g.wg.Add(1)
			go func() {
				defer g.wg.Done()
				g.serve(c)
			}()
		}
	}()
	return g, nil
}

func (g *IdleGateway) serve(c net.Conn) {
	s, err := tunnel.Server(tls.Server(c, g.tls), g.cfg)
	if err != nil {
		return
	}
	g.mu.Lock()
	g.sessions = append(g.sessions, s)
	g.mu.Unlock()
	st, err := s.AcceptStream(context.Background())
	if err != nil {
		return
	}
	if st.Header().Kind != tunnel.KindControl || st.Reply(tunnel.StatusOK, "") != nil {
		st.Close()
		return
	}
	var h tunnel.Hello
	if err := st.Control().Recv(&h); err != nil {
		return
	}
	if err := st.Control().Send(tunnel.Hello{Name: "gateway"}); err != nil {
		return
	}
	g.hellos.Add(1)
}

// Addr is where agents dial.
func (g *IdleGateway) Addr() string { return g.ln.Addr().String() }

// Hellos counts sessions whose agent has said hello.
func (g *IdleGateway) Hellos() int64 { return g.hellos.Load() }

// Close ends every session and waits for all goroutines.
func (g *IdleGateway) Close() {
	g.ln.Close()
	g.mu.Lock()
	for _, s := range g.sessions {
		s.Close()
	}
	g.mu.Unlock()
	g.wg.Wait()
}

// DialIdleAgents opens n agent sessions to addr, each with a control stream
// and one Hello, and leaves them idle. The returned func closes them all.
func DialIdleAgents(ctx context.Context, p *PKI, cfg tunnel.Config, addr string, n int) (func(), error) {
	var sessions []*tunnel.Session
	closeAll := func() {
		for _, s := range sessions {
			s.Close()
		}
	}
	for i := range n {
		s, err := tunnel.Dial(ctx, tunnel.DialConfig{Addr: addr, TLS: p.ClientTLS(tunnel.ALPNAgent), Config: cfg})
		if err != nil {
			closeAll()
			return nil, fmt.Errorf("idle agent %d: %w", i, err)
		}
		sessions = append(sessions, s)
		ctl, err := s.OpenControl(ctx)
		if err != nil {
			closeAll()
			return nil, fmt.Errorf("idle agent %d control: %w", i, err)
		}
		if err := ctl.Send(tunnel.Hello{Name: fmt.Sprintf("idle-%d", i), Instance: "bench", Version: "bench", Resources: []string{"postgres"}}); err != nil {
			closeAll()
			return nil, fmt.Errorf("idle agent %d hello: %w", i, err)
		}
	}
	return closeAll, nil
}

// Live is what the process holds on to after full collections: live heap,
// goroutine stacks, and the number of goroutines.
type Live struct {
	Heap, Stack uint64
	Goroutines  int
}

// LiveBytes measures Live. It collects several times so that stacks grown
// during handshakes shrink back to what the idle goroutines really use (the
// runtime halves an underused stack at each collection), i.e. the steady
// state of a long-running gateway.
func LiveBytes() Live {
	for range 8 {
		runtime.GC()
	}
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return Live{Heap: m.HeapAlloc, Stack: m.StackInuse, Goroutines: runtime.NumGoroutine()}
}

// WaitHellos polls until g has seen n hellos or the deadline passes.
func (g *IdleGateway) WaitHellos(n int64, within time.Duration) error {
	deadline := time.Now().Add(within)
	for g.Hellos() < n {
		if time.Now().After(deadline) {
			return fmt.Errorf("only %d of %d idle agents said hello within %s", g.Hellos(), n, within)
		}
		time.Sleep(10 * time.Millisecond) // polling with a deadline, in a measuring tool
	}
	return nil
}

// AgentCredentials carries the client identity to a child process that
// plays the idle agents, so their memory is not counted with the gateway's.
type AgentCredentials struct {
	Roots [][]byte `json:"roots"` // DER
	Chain [][]byte `json:"chain"` // DER, leaf first
	Key   []byte   `json:"key"`   // PKCS#8 DER
}

// ExportAgent serialises the client identity for a child process.
func (p *PKI) ExportAgent() ([]byte, error) {
	key, err := x509.MarshalPKCS8PrivateKey(p.Client.PrivateKey)
	if err != nil {
		return nil, err
	}
	// The root is the last certificate of the client chain.
	chain := p.Client.Certificate
	return json.Marshal(AgentCredentials{Roots: [][]byte{chain[len(chain)-1]}, Chain: chain, Key: key})
}

// ImportAgent rebuilds a client-only PKI from ExportAgent's output.
func ImportAgent(b []byte) (*PKI, error) {
	var ac AgentCredentials
	if err := json.Unmarshal(b, &ac); err != nil {
		return nil, err
	}
	key, err := x509.ParsePKCS8PrivateKey(ac.Key)
	if err != nil {
		return nil, err
	}
	p := &PKI{Roots: x509.NewCertPool(), Client: &tls.Certificate{Certificate: ac.Chain, PrivateKey: key}}
	for _, der := range ac.Roots {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return nil, err
		}
		p.Roots.AddCert(c)
	}
	return p, nil
}
