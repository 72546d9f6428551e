package ca

import (
	"context"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"math/big"
	"net/http"
	"os"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-chi/chi/v5"
	"github.com/smallstep/certificates/acme"
	acmeAPI "github.com/smallstep/certificates/acme/api"
	acmeNoSQL "github.com/smallstep/certificates/acme/db/nosql"
	"github.com/smallstep/certificates/api"
	"github.com/smallstep/certificates/authority"
	"github.com/smallstep/certificates/authority/config"
	"github.com/smallstep/certificates/authority/policy"
	"github.com/smallstep/certificates/authority/provisioner"
	stepdb "github.com/smallstep/certificates/db"
	"go.step.sm/crypto/jose"
	"go.step.sm/crypto/keyutil"
	"go.step.sm/crypto/x509util"
)

// Authority is the running certificate authority. Its methods are safe for
// concurrent use.
type Authority struct {
	cfg       Config
	pki       *pki
	db        *authDB
	auth      *authority.Authority
	rootPool  *x509.CertPool
	interPool *x509.CertPool
	rootFP    string
	handler   http.Handler

	acmeDB     *acmeDB
	acmeClient *validationClient

	gwCert atomic.Pointer[tls.Certificate]

	peerCache  sync.Map // peerKey -> peerEntry
	peerCacheN atomic.Int64

	stop     chan struct{}
	loops    sync.WaitGroup
	closeOne sync.Once
	closeErr error
}

// New opens the certificate authority in cfg.DataDir: on first start (empty dir) it
// creates the PKI, on later starts it loads it. It issues the gateway's own server
// certificate and starts its in-process renewal.
func New(ctx context.Context, cfg Config) (*Authority, error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("create CA data dir: %w", err)
	}
	if err := os.Chmod(cfg.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("restrict CA data dir: %w", err)
	}
	exists, err := stateExists(cfg.DataDir)
	if err != nil {
		return nil, fmt.Errorf("open CA in %s: %w", cfg.DataDir, err)
	}
	password, generated, err := resolvePassword(&cfg, !exists)
	if err != nil {
		return nil, fmt.Errorf("open CA in %s: %w", cfg.DataDir, err)
	}
	if generated {
		cfg.Logger.Warn("generated a random CA password; keep this file safe and back it up with the data dir",
			"path", cfg.DataDir+string(os.PathSeparator)+passwordFileName)
	}
	var p *pki
	if exists {
		p, err = loadPKI(cfg.DataDir, password)
	} else {
		p, err = createPKI(cfg.DataDir, password, time.Now())
		if err == nil {
			cfg.Logger.Info("created a new certificate authority", "dir", cfg.DataDir)
		}
	}
	if err != nil {
		return nil, fmt.Errorf("open CA in %s: %w", cfg.DataDir, err)
	}

	adb, err := openDB(cfg.DataDir, cfg.DB)
	if err != nil {
		return nil, err
	}
	a := &Authority{cfg: cfg, pki: p, db: adb, stop: make(chan struct{})}
	ok := false
	defer func() {
		if !ok {
			if a.auth != nil {
				a.auth.Shutdown() // closes the DB too
			} else {
				adb.Shutdown()
			}
		}
	}()
	if err := adb.init(); err != nil {
		return nil, err
	}
	adb.onRevoke = a.fireOnRevoke
	if cfg.AgentACME != nil {
		adb.onRevokedAgentACME = a.deactivateAgentACME
	}
	if onIssued := cfg.ACME.OnIssued; onIssued != nil {
		adb.onACMEIssued = func(leaf *x509.Certificate) { onIssued(leaf.DNSNames, leaf.SerialNumber.String()) }
	}
	adb.onACMERevoked = cfg.ACME.OnRevoked
	if cfg.AgentACME != nil && cfg.AgentACME.OnIssued != nil {
		onIssued := cfg.AgentACME.OnIssued
		adb.onAgentACMEIssued = func(leaf *x509.Certificate) {
			if id, err := ParseIdentity(leaf); err == nil {
				onIssued(id, leaf.SerialNumber.String())
			}
		}
	}

	a.rootPool = x509.NewCertPool()
	a.rootPool.AddCert(p.root)
	a.interPool = x509.NewCertPool()
	a.interPool.AddCert(p.intermediate)
	sum := sha256.Sum256(p.root.Raw)
	a.rootFP = hex.EncodeToString(sum[:])

	provs, provKeys, err := a.provisioners()
	if err != nil {
		return nil, err
	}
	adb.provKeys = provKeys
	adb.now = cfg.Now

	scfg := &config.Config{
		DNSNames: a.dnsNames(),
		AuthorityConfig: &config.AuthConfig{
			Provisioners: provs,
			// Tokens minted before a restart stay valid until their exp: single use
			// is enforced by the database (used_ott), which survives restarts.
			DisableIssuedAtCheck: true,
		},
		CRL: &config.CRLConfig{Enabled: true, GenerateOnRevoke: true},
	}
	a.auth, err = authority.NewEmbedded(
		authority.WithConfig(scfg),
		authority.WithDatabase(adb),
		authority.WithX509RootCerts(p.root),
		authority.WithX509Signer(p.intermediate, p.intermediateKey),
		authority.WithQuietInit(),
	)
	if err != nil {
		return nil, fmt.Errorf("start step-ca authority: %w", err)
	}
	if len(cfg.ACME.AllowedNames) > 0 || cfg.AgentACME != nil {
		ndb, err := acmeNoSQL.New(adb)
		if err != nil {
			return nil, fmt.Errorf("open ACME database: %w", err)
		}
		a.acmeDB = &acmeDB{DB: ndb, kv: adb, agentDomain: a.AgentACMEDomain()}
		a.acmeClient = newValidationClient(cfg.ACME)
	}
	a.handler = a.buildHandler()

	if err := a.rotateGatewayCert(ctx); err != nil {
		return nil, fmt.Errorf("issue the gateway certificate: %w", err)
	}
	a.loops.Go(a.renewLoop)
	if cfg.RevocationSync > 0 {
		a.loops.Go(a.revocationSyncLoop)
	}
	ok = true
	return a, nil
}

