package public

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"os"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/certmagic"
	"github.com/mholt/acmez/v3/acme"
	"github.com/wicketgw/wicket/gateway/audit"
)

// Audit record types written by this package (gateway/audit has no constant for them).
const (
	// TypeHTTPRequest is one proxied (or refused) HTTP request.
	TypeHTTPRequest = "http.request"
	// TypePublicCertObtained is a public certificate obtained or renewed from the ACME CA.
	TypePublicCertObtained = "public_cert.obtained"
	// TypePublicCertFailed is a failed attempt to obtain or renew a public certificate.
	TypePublicCertFailed = "public_cert.failed"
)

// loadTimeout bounds loading one stored certificate at start (it may fetch an OCSP staple).
const loadTimeout = 10 * time.Second

// Stats are running totals since New, for metrics.
type Stats struct {
	// CertsObtained counts first certificates obtained for a host; CertsRenewed renewals.
	CertsObtained, CertsRenewed uint64
	// ObtainFailures and RenewalFailures count failed attempts (each retry counts).
	ObtainFailures, RenewalFailures uint64
	// Requests counts HTTP requests answered on the HTTPS listener; Refused those answered
	// 4xx by this package itself (unknown host, missing or refused user certificate);
	// BackendErrors those answered 502 because no stream could be opened.
	Requests, Refused, BackendErrors uint64
}

// Server is the public HTTPS listener. Create it with New, run it with Serve.
type Server struct {
	cfg   Config
	log   *slog.Logger
	ln    net.Listener
	httpL net.Listener // nil when the HTTP listener is off
	port  int          // HTTPS port for redirects

	cache  *certmagic.Cache
	magic  *certmagic.Config
	issuer *certmagic.ACMEIssuer

	tlsBase  *tls.Config
	srv      *http.Server
	httpSrv  *http.Server
	proxy    http.Handler
	tr       *http.Transport
	handlers inflight // requests being handled, upgraded ones included
	userReqs byCert   // requests on users hosts, by user certificate serial (Cut)

	baseCtx    context.Context
	baseCancel context.CancelFunc

	obtained, renewed, obtainFail, renewFail atomic.Uint64
	requests, refused, backendErrors         atomic.Uint64

	serveOnce sync.Once
	closeOnce sync.Once
	closed    chan struct{}
	wg        sync.WaitGroup // Serve's goroutines
}

