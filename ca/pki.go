package ca

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
	"time"

	"go.step.sm/crypto/keyutil"
	"go.step.sm/crypto/pemutil"
	"go.step.sm/crypto/x509util"
)

// The files of the CA state in Config.DataDir.
const (
	rootCertFile         = "root.crt"
	rootKeyFile          = "root.key"
	intermediateCertFile = "intermediate.crt"
	intermediateKeyFile  = "intermediate.key"
	agentProvKeyFile     = "provisioner-agent.key"
	userProvKeyFile      = "provisioner-user.key"
	gatewayProvKeyFile   = "provisioner-gateway.key"
	bboltFile            = "ca.db"
)

var stateFiles = []string{rootCertFile, rootKeyFile, intermediateCertFile, intermediateKeyFile,
	agentProvKeyFile, userProvKeyFile, gatewayProvKeyFile}

// pki is the loaded key material.
type pki struct {
	root, intermediate *x509.Certificate
	intermediateKey    crypto.Signer
	provKeys           map[Role]*ecdsa.PrivateKey
}

// resolvePassword picks the CA password (see Config.Password) and reports whether it
// was generated now.
func resolvePassword(cfg *Config, firstStart bool) ([]byte, bool, error) {
	switch {
	case len(cfg.Password) > 0:
		return cfg.Password, false, nil
	case cfg.PasswordFile != "":
		if fi, err := os.Stat(cfg.PasswordFile); err == nil && fi.Mode().Perm()&0o077 != 0 {
			cfg.Logger.Warn("the CA password file is readable by other users; chmod 600 it",
				"path", cfg.PasswordFile, "mode", fi.Mode().Perm().String())
		}
		b, err := os.ReadFile(cfg.PasswordFile)
		if err != nil {
			return nil, false, fmt.Errorf("read CA password file: %w", err)
		}
		b = bytes.TrimRight(b, "\r\n")
		if len(b) == 0 {
			return nil, false, fmt.Errorf("CA password file %s is empty", cfg.PasswordFile)
		}
		return b, false, nil
	case os.Getenv("WICKET_CA_PASSWORD") != "":
		return []byte(os.Getenv("WICKET_CA_PASSWORD")), false, nil
	}
	pwPath := filepath.Join(cfg.DataDir, passwordFileName)
	b, err := os.ReadFile(pwPath)
	switch {
	case err == nil:
		b = bytes.TrimRight(b, "\r\n")
		if len(b) == 0 {
			return nil, false, fmt.Errorf("%w: %s is empty", ErrCorruptState, pwPath)
		}
		return b, false, nil
	case !errors.Is(err, fs.ErrNotExist):
		return nil, false, fmt.Errorf("read CA password file: %w", err)
	case !firstStart:
		return nil, false, errors.New("no CA password: set WICKET_CA_PASSWORD or a password file for the existing CA in " + cfg.DataDir)
	}
	raw := make([]byte, 32)
	if _, err := rand.Read(raw); err != nil {
		return nil, false, err
	}
	pw := []byte(base64.RawURLEncoding.EncodeToString(raw))
	if err := writeFileExcl(pwPath, append(pw, '\n')); err != nil {
		return nil, false, fmt.Errorf("write generated CA password: %w", err)
	}
	return pw, true, nil
}

// stateExists reports whether the data dir holds CA state: false when none of the state
// files exist (first start), true when all do, and ErrCorruptState naming the missing
// files when only some do (we never re-create part of a PKI over an existing one).
func stateExists(dir string) (bool, error) {
	var missing []string
	for _, f := range stateFiles {
		if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
			if !errors.Is(err, fs.ErrNotExist) {
				return false, fmt.Errorf("%w: %v", ErrCorruptState, err)
			}
			missing = append(missing, f)
		}
	}
	switch len(missing) {
	case 0:
		return true, nil
	case len(stateFiles):
		return false, nil
	}
	return false, fmt.Errorf("%w: missing %v in %s", ErrCorruptState, missing, dir)
}

