package ca

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/tls"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/smallstep/certificates/acme"
	"github.com/smallstep/nosql/database"
	"go.step.sm/crypto/jose"
)

// Agent enrollment by ACME (see the package documentation for the security argument).
const (
	agentACMEProvisionerName = "agents"
	// agentEABTable maps an agent EAB key id to its expiry (Unix seconds): step-ca's
	// EAB keys do not expire, enrollment credentials must.
	agentEABTable = "wicket_agent_eab"
)

var agentEABTableName = []byte(agentEABTable)

// agentAccountTable maps an agents-ACME account ID to the EAB key id it was bound
// with: step-ca's nosql store cannot look a key up by account (it answers nil).
const agentAccountTable = "wicket_agent_acme_account"

var agentAccountTableName = []byte(agentAccountTable)

// AgentACMEConfig enables enrollment of agents by ACME at /acme/agents/directory.
type AgentACMEConfig struct {
	// Dial opens a connection to the agent name for a tls-alpn-01 validation, through a
	// connection the agent itself opened to the gateway and bound (AgentACMEAccount) to
	// the ACME account accountID, whose challenge is being validated. It must return an
	// error rather than any other connection. Required.
	Dial func(ctx context.Context, name, accountID string) (net.Conn, error)
	// OnRefusal, if set, is called for every refused POST to the agents ACME endpoints
	// (unknown, used or expired enrollment credential, an order for another name or a
	// name outside the agents domain, a failed validation...), for the audit log. It
	// must not block for long: it runs on the request.
	OnRefusal func(AgentACMERefusal)
	// OnIssued, if set, is called after an agent certificate was issued by ACME
	// (enrollment or renewal), with its identity and serial (decimal).
	OnIssued func(id Identity, serial string)
}

// AgentACMERefusal describes one refused agent ACME request. It carries no secret.
type AgentACMERefusal struct {
	// Action is the ACME resource: "new-account", "new-order", "challenge", "finalize"...
	Action string
	// Name is the agent the request's account or EAB key is bound to; "" if unknown.
	Name string
	// AccountID is the ACME account of the request; "" for new-account.
	AccountID string
	// Status is the HTTP status of the answer.
	Status int
	// Reason is the ACME problem detail.
	Reason string
}

// AgentACMEAccount is an ACME account of the agents provisioner and the agent name
// its External Account Binding key was created for.
type AgentACMEAccount struct {
	ID   string
	Name string
}

// Enrollment credential sentinel errors.
var (
	// ErrEABUsed: the agent's ACME enrollment credential was already used.
	ErrEABUsed = errors.New("the ACME enrollment credential was already used; create a new one with `wicket token create agent NAME --acme`")
	// ErrEABExpired: the agent's ACME enrollment credential has expired.
	ErrEABExpired = errors.New("the ACME enrollment credential has expired; create a new one with `wicket token create agent NAME --acme`")
	// ErrEABUnknown: no such enrollment credential for this CA.
	ErrEABUnknown = errors.New("the ACME enrollment credential is not known to this certificate authority")
)

// AgentACMEDomain is the DNS domain under which agents are named for ACME:
// agent "db1" orders "db1.agents.<trust-domain>".
func (a *Authority) AgentACMEDomain() string { return "agents." + a.cfg.TrustDomain }

// AgentACMEName is the DNS identifier an agent orders.
func (a *Authority) AgentACMEName(name string) string { return name + "." + a.AgentACMEDomain() }

// AgentACMEDirectoryURL is the ACME directory for agent enrollment.
func (a *Authority) AgentACMEDirectoryURL() string {
	return a.cfg.URL + "/acme/" + agentACMEProvisionerName + "/directory"
}