// New validates cfg, creates the certificate storage directory (0700), binds the listeners and
// prepares certificate management. Nothing is served and no certificate is requested until
// Serve. Call Close if Serve is never called.
func New(cfg Config) (_ *Server, err error) {
	cfg, err = cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	storage := cfg.Storage
	if storage == nil {
		if err := os.MkdirAll(cfg.StorageDir, 0o700); err != nil {
			return nil, fmt.Errorf("public: create certificate storage %s: %w", cfg.StorageDir, err)
		}
		if err := os.Chmod(cfg.StorageDir, 0o700); err != nil {
			return nil, fmt.Errorf("public: restrict certificate storage %s: %w", cfg.StorageDir, err)
		}
		storage = &certmagic.FileStorage{Path: cfg.StorageDir}
	}
	// s is not the named result: a failing return sets that to nil before the deferred
	// release runs, which must still see what was acquired.
	s := &Server{cfg: cfg, log: cfg.Logger, closed: make(chan struct{})}
	s.baseCtx, s.baseCancel = context.WithCancel(context.Background())
	defer func() {
		if err != nil {
			s.release()
		}
	}()

	s.ln = cfg.Listener
	if s.ln == nil {
		if s.ln, err = net.Listen("tcp", cfg.Listen); err != nil {
			return nil, fmt.Errorf("public: listen on %s: %w", cfg.Listen, err)
		}
	}
	s.httpL = cfg.HTTPListener
	if s.httpL == nil && cfg.HTTPListen != ListenOff {
		if s.httpL, err = net.Listen("tcp", cfg.HTTPListen); err != nil {
			return nil, fmt.Errorf("public: listen on %s: %w", cfg.HTTPListen, err)
		}
	}
	s.port = cfg.HTTPSPort
	if s.port == 0 {
		s.port = portOf(s.ln.Addr())
	}

	zl := zapToSlog(s.log.With("component", "certmagic"))
	s.cache = certmagic.NewCache(certmagic.CacheOptions{
		GetConfigForCert:   func(certmagic.Certificate) (*certmagic.Config, error) { return s.magic, nil },
		RenewCheckInterval: cfg.RenewCheckInterval,
		Logger:             zl,
	})
	s.magic = certmagic.New(s.cache, certmagic.Config{
		RenewalWindowRatio: cfg.RenewalWindowRatio,
		Storage:            storage,
		OnEvent:            s.onEvent,
		Logger:             zl,
	})
	lnHost, _, _ := net.SplitHostPort(s.ln.Addr().String())
	iss := certmagic.ACMEIssuer{
		CA:                      cfg.ACMECA,
		Email:                   cfg.Email,
		Agreed:                  true,
		TrustedRoots:            cfg.ACMERoots,
		DisableHTTPChallenge:    !slices.Contains(cfg.Challenges, ChallengeHTTP01),
		DisableTLSALPNChallenge: !slices.Contains(cfg.Challenges, ChallengeTLSALPN01),
		// certmagic starts its own challenge listener only if it can bind this address; ours
		// holds it, so certmagic sees "in use" and leaves the answers to our listeners.
		ListenHost:     hostForSolver(lnHost),
		AltTLSALPNPort: portOf(s.ln.Addr()),
		Logger:         zl,
	}
	if s.httpL != nil {
		iss.AltHTTPPort = portOf(s.httpL.Addr())
	}
	s.issuer = certmagic.NewACMEIssuer(s.magic, iss)
	s.magic.Issuers = []certmagic.Issuer{s.issuer}

	s.tlsBase = &tls.Config{
		MinVersion: tls.VersionTLS12,
		// TLS 1.2 only with forward secrecy and AEAD; TLS 1.3 suites are not configurable and
		// all qualify. Go negotiates TLS 1.3 whenever the client offers it.
		CipherSuites: []uint16{
			tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
			tls.TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
			tls.TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
			tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
			tls.TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
			tls.TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
		},
		NextProtos:     []string{"h2", "http/1.1"},
		GetCertificate: s.magic.GetCertificate,
	}

	s.tr = &http.Transport{
		DialContext:           s.dialBackend,
		MaxIdleConnsPerHost:   16,
		IdleConnTimeout:       30 * time.Second,
		ExpectContinueTimeout: time.Second,
		// Pass the origin's encoding through untouched.
		DisableCompression: true,
		// Plain HTTP/1.1 over the stream: upgrades (WebSocket) need it.
		ForceAttemptHTTP2: false,
	}
	errLog := slog.NewLogLogger(s.log.With("component", "public-http").Handler(), slog.LevelDebug)
	s.proxy = s.newProxy(errLog)
	s.srv = &http.Server{
		Handler:           http.HandlerFunc(s.serveHTTPS),
		TLSConfig:         &tls.Config{GetConfigForClient: s.configForClient, MinVersion: tls.VersionTLS12},
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       2 * time.Minute,
		ErrorLog:          errLog,
		BaseContext:       func(net.Listener) context.Context { return s.baseCtx },
	}
	if s.httpL != nil {
		s.httpSrv = &http.Server{
			Handler:           s.issuer.HTTPChallengeHandler(http.HandlerFunc(s.redirect)),
			ReadHeaderTimeout: 10 * time.Second,
			IdleTimeout:       30 * time.Second,
			ErrorLog:          errLog,
			BaseContext:       func(net.Listener) context.Context { return s.baseCtx },
		}
	}
	return s, nil
}

// hostForSolver is the host certmagic tries to bind for its own challenge listeners.
func hostForSolver(h string) string {
	if ip := net.ParseIP(h); ip != nil && ip.IsUnspecified() {
		return ""
	}
	return h
}

func portOf(a net.Addr) int {
	_, p, err := net.SplitHostPort(a.String())
	if err != nil {
		return 0
	}
	n, _ := strconv.Atoi(p)
	return n
}

// Addr is the HTTPS listener's address.
func (s *Server) Addr() net.Addr { return s.ln.Addr() }

// HTTPAddr is the HTTP listener's address, nil when it is off.
func (s *Server) HTTPAddr() net.Addr {
	if s.httpL == nil {
		return nil
	}
	return s.httpL.Addr()
}

