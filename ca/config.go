package ca

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"strings"
	"time"
)

// Lifetime bounds and defaults (DESIGN.md, Identity).
const (
	MinLifetime             = 5 * time.Minute
	MaxLifetime             = 24 * time.Hour
	DefaultAgentLifetime    = time.Hour
	DefaultUserLifetime     = 8 * time.Hour
	DefaultGatewayLifetime  = 24 * time.Hour
	DefaultTokenTTL         = 15 * time.Minute
	MaxTokenTTL             = 24 * time.Hour
	DefaultACMELifetime     = 24 * time.Hour
	passwordFileName        = "password"
	defaultGatewayID        = "gateway"
	acmeProvisionerName     = "acme"
	agentProvisionerName    = "wicket-agent"
	userProvisionerName     = "wicket-user"
	gatewayProvisionerName  = "wicket-gateway"
	rootLifetime            = 10 * 365 * 24 * time.Hour
	intermediateLifetime    = 5 * 365 * 24 * time.Hour
	postgresDSNPrefix       = "postgresql://"
	postgresDSNPrefixShort  = "postgres://"
	defaultRevocationReason = "revoked by the gateway administrator"
	defaultRevocationSync   = 2 * time.Second
)

// Config configures the built-in certificate authority.
type Config struct {
	// DataDir holds the CA state: root.crt, intermediate.crt, the encrypted keys and,
	// with the default database, ca.db. Created with mode 0700. Required.
	DataDir string
	// DB selects the database. "" (default) is a bbolt file DataDir/ca.db;
	// "postgresql://user@host:port/dbname?..." selects step-ca's PostgreSQL backend
	// (the database is created if missing). Use PostgreSQL to share state between gateways.
	DB string
	// Password decrypts (and, on first start, encrypts) the CA private keys. When empty,
	// PasswordFile is read, then $WICKET_CA_PASSWORD; if none is set, the first start
	// generates a random password into DataDir/password (0600) and logs that path
	// (never the value), and later starts read it from there.
	Password []byte
	// PasswordFile is a file whose content (trailing newline trimmed) is the CA password.
	PasswordFile string
	// TrustDomain is the SPIFFE trust domain of every identity. Default DefaultTrustDomain.
	TrustDomain string
	// URL is the gateway's external base URL, e.g. "https://gw.example.com:8443". Tokens
	// carry URL+"/1.0/sign" as their audience, and enrolling clients dial it. Required.
	URL string
	// ServerNames are extra DNS names or IP addresses for the gateway's own TLS server
	// certificate; the host of URL is always included.
	ServerNames []string
	// GatewayID names this gateway: its certificate carries spiffe://<td>/gateway/<id>.
	// Default "gateway".
	GatewayID string
	// AgentLifetime is the validity of agent certificates. Default 1h; 5m..24h.
	AgentLifetime time.Duration
	// UserLifetime is the validity of user certificates. Default 8h; 5m..24h.
	UserLifetime time.Duration
	// GatewayLifetime is the validity of the gateway's own server certificate, renewed
	// in-process at about 2/3 of it. Default 24h; 5m..24h.
	GatewayLifetime time.Duration
	// ACME configures the ACME server at /acme/acme/directory.
	ACME ACMEConfig
	// AgentACME, if set, enables enrollment of agents by ACME at
	// /acme/agents/directory (EAB required, tls-alpn-01 through the agent's own
	// connection). nil (the default) disables it.
	AgentACME *AgentACMEConfig
	// Logger receives operational messages (never a key, password or token).
	// Default: discard.
	Logger *slog.Logger
	// Now is the clock used for renewal scheduling of the gateway certificate, for
	// VerifyPeer's validity check, and for the validity window of one-time tokens and
	// agent ACME enrollment credentials. nil = time.Now. (step-ca's own checks use the
	// system clock, with a minute of leeway on tokens: ours are the stricter ones.)
	Now func() time.Time
	// RevocationSync is how often revocations are reloaded from the database, so that
	// revocations made by another gateway sharing it are seen here (IsRevoked,
	// VerifyPeer, OnRevoke). Default 2s with PostgreSQL; with bbolt, which only one
	// process can open, 0 (off). Negative disables it.
	RevocationSync time.Duration
	// After is the timer used to schedule the gateway certificate's renewal; nil =
	// time.After. Tests inject it to trigger a renewal without waiting.
	After func(d time.Duration) <-chan time.Time
	// OnRevoke is called after every successful revocation, by any path: Revoke,
	// RevokeIdentity, or the HTTP /revoke endpoint. It receives the serials (decimal)
	// revoked by that call. It must not block for long: it runs on the revoking request.
	OnRevoke func(serials []string)
	// OnGatewayCertificate is called each time the gateway's own server certificate is issued:
	// at start (renewal false) and at every in-process renewal (renewal true).
	OnGatewayCertificate func(serial string, notAfter time.Time, renewal bool)
}