// NewAgentEABKey creates a single-use External Account Binding key for agent name,
// valid for ttl (DefaultTokenTTL if 0, at most MaxTokenTTL). An account registered with
// it can only order AgentACMEName(name).
func (a *Authority) NewAgentEABKey(ctx context.Context, name string, ttl time.Duration) (keyID string, hmacKey []byte, expires time.Time, err error) {
	if a.cfg.AgentACME == nil {
		return "", nil, time.Time{}, errors.New("create agent EAB key: agent enrollment by ACME is disabled")
	}
	if err := ValidName(name); err != nil {
		return "", nil, time.Time{}, fmt.Errorf("create agent EAB key: %w", err)
	}
	if ttl == 0 {
		ttl = DefaultTokenTTL
	}
	if ttl < MinTokenTTL || ttl > MaxTokenTTL {
		return "", nil, time.Time{}, fmt.Errorf("create agent EAB key: ttl %s must be between %s and %s", ttl, MinTokenTTL, shortDuration(MaxTokenTTL))
	}
	expires = a.now().Add(ttl).Truncate(time.Second)
	// step-ca keeps one key per reference for ever (its reference index is
	// insert-once), so each key gets its own: the name plus a random suffix.
	var sfx [6]byte
	if _, err := rand.Read(sfx[:]); err != nil {
		return "", nil, time.Time{}, err
	}
	k, err := a.acmeDB.CreateExternalAccountKey(ctx, agentACMEProvisionerName, name+"."+hex.EncodeToString(sfx[:]))
	if err != nil {
		return "", nil, time.Time{}, fmt.Errorf("create agent EAB key for %s: %w", name, err)
	}
	if err := a.db.Set(agentEABTableName, []byte(k.ID), []byte(strconv.FormatInt(expires.Unix(), 10))); err != nil {
		return "", nil, time.Time{}, fmt.Errorf("record expiry of agent EAB key for %s: %w", name, err)
	}
	return k.ID, k.HmacKey, expires, nil
}

// AgentACMEAccountByKey finds the valid agents-ACME account registered with the
// public key pub, and the agent its EAB key was created for. The gateway binds a
// validation connection to it after the agent proved possession of the private key.
func (a *Authority) AgentACMEAccountByKey(ctx context.Context, pub crypto.PublicKey) (AgentACMEAccount, error) {
	if a.cfg.AgentACME == nil {
		return AgentACMEAccount{}, errors.New("agent enrollment by ACME is disabled")
	}
	kid, err := acme.KeyToID(&jose.JSONWebKey{Key: pub})
	if err != nil {
		return AgentACMEAccount{}, fmt.Errorf("ACME account key: %w", err)
	}
	acc, err := a.acmeDB.GetAccountByKeyID(ctx, kid)
	if err != nil {
		return AgentACMEAccount{}, fmt.Errorf("no ACME account for this key: %w", err)
	}
	if acc.Status != acme.StatusValid {
		return AgentACMEAccount{}, fmt.Errorf("ACME account %s is %s", acc.ID, acc.Status)
	}
	eak, err := a.acmeDB.GetExternalAccountKeyByAccountID(ctx, agentACMEProvisionerName, acc.ID)
	if err != nil || eak == nil {
		return AgentACMEAccount{}, fmt.Errorf("ACME account %s is not bound to an agent enrollment credential", acc.ID)
	}
	return AgentACMEAccount{ID: acc.ID, Name: agentOfEAB(eak)}, nil
}

// agentOfEAB is the agent name an agents EAB key was created for ("" if none): its
// reference is "<name>.<random>" (names contain no dot).
func agentOfEAB(eak *acme.ExternalAccountKey) string {
	name, _, ok := strings.Cut(eak.Reference, ".")
	if !ok || ValidName(name) != nil {
		return ""
	}
	return name
}

// acmeDB restricts, per account, what step-ca's ACME server accepts for agents: an
// account of the agents provisioner may only order the one name its EAB key was
// created for. step-ca evaluates this account-level policy at new-order; its nosql
// store does not persist a policy, so we derive it from the key's reference.
type acmeDB struct {
	acme.DB
	kv          *authDB
	agentDomain string
}

// UpdateExternalAccountKey records, for agents' keys being bound, which account the
// key was bound to (after step-ca stored the binding).
func (d *acmeDB) UpdateExternalAccountKey(ctx context.Context, provisionerID string, eak *acme.ExternalAccountKey) error {
	if err := d.DB.UpdateExternalAccountKey(ctx, provisionerID, eak); err != nil {
		return err
	}
	if provisionerID == agentACMEProvisionerName && eak.AccountID != "" {
		if err := d.kv.Set(agentAccountTableName, []byte(eak.AccountID), []byte(eak.ID)); err != nil {
			return fmt.Errorf("record the agent ACME account: %w", err)
		}
	}
	if provisionerID == acmeProvisionerName {
		return d.recordACMEAccount(eak)
	}
	return nil
}