// Serve serves both listeners and manages the certificates of every published host (obtained
// in the background, retried with backoff while the CA fails) until ctx ends or Close is
// called; then it lets requests finish for up to ShutdownGrace and releases everything.
// It returns nil after a normal shutdown. Serve may be called once.
func (s *Server) Serve(ctx context.Context) error {
	first := false
	s.serveOnce.Do(func() { first = true })
	if !first {
		return errors.New("public: Serve called twice")
	}
	select {
	case <-s.closed:
		return ErrClosed
	default:
	}
	names := make([]string, 0, len(s.cfg.Hosts))
	for n := range s.cfg.Hosts {
		names = append(names, n)
	}
	slices.Sort(names)
	// Load the certificates already in storage before the first handshake, so a restart serves
	// them at once (even while the CA is unreachable); renewal of a due one then runs in the
	// background maintenance. Only missing ones are obtained by ManageAsync below.
	for _, n := range names {
		loadCtx, cancel := context.WithTimeout(s.baseCtx, loadTimeout)
		_, err := s.magic.CacheManagedCertificate(loadCtx, n)
		cancel()
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			s.log.Warn("could not load the stored public certificate; a new one will be obtained", "host", n, "err", err)
		}
	}
	errc := make(chan error, 2)
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		if err := s.srv.ServeTLS(s.ln, "", ""); err != nil && !errors.Is(err, http.ErrServerClosed) {
			errc <- fmt.Errorf("public: serve HTTPS on %s: %w", s.ln.Addr(), err)
		}
	}()
	if s.httpSrv != nil {
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			if err := s.httpSrv.Serve(s.httpL); err != nil && !errors.Is(err, http.ErrServerClosed) {
				errc <- fmt.Errorf("public: serve HTTP on %s: %w", s.httpL.Addr(), err)
			}
		}()
	}
	// The certificates are managed under baseCtx so that Close cancels obtain retries.
	if err := s.magic.ManageAsync(s.baseCtx, names); err != nil {
		s.Close()
		return fmt.Errorf("public: manage certificates: %w", err)
	}
	s.log.Info("public HTTPS listening", "addr", s.ln.Addr().String(), "http", addrString(s.HTTPAddr()),
		"acme_ca", s.cfg.ACMECA, "hosts", names, "challenges", s.cfg.Challenges)

	var err error
	select {
	case <-ctx.Done():
	case <-s.closed:
	case err = <-errc:
	}
	graceCtx, cancel := context.WithTimeout(context.Background(), s.cfg.ShutdownGrace)
	defer cancel()
	var sd sync.WaitGroup
	for _, srv := range []*http.Server{s.srv, s.httpSrv} {
		if srv != nil {
			sd.Go(func() { _ = srv.Shutdown(graceCtx) })
		}
	}
	// Upgraded connections (WebSocket) are not tracked by Shutdown: wait for them too.
	done := make(chan struct{})
	go func() { sd.Wait(); <-s.handlers.zero(); close(done) }()
	select {
	case <-done:
	case <-graceCtx.Done():
		s.log.Warn("public HTTPS: grace period over, closing the requests still open")
	}
	s.Close()
	<-done
	return err
}

func addrString(a net.Addr) string {
	if a == nil {
		return "off"
	}
	return a.String()
}

// Close stops everything at once: listeners, open requests (upgraded ones included), certificate
// maintenance and pending ACME operations, idle backend streams. Safe to call more than once.
func (s *Server) Close() error {
	s.closeOnce.Do(func() {
		close(s.closed)
		s.release()
	})
	return nil
}

func (s *Server) release() {
	s.baseCancel() // cancels request contexts (ends upgraded connections) and ACME retries
	if s.srv != nil {
		_ = s.srv.Close()
	}
	if s.httpSrv != nil {
		_ = s.httpSrv.Close()
	}
	if s.ln != nil {
		_ = s.ln.Close()
	}
	if s.httpL != nil {
		_ = s.httpL.Close()
	}
	s.wg.Wait()
	<-s.handlers.zero()
	if s.cache != nil {
		s.cache.Stop()
	}
	if s.tr != nil {
		s.tr.CloseIdleConnections()
	}
}

// Stats returns the running totals.
func (s *Server) Stats() Stats {
	return Stats{
		CertsObtained: s.obtained.Load(), CertsRenewed: s.renewed.Load(),
		ObtainFailures: s.obtainFail.Load(), RenewalFailures: s.renewFail.Load(),
		Requests: s.requests.Load(), Refused: s.refused.Load(), BackendErrors: s.backendErrors.Load(),
	}
}

