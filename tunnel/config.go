package tunnel

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/hashicorp/yamux"
)

// Protocol constants.
const (
	// ALPNAgent is the ALPN protocol an agent speaks to the gateway.
	ALPNAgent = "wicket-agent/1"
	// ALPNClient is the ALPN protocol a user's client speaks to the gateway.
	ALPNClient = "wicket-client/1"

	// ProtocolVersion is the stream-header and reply version this package
	// speaks (see PROTOCOL.md).
	ProtocolVersion uint8 = 1
)

// Config holds the yamux and stream-protocol knobs. Start from DefaultConfig;
// a zero Config is not valid. Every default below was chosen by measurement on
// the machine described in docs/BENCHMARKS.md ("## tunnel").
type Config struct {
	// MaxStreamWindowSize is the most unacknowledged data (bytes) the peer may
	// send on one stream before it must wait for a window update; it is also
	// the most the receiver buffers for a stream whose reader is slow. One
	// stream's throughput is bounded by window / RTT:
	//   256 KiB (yamux default) at 50 ms RTT:   5.2 MB/s = 0.04 Gbit/s
	//     4 MiB                 at 50 ms RTT:    84 MB/s = 0.67 Gbit/s
	//    16 MiB                 at 50 ms RTT:   335 MB/s = 2.7  Gbit/s
	// Measured (BenchmarkWindowAtRTT, one stream through a 20 ms RTT delay
	// proxy, 8 windows sent): 256 KiB 5.2 MB/s, 1 MiB 20 MB/s, 4 MiB 66 MB/s,
	// 16 MiB 203 MB/s, i.e. about 0.4 x window/RTT for such transfers, since
	// yamux only returns window after half of it was read. On loopback
	// (RTT ~50 us) every size >= 256 KiB is CPU-bound, not window-bound.
	//
	// The price is memory, paid by the gateway: a stream whose far side reads
	// slowly (a user on a slow link downloading a large result) makes the
	// receiver buffer up to one window, and yamux's bytes.Buffer growth can
	// reach ~2x that; a user opening many such streams multiplies it. The
	// benchmarks also showed larger windows growing those buffers (and the
	// garbage they leave) during bulk transfers on a busy 2-core box.
	// Default 4 MiB: ~0.3 Gbit/s for one stream at 50 ms, ~1 Gbit/s at 10 ms,
	// and at most ~8 MiB held per slow stream. Raise it (16 MiB) for bulk
	// transfers over long paths when memory allows. Minimum 256 KiB (yamux's
	// floor).
	MaxStreamWindowSize uint32

	// AcceptBacklog is how many streams the peer may have opened that this side
	// has not yet accepted; beyond it yamux resets new streams, so a peer that
	// opens streams faster than we accept them cannot grow our memory
	// (TestStreamFloodIsBounded: 2,000 opens against a backlog of 16 leave 16
	// held, the rest reset). yamux also uses it as the cap on this side's own
	// un-acknowledged opens: more concurrent opens wait for a slot, they do not
	// fail (TestThousandConcurrentStreams). Each un-accepted stream may carry
	// up to 256 KiB (the initial window), so the hostile worst case per session
	// is AcceptBacklog x 256 KiB. Default 64: 16 MiB worst case, and the
	// accept queue costs 512 bytes per idle session (it is allocated up front).
	AcceptBacklog int

	// KeepAliveInterval is how often each side pings the peer. A peer that
	// stops answering (blackholed network, frozen process) is detected within
	// KeepAliveInterval + 2 x ConnectionWriteTimeout and the session is closed
	// so the agent reconnects. It also keeps NAT and load-balancer idle timers
	// (typically >= 60 s) from expiring. Default 15 s (detection <= 35 s with
	// the default write timeout; TestKeepaliveDetectsBlackhole measures ~300 ms
	// with 100 ms / 200 ms). A ping costs 24 bytes each way, so even 10,000
	// idle agents cost the gateway ~16 bytes/s each. Must be > 0.
	KeepAliveInterval time.Duration

	// ConnectionWriteTimeout bounds every write to the underlying connection
	// and the wait for a keepalive reply. When it fires the WHOLE session is
	// closed (never just the stream): after a timed-out write the peer may be
	// left waiting for bytes that will never come (yamux #142). Default 10 s:
	// far above any healthy write (a 32 KiB frame takes < 1 ms on a 1 Gbit/s
	// link), short enough that a stuck peer is dropped promptly.
	ConnectionWriteTimeout time.Duration

	// StreamOpenTimeout is how long OpenStream waits for the peer to accept the
	// stream and reply (the agent dials the resource before replying, so this
	// must exceed the agent's dial timeout). A peer that does not even
	// acknowledge a stream within this time is considered broken and the
	// session is closed (yamux's StreamOpenTimeout). Default 30 s.
	StreamOpenTimeout time.Duration

	// StreamCloseTimeout bounds how long a stream lingers after this side sent
	// its FIN (Close or CloseWrite) while the peer has not finished its own
	// direction; then the stream is reset and its buffers freed. It protects
	// against peers that never finish; a legitimate half-closed stream whose
	// other direction runs longer than this is cut. Default 5 min.
	StreamCloseTimeout time.Duration

	// HandshakeTimeout bounds the TLS handshake (Dial, and Server when the
	// connection was not yet handshaken) and the wait for a stream's header
	// after the peer opened it. A peer that connects and sends nothing is
	// dropped after it. Default 10 s.
	HandshakeTimeout time.Duration

	// MaxHeaderSize caps an encoded stream header (3-byte prefix included).
	// Larger headers are refused without being read. Default 4096 bytes;
	// allowed range 64..65538.
	MaxHeaderSize int

	// MaxControlMessageSize caps one control-stream message (the JSON body).
	// Default 64 KiB.
	MaxControlMessageSize int

	// Logger receives connection-level events (never payloads). nil discards.
	Logger *slog.Logger
}

