package gateway

import (
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/wicketgw/wicket/tunnel"
)

// Defaults for Config fields left zero.
const (
	// DefaultListen is the gateway's one TLS port.
	DefaultListen = ":8443"
	// DefaultGracePeriod bounds how long Run waits for user streams to finish at shutdown.
	DefaultGracePeriod = 30 * time.Second
	// DefaultRevocationSweep is how often live sessions' certificates are re-checked against the
	// CA's revocation list. Revocations made through the admin API or the CA's /revoke close
	// sessions at once through ca.Config.OnRevoke; the sweep covers revocations made by other
	// paths (another gateway sharing the database, a direct database edit).
	DefaultRevocationSweep = 500 * time.Millisecond
	// DefaultMaxStreamsPerUser bounds the streams open at once on one user connection.
	DefaultMaxStreamsPerUser = 1024
	// DefaultHandshakeTimeout bounds the TLS handshake of one incoming connection and, for
	// agents, the wait for their hello.
	DefaultHandshakeTimeout = 10 * time.Second
)

// Config configures a Gateway. The zero value of every field means its documented default.
type Config struct {
	// DataDir holds the gateway's state: ca/, the database, audit.log, admin.sock.
	// Created with mode 0700 on first start. Required.
	DataDir string
	// Listen is the TCP address of the one TLS port (agents, users, CA API). Default ":8443".
	// "127.0.0.1:0" picks a free port (see Gateway.Addr).
	Listen string
	// PublicAddr is HOST[:PORT] that agents and users dial; it becomes the CA URL in every token
	// and a name on the gateway's server certificate. Default: the listen address, or
	// "localhost:<port>" when the listen host is unspecified. A missing port means the listen port.
	PublicAddr string
	// DB is the CA database: "" is a bbolt file inside DataDir/ca, "postgresql://..." PostgreSQL.
	DB string
	// PolicyFile is the YAML policy deciding which user may reach which resource; reloaded when
	// it changes. Default "": no policy, so every user is denied (default deny).
	PolicyFile string
	// PolicyInterval is how often the policy file is checked for changes. Default 1s.
	PolicyInterval time.Duration
	// TrustDomain is the SPIFFE trust domain. Default ca.DefaultTrustDomain ("wicket.local").
	TrustDomain string
	// CAPassword decrypts the CA keys. Default: CAPasswordFile, then $WICKET_CA_PASSWORD, then a
	// generated password file inside DataDir/ca (see ca.Config).
	CAPassword []byte
	// CAPasswordFile is a file holding the CA password. Default "" (see CAPassword).
	CAPasswordFile string
	// AgentLifetime and UserLifetime are the certificate lifetimes issued to agents (default 1h)
	// and users (default 8h); min 5m, max 24h.
	AgentLifetime, UserLifetime time.Duration
	// GracePeriod bounds how long Run lets user streams finish after its context ends.
	// Default 30s.
	GracePeriod time.Duration
	// HandshakeTimeout bounds each incoming TLS handshake and an agent's hello. Default:
	// Tunnel.HandshakeTimeout if set, else 10s.
	HandshakeTimeout time.Duration
	// MaxStreamsPerUser bounds the streams one user connection may have open at once, so
	// one client cannot make the gateway hold unbounded goroutines and agent streams;
	// `wicket connect` opens one stream per local connection. Default 1024.
	MaxStreamsPerUser int
	// RevocationSweep is the period of the revocation re-check of live sessions. Default 500ms.
	RevocationSweep time.Duration
	// Public turns on the public HTTPS listener for published HTTP resources. Default nil: off.
	Public *PublicConfig
	// ACMEServer turns on the ACME server for internal names (acmeserver.go). Default nil: off.
	ACMEServer *ACMEServerConfig
	// PostgresResources pins resources as PostgreSQL, by name or path.Match pattern: their
	// sessions are followed and every statement audited whatever their agent's Hello
	// announces, so a compromised agent cannot switch the audit off by announcing raw TCP.
	// A resource not pinned is followed when its agent announces postgres://. Default none.
	PostgresResources []string
	// Tunnel configures the yamux sessions with agents and users. Default tunnel.DefaultConfig().
	Tunnel tunnel.Config
	// Version is reported to agents in the gateway's hello. Default "dev".
	Version string
	// Clock is the time source for certificate-expiry timers. Default: the system clock.
	// Tests inject a fake clock so a 5-minute certificate can expire without waiting.
	Clock Clock
	// Logger receives the gateway's log lines. Default: discard.
	Logger *slog.Logger
}

// Clock is the time source the gateway uses for certificate expiry.
type Clock interface {
	Now() time.Time
	// AfterFunc calls f in its own goroutine after d; stop cancels it and reports whether it did.
	AfterFunc(d time.Duration, f func()) (stop func() bool)
}

type systemClock struct{}

func (systemClock) Now() time.Time { return time.Now() }
func (systemClock) AfterFunc(d time.Duration, f func()) func() bool {
	return time.AfterFunc(d, f).Stop
}

// withDefaults returns c with every zero field set to its default.
func (c Config) withDefaults() (Config, error) {
	if c.DataDir == "" {
		return c, errors.New("gateway: a data directory is required (--data-dir)")
	}
	if c.Listen == "" {
		c.Listen = DefaultListen
	}
	if c.GracePeriod == 0 {
		c.GracePeriod = DefaultGracePeriod
	}
	if c.GracePeriod < 0 {
		return c, fmt.Errorf("gateway: grace period %v is negative", c.GracePeriod)
	}
	if c.PolicyInterval <= 0 {
		c.PolicyInterval = time.Second
	}
	if err := checkPostgresResources(c.PostgresResources); err != nil {
		return c, err
	}
	if c.MaxStreamsPerUser <= 0 {
		c.MaxStreamsPerUser = DefaultMaxStreamsPerUser
	}
	if c.RevocationSweep <= 0 {
		c.RevocationSweep = DefaultRevocationSweep
	}
	if c.Tunnel == (tunnel.Config{}) {
		c.Tunnel = tunnel.DefaultConfig()
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Tunnel.Logger == nil {
		c.Tunnel.Logger = c.Logger
	}
	if c.HandshakeTimeout <= 0 {
		c.HandshakeTimeout = c.Tunnel.HandshakeTimeout
	}
	if c.HandshakeTimeout <= 0 {
		c.HandshakeTimeout = DefaultHandshakeTimeout
	}
	if c.Version == "" {
		c.Version = "dev"
	}
	if c.Clock == nil {
		c.Clock = systemClock{}
	}
	if err := c.Tunnel.Verify(); err != nil {
		return c, fmt.Errorf("gateway: tunnel config: %w", err)
	}
	return c, nil
}
