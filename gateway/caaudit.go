package gateway

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"io"
	"maps"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/wicketgw/wicket/ca"
	"github.com/wicketgw/wicket/gateway/audit"
)

// maxCAAuditBody bounds what the CA audit wrapper buffers of a request or response; sign and
// renew bodies are a few kilobytes.
const maxCAAuditBody = 256 << 10

// caAudit wraps the CA's HTTP API so that enrollments (POST /1.0/sign) and renewals
// (POST /1.0/renew, /1.0/rekey, /re-sign) are audited, refused ones included: a replayed token
// shows up in the audit log with the name it claimed. The CA package cannot do it itself (it
// must not know the gateway's audit log). Revocations through /revoke are audited by OnRevoke.
//
// Issuing fails closed on the audit log. While the log is known to be unwritable, sign,
// renew and ACME finalize requests are refused before step-ca sees them (a token is not
// spent). Otherwise the answer of a sign or renew is held back until its record is written;
// if that write fails, the certificate just issued is revoked and the client gets a 503
// instead, so no certificate is in anyone's hands without its record.
func (g *Gateway) caAudit(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var kind string
		switch r.URL.Path {
		case "/1.0/sign", "/sign":
			kind = "sign"
		case "/1.0/renew", "/renew", "/1.0/rekey", "/rekey", "/1.0/re-sign", "/re-sign":
			kind = "renew"
		}
		if r.Method == http.MethodPost && kind == "" && strings.HasPrefix(r.URL.Path, "/acme/") && strings.HasSuffix(r.URL.Path, "/finalize") {
			// ACME issues at finalize; its record is written by OnIssued (recordIssued).
			if err := g.audit.Admit(audit.TypeCertIssued); err != nil {
				g.refuseACME(w, r, err)
				return
			}
		}
		if r.Method != http.MethodPost || kind == "" {
			next.ServeHTTP(w, r)
			return
		}
		var (
			claimed   ca.Identity // unverified for sign: what the token says
			oldSerial string
		)
		if kind == "sign" {
			body, err := io.ReadAll(io.LimitReader(r.Body, maxCAAuditBody))
			if err != nil {
				http.Error(w, "cannot read the request body", http.StatusBadRequest)
				return
			}
			r.Body = io.NopCloser(bytes.NewReader(body))
			var req struct {
				OTT string `json:"ott"`
			}
			if json.Unmarshal(body, &req) == nil {
				if info, err := ca.InspectToken(req.OTT); err == nil {
					claimed = info.Identity
				}
			}
		} else if r.TLS != nil && len(r.TLS.PeerCertificates) > 0 {
			claimed, _ = ca.ParseIdentity(r.TLS.PeerCertificates[0])
			oldSerial = r.TLS.PeerCertificates[0].SerialNumber.String()
		}
		if err := g.audit.Admit(caRecordType(kind, claimed)); err != nil {
			g.refuseCA(w, r, kind, claimed, err, "")
			return
		}
		bw := &bufferedWriter{header: http.Header{}, status: http.StatusOK}
		next.ServeHTTP(bw, r)
		if g.auditCA(kind, claimed, oldSerial, bw, w, r) {
			bw.sendTo(w)
		}
	})
}

// caRecordType is the audit type of a sign or renew request: enrollments are named by
// the role the token claims.
func caRecordType(kind string, id ca.Identity) string {
	switch {
	case kind == "renew":
		return audit.TypeCertRenewed
	case id.Role == ca.RoleUser:
		return audit.TypeUserEnrolled
	}
	return audit.TypeAgentEnrolled
}

// auditCA writes the record of a sign or renew answer held in bw. It returns false when it
// has answered on w itself: the certificate was issued but its record could not be
// written, so it was revoked and the client got a 503.
func (g *Gateway) auditCA(kind string, claimed ca.Identity, oldSerial string, bw *bufferedWriter, w http.ResponseWriter, r *http.Request) bool {
	rec := audit.Record{Remote: r.RemoteAddr, Outcome: audit.OutcomeOK, Type: caRecordType(kind, claimed)}
	if r.TLS != nil {
		rec.SetTLS(*r.TLS)
	}
	id := claimed
	if bw.status/100 == 2 {
		var resp struct {
			Crt string `json:"crt"`
		}
		if json.Unmarshal(bw.body.Bytes(), &resp) == nil {
			if block, _ := pem.Decode([]byte(resp.Crt)); block != nil {
				if leaf, err := x509.ParseCertificate(block.Bytes); err == nil {
					rec.Serial = leaf.SerialNumber.String()
					if issued, err := ca.ParseIdentity(leaf); err == nil {
						id = issued
						rec.Type = caRecordType(kind, issued)
					}
				}
			}
		}
	} else {
		var eb struct {
			Message string `json:"message"`
		}
		_ = json.Unmarshal(bw.body.Bytes(), &eb)
		rec.Outcome = audit.OutcomeDenied
		if bw.status >= 500 {
			rec.Outcome = audit.OutcomeError
		}
		rec.Reason = eb.Message
		if rec.Reason == "" {
			rec.Reason = http.StatusText(bw.status)
		}
		if len(rec.Reason) > 300 {
			rec.Reason = rec.Reason[:300]
		}
		if kind == "sign" && claimed != (ca.Identity{}) {
			// Nothing was issued: the name comes from the token's unverified claims.
			rec.Extra = map[string]string{"identity_from": "token claims (unverified)"}
		}
	}
	if kind == "renew" && oldSerial != "" {
		if rec.Extra == nil {
			rec.Extra = map[string]string{}
		}
		rec.Extra["previous_serial"] = oldSerial
	}
	setIdentity(&rec, id)
	if rec.Outcome == audit.OutcomeOK {
		if err := g.recordAccess(rec); err != nil {
			g.revokeUnrecorded(rec.Serial, id)
			g.refuseCA(w, r, kind, id, err, rec.Serial)
			return false
		}
		certKind := "issued"
		if kind == "renew" {
			certKind = "renewed"
		}
		g.counters.certs.inc(certKind, roleLabel(id.Role))
		g.log.Info("certificate issued", "kind", kind, "identity", id.String(), "serial", rec.Serial, "remote", rec.Remote)
		return true
	}
	// Anyone can send a bad request: beyond a burst, refusals are rate-limited.
	if ok, suppressed := g.caRefusedLimit.allow(time.Now()); ok {
		if suppressed > 0 {
			if rec.Extra == nil {
				rec.Extra = map[string]string{}
			}
			rec.Extra["suppressed_before"] = strconv.FormatInt(suppressed, 10)
		}
		g.record(rec)
		g.log.Info("certificate request refused", "kind", kind, "identity", id.String(), "reason", rec.Reason, "remote", rec.Remote)
	}
	return true
}