// GetExternalAccountKeyByAccountID returns, for the agents provisioner, the EAB key
// the account was bound with and the policy that allows only its agent's name. An
// agents account without one may order nothing.
func (d *acmeDB) GetExternalAccountKeyByAccountID(ctx context.Context, provisionerID, accountID string) (*acme.ExternalAccountKey, error) {
	if provisionerID == acmeProvisionerName {
		return d.acmeKeyOfAccount(ctx, accountID)
	}
	if provisionerID != agentACMEProvisionerName {
		return d.DB.GetExternalAccountKeyByAccountID(ctx, provisionerID, accountID)
	}
	kid, err := d.kv.Get(agentAccountTableName, []byte(accountID))
	if err != nil {
		return nil, acme.NewError(acme.ErrorUnauthorizedType, "ACME account %s is not bound to an agent enrollment credential", accountID)
	}
	eak, err := d.DB.GetExternalAccountKey(ctx, provisionerID, string(kid))
	if err != nil {
		return nil, err
	}
	if agentOfEAB(eak) == "" || eak.AccountID != accountID {
		return nil, acme.NewError(acme.ErrorUnauthorizedType, "EAB key %s does not bind account %s to an agent", eak.ID, accountID)
	}
	eak.Policy = &acme.Policy{X509: acme.X509Policy{
		Allowed: acme.PolicyNames{DNSNames: []string{agentOfEAB(eak) + "." + d.agentDomain}},
	}}
	return eak, nil
}

// agentTemplate makes an agents-ACME certificate a Wicket agent identity: exactly one
// DNS identifier <name>.agents.<td> (validated by the order) becomes the SPIFFE ID
// spiffe://<td>/agent/<name>, with the token path's key usages.
func (a *Authority) agentTemplate() string {
	domain := "." + a.AgentACMEDomain()
	prefix := "spiffe://" + a.cfg.TrustDomain + "/agent/"
	pattern := `^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?` + regexp.QuoteMeta(domain) + `$`
	msg := "an agent ACME order must name exactly one <name>" + domain
	return fmt.Sprintf(`{{- if ne (len .SANs) 1 }}{{ fail %[1]q }}{{ end }}
{{- $san := index .SANs 0 }}
{{- if ne $san.Type "dns" }}{{ fail %[1]q }}{{ end }}
{{- if not (regexMatch %[2]q $san.Value) }}{{ fail %[1]q }}{{ end }}
{{- $id := print %[3]q (trimSuffix %[4]q $san.Value) }}
{
	"subject": {"commonName": {{ toJson $id }}},
	"sans": [{"type": "dns", "value": {{ toJson $san.Value }}}, {"type": "uri", "value": {{ toJson $id }}}],
	"keyUsage": ["digitalSignature"],
	"extKeyUsage": ["clientAuth"]
}`, msg, pattern, prefix, domain)
}

// jwsEnvelope is the flattened JSON serialization of an ACME request.
type jwsEnvelope struct {
	Protected string `json:"protected"`
	Payload   string `json:"payload"`
}

type jwsProtected struct {
	KID string `json:"kid"`
}

func decodeB64JSON(s string, v any) error {
	b, err := base64.RawURLEncoding.DecodeString(s)
	if err != nil {
		return err
	}
	return json.Unmarshal(b, v)
}

// agentACMERequest is what the guard reads (unverified) from a POST to the agents
// ACME endpoints. step-ca verifies the JWS afterwards; the guard only refuses
// earlier (with a precise reason) and routes validation, never accepts anything.
type agentACMERequest struct {
	action    string
	accountID string // from the JWS kid (the account URL)
	eabKID    string // new-account only
}

func parseAgentACMERequest(path string, body []byte) agentACMERequest {
	rest := strings.TrimPrefix(path, "/acme/"+agentACMEProvisionerName+"/")
	req := agentACMERequest{action: strings.SplitN(rest, "/", 2)[0]}
	var env jwsEnvelope
	if json.Unmarshal(body, &env) != nil {
		return req
	}
	var prot jwsProtected
	if decodeB64JSON(env.Protected, &prot) == nil && prot.KID != "" {
		req.accountID = prot.KID[strings.LastIndexByte(prot.KID, '/')+1:]
	}
	if req.action == "new-account" {
		var nar struct {
			EAB *jwsEnvelope `json:"externalAccountBinding"`
		}
		if decodeB64JSON(env.Payload, &nar) == nil && nar.EAB != nil {
			var p jwsProtected
			if decodeB64JSON(nar.EAB.Protected, &p) == nil {
				req.eabKID = p.KID
			}
		}
	}
	return req
}

// checkAgentEAB refuses an unknown, used or expired enrollment credential before
// step-ca binds it (step-ca answers a reused key with a 500 that ACME clients retry).
func (a *Authority) checkAgentEAB(ctx context.Context, kid string) (name string, err error) {
	if kid == "" {
		return "", nil // step-ca answers "external account binding required"
	}
	eak, err := a.acmeDB.GetExternalAccountKey(ctx, agentACMEProvisionerName, kid)
	if err != nil || eak == nil {
		return "", ErrEABUnknown
	}
	if eak.AlreadyBound() {
		return agentOfEAB(eak), ErrEABUsed
	}
	v, err := a.db.Get(agentEABTableName, []byte(kid))
	if err != nil {
		return agentOfEAB(eak), ErrEABUnknown
	}
	exp, err := strconv.ParseInt(string(v), 10, 64)
	if err != nil || !a.now().Before(time.Unix(exp, 0)) {
		return agentOfEAB(eak), ErrEABExpired
	}
	return agentOfEAB(eak), nil
}

