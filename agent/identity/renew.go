package identity

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"github.com/wicketgw/wicket/ca"
)

// Renewal timing. A certificate is renewed at a random point between
// RenewFractionMin and RenewFractionMax of its lifetime ("about 2/3", as
// DESIGN.md says): the jitter keeps a fleet of agents enrolled at the same
// moment from renewing in the same second, and the remaining third leaves
// room for retries while the CA is unreachable.
const (
	RenewFractionMin = 0.6
	RenewFractionMax = 0.7
)

// ExpiredError is the terminal error of an identity whose certificate has
// expired. It matches ErrExpired and ca.ErrExpired with errors.Is.
type ExpiredError struct{ NotAfter time.Time }

// Error says when the certificate expired and what to do.
func (e *ExpiredError) Error() string {
	return fmt.Sprintf("the certificate expired at %s and cannot be renewed: enroll again with a new token",
		e.NotAfter.UTC().Format(time.RFC3339))
}

// Is makes errors.Is(err, ErrExpired) and errors.Is(err, ca.ErrExpired) true.
func (e *ExpiredError) Is(target error) bool { return target == ErrExpired || target == ca.ErrExpired }

// RevokedError is the terminal error of an identity whose certificate the CA
// reports as revoked. It matches ErrRevoked and ca.ErrRevoked.
type RevokedError struct {
	Role ca.Role
	Name string
}

// Error says the certificate was revoked and how to get a new one.
func (e *RevokedError) Error() string {
	if e.Role == ca.RoleUser {
		return fmt.Sprintf("the user certificate was revoked: log in again with a new token from `wicket token create user %s`", e.Name)
	}
	return fmt.Sprintf("the agent certificate was revoked: enroll again with a new token from `wicket token create agent %s`", e.Name)
}

// Is makes errors.Is(err, ErrRevoked) and errors.Is(err, ca.ErrRevoked) true.
func (e *RevokedError) Is(target error) bool { return target == ErrRevoked || target == ca.ErrRevoked }

// CheckValid returns an *ExpiredError if the leaf of s has expired at now.
func CheckValid(s *Stored, now time.Time) error {
	if leaf := s.Leaf(); !now.Before(leaf.NotAfter) {
		return &ExpiredError{NotAfter: leaf.NotAfter}
	}
	return nil
}

// RenewerConfig configures a Renewer.
type RenewerConfig struct {
	// Dir is the data directory renewed certificates are saved to. Empty
	// means keep them in memory only.
	Dir string
	// Renew asks the CA for a new chain with the same key. Default ca.Renew.
	Renew func(ctx context.Context, baseURL string, cur *ca.Credentials) (*ca.Credentials, error)
	// Logger receives renewal events. Default: discard.
	Logger *slog.Logger
	// Now is the clock. Default time.Now.
	Now func() time.Time
	// After waits for a duration. Default time.After. Tests inject a fake
	// clock so that a one-hour certificate is renewed without waiting.
	After func(time.Duration) <-chan time.Time
	// Rand returns a number in [0,1) for the renewal jitter and retry
	// backoff. Default math/rand/v2.Float64.
	Rand func() float64
	// Period, when > 0, renews every Period (counted from when each
	// certificate was obtained or loaded) if that comes before the normal
	// time at about 2/3 of the lifetime, like `step ca renew --renew-period`.
	// For tests and demos that need several renewals within a lifetime that
	// cannot go under 5 minutes. An expired certificate is still never
	// renewed. Default 0: off.
	Period time.Duration
	// RetryInitial is the first wait after a failed renewal; it doubles on
	// each failure. Default 1s.
	RetryInitial time.Duration
	// RetryMax caps the wait between failed renewals. Default 1m: while the
	// CA is unreachable the holder keeps trying at least once a minute until
	// the certificate expires.
	RetryMax time.Duration
	// AttemptTimeout bounds one renewal request. Default 30s.
	AttemptTimeout time.Duration
}

// Renewer holds the current credentials of an identity and renews them
// before they expire. Read the newest certificate with Current or
// GetClientCertificate (safe from any goroutine); learn about a renewal on
// Updates.
type Renewer struct {
	cfg     RenewerConfig
	meta    Meta
	mu      sync.Mutex // serialises renewals (Run and RenewNow)
	cur     atomic.Pointer[state]
	updates chan *ca.Credentials
	kick    chan struct{}
}

type state struct {
	creds   *ca.Credentials
	tls     *tls.Certificate
	renewAt time.Time
}

