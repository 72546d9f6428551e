// Package identity keeps a Wicket identity (an agent's or a user's) on disk
// and renews its certificate before it expires.
//
// A data directory holds four files: key.pem (the private key, 0600),
// chain.pem (leaf first, then intermediates), root.pem (the pinned root, the
// only trust anchor used to reach the gateway) and identity.json (the
// gateway's URL, role, name and trust domain). Every file is replaced
// atomically (temporary file in the same directory, fsync, rename, fsync of
// the directory), so a crash leaves either the old or the new file, never a
// torn one. The directory is created 0700.
//
// The package must NOT decide who may hold an identity or talk to the
// gateway: it stores, loads, checks consistency and renews. It never logs a
// token or a key.
package identity

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"time"

	"github.com/wicketgw/wicket/ca"
)

// File names inside a data directory.
const (
	KeyFile      = "key.pem"
	ChainFile    = "chain.pem"
	RootFile     = "root.pem"
	IdentityFile = "identity.json"
	// ACMEAccountKeyFile holds the ACME account key of an identity enrolled by ACME
	// (0600); renewals are new orders of that account.
	ACMEAccountKeyFile = "acme-account.key"
)

// Sentinel errors of this package; compare with errors.Is.
var (
	// ErrNotFound: the directory holds no identity (no identity.json).
	ErrNotFound = errors.New("no stored identity")
	// ErrCorrupt: some identity file is missing, unreadable or inconsistent.
	ErrCorrupt = errors.New("stored identity is corrupt")
	// ErrExpired: the certificate has expired; it cannot be renewed.
	ErrExpired = errors.New("certificate expired")
	// ErrRevoked: the CA says the certificate was revoked.
	ErrRevoked = errors.New("certificate revoked")
)

// Meta is the non-secret description of a stored identity (identity.json).
type Meta struct {
	// URL is the gateway's base URL ("https://host:port"), learnt from the
	// enrollment token's audience. Sessions and renewals go there.
	URL string `json:"url"`
	// Role is "agent" or "user".
	Role ca.Role `json:"role"`
	// Name is the agent or user name of the SPIFFE ID.
	Name string `json:"name"`
	// TrustDomain is the SPIFFE trust domain of the certificate.
	TrustDomain string `json:"trust_domain"`
	// TokenSHA256 is the hex SHA-256 of the one-time token that enrolled this
	// identity. The token is spent once used, so its hash reveals nothing
	// useful; it lets a restart with the same (spent) token recognise it and
	// keep the stored identity instead of failing.
	TokenSHA256 string `json:"token_sha256,omitempty"`
	// Enrolled is when the identity was created.
	Enrolled time.Time `json:"enrolled"`
	// ACME is true for an identity enrolled by ACME: it renews by new ACME orders of
	// the account whose key is in ACMEAccountKeyFile.
	ACME bool `json:"acme,omitempty"`
}

// Stored is an identity as kept in a data directory.
type Stored struct {
	Meta
	Creds *ca.Credentials
	// ACMEAccountKey is the ACME account key when Meta.ACME is set.
	ACMEAccountKey crypto.Signer
}

// Leaf returns the certificate of the identity.
func (s *Stored) Leaf() *x509.Certificate { return s.Creds.Chain[0] }

// Gateway is where sessions of this identity go: the host:port to dial (port 443 when the
// URL names none), the host name the gateway's certificate must carry, and the pinned root.
// It fails when the stored URL has no host.
func (s *Stored) Gateway() (addr, host string, roots *x509.CertPool, err error) {
	u, err := url.Parse(s.URL)
	if err != nil || u.Host == "" {
		return "", "", nil, fmt.Errorf("the stored gateway URL %q is not usable", s.URL)
	}
	addr = u.Host
	if u.Port() == "" {
		addr = net.JoinHostPort(u.Hostname(), "443")
	}
	roots = x509.NewCertPool()
	roots.AddCert(s.Creds.Root)
	return addr, u.Hostname(), roots, nil
}

// TokenHash returns the value stored in Meta.TokenSHA256 for token.
func TokenHash(token string) string {
	sum := sha256.Sum256([]byte(token))
	return hex.EncodeToString(sum[:])
}

// Exists reports whether dir holds an identity (valid or not). A missing
// directory is not an error.
func Exists(dir string) (bool, error) {
	_, err := os.Stat(filepath.Join(dir, IdentityFile))
	if err == nil {
		return true, nil
	}
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	return false, fmt.Errorf("look for a stored identity in %s: %w", dir, err)
}