// Close stops the gateway-certificate renewal and closes the database.
func (a *Authority) Close() error {
	a.closeOne.Do(func() {
		close(a.stop)
		a.loops.Wait()
		if a.acmeClient != nil {
			a.acmeClient.close()
		}
		a.closeErr = a.auth.Shutdown()
	})
	return a.closeErr
}

func (a *Authority) fireOnRevoke(serial string) {
	if a.cfg.OnRevoke != nil {
		a.cfg.OnRevoke([]string{serial})
	}
}

func (a *Authority) dnsNames() []string {
	names := []string{a.cfg.serverHost()}
	for _, n := range a.cfg.ServerNames {
		if n != "" && n != names[0] {
			names = append(names, n)
		}
	}
	return names
}

// provisioners builds one JWK provisioner per role (so that a user token can never
// yield an agent identity: the role is bound to the provisioner, and each
// provisioner's template refuses SPIFFE IDs of another role) and the ACME provisioner.
func (a *Authority) provisioners() (provisioner.List, map[string]*ecdsa.PublicKey, error) {
	var list provisioner.List
	keys := map[string]*ecdsa.PublicKey{}
	for _, role := range []Role{RoleAgent, RoleUser, RoleGateway} {
		priv := a.pki.provKeys[role]
		jwk, err := publicJWK(priv)
		if err != nil {
			return nil, nil, err
		}
		lifetime := a.lifetime(role)
		name := provisionerName(role)
		keys[name] = &priv.PublicKey
		list = append(list, &provisioner.JWK{
			Type: provisioner.TypeJWK.String(),
			Name: name,
			Key:  jwk,
			Claims: &provisioner.Claims{
				MinTLSDur:     &provisioner.Duration{Duration: MinLifetime},
				MaxTLSDur:     &provisioner.Duration{Duration: lifetime},
				DefaultTLSDur: &provisioner.Duration{Duration: lifetime},
			},
			Options: &provisioner.Options{X509: &provisioner.X509Options{Template: a.roleTemplate(role)}},
		})
	}
	if len(a.cfg.ACME.AllowedNames) > 0 {
		var chs []provisioner.ACMEChallenge
		for _, c := range a.cfg.ACME.Challenges {
			chs = append(chs, provisioner.ACMEChallenge(c))
		}
		if len(chs) == 0 {
			chs = []provisioner.ACMEChallenge{provisioner.HTTP_01, provisioner.TLS_ALPN_01, provisioner.DNS_01}
		}
		list = append(list, &provisioner.ACME{
			ID:         acmeProvisionerName,
			Type:       provisioner.TypeACME.String(),
			Name:       acmeProvisionerName,
			RequireEAB: a.cfg.ACME.RequireEAB,
			Challenges: chs,
			Claims: &provisioner.Claims{
				MinTLSDur:     &provisioner.Duration{Duration: MinLifetime},
				MaxTLSDur:     &provisioner.Duration{Duration: a.cfg.ACME.Lifetime},
				DefaultTLSDur: &provisioner.Duration{Duration: a.cfg.ACME.Lifetime},
			},
			Options: &provisioner.Options{X509: &provisioner.X509Options{
				AllowedNames: &policy.X509NameOptions{DNSDomains: a.cfg.ACME.AllowedNames},
			}},
		})
	}
	if a.cfg.AgentACME != nil {
		list = append(list, &provisioner.ACME{
			ID:         agentACMEProvisionerName,
			Type:       provisioner.TypeACME.String(),
			Name:       agentACMEProvisionerName,
			RequireEAB: true,
			Challenges: []provisioner.ACMEChallenge{provisioner.TLS_ALPN_01},
			Claims: &provisioner.Claims{
				MinTLSDur:     &provisioner.Duration{Duration: MinLifetime},
				MaxTLSDur:     &provisioner.Duration{Duration: a.cfg.AgentLifetime},
				DefaultTLSDur: &provisioner.Duration{Duration: a.cfg.AgentLifetime},
			},
			Options: &provisioner.Options{X509: &provisioner.X509Options{
				Template: a.agentTemplate(),
				AllowedNames: &policy.X509NameOptions{
					DNSDomains: []string{"*." + a.AgentACMEDomain()},
					URIDomains: []string{a.cfg.TrustDomain},
				},
			}},
		})
	}
	return list, keys, nil
}

