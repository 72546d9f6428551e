package ca

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/smallstep/certificates/acme"
	"github.com/smallstep/certificates/authority"
	stepdb "github.com/smallstep/certificates/db"
	"go.step.sm/crypto/jose"
)

// maxRequestBody bounds every request body: a CSR and a token are a few KiB.
const maxRequestBody = 256 << 10

// usedOTTTable is step-ca's table of used one-time tokens (key: the token's jti).
var usedOTTTable = []byte("used_ott")

// guard sits in front of step-ca's handlers. It bounds request bodies, puts the
// authority in the request context, refuses renewals by certificates that are not
// ours, expired or revoked with a precise message, and turns step-ca's deliberately
// vague 401 on /sign into a precise one (expired, forged, or already used token) so
// that a person knows what to do. It accepts nothing step-ca refuses; the one thing
// it refuses that step-ca would accept is a token outside its validity window by
// less than step-ca's minute of leeway (tokenLeeway).
type guard struct {
	a    *Authority
	next http.Handler
	base context.Context
}

type errorBody struct {
	Status  int    `json:"status"`
	Message string `json:"message"`
}

func writeError(w http.ResponseWriter, status int, err error) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(errorBody{Status: status, Message: err.Error()})
}

// ServeHTTP applies the checks above, then hands the request to step-ca.
func (g *guard) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	r.Body = http.MaxBytesReader(w, r.Body, maxRequestBody)
	ctx := authority.NewContext(r.Context(), g.a.auth)
	ctx = stepdb.NewContext(ctx, g.a.db)
	if g.a.acmeDB != nil {
		ctx = acme.NewContext(ctx, g.a.acmeDB, g.a.acmeClient, acme.MustLinkerFromContext(g.base), nil)
	}
	r = r.WithContext(ctx)

	if g.a.cfg.AgentACME != nil && r.Method == http.MethodPost &&
		strings.HasPrefix(r.URL.Path, "/acme/"+agentACMEProvisionerName+"/") {
		g.serveAgentACME(w, r)
		return
	}

	if len(g.a.cfg.ACME.AllowedNames) > 0 && r.Method == http.MethodPost &&
		r.URL.Path == "/acme/"+acmeProvisionerName+"/new-order" {
		g.serveOrgNewOrder(w, r)
		return
	}

	switch r.URL.Path {
	case "/renew", "/1.0/renew", "/rekey", "/1.0/rekey", "/re-sign", "/1.0/re-sign":
		if r.Method == http.MethodPost && !g.checkRenewal(w, r) {
			return
		}
	case "/sign", "/1.0/sign":
		if r.Method == http.MethodPost {
			g.serveSign(w, r)
			return
		}
	}
	g.next.ServeHTTP(w, r)
}

