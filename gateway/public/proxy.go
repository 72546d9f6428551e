package public

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/mholt/acmez/v3"
	"github.com/wicketgw/wicket/gateway/audit"
)

// UserHeader carries the verified user name to the resource on AccessUsers hosts. Whatever the
// client sent under this name is removed first, on every host.
const UserHeader = "X-Wicket-User"

// configForClient picks the TLS configuration by SNI: the ACME tls-alpn-01 answer, a published
// public host (no client certificate asked), or a users host (client certificate requested and
// verified per request by VerifyUser, so a missing or refused certificate gets a readable HTTP
// answer instead of a bare handshake failure). Unpublished names get no certificate at all.
func (s *Server) configForClient(hello *tls.ClientHelloInfo) (*tls.Config, error) {
	if slices.Contains(hello.SupportedProtos, acmez.ACMETLS1Protocol) {
		return &tls.Config{
			MinVersion:     tls.VersionTLS12,
			NextProtos:     []string{acmez.ACMETLS1Protocol},
			GetCertificate: s.magic.GetCertificate,
		}, nil
	}
	name := strings.ToLower(strings.TrimSuffix(hello.ServerName, "."))
	h, ok := s.cfg.Hosts[name]
	if !ok {
		return nil, fmt.Errorf("public: %w: %q", ErrUnknownHost, hello.ServerName)
	}
	c := s.tlsBase.Clone()
	if h.Access == AccessUsers {
		c.ClientAuth = tls.RequestClientCert
	}
	return c, nil
}

type metaKey struct{}

// backendKey is the URL host that keys the transport's connection pool: one pool per host and
// user, so a keep-alive stream opened for one user is never reused for another.
func backendKey(host, user string) string {
	if user == "" {
		return "p." + host
	}
	return "u." + hexString(user) + "." + host
}

func hexString(s string) string {
	const digits = "0123456789abcdef"
	b := make([]byte, 0, 2*len(s))
	for i := 0; i < len(s); i++ {
		b = append(b, digits[s[i]>>4], digits[s[i]&15])
	}
	return string(b)
}

// dialMeta travels in the request context to dialBackend.
type dialMeta struct {
	resource string
	meta     Meta
	err      *error // where dialBackend reports its failure, for the audit record
}

func (s *Server) dialBackend(ctx context.Context, _, _ string) (net.Conn, error) {
	dm, ok := ctx.Value(metaKey{}).(*dialMeta)
	if !ok {
		return nil, errors.New("public: backend dial without request metadata")
	}
	c, err := s.cfg.Dialer.DialResource(ctx, dm.resource, dm.meta)
	if err != nil {
		err = fmt.Errorf("open a stream to resource %s: %w", dm.resource, err)
		*dm.err = err
		return nil, err
	}
	return c, nil
}

func (s *Server) newProxy(errLog *log.Logger) http.Handler {
	return &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			dm := pr.In.Context().Value(metaKey{}).(*dialMeta)
			pr.SetURL(&url.URL{Scheme: "http", Host: backendKey(dm.meta.Host, dm.meta.User)})
			pr.Out.Host = pr.In.Host
			pr.SetXForwarded()
			if dm.meta.User != "" {
				pr.Out.Header.Set(UserHeader, dm.meta.User)
			}
		},
		Transport: s.tr,
		// Stream every response as it comes (server-sent events, long polls, downloads).
		FlushInterval: -1,
		ErrorLog:      errLog,
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			dm := r.Context().Value(metaKey{}).(*dialMeta)
			if *dm.err == nil {
				*dm.err = err
			}
			if errors.Is(context.Cause(r.Context()), ErrCertificateRevoked) {
				*dm.err = ErrCertificateRevoked
				httpError(w, http.StatusForbidden, "Your user certificate was revoked; run `wicket login` again if you should still have access.")
				return
			}
			if errors.Is(err, context.Canceled) {
				// The client went away; nobody reads this answer.
				w.WriteHeader(499)
				return
			}
			s.backendErrors.Add(1)
			httpError(w, http.StatusBadGateway, fmt.Sprintf("%s is published here, but its service cannot be reached right now; try again later.", dm.meta.Host))
		},
	}
}

