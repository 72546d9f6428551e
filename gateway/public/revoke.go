package public

import (
	"context"
	"errors"
	"sync"
)

// ErrCertificateRevoked is the cause of a request cut by Server.Cut.
var ErrCertificateRevoked = errors.New("the user certificate was revoked")

// byCert tracks the requests in flight on users hosts by the serial of the user certificate
// that authorized them, so that revoking the certificate ends them at once. Without it a
// streamed response or an upgraded connection would run on until the certificate expires:
// new requests are re-verified, but these never come back for another check.
type byCert struct {
	mu   sync.Mutex
	next uint64
	reqs map[string]map[uint64]context.CancelCauseFunc
}

// add registers one request's cancel func under serial; the returned func unregisters it.
func (b *byCert) add(serial string, cancel context.CancelCauseFunc) (remove func()) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.reqs == nil {
		b.reqs = map[string]map[uint64]context.CancelCauseFunc{}
	}
	b.next++
	id := b.next
	set := b.reqs[serial]
	if set == nil {
		set = map[uint64]context.CancelCauseFunc{}
		b.reqs[serial] = set
	}
	set[id] = cancel
	return func() {
		b.mu.Lock()
		defer b.mu.Unlock()
		delete(b.reqs[serial], id)
		if len(b.reqs[serial]) == 0 {
			delete(b.reqs, serial)
		}
	}
}

// cut cancels every request registered under one of serials and returns how many.
func (b *byCert) cut(serials []string, cause error) int {
	var cancels []context.CancelCauseFunc
	b.mu.Lock()
	for _, s := range serials {
		for _, c := range b.reqs[s] {
			cancels = append(cancels, c)
		}
	}
	b.mu.Unlock()
	for _, c := range cancels {
		c(cause)
	}
	return len(cancels)
}

// serials lists the certificates behind requests in flight.
func (b *byCert) serials() []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	out := make([]string, 0, len(b.reqs))
	for s := range b.reqs {
		out = append(out, s)
	}
	return out
}

// Cut ends the requests in flight on users hosts that were authorized by a user certificate
// with one of serials (decimal, as x509's SerialNumber.String() writes them): streamed
// responses stop, upgraded connections close, a request still waiting for its backend gets
// 403. Each is audited with the reason. It returns how many requests it cut. The gateway calls
// it whenever a certificate is revoked.
func (s *Server) Cut(serials []string) int {
	return s.userReqs.cut(serials, ErrCertificateRevoked)
}

// UserSerials returns the serials of the user certificates behind requests in flight, so the
// gateway's periodic revocation check covers revocations it was not told about.
func (s *Server) UserSerials() []string { return s.userReqs.serials() }
