package agent

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/wicketgw/wicket/agent/identity"
	"github.com/wicketgw/wicket/ca"
)

// obtainIdentity returns the identity the agent runs with: enrolled with
// cfg.Token, or loaded from cfg.DataDir (see Config.Token for the rules).
func obtainIdentity(ctx context.Context, cfg *Config) (*identity.Stored, error) {
	log := cfg.Logger
	dir := cfg.DataDir
	now := cfg.Now()

	if cfg.Token == "" {
		s, err := identity.Load(dir)
		if err != nil {
			return nil, err
		}
		if err := checkAgentRole(s, dir); err != nil {
			return nil, err
		}
		if err := identity.CheckValid(s, now); err != nil {
			return nil, err
		}
		log.Info("using the stored identity", "dir", dir, "agent", s.Name)
		return s, nil
	}

	if ca.IsACMECredential(cfg.Token) {
		return obtainIdentityACME(ctx, cfg)
	}
	info, err := ca.InspectToken(cfg.Token)
	if err != nil {
		return nil, fmt.Errorf("the token cannot be used: %w", err)
	}
	switch info.Identity.Role {
	case ca.RoleAgent:
	case ca.RoleUser:
		return nil, errors.New("this is a user token; use `wicket login`")
	default:
		return nil, fmt.Errorf("this is a %s token; `wicket agent` needs one from `wicket token create agent NAME`", info.Identity.Role)
	}
	name := info.Identity.Name

	// A valid identity already stored may make enrolling unnecessary.
	use, stored, err := storedIdentity(cfg, enrollment{
		what: "token", name: name, url: info.URL, trustDomain: info.Identity.TrustDomain,
		hash: identity.TokenHash(cfg.Token), expiry: info.Expiry,
	})
	if use != nil || err != nil {
		return use, err
	}

	log.Info("enrolling", "agent", name, "gateway", info.URL)
	creds, err := cfg.Enroll(ctx, cfg.Token)
	if err != nil {
		if stored != nil && (errors.Is(err, ca.ErrTokenUsed) || errors.Is(err, ca.ErrTokenExpired)) {
			log.Warn("the token cannot enroll again; using the stored identity, which is still valid", "agent", name, "err", err)
			return stored, nil
		}
		log.Debug("enrollment failed", "agent", name, "err", err)
		return nil, fmt.Errorf("enroll agent %s with the gateway at %s: %w", name, info.URL, identity.CAReason(err))
	}
	s := &identity.Stored{
		Meta: identity.Meta{
			URL: info.URL, Role: ca.RoleAgent, Name: name, TrustDomain: info.Identity.TrustDomain,
			TokenSHA256: identity.TokenHash(cfg.Token), Enrolled: now.UTC(),
		},
		Creds: creds,
	}
	if err := identity.Save(dir, s); err != nil {
		return nil, fmt.Errorf("enrolled agent %s but could not store its identity: %w", name, err)
	}
	log.Info("enrolled", "agent", name, "dir", dir, "serial", creds.Chain[0].SerialNumber.String(),
		"cert_expires", creds.Chain[0].NotAfter.UTC())
	return s, nil
}

// enrollment describes the one-time credential an agent was started with, as
// far as the rules for an identity already stored need it.
type enrollment struct {
	what        string // "token" or "ACME enrollment credential", for messages
	name        string // the agent name it enrolls
	url         string // the gateway it enrolls with
	trustDomain string
	hash        string // identity.TokenHash of the credential
	expiry      time.Time
}