func provisionerName(r Role) string {
	switch r {
	case RoleAgent:
		return agentProvisionerName
	case RoleUser:
		return userProvisionerName
	}
	return gatewayProvisionerName
}

func (a *Authority) lifetime(r Role) time.Duration {
	switch r {
	case RoleAgent:
		return a.cfg.AgentLifetime
	case RoleUser:
		return a.cfg.UserLifetime
	}
	return a.cfg.GatewayLifetime
}

// roleTemplate is the X.509 template of a role's provisioner. step-ca fills .SANs from
// the token (and refuses a CSR whose SANs differ from them); the template refuses a
// token whose single SAN is not a SPIFFE ID of this provisioner's role whose name is
// the token subject, and sets the key usages: client auth only for agents and users,
// server and client auth for the gateway.
func (a *Authority) roleTemplate(r Role) string {
	prefix := "spiffe://" + a.cfg.TrustDomain + "/" + string(r) + "/"
	eku := `["clientAuth"]`
	extra := ""
	if r == RoleGateway {
		eku = `["serverAuth", "clientAuth"]`
	}
	pattern := "^" + regexp.QuoteMeta(prefix) + `[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`
	msg := fmt.Sprintf("a %s token can only issue one %s<name> identity", provisionerName(r), prefix)
	check := fmt.Sprintf(`{{- $uris := list }}{{- range .SANs }}{{ if eq .Type "uri" }}{{ $uris = append $uris .Value }}{{ end }}{{ end }}
{{- if ne (len $uris) 1 }}{{ fail %[1]q }}{{ end }}
{{- if not (regexMatch %[2]q (index $uris 0)) }}{{ fail %[1]q }}{{ end }}
{{- if ne (index $uris 0) (print %[3]q .Subject.CommonName) }}{{ fail %[1]q }}{{ end }}
`, msg, pattern, prefix)
	if r != RoleGateway {
		extra = fmt.Sprintf(`{{- if ne (len .SANs) 1 }}{{ fail %q }}{{ end }}
`, msg)
	}
	return check + extra + `{
	"subject": {"commonName": {{ toJson .Subject.CommonName }}},
	"sans": {{ toJson .SANs }},
	"keyUsage": ["digitalSignature"],
	"extKeyUsage": ` + eku + `
}`
}

func publicJWK(priv *ecdsa.PrivateKey) (*jose.JSONWebKey, error) {
	jwk := &jose.JSONWebKey{Key: &priv.PublicKey, Algorithm: jose.ES256, Use: "sig"}
	kid, err := jose.Thumbprint(jwk)
	if err != nil {
		return nil, err
	}
	jwk.KeyID = kid
	return jwk, nil
}

