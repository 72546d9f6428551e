package ca

import (
	"bytes"
	"context"
	"crypto"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"

	"go.step.sm/crypto/jose"
	"go.step.sm/crypto/keyutil"
	"go.step.sm/crypto/pemutil"
)

// TokenInfo is what a one-time token says about itself (unverified: the CA checks
// the signature).
type TokenInfo struct {
	Identity        Identity
	URL             string // gateway base URL, from aud (aud minus "/1.0/sign")
	RootFingerprint string // from the sha claim
	Expiry          time.Time
	// NotBefore is the later of nbf and iat; zero if the token has neither.
	NotBefore time.Time
}

// InspectToken parses a token without verifying its signature, so that a client
// learns where to enroll and which root to pin. It refuses anything that is not a
// Wicket bootstrap token.
func InspectToken(token string) (TokenInfo, error) {
	token = strings.TrimSpace(token)
	jwt, err := jose.ParseSigned(token)
	if err != nil {
		return TokenInfo{}, fmt.Errorf("%w: it is not a signed JWT (copy the whole token)", ErrTokenInvalid)
	}
	var c tokenClaims
	if err := jwt.UnsafeClaimsWithoutVerification(&c); err != nil {
		return TokenInfo{}, fmt.Errorf("%w: unreadable claims", ErrTokenInvalid)
	}
	if len(c.SANs) != 1 {
		return TokenInfo{}, fmt.Errorf("%w: it names %d identities, want exactly one", ErrTokenInvalid, len(c.SANs))
	}
	u, err := url.Parse(c.SANs[0])
	if err != nil {
		return TokenInfo{}, fmt.Errorf("%w: bad identity %q", ErrTokenInvalid, c.SANs[0])
	}
	id, err := ParseIdentityURI(u)
	if err != nil {
		return TokenInfo{}, fmt.Errorf("%w: %v", ErrTokenInvalid, err)
	}
	if id.Name != c.Subject {
		return TokenInfo{}, fmt.Errorf("%w: subject %q does not match identity %s", ErrTokenInvalid, c.Subject, id)
	}
	if len(c.Audience) != 1 || !strings.HasSuffix(c.Audience[0], "/1.0/sign") {
		return TokenInfo{}, fmt.Errorf("%w: audience is not a CA sign URL", ErrTokenInvalid)
	}
	base := strings.TrimSuffix(c.Audience[0], "/1.0/sign")
	bu, err := url.Parse(base)
	if err != nil || bu.Scheme != "https" || bu.Host == "" {
		return TokenInfo{}, fmt.Errorf("%w: audience %q is not an https URL", ErrTokenInvalid, c.Audience[0])
	}
	if len(c.SHA) != 64 {
		return TokenInfo{}, fmt.Errorf("%w: it carries no root fingerprint (sha)", ErrTokenInvalid)
	}
	if _, err := hex.DecodeString(c.SHA); err != nil {
		return TokenInfo{}, fmt.Errorf("%w: bad root fingerprint", ErrTokenInvalid)
	}
	if c.Expiry == nil {
		return TokenInfo{}, fmt.Errorf("%w: no expiry", ErrTokenInvalid)
	}
	return TokenInfo{Identity: id, URL: base, RootFingerprint: strings.ToLower(c.SHA), Expiry: c.Expiry.Time(),
		NotBefore: notBefore(c.Claims)}, nil
}

// Credentials is what enrollment or renewal yields.
type Credentials struct {
	Key   crypto.Signer       // ECDSA P-256
	Chain []*x509.Certificate // leaf first, then intermediate(s)
	Root  *x509.Certificate
}

// TLSCertificate returns the credentials as a tls.Certificate (leaf + intermediates).
func (c *Credentials) TLSCertificate() *tls.Certificate {
	tc := &tls.Certificate{PrivateKey: c.Key}
	for _, x := range c.Chain {
		tc.Certificate = append(tc.Certificate, x.Raw)
	}
	if len(c.Chain) > 0 {
		tc.Leaf = c.Chain[0]
	}
	return tc
}