// NewRenewer returns a Renewer for s. It does not start renewing: call Run.
func NewRenewer(s *Stored, cfg RenewerConfig) *Renewer {
	if cfg.Renew == nil {
		cfg.Renew = ca.Renew
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.After == nil {
		cfg.After = time.After
	}
	if cfg.Rand == nil {
		cfg.Rand = rand.Float64
	}
	if cfg.RetryInitial <= 0 {
		cfg.RetryInitial = time.Second
	}
	if cfg.RetryMax <= 0 {
		cfg.RetryMax = time.Minute
	}
	if cfg.AttemptTimeout <= 0 {
		cfg.AttemptTimeout = 30 * time.Second
	}
	r := &Renewer{
		cfg:     cfg,
		meta:    s.Meta,
		updates: make(chan *ca.Credentials, 1),
		kick:    make(chan struct{}, 1),
	}
	r.cur.Store(r.newState(s.Creds))
	return r
}

// RenewAt is the moment a certificate valid from notBefore to notAfter is
// renewed, for a jitter value u in [0,1).
func RenewAt(notBefore, notAfter time.Time, u float64) time.Time {
	life := notAfter.Sub(notBefore)
	f := RenewFractionMin + (RenewFractionMax-RenewFractionMin)*u
	return notBefore.Add(time.Duration(float64(life) * f))
}

// ClientCertificate is the certificate an agent or user presents to the
// gateway: the leaf alone. The gateway is the CA that issued it; it holds the
// intermediate and verifies against its own copy (ca.Authority.VerifyPeer).
// Sending the intermediate on every connection would only add handshake
// bytes and about 3 KiB of gateway memory per session, which crypto/tls keeps
// parsed for the connection's life.
func ClientCertificate(c *ca.Credentials) *tls.Certificate {
	leaf := c.Chain[0]
	return &tls.Certificate{PrivateKey: c.Key, Leaf: leaf, Certificate: [][]byte{leaf.Raw}}
}

func (r *Renewer) newState(c *ca.Credentials) *state {
	leaf := c.Chain[0]
	tc := ClientCertificate(c)
	at := RenewAt(leaf.NotBefore, leaf.NotAfter, r.cfg.Rand())
	if r.cfg.Period > 0 {
		if p := r.cfg.Now().Add(r.cfg.Period); p.Before(at) {
			at = p
		}
	}
	return &state{creds: c, tls: tc, renewAt: at}
}

// Current returns the newest credentials.
func (r *Renewer) Current() *ca.Credentials { return r.cur.Load().creds }

// RenewAtTime returns when the current certificate is due for renewal.
func (r *Renewer) RenewAtTime() time.Time { return r.cur.Load().renewAt }

// GetClientCertificate suits tls.Config.GetClientCertificate: every new TLS
// connection presents the newest certificate.
func (r *Renewer) GetClientCertificate(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
	return r.cur.Load().tls, nil
}

// RecordingClientCertificate returns a GetClientCertificate hook for one
// connection and a function that reports which leaf that connection's
// handshake presented (nil if the server never asked). A session needs the
// exact certificate it runs on: a renewal may land between building the TLS
// config and the handshake, and the session's expiry is that leaf's.
func (r *Renewer) RecordingClientCertificate() (get func(*tls.CertificateRequestInfo) (*tls.Certificate, error), used func() *x509.Certificate) {
	var (
		mu   sync.Mutex
		leaf *x509.Certificate
	)
	get = func(cri *tls.CertificateRequestInfo) (*tls.Certificate, error) {
		c, err := r.GetClientCertificate(cri)
		if err == nil {
			mu.Lock()
			leaf = c.Leaf
			mu.Unlock()
		}
		return c, err
	}
	used = func() *x509.Certificate {
		mu.Lock()
		defer mu.Unlock()
		return leaf
	}
	return get, used
}

// Updates delivers the credentials after each successful renewal. It holds
// at most one value: a slow reader sees only the newest.
func (r *Renewer) Updates() <-chan *ca.Credentials { return r.updates }

// Run renews the certificate at about 2/3 of each lifetime until ctx ends
// (it then returns ctx.Err()) or renewal has become impossible: it returns
// an *ExpiredError once the certificate has expired without a successful
// renewal (an expired certificate is never sent to the CA), and a
// *RevokedError when the CA says it was revoked.
func (r *Renewer) Run(ctx context.Context) error {
	for {
		st := r.cur.Load()
		now := r.cfg.Now()
		leaf := st.creds.Chain[0]
		if !now.Before(leaf.NotAfter) {
			return &ExpiredError{NotAfter: leaf.NotAfter}
		}
		if wait := st.renewAt.Sub(now); wait > 0 {
			r.cfg.Logger.Debug("certificate renewal scheduled", "at", st.renewAt, "expires", leaf.NotAfter)
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-r.kick:
				continue // renewed elsewhere (RenewNow): reschedule
			case <-r.cfg.After(wait):
			}
		}
		if err := r.renewWithRetry(ctx); err != nil {
			return err
		}
	}
}