// Load reads the identity stored in dir and checks that it is consistent:
// the key matches the leaf, the chain verifies against the stored root, and
// the leaf's SPIFFE ID matches identity.json. It does not check expiry, so a
// caller can say "expired" rather than "corrupt".
func Load(dir string) (*Stored, error) {
	metaBytes, err := os.ReadFile(filepath.Join(dir, IdentityFile))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%w in %s: run with --token first", ErrNotFound, dir)
	}
	if err != nil {
		return nil, fmt.Errorf("read stored identity in %s: %w", dir, err)
	}
	corrupt := func(what string, err error) error {
		if err != nil {
			return fmt.Errorf("%w in %s: %s: %v; enroll again with a new token (or restore the directory from a backup)", ErrCorrupt, dir, what, err)
		}
		return fmt.Errorf("%w in %s: %s; enroll again with a new token (or restore the directory from a backup)", ErrCorrupt, dir, what)
	}
	var meta Meta
	if err := json.Unmarshal(metaBytes, &meta); err != nil {
		return nil, corrupt(IdentityFile+" is not valid JSON", err)
	}
	if meta.URL == "" || meta.Name == "" || meta.Role == "" {
		return nil, corrupt(IdentityFile+" lacks url, name or role", nil)
	}

	keyPEM, err := os.ReadFile(filepath.Join(dir, KeyFile))
	if err != nil {
		return nil, corrupt("cannot read "+KeyFile, err)
	}
	key, err := parseKey(keyPEM)
	if err != nil {
		return nil, corrupt(KeyFile, err)
	}
	chainPEM, err := os.ReadFile(filepath.Join(dir, ChainFile))
	if err != nil {
		return nil, corrupt("cannot read "+ChainFile, err)
	}
	chain, err := parseCerts(chainPEM)
	if err != nil {
		return nil, corrupt(ChainFile, err)
	}
	rootPEM, err := os.ReadFile(filepath.Join(dir, RootFile))
	if err != nil {
		return nil, corrupt("cannot read "+RootFile, err)
	}
	roots, err := parseCerts(rootPEM)
	if err != nil {
		return nil, corrupt(RootFile, err)
	}
	if len(roots) != 1 {
		return nil, corrupt(fmt.Sprintf("%s holds %d certificates, want 1", RootFile, len(roots)), nil)
	}
	creds := &ca.Credentials{Key: key, Chain: chain, Root: roots[0]}
	if err := Check(creds, meta); err != nil {
		return nil, corrupt("inconsistent files", err)
	}
	st := &Stored{Meta: meta, Creds: creds}
	if meta.ACME {
		b, err := os.ReadFile(filepath.Join(dir, ACMEAccountKeyFile))
		if err != nil {
			return nil, corrupt("cannot read "+ACMEAccountKeyFile, err)
		}
		if st.ACMEAccountKey, err = parseKey(b); err != nil {
			return nil, corrupt(ACMEAccountKeyFile, err)
		}
	}
	return st, nil
}

// Check verifies that creds hang together and match meta: the key is the
// leaf's, the chain verifies against the root (ignoring time, which callers
// check separately), and the leaf's SPIFFE ID has meta's role, name and
// trust domain.
func Check(creds *ca.Credentials, meta Meta) error {
	if creds == nil || creds.Key == nil || len(creds.Chain) == 0 || creds.Root == nil {
		return errors.New("credentials lack a key, a chain or a root")
	}
	leaf := creds.Chain[0]
	pub, ok := creds.Key.Public().(interface{ Equal(crypto.PublicKey) bool })
	if !ok || !pub.Equal(leaf.PublicKey) {
		return errors.New("the private key does not belong to the certificate")
	}
	roots := x509.NewCertPool()
	roots.AddCert(creds.Root)
	inter := x509.NewCertPool()
	for _, c := range creds.Chain[1:] {
		inter.AddCert(c)
	}
	// Verify at the latest NotBefore of the chain, a moment at which every
	// certificate of a well-formed chain is valid, so that an expired
	// certificate reads as expired (callers check time), not as a broken chain.
	at := creds.Root.NotBefore
	for _, c := range creds.Chain {
		if c.NotBefore.After(at) {
			at = c.NotBefore
		}
	}
	if _, err := leaf.Verify(x509.VerifyOptions{
		Roots:         roots,
		Intermediates: inter,
		CurrentTime:   at,
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
	}); err != nil {
		return fmt.Errorf("the certificate does not chain to the stored root: %w", err)
	}
	id, err := ca.ParseIdentity(leaf)
	if err != nil {
		return fmt.Errorf("the certificate's identity: %w", err)
	}
	if id.Role != meta.Role || id.Name != meta.Name || (meta.TrustDomain != "" && id.TrustDomain != meta.TrustDomain) {
		return fmt.Errorf("the certificate is for %s, not %s %s in %s", id, meta.Role, meta.Name, meta.TrustDomain)
	}
	return nil
}