// createPKI generates the root, the intermediate and one JWK provisioner key per role,
// all ECDSA P-256, and writes them (keys encrypted with password) to dir. It refuses
// to overwrite any existing file.
func createPKI(dir string, password []byte, now time.Time) (*pki, error) {
	rootKey, err := keyutil.GenerateSigner("EC", "P-256", 0)
	if err != nil {
		return nil, err
	}
	notBefore := now.Add(-time.Minute).UTC()
	rootTmpl := &x509.Certificate{
		Subject:               pkix.Name{CommonName: "Wicket Root CA", Organization: []string{"Wicket"}},
		NotBefore:             notBefore,
		NotAfter:              notBefore.Add(rootLifetime),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLen:            1,
	}
	root, err := x509util.CreateCertificate(rootTmpl, rootTmpl, rootKey.Public(), rootKey)
	if err != nil {
		return nil, fmt.Errorf("create root certificate: %w", err)
	}
	intKey, err := keyutil.GenerateSigner("EC", "P-256", 0)
	if err != nil {
		return nil, err
	}
	intTmpl := &x509.Certificate{
		Subject:               pkix.Name{CommonName: "Wicket Intermediate CA", Organization: []string{"Wicket"}},
		NotBefore:             notBefore,
		NotAfter:              notBefore.Add(intermediateLifetime),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLen:            0,
		MaxPathLenZero:        true,
	}
	inter, err := x509util.CreateCertificate(intTmpl, root, intKey.Public(), rootKey)
	if err != nil {
		return nil, fmt.Errorf("create intermediate certificate: %w", err)
	}
	p := &pki{root: root, intermediate: inter, intermediateKey: intKey, provKeys: map[Role]*ecdsa.PrivateKey{}}

	files := map[string][]byte{
		rootCertFile:         pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: root.Raw}),
		intermediateCertFile: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: inter.Raw}),
	}
	keys := map[string]crypto.Signer{rootKeyFile: rootKey, intermediateKeyFile: intKey}
	for role, f := range provKeyFiles {
		k, err := keyutil.GenerateSigner("EC", "P-256", 0)
		if err != nil {
			return nil, err
		}
		p.provKeys[role] = k.(*ecdsa.PrivateKey)
		keys[f] = k
	}
	// PBKDF2 with 600k iterations per key dominates start-up: run them in parallel.
	var mu sync.Mutex
	var encErr error
	var wg sync.WaitGroup
	for f, k := range keys {
		wg.Go(func() {
			blk, err := pemutil.Serialize(k, pemutil.WithPassword(password), pemutil.WithPKCS8(true))
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				encErr = fmt.Errorf("encrypt %s: %w", f, err)
				return
			}
			files[f] = pem.EncodeToMemory(blk)
		})
	}
	wg.Wait()
	if encErr != nil {
		return nil, encErr
	}
	// Certificates last: root.crt is what a later start looks for first.
	order := []string{rootKeyFile, intermediateKeyFile, agentProvKeyFile, userProvKeyFile, gatewayProvKeyFile, intermediateCertFile, rootCertFile}
	for _, f := range order {
		if err := writeFileExcl(filepath.Join(dir, f), files[f]); err != nil {
			return nil, fmt.Errorf("write %s: %w", f, err)
		}
	}
	return p, nil
}

var provKeyFiles = map[Role]string{RoleAgent: agentProvKeyFile, RoleUser: userProvKeyFile, RoleGateway: gatewayProvKeyFile}