// Identity returns the SPIFFE identity of the leaf.
func (c *Credentials) Identity() (Identity, error) {
	if len(c.Chain) == 0 {
		return Identity{}, ErrNoIdentity
	}
	return ParseIdentity(c.Chain[0])
}

const clientTimeout = 30 * time.Second

func newTransport(tc *tls.Config) *http.Transport {
	tc.MinVersion = tls.VersionTLS13
	tc.NextProtos = []string{"h2", "http/1.1"}
	return &http.Transport{TLSClientConfig: tc, ForceAttemptHTTP2: true, TLSHandshakeTimeout: 10 * time.Second}
}

// Enroll creates a key, fetches the root from the token's URL pinned by the token's
// sha (no trust on first use: the server must present a chain to a root whose SHA-256
// is the token's), and signs a CSR with the one-time token via POST /1.0/sign.
func Enroll(ctx context.Context, token string) (*Credentials, error) {
	token = strings.TrimSpace(token)
	info, err := InspectToken(token)
	if err != nil {
		return nil, fmt.Errorf("enroll: %w", err)
	}
	// This host's clock is not the gateway's, and the gateway decides (to the second,
	// and audits the refusal): only a token expired for a while is refused here, to
	// spare the round trip.
	expired := &TokenTimeError{Expired: true, At: info.Expiry, Role: info.Identity.Role, Name: info.Identity.Name}
	if time.Now().After(info.Expiry.Add(time.Minute)) {
		return nil, fmt.Errorf("enroll %s: %w", info.Identity.Name, expired)
	}
	root, err := fetchPinnedRoot(ctx, info.URL, info.RootFingerprint)
	if err != nil {
		return nil, fmt.Errorf("enroll %s: %w", info.Identity.Name, err)
	}
	key, err := keyutil.GenerateSigner("EC", "P-256", 0)
	if err != nil {
		return nil, err
	}
	csrDER, err := x509.CreateCertificateRequest(nil, &x509.CertificateRequest{
		Subject: pkixName(info.Identity.Name),
		URIs:    []*url.URL{info.Identity.URI()},
	}, key)
	if err != nil {
		return nil, fmt.Errorf("enroll %s: create CSR: %w", info.Identity.Name, err)
	}
	body, _ := json.Marshal(map[string]string{
		"csr": string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: csrDER})),
		"ott": token,
	})
	pool := x509.NewCertPool()
	pool.AddCert(root)
	chain, err := post(ctx, info.URL+"/1.0/sign", body, &tls.Config{RootCAs: pool}, kindSign)
	switch {
	case errors.Is(err, ErrTokenExpired):
		// The CA's sentence, rebuilt from the token's own times so that callers
		// can show it whole (errors.As *TokenTimeError).
		return nil, fmt.Errorf("enroll %s: %w", info.Identity.Name, expired)
	case errors.Is(err, ErrTokenNotYetValid):
		return nil, fmt.Errorf("enroll %s: %w", info.Identity.Name,
			&TokenTimeError{At: info.NotBefore, Role: info.Identity.Role, Name: info.Identity.Name})
	case err != nil:
		return nil, fmt.Errorf("enroll %s: %w", info.Identity.Name, err)
	}
	creds := &Credentials{Key: key, Chain: chain, Root: root}
	if err := checkCredentials(creds, info.Identity); err != nil {
		return nil, fmt.Errorf("enroll %s: %w", info.Identity.Name, err)
	}
	return creds, nil
}

