package gateway

import (
	"bytes"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"io"
	"net/http"
	"strconv"
	"time"

	"github.com/wicketgw/wicket/ca"
	"github.com/wicketgw/wicket/gateway/audit"
)

// maxCAAuditBody bounds what the CA audit wrapper buffers of a request or response; sign and
// renew bodies are a few kilobytes.
const maxCAAuditBody = 256 << 10

// caAudit wraps the CA's HTTP API so that enrollments (POST /1.0/sign) and renewals
// (POST /1.0/renew, /1.0/rekey) are audited, refused ones included: a replayed token shows up
// in the audit log with the name it claimed. The CA package cannot do it itself (it must not
// know the gateway's audit log). Revocations through /revoke are audited by OnRevoke.
func (g *Gateway) caAudit(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var kind string
		switch r.URL.Path {
		case "/1.0/sign", "/sign":
			kind = "sign"
		case "/1.0/renew", "/renew", "/1.0/rekey", "/rekey":
			kind = "renew"
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
		cw := &captureWriter{ResponseWriter: w, status: http.StatusOK}
		next.ServeHTTP(cw, r)
		g.auditCA(kind, claimed, oldSerial, cw, r)
	})
}

func (g *Gateway) auditCA(kind string, claimed ca.Identity, oldSerial string, cw *captureWriter, r *http.Request) {
	rec := audit.Record{Remote: r.RemoteAddr, Outcome: audit.OutcomeOK}
	if r.TLS != nil {
		rec.SetTLS(*r.TLS)
	}
	id := claimed
	if cw.status/100 == 2 {
		var resp struct {
			Crt string `json:"crt"`
		}
		if json.Unmarshal(cw.body.Bytes(), &resp) == nil {
			if block, _ := pem.Decode([]byte(resp.Crt)); block != nil {
				if leaf, err := x509.ParseCertificate(block.Bytes); err == nil {
					rec.Serial = leaf.SerialNumber.String()
					if issued, err := ca.ParseIdentity(leaf); err == nil {
						id = issued
					}
				}
			}
		}
	} else {
		var eb struct {
			Message string `json:"message"`
		}
		_ = json.Unmarshal(cw.body.Bytes(), &eb)
		rec.Outcome = audit.OutcomeDenied
		if cw.status >= 500 {
			rec.Outcome = audit.OutcomeError
		}
		rec.Reason = eb.Message
		if rec.Reason == "" {
			rec.Reason = http.StatusText(cw.status)
		}
		if len(rec.Reason) > 300 {
			rec.Reason = rec.Reason[:300]
		}
		if kind == "sign" && claimed != (ca.Identity{}) {
			// Nothing was issued: the name comes from the token's unverified claims.
			rec.Extra = map[string]string{"identity_from": "token claims (unverified)"}
		}
	}
	switch {
	case kind == "renew":
		rec.Type = audit.TypeCertRenewed
		if oldSerial != "" {
			if rec.Extra == nil {
				rec.Extra = map[string]string{}
			}
			rec.Extra["previous_serial"] = oldSerial
		}
	case id.Role == ca.RoleUser:
		rec.Type = audit.TypeUserEnrolled
	default:
		rec.Type = audit.TypeAgentEnrolled
	}
	setIdentity(&rec, id)
	if rec.Outcome == audit.OutcomeOK {
		certKind := "issued"
		if kind == "renew" {
			certKind = "renewed"
		}
		g.counters.certs.inc(certKind, roleLabel(id.Role))
	}
	if rec.Outcome != audit.OutcomeOK {
		// Anyone can send a bad request: beyond a burst, refusals are rate-limited.
		ok, suppressed := g.caRefusedLimit.allow(time.Now())
		if !ok {
			return
		}
		if suppressed > 0 {
			if rec.Extra == nil {
				rec.Extra = map[string]string{}
			}
			rec.Extra["suppressed_before"] = strconv.FormatInt(suppressed, 10)
		}
	}
	g.record(rec)
	if rec.Outcome == audit.OutcomeOK {
		g.log.Info("certificate issued", "kind", kind, "identity", id.String(), "serial", rec.Serial, "remote", rec.Remote)
	} else {
		g.log.Info("certificate request refused", "kind", kind, "identity", id.String(), "reason", rec.Reason, "remote", rec.Remote)
	}
}

// captureWriter passes a response through and keeps its status and the start of its body.
type captureWriter struct {
	http.ResponseWriter
	status      int
	wroteHeader bool
	body        bytes.Buffer
}

func (c *captureWriter) WriteHeader(status int) {
	if !c.wroteHeader {
		c.status, c.wroteHeader = status, true
	}
	c.ResponseWriter.WriteHeader(status)
}

func (c *captureWriter) Write(b []byte) (int, error) {
	c.wroteHeader = true
	if room := maxCAAuditBody - c.body.Len(); room > 0 {
		c.body.Write(b[:min(len(b), room)])
	}
	return c.ResponseWriter.Write(b)
}

// Unwrap lets http.ResponseController reach the underlying writer.
func (c *captureWriter) Unwrap() http.ResponseWriter { return c.ResponseWriter }