// Save writes s into dir (created 0700 if missing), each file atomically.
// The key is written first and identity.json last, so an interrupted Save
// of a new enrollment leaves a directory that Load reports as inconsistent
// rather than one that silently mixes two identities.
func Save(dir string, s *Stored) error {
	if err := Check(s.Creds, s.Meta); err != nil {
		return fmt.Errorf("save identity in %s: %w", dir, err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create data directory %s: %w", dir, err)
	}
	// MkdirAll leaves an existing directory's mode alone; tighten it, since it
	// holds a private key.
	if err := os.Chmod(dir, 0o700); err != nil {
		return fmt.Errorf("restrict data directory %s to 0700: %w", dir, err)
	}
	keyPEM, err := encodeKey(s.Creds.Key)
	if err != nil {
		return fmt.Errorf("save identity in %s: %w", dir, err)
	}
	if err := WriteFileAtomic(dir, KeyFile, keyPEM, 0o600); err != nil {
		return err
	}
	if s.ACME {
		if s.ACMEAccountKey == nil {
			return fmt.Errorf("save identity in %s: an ACME identity needs its account key", dir)
		}
		accPEM, err := encodeKey(s.ACMEAccountKey)
		if err != nil {
			return fmt.Errorf("save identity in %s: %w", dir, err)
		}
		if err := WriteFileAtomic(dir, ACMEAccountKeyFile, accPEM, 0o600); err != nil {
			return err
		}
	}
	if err := saveCerts(dir, s.Creds); err != nil {
		return err
	}
	meta, err := json.MarshalIndent(s.Meta, "", "  ")
	if err != nil {
		return fmt.Errorf("encode %s: %w", IdentityFile, err)
	}
	return WriteFileAtomic(dir, IdentityFile, append(meta, '\n'), 0o600)
}

// saveCerts replaces chain.pem and root.pem. A renewal keeps the key, so
// this is all it has to write.
func saveCerts(dir string, creds *ca.Credentials) error {
	if err := WriteFileAtomic(dir, ChainFile, encodeCerts(creds.Chain), 0o600); err != nil {
		return err
	}
	return WriteFileAtomic(dir, RootFile, encodeCerts([]*x509.Certificate{creds.Root}), 0o600)
}

// WriteFileAtomic replaces dir/name with data: temporary file in dir (created with mode),
// fsync, rename over the old file, fsync of dir so the rename itself is durable. A reader
// sees the old file or the new one, never a part. The gateway writes its agents file with it.
func WriteFileAtomic(dir, name string, data []byte, mode os.FileMode) (err error) {
	f, err := os.CreateTemp(dir, "."+name+".tmp-*")
	if err != nil {
		return fmt.Errorf("write %s in %s: %w", name, dir, err)
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(tmp)
		}
	}()
	if err = f.Chmod(mode); err != nil {
		return fmt.Errorf("write %s in %s: %w", name, dir, err)
	}
	if _, err = f.Write(data); err != nil {
		return fmt.Errorf("write %s in %s: %w", name, dir, err)
	}
	if err = f.Sync(); err != nil {
		return fmt.Errorf("write %s in %s: %w", name, dir, err)
	}
	if err = f.Close(); err != nil {
		return fmt.Errorf("write %s in %s: %w", name, dir, err)
	}
	if err = os.Rename(tmp, filepath.Join(dir, name)); err != nil {
		return fmt.Errorf("write %s in %s: %w", name, dir, err)
	}
	if d, derr := os.Open(dir); derr == nil {
		// Best effort: some filesystems refuse fsync on a directory.
		_ = d.Sync()
		d.Close()
	}
	return nil
}

func encodeKey(key crypto.Signer) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("encode private key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

func parseKey(data []byte) (crypto.Signer, error) {
	block, _ := pem.Decode(data)
	if block == nil {
		return nil, errors.New("no PEM block")
	}
	var (
		key any
		err error
	)
	switch block.Type {
	case "PRIVATE KEY":
		key, err = x509.ParsePKCS8PrivateKey(block.Bytes)
	case "EC PRIVATE KEY":
		key, err = x509.ParseECPrivateKey(block.Bytes)
	default:
		return nil, fmt.Errorf("unexpected PEM block %q", block.Type)
	}
	if err != nil {
		return nil, err
	}
	signer, ok := key.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("key of type %T cannot sign", key)
	}
	if _, ok := signer.(*ecdsa.PrivateKey); !ok {
		// Wicket issues ECDSA P-256 keys only; anything else was not written by us.
		return nil, fmt.Errorf("key of type %T, want ECDSA", key)
	}
	return signer, nil
}

func encodeCerts(certs []*x509.Certificate) []byte {
	var buf bytes.Buffer
	for _, c := range certs {
		_ = pem.Encode(&buf, &pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
	}
	return buf.Bytes()
}

func parseCerts(data []byte) ([]*x509.Certificate, error) {
	var certs []*x509.Certificate
	for {
		var block *pem.Block
		block, data = pem.Decode(data)
		if block == nil {
			break
		}
		if block.Type != "CERTIFICATE" {
			return nil, fmt.Errorf("unexpected PEM block %q", block.Type)
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, err
		}
		certs = append(certs, c)
	}
	if len(bytes.TrimSpace(data)) != 0 {
		return nil, errors.New("trailing data that is not PEM")
	}
	if len(certs) == 0 {
		return nil, errors.New("no certificate")
	}
	return certs, nil
}
