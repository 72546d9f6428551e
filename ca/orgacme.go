package ca

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"

	"github.com/smallstep/certificates/acme"
)

// The ACME server for the organization's internal names (provisioner "acme",
// /acme/acme/directory). Its allow-list is ACMEConfig.AllowedNames; with
// ACMEConfig.RequireEAB every account is created with an EAB key from NewACMEEABKey,
// which is bound to name patterns: the account may order only names matching them.
// step-ca enforces that (an account-level policy from GetExternalAccountKeyByAccountID);
// the guard refuses earlier, with a reason that says which rule refused the name.

// acmeEABAccountTable maps an "acme" provisioner account ID to the EAB key id it was
// bound with: step-ca's nosql store cannot look a key up by account (it answers nil).
const acmeEABAccountTable = "wicket_acme_eab_account"

var acmeEABAccountTableName = []byte(acmeEABAccountTable)

// eabRefPrefix marks the reference of an EAB key made by NewACMEEABKey: the reference
// is "names:" + the comma-separated patterns + "#" + random hex (references are unique).
const eabRefPrefix = "names:"

// ErrNotInACMENames is the reason an identifier outside ACMEConfig.AllowedNames is refused.
var ErrNotInACMENames = errors.New("not in --acme-names")

// ACMEOrder is one new-order request to the "acme" provisioner, reported to
// ACMEConfig.OnOrder after it was answered.
type ACMEOrder struct {
	// AccountID is the account the request's JWS names (verified by step-ca when Status
	// is below 400; as claimed otherwise).
	AccountID string
	// Names are the DNS identifiers asked for.
	Names []string
	// Status is the HTTP status of the answer (201 when the order was created).
	Status int
	// Reason is why it was refused ("" when created).
	Reason string
}

// MatchACMEName reports whether name matches pattern as step-ca's name policy does:
// "host.example.com" matches that name exactly (case-insensitively), "*.example.com"
// any name one label under example.com (a.example.com, not a.b.example.com nor
// example.com itself).
func MatchACMEName(pattern, name string) bool {
	pattern, name = strings.ToLower(pattern), strings.ToLower(strings.TrimSuffix(name, "."))
	if suffix, ok := strings.CutPrefix(pattern, "*."); ok {
		rest, found := strings.CutSuffix(name, "."+suffix)
		return found && rest != "" && !strings.Contains(rest, ".")
	}
	return pattern == name
}

// matchAny reports whether name matches one of patterns.
func matchAny(patterns []string, name string) bool {
	for _, p := range patterns {
		if MatchACMEName(p, name) {
			return true
		}
	}
	return false
}

// patternWithin reports whether every name pattern p matches is allowed by one of
// allowed: p is a name allowed, or p is one of the allowed patterns.
func patternWithin(allowed []string, p string) bool {
	if !strings.HasPrefix(p, "*.") {
		return matchAny(allowed, p)
	}
	for _, a := range allowed {
		if strings.EqualFold(a, p) {
			return true
		}
	}
	return false
}

// NewACMEEABKey creates a one-time External Account Binding key for the ACME server:
// the account created with it may order only names matching patterns (each a name or
// *.suffix inside ACMEConfig.AllowedNames). Give keyID and hmacKey to the ACME client
// (certbot --eab-kid/--eab-hmac-key, lego --eab --kid/--hmac) out of band.
func (a *Authority) NewACMEEABKey(ctx context.Context, patterns []string) (keyID string, hmacKey []byte, err error) {
	if len(a.cfg.ACME.AllowedNames) == 0 || a.acmeDB == nil {
		return "", nil, errors.New("create ACME EAB key: the ACME server is off (start the gateway with --acme-server --acme-names PATTERNS)")
	}
	if len(patterns) == 0 {
		return "", nil, errors.New("create ACME EAB key: name at least one name or *.suffix it may order")
	}
	for _, p := range patterns {
		if p == "" || p == "*" || strings.Contains(strings.TrimPrefix(p, "*."), "*") || strings.ContainsAny(p, ",# /") {
			return "", nil, fmt.Errorf("create ACME EAB key: %q is not a DNS name or *.suffix", p)
		}
		if !patternWithin(a.cfg.ACME.AllowedNames, p) {
			return "", nil, fmt.Errorf("create ACME EAB key: %s is %s", p, ErrNotInACMENames)
		}
	}
	var r [8]byte
	if _, err := rand.Read(r[:]); err != nil {
		return "", nil, err
	}
	ref := eabRefPrefix + strings.ToLower(strings.Join(patterns, ",")) + "#" + hex.EncodeToString(r[:])
	k, err := a.acmeDB.CreateExternalAccountKey(ctx, acmeProvisionerName, ref)
	if err != nil {
		return "", nil, fmt.Errorf("create ACME EAB key for %s: %w", strings.Join(patterns, ","), err)
	}
	return k.ID, k.HmacKey, nil
}

// eabPatterns returns the name patterns an EAB key made by NewACMEEABKey is bound to, or
// nil for another key (NewEABKey's keys name no pattern: their accounts order anything
// in the allow-list).
func eabPatterns(eak *acme.ExternalAccountKey) []string {
	rest, ok := strings.CutPrefix(eak.Reference, eabRefPrefix)
	if !ok {
		return nil
	}
	names, _, _ := strings.Cut(rest, "#")
	return strings.Split(names, ",")
}