// Renew sends POST /1.0/renew over mTLS with cur and returns the new chain with the
// same key. The server is verified against cur.Root.
func Renew(ctx context.Context, baseURL string, cur *Credentials) (*Credentials, error) {
	if cur == nil || cur.Root == nil || len(cur.Chain) == 0 || cur.Key == nil {
		return nil, errors.New("renew: incomplete credentials")
	}
	id, err := ParseIdentity(cur.Chain[0])
	if err != nil {
		return nil, fmt.Errorf("renew: %w", err)
	}
	if time.Now().After(cur.Chain[0].NotAfter) {
		return nil, fmt.Errorf("renew %s: %w", id.Name, ErrExpired)
	}
	pool := x509.NewCertPool()
	pool.AddCert(cur.Root)
	tc := cur.TLSCertificate()
	chain, err := post(ctx, strings.TrimSuffix(baseURL, "/")+"/1.0/renew", nil,
		&tls.Config{RootCAs: pool, Certificates: []tls.Certificate{*tc}}, kindRenew)
	if err != nil {
		return nil, fmt.Errorf("renew %s: %w", id.Name, err)
	}
	creds := &Credentials{Key: cur.Key, Chain: chain, Root: cur.Root}
	if err := checkCredentials(creds, id); err != nil {
		return nil, fmt.Errorf("renew %s: %w", id.Name, err)
	}
	return creds, nil
}

// checkCredentials makes sure the CA gave what was asked: a chain to the pinned root,
// the requested identity, and a certificate for our key.
func checkCredentials(c *Credentials, want Identity) error {
	leaf := c.Chain[0]
	inter := x509.NewCertPool()
	for _, x := range c.Chain[1:] {
		inter.AddCert(x)
	}
	roots := x509.NewCertPool()
	roots.AddCert(c.Root)
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		return fmt.Errorf("%w: the issued certificate does not chain to the pinned root: %v", ErrUnknownCA, err)
	}
	got, err := ParseIdentity(leaf)
	if err != nil {
		return err
	}
	if got != want {
		return fmt.Errorf("%w: the CA issued %s, want %s", ErrRequestRefused, got, want)
	}
	if err := keyutil.VerifyPair(leaf.PublicKey, c.Key); err != nil {
		return fmt.Errorf("the issued certificate is not for our key: %w", err)
	}
	return nil
}