// agentNameOfAccount is the agent an account's EAB key names, for the audit ("" if none).
func (a *Authority) agentNameOfAccount(ctx context.Context, accountID string) string {
	if accountID == "" {
		return ""
	}
	eak, err := a.acmeDB.GetExternalAccountKeyByAccountID(ctx, agentACMEProvisionerName, accountID)
	if err != nil || eak == nil {
		return ""
	}
	return agentOfEAB(eak)
}

// writeACMEProblem answers an ACME request with an RFC 8555 problem document.
func writeACMEProblem(w http.ResponseWriter, status int, typ string, err error) {
	w.Header().Set("Content-Type", "application/problem+json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(map[string]any{
		"type": "urn:ietf:params:acme:error:" + typ, "detail": err.Error(), "status": status,
	})
}

// agentValidationClient validates agents' challenges: tls-alpn-01 only, through
// AgentACMEConfig.Dial for the account whose challenge is being validated.
type agentValidationClient struct {
	dial      func(ctx context.Context, name, accountID string) (net.Conn, error)
	domain    string
	accountID string
}

var errAgentChallenge = errors.New("agents are validated by tls-alpn-01 through their own connection only")

// Get refuses http-01: not offered to agents.
func (c *agentValidationClient) Get(string) (*http.Response, error) { return nil, errAgentChallenge }

// LookupTxt refuses dns-01: not offered to agents.
func (c *agentValidationClient) LookupTxt(string) ([]string, error) { return nil, errAgentChallenge }

// TLSDial opens the validation connection through the agent's own bound connection.
func (c *agentValidationClient) TLSDial(_, addr string, cfg *tls.Config) (*tls.Conn, error) {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		host = addr
	}
	name, ok := strings.CutSuffix(host, "."+c.domain)
	if !ok || ValidName(name) != nil || c.accountID == "" {
		return nil, fmt.Errorf("%s is not an agent name", host)
	}
	ctx, cancel := context.WithTimeout(context.Background(), validationTimeout)
	defer cancel()
	raw, err := c.dial(ctx, name, c.accountID)
	if err != nil {
		return nil, fmt.Errorf("no connection from agent %s bound to ACME account %s: %w", name, c.accountID, err)
	}
	conn := tls.Client(raw, cfg)
	if err := conn.HandshakeContext(ctx); err != nil {
		raw.Close()
		return nil, err
	}
	return conn, nil
}

// deactivateAgentACME deactivates every agents-ACME account of the agent whose
// certificate serial was revoked, so that a revoked agent cannot get a new certificate
// by a new ACME order (the token path's renewal presents the revoked certificate and is
// refused; an ACME order presents none). Enrolling again needs a new credential.
func (a *Authority) deactivateAgentACME(serial string) error {
	if a.acmeDB == nil {
		return nil
	}
	cert, err := a.db.GetCertificate(serial)
	if err != nil {
		return nil // not ours to know (step-ca refuses to revoke unknown serials)
	}
	id, err := ParseIdentity(cert)
	if err != nil || id.Role != RoleAgent {
		return nil
	}
	entries, err := a.db.List(agentAccountTableName)
	if err != nil {
		if database.IsErrNotFound(err) {
			return nil
		}
		return err
	}
	ctx := context.Background()
	for _, e := range entries {
		eak, err := a.acmeDB.GetExternalAccountKey(ctx, agentACMEProvisionerName, string(e.Value))
		if err != nil || agentOfEAB(eak) != id.Name {
			continue
		}
		acc, err := a.acmeDB.GetAccount(ctx, string(e.Key))
		if err != nil {
			return fmt.Errorf("ACME account %s: %w", e.Key, err)
		}
		if acc.Status == acme.StatusDeactivated {
			continue
		}
		acc.Status = acme.StatusDeactivated
		if err := a.acmeDB.UpdateAccount(ctx, acc); err != nil {
			return fmt.Errorf("deactivate ACME account %s: %w", e.Key, err)
		}
		a.cfg.Logger.Info("deactivated the ACME account of a revoked agent", "agent", id.Name, "acme_account", acc.ID)
	}
	return nil
}