// recordACMEAccount remembers which account an "acme" provisioner EAB key was bound to.
func (d *acmeDB) recordACMEAccount(eak *acme.ExternalAccountKey) error {
	if eak.AccountID == "" {
		return nil
	}
	if err := d.kv.Set(acmeEABAccountTableName, []byte(eak.AccountID), []byte(eak.ID)); err != nil {
		return fmt.Errorf("record the ACME account's EAB key: %w", err)
	}
	return nil
}

// acmeKeyOfAccount returns the EAB key an "acme" account was bound with, with the
// account-level policy of its name patterns; nil (no error) for an account without one.
func (d *acmeDB) acmeKeyOfAccount(ctx context.Context, accountID string) (*acme.ExternalAccountKey, error) {
	kid, err := d.kv.Get(acmeEABAccountTableName, []byte(accountID))
	if err != nil {
		return nil, acme.NewError(acme.ErrorUnauthorizedType, "ACME account %s was not created with an EAB key of this server", accountID)
	}
	eak, err := d.DB.GetExternalAccountKey(ctx, acmeProvisionerName, string(kid))
	if err != nil {
		return nil, err
	}
	if eak.AccountID != accountID {
		return nil, acme.NewError(acme.ErrorUnauthorizedType, "EAB key %s is not bound to account %s", eak.ID, accountID)
	}
	if pats := eabPatterns(eak); pats != nil {
		eak.Policy = &acme.Policy{X509: acme.X509Policy{Allowed: acme.PolicyNames{DNSNames: pats}}}
	}
	return eak, nil
}

// orgOrderRequest is what the guard reads (unverified) from a new-order POST.
type orgOrderRequest struct {
	accountID string
	names     []string
}

func parseOrgOrder(body []byte) orgOrderRequest {
	var req orgOrderRequest
	var env jwsEnvelope
	if json.Unmarshal(body, &env) != nil {
		return req
	}
	var prot jwsProtected
	if decodeB64JSON(env.Protected, &prot) == nil && prot.KID != "" {
		req.accountID = prot.KID[strings.LastIndexByte(prot.KID, '/')+1:]
	}
	var nor struct {
		Identifiers []struct {
			Type  string `json:"type"`
			Value string `json:"value"`
		} `json:"identifiers"`
	}
	if decodeB64JSON(env.Payload, &nor) == nil {
		for _, id := range nor.Identifiers {
			req.names = append(req.names, id.Value)
		}
	}
	return req
}

// refuseOrgOrder returns why an order for names is refused before step-ca sees it, or
// "": a name outside the allow-list, or (with EAB) outside the account's EAB patterns.
func (g *guard) refuseOrgOrder(ctx context.Context, req orgOrderRequest) string {
	for _, n := range req.names {
		if !matchAny(g.a.cfg.ACME.AllowedNames, n) {
			return fmt.Sprintf("%s is %s: ask the gateway's administrator to add it", n, ErrNotInACMENames)
		}
	}
	if !g.a.cfg.ACME.RequireEAB || req.accountID == "" {
		return ""
	}
	eak, err := g.a.acmeDB.acmeKeyOfAccount(ctx, req.accountID)
	if err != nil || eak == nil {
		return "" // step-ca answers with its own reason
	}
	if pats := eabPatterns(eak); pats != nil {
		for _, n := range req.names {
			if !matchAny(pats, n) {
				return fmt.Sprintf("%s is not among the names this account's EAB key may order (%s): ask for a key with `wicket token create acme PATTERN`",
					n, strings.Join(pats, ","))
			}
		}
	}
	return ""
}

// serveOrgNewOrder pre-checks a new-order of the "acme" provisioner, lets step-ca answer
// it, and reports it to ACMEConfig.OnOrder.
func (g *guard) serveOrgNewOrder(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(r.Body)
	if err != nil {
		writeACMEProblem(w, http.StatusRequestEntityTooLarge, "malformed", errors.New("request body too large"))
		return
	}
	r.Body = io.NopCloser(bytes.NewReader(body))
	req := parseOrgOrder(body)
	report := func(status int, reason string) {
		if f := g.a.cfg.ACME.OnOrder; f != nil {
			f(ACMEOrder{AccountID: req.accountID, Names: req.names, Status: status, Reason: reason})
		}
	}
	if reason := g.refuseOrgOrder(r.Context(), req); reason != "" {
		writeACMEProblem(w, http.StatusForbidden, "rejectedIdentifier", errors.New(reason))
		report(http.StatusForbidden, reason)
		return
	}
	rec := &bufferedWriter{header: http.Header{}, status: http.StatusOK}
	g.next.ServeHTTP(rec, r)
	reason := ""
	if rec.status >= 400 {
		var p struct {
			Detail string `json:"detail"`
		}
		_ = json.Unmarshal(rec.body.Bytes(), &p)
		reason = p.Detail
		if reason == "" {
			reason = http.StatusText(rec.status)
		}
	}
	for k, v := range rec.header {
		w.Header()[k] = v
	}
	w.WriteHeader(rec.status)
	_, _ = w.Write(rec.body.Bytes())
	report(rec.status, reason)
}