// fetchPinnedRoot gets /root/<sha> and checks both that the returned root hashes to
// sha and that the TLS server itself chains to that root (for the URL's host).
func fetchPinnedRoot(ctx context.Context, baseURL, sha string) (*x509.Certificate, error) {
	u, err := url.Parse(baseURL)
	if err != nil {
		return nil, err
	}
	// Verification is done below, by hand, against the pinned fingerprint: nothing
	// but this GET of a public certificate is sent before it.
	tr := newTransport(&tls.Config{InsecureSkipVerify: true}) //nolint:gosec
	defer tr.CloseIdleConnections()
	hc := &http.Client{Transport: tr, Timeout: clientTimeout}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, baseURL+"/root/"+sha, nil)
	if err != nil {
		return nil, err
	}
	resp, err := hc.Do(req)
	if err != nil {
		return nil, fmt.Errorf("fetch the CA root from %s: %w", baseURL, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if err != nil {
		return nil, fmt.Errorf("fetch the CA root: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("%w: %s has no root with the token's fingerprint (HTTP %d)", ErrUnknownCA, baseURL, resp.StatusCode)
	}
	var rr struct {
		CA string `json:"ca"`
	}
	if err := json.Unmarshal(b, &rr); err != nil {
		return nil, fmt.Errorf("fetch the CA root: bad response: %w", err)
	}
	root, err := pemutil.ParseCertificate([]byte(rr.CA))
	if err != nil {
		return nil, fmt.Errorf("fetch the CA root: %w", err)
	}
	sum := sha256.Sum256(root.Raw)
	if subtle.ConstantTimeCompare([]byte(hex.EncodeToString(sum[:])), []byte(sha)) != 1 {
		return nil, fmt.Errorf("%w: the root served by %s does not match the token's fingerprint", ErrUnknownCA, baseURL)
	}
	if resp.TLS == nil || len(resp.TLS.PeerCertificates) == 0 {
		return nil, fmt.Errorf("%w: no server certificate", ErrUnknownCA)
	}
	roots := x509.NewCertPool()
	roots.AddCert(root)
	inter := x509.NewCertPool()
	for _, c := range resp.TLS.PeerCertificates[1:] {
		inter.AddCert(c)
	}
	if _, err := resp.TLS.PeerCertificates[0].Verify(x509.VerifyOptions{
		Roots: roots, Intermediates: inter, DNSName: u.Hostname(),
	}); err != nil {
		return nil, fmt.Errorf("%w: the server %s is not certified by the pinned root: %v", ErrUnknownCA, u.Host, err)
	}
	return root, nil
}

type requestKind int

const (
	kindSign requestKind = iota
	kindRenew
)

// post sends a sign or renew request and parses the certificate chain.
func post(ctx context.Context, u string, body []byte, tc *tls.Config, kind requestKind) ([]*x509.Certificate, error) {
	tr := newTransport(tc)
	defer tr.CloseIdleConnections()
	hc := &http.Client{Transport: tr, Timeout: clientTimeout}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, u, bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := hc.Do(req)
	if err != nil {
		var uae x509.UnknownAuthorityError
		var cve *tls.CertificateVerificationError
		if errors.As(err, &uae) || errors.As(err, &cve) {
			return nil, fmt.Errorf("%w: %v", ErrUnknownCA, err)
		}
		return nil, fmt.Errorf("contact the CA at %s: %w", u, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return nil, fmt.Errorf("read the CA's answer: %w", err)
	}
	if resp.StatusCode != http.StatusCreated && resp.StatusCode != http.StatusOK {
		return nil, mapHTTPError(resp.StatusCode, b, kind)
	}
	var sr struct {
		Crt       string   `json:"crt"`
		CA        string   `json:"ca"`
		CertChain []string `json:"certChain"`
	}
	if err := json.Unmarshal(b, &sr); err != nil {
		return nil, fmt.Errorf("the CA's answer is not valid JSON: %w", err)
	}
	pems := sr.CertChain
	if len(pems) == 0 {
		pems = []string{sr.Crt, sr.CA}
	}
	var chain []*x509.Certificate
	for _, p := range pems {
		if p == "" {
			continue
		}
		c, err := pemutil.ParseCertificate([]byte(p))
		if err != nil {
			return nil, fmt.Errorf("the CA's answer holds a bad certificate: %w", err)
		}
		chain = append(chain, c)
	}
	if len(chain) == 0 {
		return nil, errors.New("the CA answered without a certificate")
	}
	return chain, nil
}

// sentinels whose text the server (guard) sends verbatim as the message.
var wireSentinels = []error{ErrTokenUsed, ErrTokenExpired, ErrTokenNotYetValid, ErrTokenInvalid, ErrRevoked, ErrExpired,
	ErrWrongRole, ErrUnknownCA, ErrNoIdentity, ErrRequestRefused}

// mapHTTPError turns a CA error response into a sentinel error with the CA's message.
func mapHTTPError(status int, body []byte, kind requestKind) error {
	var eb errorBody
	_ = json.Unmarshal(body, &eb)
	msg := strings.TrimSpace(eb.Message)
	for _, s := range wireSentinels {
		if strings.Contains(msg, s.Error()) {
			return fmt.Errorf("%w (HTTP %d: %s)", s, status, msg)
		}
	}
	if msg == "" {
		msg = http.StatusText(status)
	}
	switch {
	case strings.Contains(msg, "token already used"):
		return fmt.Errorf("%w (HTTP %d)", ErrTokenUsed, status)
	case strings.Contains(msg, "has been revoked"):
		return fmt.Errorf("%w (HTTP %d)", ErrRevoked, status)
	case status == http.StatusUnauthorized && kind == kindSign:
		return fmt.Errorf("%w (HTTP %d: %s)", ErrTokenInvalid, status, msg)
	case status == http.StatusUnauthorized || status == http.StatusForbidden || status == http.StatusBadRequest:
		return fmt.Errorf("%w (HTTP %d: %s)", ErrRequestRefused, status, msg)
	}
	return fmt.Errorf("the CA answered HTTP %d: %s", status, msg)
}

func pkixName(cn string) pkix.Name { return pkix.Name{CommonName: cn} }