// Root returns the root certificate.
func (a *Authority) Root() *x509.Certificate { return a.pki.root }

// RootPool returns a pool holding only the root certificate.
func (a *Authority) RootPool() *x509.CertPool { return a.rootPool }

// Intermediate returns the intermediate (issuing) certificate.
func (a *Authority) Intermediate() *x509.Certificate { return a.pki.intermediate }

// RootFingerprint is the lowercase hex SHA-256 of the root certificate's DER, the
// value of a token's sha claim.
func (a *Authority) RootFingerprint() string { return a.rootFP }

// TrustDomain returns the SPIFFE trust domain.
func (a *Authority) TrustDomain() string { return a.cfg.TrustDomain }

// URL returns the configured external base URL.
func (a *Authority) URL() string { return a.cfg.URL }

// Identity returns the identity of role/name in this CA's trust domain.
func (a *Authority) Identity(role Role, name string) Identity {
	return Identity{TrustDomain: a.cfg.TrustDomain, Role: role, Name: name}
}

// MintToken creates a one-time bootstrap token for an agent or user: a JWT signed by
// the role's provisioner key with sub=name, sans=[SPIFFE ID], aud=URL/1.0/sign,
// sha=root fingerprint, a random jti and exp=now+ttl (0 => 15m; 1s..24h). The CA
// accepts it once, from minting until exp plus tokenLeeway (1s) by Config.Now: at
// least ttl, less than a second more. The token is a credential: never log it.
func (a *Authority) MintToken(role Role, name string, ttl time.Duration) (string, error) {
	if role != RoleAgent && role != RoleUser {
		return "", fmt.Errorf("mint token: %w: tokens are for agents or users, not %q", ErrWrongRole, role)
	}
	return a.mintToken(role, name, ttl, nil)
}

func (a *Authority) mintToken(role Role, name string, ttl time.Duration, extraSANs []string) (string, error) {
	if err := ValidName(name); err != nil {
		return "", fmt.Errorf("mint token: %w", err)
	}
	if ttl == 0 {
		ttl = DefaultTokenTTL
	}
	if ttl < MinTokenTTL || ttl > MaxTokenTTL {
		return "", fmt.Errorf("mint token: ttl %s must be between %s and %s", ttl, MinTokenTTL, shortDuration(MaxTokenTTL))
	}
	priv := a.pki.provKeys[role]
	jwk, err := publicJWK(priv)
	if err != nil {
		return "", err
	}
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.ES256, Key: priv},
		new(jose.SignerOptions).WithType("JWT").WithHeader("kid", jwk.KeyID))
	if err != nil {
		return "", fmt.Errorf("mint token: %w", err)
	}
	jti := make([]byte, 32)
	if _, err := rand.Read(jti); err != nil {
		return "", err
	}
	// step-ca checks a token's times against the system clock, so it is minted by
	// that clock; the guard checks them against Config.Now, which is the system clock
	// too except in tests that move it. exp is rounded down to the second (JWT
	// times are whole seconds); tokenLeeway gives that second back.
	now := time.Now()
	claims := tokenClaims{
		Claims: jose.Claims{
			Issuer:    provisionerName(role),
			Subject:   name,
			Audience:  jose.Audience{a.cfg.URL + "/1.0/sign"},
			ID:        hex.EncodeToString(jti),
			IssuedAt:  jose.NewNumericDate(now),
			NotBefore: jose.NewNumericDate(now),
			Expiry:    jose.NewNumericDate(now.Add(ttl)),
		},
		SANs: append([]string{a.Identity(role, name).String()}, extraSANs...),
		SHA:  a.rootFP,
	}
	tok, err := jose.Signed(signer).Claims(claims).CompactSerialize()
	if err != nil {
		return "", fmt.Errorf("mint token: %w", err)
	}
	return tok, nil
}

type tokenClaims struct {
	jose.Claims
	SANs []string `json:"sans"`
	SHA  string   `json:"sha"`
}

// now is the CA's clock (Config.Now).
func (a *Authority) now() time.Time { return a.cfg.Now() }