// ACMEConfig configures the ACME provisioner "acme".
type ACMEConfig struct {
	// AllowedNames is the allow-list of DNS names the ACME provisioner issues for:
	// "host.example.com" allows that name exactly, "*.example.com" allows any name
	// under example.com (not example.com itself). Empty (the default) disables ACME:
	// default deny, the /acme endpoints answer 404.
	AllowedNames []string
	// RequireEAB requires External Account Binding for new ACME accounts; create keys
	// with Authority.NewEABKey. Default false.
	RequireEAB bool
	// Challenges enables a subset of "http-01", "tls-alpn-01", "dns-01". Default all three.
	Challenges []string
	// Lifetime of ACME-issued certificates. Default 24h; 5m..24h.
	Lifetime time.Duration
	// DialContext, if set, is used by the validation client to reach the name being
	// validated (http-01 and tls-alpn-01), e.g. to route through the connection of the
	// agent that owns the name. Default: a net.Dialer with a 10s timeout.
	DialContext func(ctx context.Context, network, addr string) (net.Conn, error)
	// LookupTXT, if set, resolves dns-01 TXT records. Default net.DefaultResolver.
	LookupTXT func(ctx context.Context, name string) ([]string, error)
	// OnIssued, if set, is called after the provisioner issued a certificate (its DNS names
	// and serial), e.g. for the gateway's metrics and audit log.
	OnIssued func(dnsNames []string, serial string)
	// OnOrder, if set, is called after every new-order request was answered, created or
	// refused (ACMEOrder says which, and why).
	OnOrder func(ACMEOrder)
	// OnRevoked, if set, is called after a certificate of this provisioner was revoked
	// through ACME (revokeCert), with its serial (decimal).
	OnRevoked func(serial string)
}

func (c *Config) setDefaults() error {
	if c.DataDir == "" {
		return errors.New("ca: Config.DataDir is required")
	}
	if c.URL == "" {
		return errors.New("ca: Config.URL (the gateway's external https URL) is required")
	}
	u, err := url.Parse(c.URL)
	if err != nil || u.Scheme != "https" || u.Host == "" || (u.Path != "" && u.Path != "/") {
		return fmt.Errorf("ca: Config.URL %q must be an https base URL such as https://gw.example.com:8443", c.URL)
	}
	c.URL = strings.TrimSuffix(c.URL, "/")
	if c.TrustDomain == "" {
		c.TrustDomain = DefaultTrustDomain
	}
	if _, err := ParseIdentityURI(&url.URL{Scheme: "spiffe", Host: c.TrustDomain, Path: "/agent/x"}); err != nil ||
		strings.ContainsAny(c.TrustDomain, "/:@ ") || c.TrustDomain != strings.ToLower(c.TrustDomain) {
		return fmt.Errorf("ca: trust domain %q must be a lowercase DNS-like name", c.TrustDomain)
	}
	if c.GatewayID == "" {
		c.GatewayID = defaultGatewayID
	}
	if err := ValidName(c.GatewayID); err != nil {
		return fmt.Errorf("ca: gateway id: %w", err)
	}
	for _, d := range []struct {
		p   *time.Duration
		def time.Duration
		n   string
	}{
		{&c.AgentLifetime, DefaultAgentLifetime, "agent lifetime"},
		{&c.UserLifetime, DefaultUserLifetime, "user lifetime"},
		{&c.GatewayLifetime, DefaultGatewayLifetime, "gateway lifetime"},
		{&c.ACME.Lifetime, DefaultACMELifetime, "ACME lifetime"},
	} {
		if *d.p == 0 {
			*d.p = d.def
		}
		if *d.p < MinLifetime || *d.p > MaxLifetime {
			return fmt.Errorf("ca: %s %s is outside %s..%s", d.n, *d.p, MinLifetime, MaxLifetime)
		}
	}
	for _, ch := range c.ACME.Challenges {
		switch ch {
		case "http-01", "tls-alpn-01", "dns-01":
		default:
			return fmt.Errorf("ca: unknown ACME challenge %q (want http-01, tls-alpn-01 or dns-01)", ch)
		}
	}
	for _, n := range c.ACME.AllowedNames {
		if n == "" || n == "*" || strings.Contains(strings.TrimPrefix(n, "*."), "*") {
			return fmt.Errorf("ca: ACME allowed name %q must be a DNS name or *.suffix", n)
		}
	}
	if c.AgentACME != nil && c.AgentACME.Dial == nil {
		return errors.New("ca: AgentACME.Dial is required to enable agent enrollment by ACME")
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	if c.RevocationSync == 0 && c.DB != "" {
		c.RevocationSync = defaultRevocationSync
	}
	if c.After == nil {
		c.After = time.After
	}
	if c.DB != "" && !strings.HasPrefix(c.DB, postgresDSNPrefix) && !strings.HasPrefix(c.DB, postgresDSNPrefixShort) {
		return fmt.Errorf("ca: database %q is not supported: use \"\" (bbolt in the data dir) or a postgresql:// DSN", redactDSN(c.DB))
	}
	return nil
}

// serverHost is the host of Config.URL, without port.
func (c *Config) serverHost() string {
	u, _ := url.Parse(c.URL)
	return u.Hostname()
}

// redactDSN drops the password of a DSN so that it can be printed.
func redactDSN(dsn string) string {
	u, err := url.Parse(dsn)
	if err != nil {
		return "<unparsable DSN>"
	}
	return u.Redacted()
}