// renewWithRetry renews the current certificate, retrying with exponential
// backoff and full jitter, never past the certificate's expiry.
func (r *Renewer) renewWithRetry(ctx context.Context) error {
	delay := r.cfg.RetryInitial
	for attempt := 1; ; attempt++ {
		st := r.cur.Load()
		leaf := st.creds.Chain[0]
		now := r.cfg.Now()
		if !now.Before(leaf.NotAfter) {
			r.cfg.Logger.Error("certificate expired before it could be renewed", "expired", leaf.NotAfter, "attempts", attempt-1)
			return &ExpiredError{NotAfter: leaf.NotAfter}
		}
		err := r.renewOnce(ctx, st)
		if err == nil {
			return nil
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if errors.Is(err, ErrRevoked) || errors.Is(err, ErrExpired) {
			return err
		}
		wait := time.Duration(float64(delay) * (0.5 + 0.5*r.cfg.Rand()))
		if left := leaf.NotAfter.Sub(now); wait > left {
			wait = left
		}
		r.cfg.Logger.Warn("certificate renewal failed; retrying",
			"err", err, "attempt", attempt, "retry_in", wait.Round(time.Millisecond), "expires", leaf.NotAfter)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-r.kick:
			return nil // renewed elsewhere meanwhile
		case <-r.cfg.After(wait):
		}
		delay = min(delay*2, r.cfg.RetryMax)
	}
}

// RenewNow renews at once, outside the schedule. The agent uses it to learn
// why the gateway refused its certificate: a *RevokedError means stop.
func (r *Renewer) RenewNow(ctx context.Context) error {
	st := r.cur.Load()
	if err := CheckValid(&Stored{Meta: r.meta, Creds: st.creds}, r.cfg.Now()); err != nil {
		return err
	}
	if err := r.renewOnce(ctx, st); err != nil {
		return err
	}
	select {
	case r.kick <- struct{}{}:
	default:
	}
	return nil
}

// renewOnce renews st (unless another renewal replaced it meanwhile), saves
// and publishes the result.
func (r *Renewer) renewOnce(ctx context.Context, st *state) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.cur.Load() != st {
		return nil // someone renewed while we waited for the lock
	}
	actx, cancel := context.WithTimeout(ctx, r.cfg.AttemptTimeout)
	defer cancel()
	got, err := r.cfg.Renew(actx, r.meta.URL, st.creds)
	if err != nil {
		switch {
		case errors.Is(err, ca.ErrRevoked):
			return &RevokedError{Role: r.meta.Role, Name: r.meta.Name}
		case errors.Is(err, ca.ErrExpired):
			return &ExpiredError{NotAfter: st.creds.Chain[0].NotAfter}
		}
		return fmt.Errorf("renew %s %s: %w", r.meta.Role, r.meta.Name, err)
	}
	next := &ca.Credentials{Key: st.creds.Key, Chain: got.Chain, Root: got.Root}
	if got.Key != nil {
		next.Key = got.Key
	}
	if next.Root == nil {
		next.Root = st.creds.Root
	}
	if err := Check(next, r.meta); err != nil {
		return fmt.Errorf("renew %s %s: the CA returned an unusable certificate: %w", r.meta.Role, r.meta.Name, err)
	}
	leaf := next.Chain[0]
	if !r.cfg.Now().Before(leaf.NotAfter) {
		return fmt.Errorf("renew %s %s: the CA returned a certificate that is already expired", r.meta.Role, r.meta.Name)
	}
	if r.cfg.Dir != "" {
		if err := saveCerts(r.cfg.Dir, next); err != nil {
			// The running process can still use the new certificate; only a
			// restart would fall back to the old one.
			r.cfg.Logger.Error("could not save the renewed certificate; this process uses it, a restart would load the old one",
				"dir", r.cfg.Dir, "err", err)
		}
	}
	ns := r.newState(next)
	r.cur.Store(ns)
	select {
	case <-r.updates:
	default:
	}
	r.updates <- next
	r.cfg.Logger.Info("certificate renewed", "serial", leaf.SerialNumber.String(),
		"not_after", leaf.NotAfter.UTC().Format(time.RFC3339), "next_renewal", ns.renewAt.UTC().Format(time.RFC3339Nano))
	return nil
}

// CAReason returns the ca sentinel error that err matches (token used,
// token expired, revoked, ...), or err itself; for a token refused for its
// times, the *ca.TokenTimeError. The ca package wraps its
// sentinels with its own context and the HTTP detail; a caller that adds its
// own context uses this so a person reads the reason once.
func CAReason(err error) error {
	// A token refused for its times carries its own sentence (when, and the
	// command that mints another), worth more than the bare sentinel.
	if te := (*ca.TokenTimeError)(nil); errors.As(err, &te) {
		return te
	}
	for _, s := range []error{ca.ErrTokenUsed, ca.ErrTokenExpired, ca.ErrTokenInvalid, ca.ErrUnknownCA,
		ca.ErrRevoked, ca.ErrExpired, ca.ErrWrongRole, ca.ErrRequestRefused} {
		if errors.Is(err, s) {
			return s
		}
	}
	return err
}