// Certificate returns the leaf certificate served now for host, if there is one.
func (s *Server) Certificate(host string) (*x509.Certificate, bool) {
	var best *x509.Certificate
	for _, c := range s.cache.AllMatchingCertificates(host) {
		if c.Leaf != nil && (best == nil || c.Leaf.NotAfter.After(best.NotAfter)) {
			best = c.Leaf
		}
	}
	return best, best != nil
}

// RenewNow renews host's certificate from the ACME CA at once, even if it is not due, and
// starts serving the new one; the old one is served until then, and stays if renewal fails.
// For an operator's "renew now" and for tests; background renewal needs no call.
func (s *Server) RenewNow(ctx context.Context, host string) error {
	if _, ok := s.cfg.Hosts[host]; !ok {
		return fmt.Errorf("renew %s: %w", host, ErrUnknownHost)
	}
	old := s.cache.AllMatchingCertificates(host)
	if err := s.magic.RenewCertSync(ctx, host, true); err != nil {
		return fmt.Errorf("renew the certificate of %s: %w", host, err)
	}
	// Load the new certificate next to the old one before dropping the old: at every moment a
	// valid certificate is in the cache, so no handshake fails during the swap.
	cur, err := s.magic.CacheManagedCertificate(ctx, host)
	if err != nil {
		return fmt.Errorf("load the renewed certificate of %s: %w", host, err)
	}
	var drop []string
	for _, c := range old {
		if c.Hash() != cur.Hash() {
			drop = append(drop, c.Hash())
		}
	}
	s.cache.Remove(drop)
	return nil
}

// onEvent counts, logs and audits certmagic's certificate events.
func (s *Server) onEvent(_ context.Context, event string, data map[string]any) error {
	name, _ := data["identifier"].(string)
	renewal, _ := data["renewal"].(bool)
	switch event {
	case "cert_obtained":
		if renewal {
			s.renewed.Add(1)
		} else {
			s.obtained.Add(1)
		}
		issuer, _ := data["issuer"].(string)
		s.log.Info("public certificate obtained", "host", name, "renewal", renewal, "issuer", issuer)
		s.cfg.Audit(audit.Record{Type: TypePublicCertObtained, Outcome: audit.OutcomeOK,
			Resource: s.cfg.Hosts[name].Resource,
			Extra:    map[string]string{"host": name, "renewal": strconv.FormatBool(renewal), "acme_ca": s.cfg.ACMECA}})
	case "cert_failed":
		if renewal {
			s.renewFail.Add(1)
		} else {
			s.obtainFail.Add(1)
		}
		err, _ := data["error"].(error)
		reason := "unknown error"
		if err != nil {
			reason = err.Error()
			var p acme.Problem
			if errors.As(err, &p) {
				reason = p.Error()
			}
		}
		msg := "could not obtain a public certificate; will retry"
		if renewal {
			msg = "could not renew a public certificate; the current one keeps being served, will retry"
		}
		s.log.Warn(msg, "host", name, "acme_ca", s.cfg.ACMECA, "err", reason)
		s.cfg.Audit(audit.Record{Type: TypePublicCertFailed, Outcome: audit.OutcomeError, Reason: reason,
			Resource: s.cfg.Hosts[name].Resource,
			Extra:    map[string]string{"host": name, "renewal": strconv.FormatBool(renewal), "acme_ca": s.cfg.ACMECA}})
	}
	return nil
}

// inflight counts requests being handled. Unlike a WaitGroup it may be waited on while new
// requests still start (keep-alive connections during a shutdown that ran out of grace).
type inflight struct {
	mu    sync.Mutex
	n     int
	zeroc chan struct{} // closed while n == 0
}

func (f *inflight) add(d int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.zeroc == nil {
		f.zeroc = make(chan struct{})
		close(f.zeroc)
	}
	if f.n == 0 && d > 0 {
		f.zeroc = make(chan struct{})
	}
	f.n += d
	if f.n == 0 {
		close(f.zeroc)
	}
}

// zero returns a channel closed once no request is in flight.
func (f *inflight) zero() <-chan struct{} {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.zeroc == nil {
		f.zeroc = make(chan struct{})
		close(f.zeroc)
	}
	return f.zeroc
}