func httpError(w http.ResponseWriter, status int, msg string) {
	h := w.Header()
	h.Set("Content-Type", "text/plain; charset=utf-8")
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	_, _ = io.WriteString(w, msg+"\n")
}

// hostOf is the request's host name: lower case, without port and trailing dot.
func hostOf(r *http.Request) string {
	h := r.Host
	if hh, _, err := net.SplitHostPort(h); err == nil {
		h = hh
	}
	return strings.ToLower(strings.TrimSuffix(h, "."))
}

// serveHTTPS handles one request on the HTTPS listener.
func (s *Server) serveHTTPS(w http.ResponseWriter, r *http.Request) {
	s.handlers.add(1)
	defer s.handlers.add(-1)
	s.requests.Add(1)
	start := time.Now()
	host := hostOf(r)
	rec := &recorder{w: w}
	body := &countingBody{r: r.Body}
	r.Body = body
	r.Header.Del(UserHeader)

	var backendErr error
	dm := &dialMeta{meta: Meta{Host: host, Remote: r.RemoteAddr}, err: &backendErr}
	ar := audit.Record{Type: TypeHTTPRequest, Remote: r.RemoteAddr,
		Extra: map[string]string{"host": host, "method": r.Method, "path": r.URL.Path}}
	if r.TLS != nil {
		ar.SetTLS(*r.TLS)
	}
	var reason string
	var certNotAfter time.Time    // of the user certificate that authorized the request
	var revocable context.Context // the request's context that Cut cancels (users hosts)
	defer func() {
		// ReverseProxy aborts (panic(http.ErrAbortHandler)) when the response breaks after
		// its header was sent; audit that as an error, then let net/http see the panic.
		aborted := recover()
		switch {
		case errors.Is(backendErr, ErrCertificateRevoked):
			// Revoked before the backend answered: the proxy's error handler said 403.
			s.refused.Add(1)
			reason, backendErr = ErrCertificateRevoked.Error(), nil
		case revocable != nil && errors.Is(context.Cause(revocable), ErrCertificateRevoked) && reason == "":
			// Cut while the response streamed or the upgraded connection was open.
			backendErr = errors.New("the response was cut off: " + ErrCertificateRevoked.Error())
		case aborted != nil && backendErr == nil:
			backendErr = errors.New("the response was cut off")
			if !certNotAfter.IsZero() && !time.Now().Before(certNotAfter) {
				backendErr = errors.New("the response was cut off: the user certificate expired")
			}
		}
		ar.User = dm.meta.User
		ar.Resource = dm.resource
		ar.BytesUp, ar.BytesDown = body.n.Load()+rec.up.Load(), rec.n.Load()
		ar.DurationMS = time.Since(start).Milliseconds()
		status := rec.status
		if status == 0 {
			status = http.StatusOK
		}
		ar.Extra["status"] = strconv.Itoa(status)
		switch {
		case reason != "":
			ar.Outcome, ar.Reason = audit.OutcomeDenied, reason
		case backendErr != nil:
			ar.Outcome, ar.Reason = audit.OutcomeError, backendErr.Error()
		default:
			ar.Outcome = audit.OutcomeOK
		}
		s.cfg.Audit(ar)
		if aborted != nil {
			panic(aborted)
		}
	}()
	refuse := func(status int, why, msg string) {
		s.refused.Add(1)
		reason = why
		httpError(rec, status, msg)
	}

	h, ok := s.cfg.Hosts[host]
	if !ok {
		refuse(http.StatusNotFound, "host is not published", "Nothing is published at this name.")
		return
	}
	dm.resource = h.Resource
	if r.TLS == nil || !strings.EqualFold(strings.TrimSuffix(r.TLS.ServerName, "."), host) {
		// The connection was set up (certificate, client certificate request) for another name.
		refuse(http.StatusMisdirectedRequest, "TLS server name does not match the Host header",
			"This connection was opened for another host name; open a new connection to "+host+".")
		return
	}
	ctx := context.WithValue(r.Context(), metaKey{}, dm)
	if h.Access == AccessUsers {
		if len(r.TLS.PeerCertificates) == 0 {
			refuse(http.StatusUnauthorized, "no user certificate presented",
				host+" is open only to Wicket users: present your Wicket user certificate (run `wicket login`, then use its certificate and key as the client certificate).")
			return
		}
		// Registered before the certificate is checked, so a revocation that lands between the
		// check and the proxying still cuts this request.
		var cut context.CancelCauseFunc
		ctx, cut = context.WithCancelCause(ctx)
		defer cut(nil)
		defer s.userReqs.add(r.TLS.PeerCertificates[0].SerialNumber.String(), cut)()
		revocable = ctx
		user, err := s.cfg.VerifyUser(r.TLS.PeerCertificates)
		if err != nil {
			refuse(http.StatusForbidden, "user certificate refused: "+err.Error(),
				"Your client certificate was refused ("+err.Error()+"); run `wicket login` again for a valid Wicket user certificate.")
			return
		}
		dm.meta.User = user
		if s.cfg.Allow != nil && !s.cfg.Allow(user, h.Resource) {
			refuse(http.StatusForbidden, "policy does not allow user "+user+" to reach resource "+h.Resource,
				"User "+user+" is not allowed to use "+host+"; ask an administrator to grant access to resource "+h.Resource+".")
			return
		}
		// No identity outlives its certificate: a streamed response or an upgraded connection
		// ends when the user certificate it was authorized with expires (or is revoked: Cut).
		var cancel context.CancelFunc
		certNotAfter = r.TLS.PeerCertificates[0].NotAfter
		ctx, cancel = context.WithDeadline(ctx, certNotAfter)
		defer cancel()
	}
	s.proxy.ServeHTTP(rec, r.WithContext(ctx))
}