// loadPKI reads the CA state from dir. It never writes.
func loadPKI(dir string, password []byte) (*pki, error) {
	root, err := readCert(filepath.Join(dir, rootCertFile))
	if err != nil {
		return nil, err
	}
	inter, err := readCert(filepath.Join(dir, intermediateCertFile))
	if err != nil {
		return nil, err
	}
	if err := inter.CheckSignatureFrom(root); err != nil {
		return nil, fmt.Errorf("%w: %s is not signed by %s: %v", ErrCorruptState, intermediateCertFile, rootCertFile, err)
	}
	// The root key is not needed at run time (the intermediate signs): it is checked
	// to be an encrypted key but not decrypted, which saves a PBKDF2 run per start.
	if err := checkEncryptedKeyFile(filepath.Join(dir, rootKeyFile)); err != nil {
		return nil, err
	}
	// Decrypt the other keys in parallel (PBKDF2 dominates start-up).
	names := []string{intermediateKeyFile}
	for _, f := range provKeyFiles {
		names = append(names, f)
	}
	files := map[string]*ecdsa.PrivateKey{}
	var mu sync.Mutex
	var errs []error
	var wg sync.WaitGroup
	for _, f := range names {
		wg.Go(func() {
			k, err := readKey(filepath.Join(dir, f), password)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				errs = append(errs, err)
				return
			}
			files[f] = k
		})
	}
	wg.Wait()
	if len(errs) > 0 {
		// Prefer the wrong-password error: it is the likely one and the actionable one.
		for _, err := range errs {
			if errors.Is(err, ErrWrongPassword) {
				return nil, err
			}
		}
		return nil, errs[0]
	}
	intKey := files[intermediateKeyFile]
	if err := keyutil.VerifyPair(inter.PublicKey, intKey); err != nil {
		return nil, fmt.Errorf("%w: %s does not match %s", ErrCorruptState, intermediateKeyFile, intermediateCertFile)
	}
	p := &pki{root: root, intermediate: inter, intermediateKey: intKey, provKeys: map[Role]*ecdsa.PrivateKey{}}
	for role, f := range provKeyFiles {
		p.provKeys[role] = files[f]
	}
	return p, nil
}

func readCert(path string) (*x509.Certificate, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrCorruptState, err)
	}
	c, err := pemutil.ParseCertificate(b)
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrCorruptState, path, err)
	}
	return c, nil
}

func checkEncryptedKeyFile(path string) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("%w: %v", ErrCorruptState, err)
	}
	blk, rest := pem.Decode(b)
	if blk == nil || blk.Type != "ENCRYPTED PRIVATE KEY" || len(bytes.TrimSpace(rest)) != 0 {
		return fmt.Errorf("%w: %s is not an encrypted private key", ErrCorruptState, path)
	}
	return nil
}

// readKey decrypts an encrypted PKCS#8 ECDSA key. A file that is not such a PEM block
// is corrupt; a block that does not decrypt means a wrong password.
func readKey(path string, password []byte) (*ecdsa.PrivateKey, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrCorruptState, err)
	}
	blk, rest := pem.Decode(b)
	if blk == nil || blk.Type != "ENCRYPTED PRIVATE KEY" || len(bytes.TrimSpace(rest)) != 0 {
		return nil, fmt.Errorf("%w: %s is not an encrypted private key", ErrCorruptState, path)
	}
	der, err := pemutil.DecryptPKCS8PrivateKey(blk.Bytes, password)
	if err != nil {
		return nil, fmt.Errorf("%w (%s)", ErrWrongPassword, filepath.Base(path))
	}
	k, err := x509.ParsePKCS8PrivateKey(der)
	if err != nil {
		// PKCS#8 decryption with a wrong password can pass the padding check by chance
		// and yield garbage; that is still most likely a wrong password.
		return nil, fmt.Errorf("%w (%s)", ErrWrongPassword, filepath.Base(path))
	}
	ek, ok := k.(*ecdsa.PrivateKey)
	if !ok {
		return nil, fmt.Errorf("%w: %s is a %T, want ECDSA", ErrCorruptState, path, k)
	}
	return ek, nil
}

// writeFileExcl creates path with mode 0600, failing if it exists, and syncs it.
func writeFileExcl(path string, data []byte) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