// VerifyPeer checks a TLS peer chain (leaf first): it chains to our root through our
// intermediate with the EKU of the role (client auth; server auth for RoleGateway),
// it is valid at Config.Now, it carries exactly one SPIFFE ID in our trust domain with
// role want, and its serial is not revoked. It is cheap: no database access, and the
// signature chain of a leaf is verified once and then cached (by the SHA-256 of its
// DER) while the chain is valid; validity, role and revocation are checked every call.
func (a *Authority) VerifyPeer(chain []*x509.Certificate, want Role) (Identity, error) {
	if len(chain) == 0 {
		return Identity{}, fmt.Errorf("verify peer: %w: no certificate presented", ErrUnknownCA)
	}
	leaf := chain[0]
	now := a.now()
	if now.After(leaf.NotAfter) {
		return Identity{}, fmt.Errorf("verify peer: %w (expired %s)", ErrExpired, leaf.NotAfter.UTC().Format(time.RFC3339))
	}
	if now.Before(leaf.NotBefore) {
		return Identity{}, fmt.Errorf("verify peer: %w: the certificate is not valid before %s", ErrUnknownCA, leaf.NotBefore.UTC().Format(time.RFC3339))
	}
	eku := x509.ExtKeyUsageClientAuth
	if want == RoleGateway {
		eku = x509.ExtKeyUsageServerAuth
	}
	key := peerKey{sum: sha256.Sum256(leaf.Raw), eku: eku}
	var id Identity
	if v, ok := a.peerCache.Load(key); ok && now.Before(v.(peerEntry).chainNotAfter) {
		id = v.(peerEntry).id
	} else {
		inters := a.interPool
		if len(chain) > 1 {
			inters = a.interPool.Clone()
			for _, c := range chain[1:] {
				inters.AddCert(c)
			}
		}
		chains, err := leaf.Verify(x509.VerifyOptions{
			Roots: a.rootPool, Intermediates: inters, CurrentTime: now,
			KeyUsages: []x509.ExtKeyUsage{eku},
		})
		if err != nil {
			var cie x509.CertificateInvalidError
			if errors.As(err, &cie) && cie.Reason == x509.Expired {
				return Identity{}, fmt.Errorf("verify peer: %w", ErrExpired)
			}
			return Identity{}, fmt.Errorf("verify peer: %w: %v", ErrUnknownCA, err)
		}
		if id, err = ParseIdentity(leaf); err != nil {
			return Identity{}, fmt.Errorf("verify peer: %w", err)
		}
		notAfter := leaf.NotAfter
		for _, c := range chains[0] {
			if c.NotAfter.Before(notAfter) {
				notAfter = c.NotAfter
			}
		}
		if a.peerCacheN.Add(1) > maxPeerCache {
			a.peerCache.Clear()
			a.peerCacheN.Store(0)
		}
		a.peerCache.Store(key, peerEntry{id: id, chainNotAfter: notAfter})
	}
	if id.TrustDomain != a.cfg.TrustDomain {
		return Identity{}, fmt.Errorf("verify peer: %w: trust domain %q is not %q", ErrUnknownCA, id.TrustDomain, a.cfg.TrustDomain)
	}
	if id.Role != want {
		return Identity{}, fmt.Errorf("verify peer %s: %w: want %s", id, ErrWrongRole, want)
	}
	if rev, _ := a.db.IsRevoked(leaf.SerialNumber.String()); rev {
		return Identity{}, fmt.Errorf("verify peer %s: %w", id, ErrRevoked)
	}
	return id, nil
}

// maxPeerCache bounds the verified-leaf cache; when full it is simply emptied.
const maxPeerCache = 50000

type peerKey struct {
	sum [32]byte
	eku x509.ExtKeyUsage
}

type peerEntry struct {
	id            Identity
	chainNotAfter time.Time
}

// IsRevoked reports whether the certificate with this decimal serial was revoked. It
// reads an in-memory set kept current by every revocation of this process and loaded
// from the database at start.
func (a *Authority) IsRevoked(serial string) (bool, error) { return a.db.IsRevoked(serial) }

// Revoke revokes the certificate with this decimal serial (passive revocation: it is
// refused for renewal and by VerifyPeer, and listed in the CRL). Revoking an already
// revoked certificate is not an error.
func (a *Authority) Revoke(ctx context.Context, serial, reason string) error {
	if _, ok := new(big.Int).SetString(serial, 10); !ok {
		return fmt.Errorf("revoke %q: not a decimal serial number", serial)
	}
	if rev, _ := a.db.IsRevoked(serial); rev {
		return nil
	}
	cert, err := a.db.GetCertificate(serial)
	if err != nil {
		return fmt.Errorf("revoke %s: no certificate with this serial was issued by this CA", serial)
	}
	if reason == "" {
		reason = defaultRevocationReason
	}
	ctx = provisioner.NewContextWithMethod(ctx, provisioner.RevokeMethod)
	err = a.auth.Revoke(ctx, &authority.RevokeOptions{
		Serial: serial, Reason: reason, PassiveOnly: true, MTLS: true, Crt: cert,
	})
	if err != nil {
		if rev, _ := a.db.IsRevoked(serial); rev {
			return nil // lost a race with another revocation of the same serial
		}
		return fmt.Errorf("revoke %s: %w", serial, err)
	}
	return nil
}