// serveAgentACME reads (unverified) which account or EAB key a POST to the agents
// ACME endpoints claims, refuses an unknown, used or expired enrollment credential
// with a precise problem, routes challenge validation to the connection bound to that
// account (step-ca verifies the JWS and the account's ownership of the challenge
// before validating), and reports every refusal to AgentACME.OnRefusal.
func (g *guard) serveAgentACME(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(r.Body)
	if err != nil {
		writeACMEProblem(w, http.StatusRequestEntityTooLarge, "malformed", errors.New("request body too large"))
		return
	}
	r.Body = io.NopCloser(bytes.NewReader(body))
	req := parseAgentACMERequest(r.URL.Path, body)
	ctx := r.Context()
	refuse := func(status int, name, reason string) {
		if f := g.a.cfg.AgentACME.OnRefusal; f != nil {
			f(AgentACMERefusal{Action: req.action, Name: name, AccountID: req.accountID, Status: status, Reason: reason})
		}
	}
	if req.action == "new-account" {
		if name, err := g.a.checkAgentEAB(ctx, req.eabKID); err != nil {
			writeACMEProblem(w, http.StatusUnauthorized, "unauthorized", err)
			refuse(http.StatusUnauthorized, name, err.Error())
			return
		}
	}
	if req.action == "challenge" {
		vc := &agentValidationClient{dial: g.a.cfg.AgentACME.Dial, domain: g.a.AgentACMEDomain(), accountID: req.accountID}
		ctx = acme.NewContext(ctx, g.a.acmeDB, vc, acme.MustLinkerFromContext(g.base), nil)
		r = r.WithContext(ctx)
	}
	rec := &bufferedWriter{header: http.Header{}, status: http.StatusOK}
	g.next.ServeHTTP(rec, r)
	status := rec.status
	reason := ""
	if status < 400 && req.action == "challenge" {
		// step-ca answers a failed validation with 200 and the challenge's error.
		var ch struct {
			Status string `json:"status"`
			Error  *struct {
				Detail string `json:"detail"`
			} `json:"error"`
		}
		if json.Unmarshal(rec.body.Bytes(), &ch) == nil && ch.Error != nil {
			reason = ch.Error.Detail
		}
	} else if status >= 400 {
		var p struct {
			Detail string `json:"detail"`
		}
		_ = json.Unmarshal(rec.body.Bytes(), &p)
		reason = p.Detail
	}
	if reason != "" || status >= 400 {
		name := g.a.agentNameOfAccount(ctx, req.accountID)
		refuse(status, name, reason)
	}
	for k, v := range rec.header {
		w.Header()[k] = v
	}
	w.WriteHeader(status)
	_, _ = w.Write(rec.body.Bytes())
}

// checkRenewal refuses a renewal whose client certificate does not chain to our root,
// has expired (by the CA clock) or is revoked. step-ca checks expiry and revocation
// too; this check gives the reason and does not depend on how the TLS server verified.
func (g *guard) checkRenewal(w http.ResponseWriter, r *http.Request) bool {
	if r.TLS == nil || len(r.TLS.PeerCertificates) == 0 {
		return true // step-ca answers "missing client certificate"
	}
	chain := r.TLS.PeerCertificates
	leaf := chain[0]
	id, err := ParseIdentity(leaf)
	if err == nil {
		_, err = g.a.VerifyPeer(chain, id.Role)
	}
	if err != nil {
		writeError(w, http.StatusUnauthorized, fmt.Errorf("renew: %w", err))
		return false
	}
	return true
}

// serveSign pre-checks the one-time token so that a refusal says why, then lets
// step-ca do the real work.
func (g *guard) serveSign(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(r.Body)
	if err != nil {
		writeError(w, http.StatusRequestEntityTooLarge, errors.New("sign: request body too large"))
		return
	}
	r.Body = io.NopCloser(bytes.NewReader(body))
	var req struct {
		OTT string `json:"ott"`
	}
	_ = json.Unmarshal(body, &req)
	jti, verr := g.a.precheckToken(req.OTT)
	if verr != nil {
		writeError(w, http.StatusUnauthorized, verr)
		return
	}
	g.a.db.verified.Store(req.OTT, struct{}{})
	rec := &bufferedWriter{header: http.Header{}, status: http.StatusOK}
	g.next.ServeHTTP(rec, r)
	g.a.db.verified.Delete(req.OTT)
	if rec.status == http.StatusUnauthorized && jti != "" && g.a.tokenRecorded(jti) {
		// step-ca says only "unauthorized"; the token was recorded by a concurrent
		// request that won.
		writeError(w, http.StatusUnauthorized, ErrTokenUsed)
		return
	}
	for k, v := range rec.header {
		w.Header()[k] = v
	}
	w.WriteHeader(rec.status)
	_, _ = w.Write(rec.body.Bytes())
}