// redirect answers the plain HTTP listener (after the http-01 challenge handler): published
// hosts are sent to HTTPS, anything else gets 404 so the listener is no open redirector.
func (s *Server) redirect(w http.ResponseWriter, r *http.Request) {
	host := hostOf(r)
	if _, ok := s.cfg.Hosts[host]; !ok {
		httpError(w, http.StatusNotFound, "Nothing is published at this name.")
		return
	}
	u := url.URL{Scheme: "https", Host: host, Path: r.URL.Path, RawPath: r.URL.RawPath, RawQuery: r.URL.RawQuery}
	if s.port != 443 && s.port != 0 {
		u.Host = net.JoinHostPort(host, strconv.Itoa(s.port))
	}
	w.Header().Set("Connection", "close")
	http.Redirect(w, r, u.String(), http.StatusPermanentRedirect)
}

// recorder notes the status and counts response bytes, including both directions of an
// upgraded (hijacked) connection. Flush and the rest reach the real writer through Unwrap.
type recorder struct {
	w      http.ResponseWriter
	status int
	n      atomic.Int64 // toward the client
	up     atomic.Int64 // from the client after an upgrade
}

func (r *recorder) Header() http.Header { return r.w.Header() }

func (r *recorder) WriteHeader(code int) {
	if r.status == 0 || (r.status >= 100 && r.status < 200 && r.status != http.StatusSwitchingProtocols) {
		r.status = code
	}
	r.w.WriteHeader(code)
}

func (r *recorder) Write(b []byte) (int, error) {
	if r.status == 0 {
		r.status = http.StatusOK
	}
	n, err := r.w.Write(b)
	r.n.Add(int64(n))
	return n, err
}

func (r *recorder) Unwrap() http.ResponseWriter { return r.w }

// Hijack is what ReverseProxy uses for a 101 Switching Protocols answer.
func (r *recorder) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	c, brw, err := http.NewResponseController(r.w).Hijack()
	if err != nil {
		return nil, nil, err
	}
	if r.status == 0 {
		r.status = http.StatusSwitchingProtocols
	}
	return &countingConn{Conn: c, in: &r.up, out: &r.n}, brw, nil
}

type countingConn struct {
	net.Conn
	in, out *atomic.Int64
}

func (c *countingConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	c.in.Add(int64(n))
	return n, err
}

func (c *countingConn) Write(b []byte) (int, error) {
	n, err := c.Conn.Write(b)
	c.out.Add(int64(n))
	return n, err
}

type countingBody struct {
	r io.ReadCloser
	n atomic.Int64
}

func (b *countingBody) Read(p []byte) (int, error) {
	n, err := b.r.Read(p)
	b.n.Add(int64(n))
	return n, err
}

func (b *countingBody) Close() error { return b.r.Close() }