// IssuedCert describes one certificate issued to an identity.
type IssuedCert struct {
	Serial              string
	NotBefore, NotAfter time.Time
	Revoked             bool
}

// Issued lists the unexpired certificates the CA has issued to id.
func (a *Authority) Issued(ctx context.Context, id Identity) ([]IssuedCert, error) {
	out, err := a.db.issued(id, a.now())
	if err != nil {
		return nil, fmt.Errorf("list certificates of %s: %w", id, err)
	}
	return out, nil
}

// RevokeIdentity revokes every unexpired, unrevoked certificate of id and returns their
// serials. OnRevoke is called once per serial.
func (a *Authority) RevokeIdentity(ctx context.Context, id Identity, reason string) ([]string, error) {
	certs, err := a.Issued(ctx, id)
	if err != nil {
		return nil, err
	}
	var serials []string
	for _, c := range certs {
		if c.Revoked {
			continue
		}
		if err := a.Revoke(ctx, c.Serial, reason); err != nil {
			return serials, fmt.Errorf("revoke %s: %w", id, err)
		}
		serials = append(serials, c.Serial)
	}
	return serials, nil
}

// GetCertificate serves the gateway's own server certificate (leaf + intermediate).
// Use it as tls.Config.GetCertificate: rotations are picked up by new handshakes.
func (a *Authority) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	c := a.gwCert.Load()
	if c == nil {
		return nil, errors.New("ca: no gateway certificate")
	}
	return c, nil
}

// rotateGatewayCert issues a fresh gateway certificate (new key) through step-ca's
// own sign path, with a token of the gateway provisioner that never leaves the process.
func (a *Authority) rotateGatewayCert(ctx context.Context) error {
	id := a.Identity(RoleGateway, a.cfg.GatewayID)
	extra := a.dnsNames()
	tok, err := a.mintToken(RoleGateway, a.cfg.GatewayID, 5*time.Minute, extra)
	if err != nil {
		return err
	}
	key, err := keyutil.GenerateSigner("EC", "P-256", 0)
	if err != nil {
		return err
	}
	csr, err := x509util.CreateCertificateRequest(a.cfg.GatewayID, append([]string{id.String()}, extra...), key)
	if err != nil {
		return err
	}
	sctx := provisioner.NewContextWithMethod(authority.NewContext(ctx, a.auth), provisioner.SignMethod)
	opts, err := a.auth.Authorize(sctx, tok)
	if err != nil {
		return err
	}
	chain, err := a.auth.SignWithContext(sctx, csr, provisioner.SignOptions{}, opts...)
	if err != nil {
		return err
	}
	tc := &tls.Certificate{PrivateKey: key, Leaf: chain[0]}
	for _, c := range chain {
		tc.Certificate = append(tc.Certificate, c.Raw)
	}
	renewal := a.gwCert.Swap(tc) != nil
	a.cfg.Logger.Info("issued gateway certificate", "identity", id.String(),
		"serial", chain[0].SerialNumber.String(), "not_after", chain[0].NotAfter)
	if a.cfg.OnGatewayCertificate != nil {
		a.cfg.OnGatewayCertificate(chain[0].SerialNumber.String(), chain[0].NotAfter, renewal)
	}
	return nil
}

// renewAt is about 2/3 of the lifetime, minus up to 5% jitter so that several
// gateways started together do not renew in lockstep.
func renewAt(leaf *x509.Certificate) time.Time {
	life := leaf.NotAfter.Sub(leaf.NotBefore)
	var j [8]byte
	_, _ = rand.Read(j[:])
	jitter := time.Duration(uint64(j[0])<<8|uint64(j[1])) * (life / 20) / 65536
	return leaf.NotBefore.Add(life*2/3 - jitter)
}