// storedIdentity applies the rules of Config.Token to an identity already in
// cfg.DataDir, for either kind of credential. use is the stored identity to
// run with, without enrolling; fallback is a still-valid stored identity to
// fall back on if the CA says the credential is spent or expired. Both are
// nil when there is nothing usable (none stored, or unreadable: enrolling
// replaces it).
func storedIdentity(cfg *Config, e enrollment) (use, fallback *identity.Stored, err error) {
	log, dir, now := cfg.Logger, cfg.DataDir, cfg.Now()
	exists, err := identity.Exists(dir)
	if err != nil || !exists {
		return nil, nil, err
	}
	s, err := identity.Load(dir)
	switch {
	case errors.Is(err, identity.ErrCorrupt):
		log.Warn("the stored identity is unreadable; enrolling again replaces it", "dir", dir, "err", err)
		return nil, nil, nil
	case err != nil:
		return nil, nil, err
	}
	if s.Role != ca.RoleAgent || s.Name != e.name || s.URL != e.url || s.TrustDomain != e.trustDomain {
		return nil, nil, fmt.Errorf("%s already holds the identity of %s %s at %s, but the %s is for agent %s at %s: use another --data-dir, or delete %s to replace it",
			dir, s.Role, s.Name, s.URL, e.what, e.name, e.url, dir)
	}
	validErr := identity.CheckValid(s, now)
	if s.TokenSHA256 == e.hash {
		if validErr != nil {
			return nil, nil, validErr
		}
		log.Info("this "+e.what+" already enrolled the stored identity; using it", "dir", dir, "agent", e.name)
		return s, nil, nil
	}
	if validErr != nil {
		return nil, nil, nil
	}
	if now.After(e.expiry) {
		log.Warn("the "+e.what+" has expired; using the stored identity, which is still valid", "dir", dir, "agent", e.name)
		return s, nil, nil
	}
	return nil, s, nil
}

func checkAgentRole(s *identity.Stored, dir string) error {
	if s.Role != ca.RoleAgent {
		return fmt.Errorf("%s holds the identity of %s %s, not of an agent: use the agent's own --data-dir", dir, s.Role, s.Name)
	}
	return nil
}

// obtainIdentityACME is obtainIdentity for an ACME enrollment credential: the same
// rules for an identity already in the data directory, then enrollment by ACME
// (ca.EnrollACME), whose account key is stored for renewals.
func obtainIdentityACME(ctx context.Context, cfg *Config) (*identity.Stored, error) {
	log, dir, now := cfg.Logger, cfg.DataDir, cfg.Now()
	cred, err := ca.ParseACMECredential(cfg.Token)
	if err != nil {
		return nil, fmt.Errorf("the ACME enrollment credential cannot be used: %w", err)
	}
	name, hash := cred.Name, identity.TokenHash(cfg.Token)
	use, stored, err := storedIdentity(cfg, enrollment{
		what: "ACME enrollment credential", name: name, url: cred.URL, trustDomain: cred.TrustDomain,
		hash: hash, expiry: cred.Expiry,
	})
	if use != nil || err != nil {
		return use, err
	}
	log.Info("enrolling by ACME", "agent", name, "gateway", cred.URL)
	creds, accountKey, err := cfg.EnrollACME(ctx, cred)
	if err != nil {
		if stored != nil && (errors.Is(err, ca.ErrEABUsed) || errors.Is(err, ca.ErrEABExpired)) {
			log.Warn("the credential cannot enroll again; using the stored identity, which is still valid", "agent", name, "err", err)
			return stored, nil
		}
		return nil, fmt.Errorf("enroll agent %s by ACME with the gateway at %s: %w", name, cred.URL, err)
	}
	s := &identity.Stored{
		Meta: identity.Meta{
			URL: cred.URL, Role: ca.RoleAgent, Name: name, TrustDomain: cred.TrustDomain,
			TokenSHA256: hash, Enrolled: now.UTC(), ACME: true,
		},
		Creds:          creds,
		ACMEAccountKey: accountKey,
	}
	if err := identity.Save(dir, s); err != nil {
		return nil, fmt.Errorf("enrolled agent %s but could not store its identity: %w", name, err)
	}
	log.Info("enrolled by ACME", "agent", name, "dir", dir, "serial", creds.Chain[0].SerialNumber.String(),
		"cert_expires", creds.Chain[0].NotAfter.UTC())
	return s, nil
}
