package public

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/caddyserver/certmagic"
	"github.com/wicketgw/wicket/gateway/audit"
)

// Defaults for Config fields left zero.
const (
	// DefaultListen is the HTTPS listener.
	DefaultListen = ":443"
	// DefaultHTTPListen is the plain HTTP listener (redirects to HTTPS, answers http-01).
	DefaultHTTPListen = ":80"
	// LetsEncryptProduction is the default ACME CA.
	LetsEncryptProduction = certmagic.LetsEncryptProductionCA
	// LetsEncryptStaging is Let's Encrypt's staging CA (untrusted certificates, high limits).
	LetsEncryptStaging = certmagic.LetsEncryptStagingCA
	// ACMECAInternal as Config.ACMECA selects the gateway's built-in CA (Config.Internal).
	ACMECAInternal = "internal"
	// DefaultShutdownGrace bounds how long Serve lets requests finish after its context ends.
	DefaultShutdownGrace = 10 * time.Second
	// DefaultRenewCheckInterval is how often certificates are checked for renewal (certmagic's
	// default).
	DefaultRenewCheckInterval = certmagic.DefaultRenewCheckInterval
	// DefaultRenewalWindowRatio: renew when a third of the lifetime remains (certmagic's default).
	DefaultRenewalWindowRatio = certmagic.DefaultRenewalWindowRatio
	// ListenOff as HTTPListen turns the plain HTTP listener off (then only tls-alpn-01 works).
	ListenOff = "off"
)

// Challenge types (Config.Challenges).
const (
	ChallengeTLSALPN01 = "tls-alpn-01"
	ChallengeHTTP01    = "http-01"
)

// Access says who may use a published host.
type Access string

const (
	// AccessPublic: anyone; no client certificate is requested.
	AccessPublic Access = "public"
	// AccessUsers: only holders of a valid Wicket user certificate, presented in the TLS
	// handshake (Config.VerifyUser decides, Config.Allow may narrow it per resource).
	AccessUsers Access = "users"
)

// Host is one published host name.
type Host struct {
	// Resource is the name of the HTTP resource an agent exposes (`--expose web=...`). Required.
	Resource string
	// Access is AccessPublic or AccessUsers. Default AccessUsers (default deny: opening a
	// resource to the whole internet has to be said out loud).
	Access Access
}

// Meta describes the request a stream is opened for, so the dialer can audit and route it.
// A connection may be reused for later requests of the same host and the same user (HTTP
// keep-alive); it is never shared between users or hosts.
type Meta struct {
	// Host is the published host name.
	Host string
	// User is the verified user name for AccessUsers hosts, "" for public hosts.
	User string
	// Remote is the address of the client whose request caused the dial.
	Remote string
}

// StreamDialer opens a byte stream to a resource: in the gateway, a tunnel stream to an agent
// that exposes it. The connection carries plain HTTP/1.1 to the resource.
type StreamDialer interface {
	DialResource(ctx context.Context, resource string, meta Meta) (net.Conn, error)
}

// StreamDialerFunc adapts a function to StreamDialer.
type StreamDialerFunc func(ctx context.Context, resource string, meta Meta) (net.Conn, error)

// DialResource calls f.
func (f StreamDialerFunc) DialResource(ctx context.Context, resource string, meta Meta) (net.Conn, error) {
	return f(ctx, resource, meta)
}

// InternalCA is the gateway's built-in CA seen as an ACME server.
type InternalCA struct {
	// DirectoryURL is its ACME directory (ca.Authority.ACMEDirectoryURL()).
	DirectoryURL string
	// Roots verifies its HTTPS endpoint (ca.Authority.RootPool()).
	Roots *x509.CertPool
}