func (a *Authority) renewLoop() {
	retry := time.Duration(0)
	rotated := false
	for {
		leaf := a.gwCert.Load().Leaf
		wait := renewAt(leaf).Sub(a.now())
		if retry > 0 {
			wait = retry
		} else if rotated && wait < minRenewInterval {
			// A clock that runs ahead of the certificates (a test clock, a wrong
			// system clock) must not make us re-issue in a tight loop.
			wait = minRenewInterval
		}
		select {
		case <-a.stop:
			return
		case <-a.cfg.After(max(wait, 0)):
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		err := a.rotateGatewayCert(ctx)
		cancel()
		if err != nil {
			// Retry sooner than the remaining lifetime so that one failure does not
			// let the certificate expire.
			retry = min(time.Minute, max(leaf.NotAfter.Sub(a.now())/10, time.Second))
			a.cfg.Logger.Error("renew gateway certificate failed; will retry", "err", err, "retry_in", retry)
			continue
		}
		retry, rotated = 0, true
	}
}

// minRenewInterval is the least time between two renewals of the gateway certificate.
const minRenewInterval = 30 * time.Second

// NewEABKey creates an ACME External Account Binding key bound to name (stored as the
// key's reference). Give keyID and hmacKey to the ACME client out of band.
func (a *Authority) NewEABKey(ctx context.Context, name string) (keyID string, hmacKey []byte, err error) {
	if len(a.cfg.ACME.AllowedNames) == 0 {
		return "", nil, errors.New("create EAB key: ACME is disabled (no allowed names configured)")
	}
	if err := ValidName(name); err != nil {
		return "", nil, fmt.Errorf("create EAB key: %w", err)
	}
	k, err := a.acmeDB.CreateExternalAccountKey(ctx, acmeProvisionerName, name)
	if err != nil {
		return "", nil, fmt.Errorf("create EAB key for %s: %w", name, err)
	}
	return k.ID, k.HmacKey, nil
}

// ACMEDirectoryURL is the ACME directory of the built-in CA.
func (a *Authority) ACMEDirectoryURL() string {
	return a.cfg.URL + "/acme/" + acmeProvisionerName + "/directory"
}

// Handler returns step-ca's HTTP API, to be served on the h2/http1.1 ALPN of the
// gateway's TLS port (TLS 1.3, client certificate requested and verified if given):
// /1.0/sign /sign /1.0/renew /renew /1.0/rekey /1.0/revoke /revoke /roots /root/{sha}
// /health /crl /acme/acme/... (the latter only when ACME is enabled).
//
// In front of step-ca it bounds request bodies (256 KiB), answers refused tokens with
// a precise reason, and refuses renewal (/renew, /rekey, /re-sign) unless the client
// certificate passes VerifyPeer for its own role: Wicket identities only (ACME
// certificates are renewed through ACME), unexpired by Config.Now, not revoked.
func (a *Authority) Handler() http.Handler { return a.handler }

func (a *Authority) buildHandler() http.Handler {
	r := chi.NewRouter()
	api.Route(r)
	r.Route("/1.0", func(r chi.Router) { api.Route(r) })
	if a.acmeDB != nil {
		r.Route("/acme", func(r chi.Router) { acmeAPI.Route(r) })
	}
	linker := acme.NewLinker(strings.TrimPrefix(a.cfg.URL, "https://"), "acme")
	base := authority.NewContext(context.Background(), a.auth)
	base = stepdb.NewContext(base, a.db)
	if a.acmeDB != nil {
		base = acme.NewContext(base, a.acmeDB, a.acmeClient, linker, nil)
	}
	return &guard{a: a, next: r, base: base}
}

// revocationSyncLoop reloads the revoked serials from the database, so that
// revocations made by another gateway sharing it reach IsRevoked, VerifyPeer and
// OnRevoke here within Config.RevocationSync.
func (a *Authority) revocationSyncLoop() {
	t := time.NewTicker(a.cfg.RevocationSync)
	defer t.Stop()
	for {
		select {
		case <-a.stop:
			return
		case <-t.C:
		}
		added, err := a.db.syncRevoked()
		if err != nil {
			a.cfg.Logger.Warn("reload revocations from the database failed; will retry", "err", err)
			continue
		}
		if len(added) > 0 {
			a.cfg.Logger.Info("revocations made elsewhere", "serials", added)
			if a.cfg.OnRevoke != nil {
				a.cfg.OnRevoke(added)
			}
		}
	}
}