// DefaultConfig returns the measured defaults documented on Config.
func DefaultConfig() Config {
	return Config{
		MaxStreamWindowSize:    4 << 20,
		AcceptBacklog:          64,
		KeepAliveInterval:      15 * time.Second,
		ConnectionWriteTimeout: 10 * time.Second,
		StreamOpenTimeout:      30 * time.Second,
		StreamCloseTimeout:     5 * time.Minute,
		HandshakeTimeout:       10 * time.Second,
		MaxHeaderSize:          4096,
		MaxControlMessageSize:  64 << 10,
	}
}

// minWindow is yamux's initial (and minimum) stream window.
const minWindow = 256 << 10

// Verify reports the first invalid field.
func (c Config) Verify() error {
	var errs []error
	if c.MaxStreamWindowSize < minWindow {
		errs = append(errs, fmt.Errorf("MaxStreamWindowSize %d is below yamux's minimum %d", c.MaxStreamWindowSize, minWindow))
	}
	if c.AcceptBacklog <= 0 {
		errs = append(errs, fmt.Errorf("AcceptBacklog must be positive, got %d", c.AcceptBacklog))
	}
	if c.KeepAliveInterval <= 0 {
		errs = append(errs, fmt.Errorf("KeepAliveInterval must be positive, got %s", c.KeepAliveInterval))
	}
	if c.ConnectionWriteTimeout <= 0 {
		errs = append(errs, fmt.Errorf("ConnectionWriteTimeout must be positive, got %s", c.ConnectionWriteTimeout))
	}
	if c.StreamOpenTimeout <= 0 {
		errs = append(errs, fmt.Errorf("StreamOpenTimeout must be positive, got %s", c.StreamOpenTimeout))
	}
	if c.StreamCloseTimeout < 0 {
		errs = append(errs, fmt.Errorf("StreamCloseTimeout must not be negative, got %s", c.StreamCloseTimeout))
	}
	if c.HandshakeTimeout <= 0 {
		errs = append(errs, fmt.Errorf("HandshakeTimeout must be positive, got %s", c.HandshakeTimeout))
	}
	if c.MaxHeaderSize < 64 || c.MaxHeaderSize > headerPrefixLen+0xffff {
		errs = append(errs, fmt.Errorf("MaxHeaderSize must be in 64..%d, got %d", headerPrefixLen+0xffff, c.MaxHeaderSize))
	}
	if c.MaxControlMessageSize < 1024 || c.MaxControlMessageSize > 16<<20 {
		errs = append(errs, fmt.Errorf("MaxControlMessageSize must be in 1KiB..16MiB, got %d", c.MaxControlMessageSize))
	}
	if len(errs) > 0 {
		return fmt.Errorf("invalid tunnel config: %w", errors.Join(errs...))
	}
	return nil
}

func (c Config) logger() *slog.Logger {
	if c.Logger != nil {
		return c.Logger
	}
	return slog.New(slog.DiscardHandler)
}

// yamuxConfig maps Config onto yamux. yamux's own keepalive is off: the
// Session runs keepalives from a timer so an idle session costs no goroutine
// for it (see Session.keepalive).
func (c Config) yamuxConfig() *yamux.Config {
	return &yamux.Config{
		AcceptBacklog:          c.AcceptBacklog,
		EnableKeepAlive:        false,
		KeepAliveInterval:      c.KeepAliveInterval,
		ConnectionWriteTimeout: c.ConnectionWriteTimeout,
		MaxStreamWindowSize:    c.MaxStreamWindowSize,
		StreamOpenTimeout:      c.StreamOpenTimeout,
		StreamCloseTimeout:     c.StreamCloseTimeout,
		Logger:                 yamuxLogger{l: c.logger()},
	}
}

// yamuxLogger adapts yamux's printf logger to slog. yamux prefixes lines with
// "[ERR]" (mostly a connection that ended uncleanly) or "[WARN]" (per-stream
// events such as a reset for a full backlog, which a misbehaving peer can
// trigger at will); those become Info and Debug so a peer cannot flood the
// log. The events that matter (keepalive and write timeouts, refused
// streams) are logged by this package itself.
type yamuxLogger struct{ l *slog.Logger }

func (y yamuxLogger) Print(v ...any)                 { y.emit(fmt.Sprint(v...)) }
func (y yamuxLogger) Println(v ...any)               { y.emit(strings.TrimSuffix(fmt.Sprintln(v...), "\n")) }
func (y yamuxLogger) Printf(format string, v ...any) { y.emit(fmt.Sprintf(format, v...)) }

func (y yamuxLogger) emit(msg string) {
	level := slog.LevelDebug
	switch {
	case strings.HasPrefix(msg, "[ERR]"):
		level = slog.LevelInfo
		msg = strings.TrimSpace(strings.TrimPrefix(msg, "[ERR]"))
	case strings.HasPrefix(msg, "[WARN]"):
		level = slog.LevelDebug
		msg = strings.TrimSpace(strings.TrimPrefix(msg, "[WARN]"))
	}
	y.l.Log(context.Background(), level, msg)
}