// precheckToken returns the token's jti, or an error if the token is refused:
// malformed, not signed by one of our provisioners, outside its validity window by
// the CA's clock (checkTokenTimes: stricter than step-ca), or used.
func (a *Authority) precheckToken(tok string) (string, error) {
	jwt, err := jose.ParseSigned(tok)
	if err != nil {
		return "", fmt.Errorf("%w: it is not a signed token", ErrTokenInvalid)
	}
	var c jose.Claims
	if err := jwt.UnsafeClaimsWithoutVerification(&c); err != nil {
		return "", fmt.Errorf("%w: unreadable claims", ErrTokenInvalid)
	}
	pub, ok := a.db.provKeys[c.Issuer]
	if !ok || c.Issuer == gatewayProvisionerName {
		return "", fmt.Errorf("%w: unknown issuer", ErrTokenInvalid)
	}
	if err := jwt.Claims(pub, &c); err != nil {
		return "", fmt.Errorf("%w: the signature does not verify", ErrTokenInvalid)
	}
	// step-ca would take the token up to a minute outside its window (see
	// tokenLeeway); refused here, it never reaches step-ca, so it is not recorded.
	if err := checkTokenTimes(c, a.now()); err != nil {
		return "", err
	}
	if c.ID != "" && a.tokenRecorded(c.ID) {
		return "", ErrTokenUsed
	}
	return c.ID, nil
}

func (a *Authority) tokenRecorded(jti string) bool {
	_, err := a.db.Get(usedOTTTable, []byte(jti))
	return err == nil
}

// bufferedWriter holds a (small) /sign response until we know whether to rewrite it.
type bufferedWriter struct {
	header http.Header
	status int
	body   bytes.Buffer
	wrote  bool
}

// Header, WriteHeader and Write implement http.ResponseWriter into memory.
func (b *bufferedWriter) Header() http.Header { return b.header }
func (b *bufferedWriter) WriteHeader(s int) {
	if !b.wrote {
		b.status, b.wrote = s, true
	}
}
func (b *bufferedWriter) Write(p []byte) (int, error) {
	b.wrote = true
	return b.body.Write(p)
}

// validationClient is the ACME validation client (acme.Client). It dials through
// ACMEConfig.DialContext when set, keeps no idle connections (nothing outlives a
// validation), and bounds every validation in time.
type validationClient struct {
	http   *http.Client
	dial   func(ctx context.Context, network, addr string) (net.Conn, error)
	lookup func(ctx context.Context, name string) ([]string, error)
}

const validationTimeout = 15 * time.Second

func newValidationClient(c ACMEConfig) *validationClient {
	dial := c.DialContext
	if dial == nil {
		d := &net.Dialer{Timeout: 10 * time.Second}
		dial = d.DialContext
	}
	lookup := c.LookupTXT
	if lookup == nil {
		lookup = net.DefaultResolver.LookupTXT
	}
	tr := &http.Transport{
		DialContext:       dial,
		DisableKeepAlives: true,
		// http-01 may redirect to https on the validated name, whose certificate is
		// not what is being validated (RFC 8555 8.3).
		TLSClientConfig:       &tls.Config{InsecureSkipVerify: true}, //nolint:gosec
		ResponseHeaderTimeout: validationTimeout,
	}
	return &validationClient{
		http: &http.Client{Transport: tr, Timeout: validationTimeout,
			CheckRedirect: func(req *http.Request, via []*http.Request) error {
				if len(via) >= 5 {
					return errors.New("too many redirects")
				}
				return nil
			}},
		dial:   dial,
		lookup: lookup,
	}
}

// Get fetches an http-01 key authorization.
func (c *validationClient) Get(url string) (*http.Response, error) { return c.http.Get(url) }

// LookupTxt resolves dns-01 TXT records, bounded in time.
func (c *validationClient) LookupTxt(name string) ([]string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), validationTimeout)
	defer cancel()
	return c.lookup(ctx, name)
}

// TLSDial opens a tls-alpn-01 validation connection, bounded in time.
func (c *validationClient) TLSDial(network, addr string, cfg *tls.Config) (*tls.Conn, error) {
	ctx, cancel := context.WithTimeout(context.Background(), validationTimeout)
	defer cancel()
	raw, err := c.dial(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	conn := tls.Client(raw, cfg)
	if err := conn.HandshakeContext(ctx); err != nil {
		raw.Close()
		return nil, err
	}
	return conn, nil
}

func (c *validationClient) close() { c.http.CloseIdleConnections() }