// Config configures a Server. The zero value of every field means its documented default.
type Config struct {
	// Listen is the TCP address of the HTTPS listener. Default ":443". Ignored if Listener is set.
	Listen string
	// Listener, if set, is used instead of binding Listen (tests, socket activation). The
	// Server closes it.
	Listener net.Listener
	// HTTPListen is the TCP address of the plain HTTP listener, which answers http-01
	// challenges and redirects everything else for published hosts to HTTPS. Default ":80";
	// "off" disables it (and with it http-01). Ignored if HTTPListener is set.
	HTTPListen string
	// HTTPListener, if set, is used instead of binding HTTPListen. The Server closes it.
	HTTPListener net.Listener
	// HTTPSPort is the port written into redirects from HTTP to HTTPS. Default: the port of the
	// HTTPS listener (omitted from the URL when 443). Set it when a proxy or NAT maps ports.
	HTTPSPort int

	// ACMECA is the ACME directory URL. Default LetsEncryptProduction; "internal" means the
	// gateway's built-in CA described by Internal.
	ACMECA string
	// ACMERoots verifies the ACME server's HTTPS certificate. Default: the system roots (or
	// Internal.Roots with ACMECA "internal").
	ACMERoots *x509.CertPool
	// Internal describes the built-in CA; required when ACMECA is "internal".
	Internal InternalCA
	// Email is the ACME account contact. Default "" (no contact; Let's Encrypt accepts that,
	// but then cannot warn you about expiring certificates).
	Email string
	// Challenges restricts the ACME challenge types: ChallengeTLSALPN01 (on the HTTPS port) and
	// ChallengeHTTP01 (on the HTTP port). Default both (http-01 only if the HTTP listener is on).
	Challenges []string
	// StorageDir holds the ACME account, certificates and keys (certmagic file storage);
	// created with mode 0700. Required unless Storage is set; the gateway uses
	// <data-dir>/certmagic.
	StorageDir string
	// Storage, if set, is used instead of file storage in StorageDir: the gateway passes a
	// PostgresStorage when its database is PostgreSQL, so gateways sharing the database share
	// their public certificates and locks. The caller closes it after the Server.
	Storage certmagic.Storage
	// RenewCheckInterval is how often certificates are checked for renewal. Default 10m.
	RenewCheckInterval time.Duration
	// RenewalWindowRatio is the fraction of the lifetime left at which renewal starts (ACME
	// Renewal Information from the CA takes precedence when offered). Default 1/3.
	RenewalWindowRatio float64

	// Hosts maps each published host name (lower case, no port) to what it serves. Required.
	Hosts map[string]Host
	// Dialer opens the stream behind each proxied connection. Required.
	Dialer StreamDialer
	// VerifyUser checks a client certificate chain (leaf first) presented to an AccessUsers
	// host and returns the user name; the gateway passes ca.Authority.VerifyPeer with
	// ca.RoleUser. Required when any host has AccessUsers.
	VerifyUser func(chain []*x509.Certificate) (user string, err error)
	// Allow, if set, decides whether a verified user may use a resource (the gateway passes
	// its policy). Default nil: every verified user may use every AccessUsers host.
	Allow func(user, resource string) bool
	// Audit receives one record per request (TypeHTTPRequest) and per certificate event.
	// It must not block for long. Default: records are dropped.
	Audit func(audit.Record)
	// ShutdownGrace bounds how long Serve lets requests finish once its context ends.
	// Default 10s.
	ShutdownGrace time.Duration
	// Logger receives log lines (certmagic's routine progress at Debug). Default: discard.
	Logger *slog.Logger
}