// refuseCA answers a sign or renew request that the audit log could not record, in the
// CA API's error shape, which `wicket login` and agents show. serial is the certificate
// that was issued and then revoked, or "" when the request was refused before signing.
func (g *Gateway) refuseCA(w http.ResponseWriter, r *http.Request, kind string, id ca.Identity, err error, serial string) {
	var msg string
	switch {
	case serial == "" && kind == "sign":
		msg = "the gateway cannot write its audit log, so it issues no certificate until it can: retry later (the token was not used)"
	case serial == "":
		msg = "the gateway cannot write its audit log, so it renews no certificate until it can: retry later (the current certificate stays valid)"
	case kind == "sign":
		msg = "the gateway could not write the audit record of the certificate it issued, so it revoked it: the token is spent, ask for a new one once the gateway's audit log is writable"
	default:
		msg = "the gateway could not write the audit record of the renewed certificate, so it revoked it: retry later (the current certificate stays valid)"
	}
	g.log.Warn("certificate request refused: the audit log cannot be written", "kind", kind,
		"identity", id.String(), "revoked_serial", serial, "remote", r.RemoteAddr, "err", err)
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Retry-After", "5")
	w.WriteHeader(http.StatusServiceUnavailable)
	_ = json.NewEncoder(w).Encode(map[string]any{"status": http.StatusServiceUnavailable, "message": msg})
}

// refuseACME answers an ACME finalize that the audit log could not record, as an ACME
// problem document.
func (g *Gateway) refuseACME(w http.ResponseWriter, r *http.Request, err error) {
	g.log.Warn("ACME finalize refused: the audit log cannot be written", "path", r.URL.Path, "remote", r.RemoteAddr, "err", err)
	w.Header().Set("Content-Type", "application/problem+json")
	w.Header().Set("Retry-After", "5")
	w.WriteHeader(http.StatusServiceUnavailable)
	_ = json.NewEncoder(w).Encode(map[string]any{"type": "urn:ietf:params:acme:error:serverInternal", "status": http.StatusServiceUnavailable,
		"detail": "the certificate authority cannot write its audit log, so it issues no certificate until it can; retry later"})
}

// recordIssued writes the record of a certificate issued by ACME (OnIssued, called once the
// certificate is stored). If it cannot be written, the certificate is revoked, so that none
// is valid without its record; the ACME client then holds a revoked certificate.
func (g *Gateway) recordIssued(rec audit.Record, id ca.Identity) bool {
	if err := g.recordAccess(rec); err != nil {
		// OnIssued runs inside the CA's store call: revoke from outside it.
		g.goFunc(func() { g.revokeUnrecorded(rec.Serial, id) })
		return false
	}
	return true
}

// revokeUnrecorded revokes a certificate whose issuance could not be audited.
func (g *Gateway) revokeUnrecorded(serial string, id ca.Identity) {
	if serial == "" {
		return
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(g.bgCtx), 30*time.Second)
	defer cancel()
	if err := g.authority.Revoke(ctx, serial, "its issuance could not be written to the audit log"); err != nil {
		g.log.Error("a certificate was issued without its audit record and could not be revoked: revoke it by hand",
			"serial", serial, "identity", id.String(), "err", err)
		return
	}
	g.log.Warn("revoked a certificate whose issuance could not be written to the audit log", "serial", serial, "identity", id.String())
}

// bufferedWriter holds step-ca's answer to a sign or renew request until its audit record
// is written: the certificate must not reach the client before that.
type bufferedWriter struct {
	header      http.Header
	status      int
	wroteHeader bool
	body        bytes.Buffer
	overflow    bool
}

func (b *bufferedWriter) Header() http.Header { return b.header }

func (b *bufferedWriter) WriteHeader(status int) {
	if !b.wroteHeader {
		b.status, b.wroteHeader = status, true
	}
}

func (b *bufferedWriter) Write(p []byte) (int, error) {
	b.wroteHeader = true
	if b.body.Len()+len(p) > maxCAAuditBody {
		b.overflow = true
		return 0, errors.New("CA answer larger than the audit wrapper buffers")
	}
	return b.body.Write(p)
}

// sendTo passes the held answer on. An answer too large to hold (no sign or renew answer
// is) is replaced by a 502 rather than cut.
func (b *bufferedWriter) sendTo(w http.ResponseWriter) {
	if b.overflow {
		http.Error(w, "the certificate authority's answer was too large", http.StatusBadGateway)
		return
	}
	maps.Copy(w.Header(), b.header)
	w.WriteHeader(b.status)
	_, _ = w.Write(b.body.Bytes())
}