// withDefaults validates c and fills in defaults.
func (c Config) withDefaults() (Config, error) {
	if c.Listen == "" {
		c.Listen = DefaultListen
	}
	if c.HTTPListen == "" {
		c.HTTPListen = DefaultHTTPListen
	}
	if c.ACMECA == "" {
		c.ACMECA = LetsEncryptProduction
	}
	if c.ACMECA == ACMECAInternal {
		if c.Internal.DirectoryURL == "" {
			return c, fmt.Errorf("public: %w: ACME CA \"internal\" needs the built-in CA's directory URL", ErrConfig)
		}
		c.ACMECA = c.Internal.DirectoryURL
		if c.ACMERoots == nil {
			c.ACMERoots = c.Internal.Roots
		}
	}
	if !strings.HasPrefix(c.ACMECA, "https://") {
		return c, fmt.Errorf("public: %w: ACME CA %q is not an https:// directory URL (or \"internal\")", ErrConfig, c.ACMECA)
	}
	if c.StorageDir == "" && c.Storage == nil {
		return c, fmt.Errorf("public: %w: a certificate storage directory is required", ErrConfig)
	}
	if len(c.Hosts) == 0 {
		return c, fmt.Errorf("public: %w: no host is published (--publish NAME=HOST)", ErrConfig)
	}
	if c.Dialer == nil {
		return c, fmt.Errorf("public: %w: a StreamDialer is required", ErrConfig)
	}
	hosts := make(map[string]Host, len(c.Hosts))
	for name, h := range c.Hosts {
		n := strings.ToLower(strings.TrimSuffix(name, "."))
		if !certmagic.SubjectQualifiesForCert(n) || strings.ContainsAny(n, "*:/ ") || net.ParseIP(n) != nil || !strings.Contains(n, ".") {
			return c, fmt.Errorf("public: %w: %q is not a host name that can be published (a fully qualified DNS name without port or wildcard)", ErrConfig, name)
		}
		if _, dup := hosts[n]; dup {
			return c, fmt.Errorf("public: %w: host %s is published twice", ErrConfig, n)
		}
		if !validName.MatchString(h.Resource) {
			return c, fmt.Errorf("public: %w: host %s: resource name %q must match %s", ErrConfig, n, h.Resource, validName)
		}
		switch h.Access {
		case "":
			h.Access = AccessUsers
		case AccessPublic, AccessUsers:
		default:
			return c, fmt.Errorf("public: %w: host %s: access %q is neither %q nor %q", ErrConfig, n, h.Access, AccessPublic, AccessUsers)
		}
		if h.Access == AccessUsers && c.VerifyUser == nil {
			return c, fmt.Errorf("public: %w: host %s is for users only, but no user certificate verifier is configured", ErrConfig, n)
		}
		hosts[n] = h
	}
	c.Hosts = hosts
	if len(c.Challenges) == 0 {
		c.Challenges = []string{ChallengeTLSALPN01}
		if c.HTTPListener != nil || c.HTTPListen != ListenOff {
			c.Challenges = append(c.Challenges, ChallengeHTTP01)
		}
	}
	for _, ch := range c.Challenges {
		switch ch {
		case ChallengeTLSALPN01:
		case ChallengeHTTP01:
			if c.HTTPListener == nil && c.HTTPListen == ListenOff {
				return c, fmt.Errorf("public: %w: http-01 needs the HTTP listener, which is off", ErrConfig)
			}
		default:
			return c, fmt.Errorf("public: %w: unknown ACME challenge %q (use %s or %s)", ErrConfig, ch, ChallengeTLSALPN01, ChallengeHTTP01)
		}
	}
	c.Challenges = slices.Compact(slices.Sorted(slices.Values(c.Challenges)))
	if c.RenewCheckInterval <= 0 {
		c.RenewCheckInterval = DefaultRenewCheckInterval
	}
	if c.RenewalWindowRatio == 0 {
		c.RenewalWindowRatio = DefaultRenewalWindowRatio
	}
	if c.RenewalWindowRatio <= 0 || c.RenewalWindowRatio >= 1 {
		return c, fmt.Errorf("public: %w: renewal window ratio %v is not between 0 and 1", ErrConfig, c.RenewalWindowRatio)
	}
	if c.ShutdownGrace <= 0 {
		c.ShutdownGrace = DefaultShutdownGrace
	}
	if c.Audit == nil {
		c.Audit = func(audit.Record) {}
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	return c, nil
}

// validName is the Wicket name rule (DESIGN.md "Identity"), which resource names follow.
var validName = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`)

// Sentinel errors.
var (
	// ErrConfig: the configuration is invalid; the message says which field and why.
	ErrConfig = errors.New("invalid public listener configuration")
	// ErrUnknownHost: the name is not published here.
	ErrUnknownHost = errors.New("host is not published")
	// ErrClosed: the server was closed.
	ErrClosed = errors.New("public listener closed")
)
