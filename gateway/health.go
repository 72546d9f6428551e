package gateway

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/wicketgw/wicket/ca"
)

// Check is the result of one readiness check.
type Check struct {
	// Name is "ca", "database", "listener" or "audit".
	Name string `json:"name"`
	// OK reports whether the check passed; Error says why not, in one sentence.
	OK    bool   `json:"ok"`
	Error string `json:"error,omitempty"`
}

// dbCheckTimeout bounds the database check: a database that does not answer within it is
// as good as unreachable for the users waiting on a certificate.
const dbCheckTimeout = 2 * time.Second

// dbCheckCacheFor is how long a database check result is reused, so that frequent probes
// (several load balancers, a tight Kubernetes period) cost at most one query per interval.
const dbCheckCacheFor = time.Second

// dbProbe is the identity whose certificates the database check lists. No certificate is
// ever issued to it (the name is not a valid Wicket name), so the listing only proves that
// the database answers.
var dbProbe = ca.Identity{TrustDomain: "health.invalid", Role: ca.RoleAgent, Name: "-readiness-probe-"}

// dbHealth runs at most one database check at a time and caches its result briefly.
type dbHealth struct {
	mu      sync.Mutex
	at      time.Time
	err     error
	running chan struct{} // non-nil while a check runs; closed when it ends
}

// Ready runs the readiness checks: the CA is loaded and holds a valid gateway certificate,
// the CA database answers, the gateway port is accepting connections, and the audit log
// can be written (while it cannot, the gateway refuses tokens, enrollments, renewals and new
// sessions: auditstate.go). The gateway is ready when every check is OK.
//
// The database check lists the certificates issued to an identity that never holds one:
// ca/ has no dedicated ping, and this is the one read of the Authority API that always goes
// to the database (IsRevoked and VerifyPeer answer from memory). With bbolt it reads a
// local file; with PostgreSQL it is one query. It takes at most 2 s, and its result is
// reused for a second.
func (g *Gateway) Ready(ctx context.Context) []Check {
	checks := []Check{{Name: "ca"}, {Name: "database"}, {Name: "listener"}, {Name: "audit"}}

	if c, err := g.authority.GetCertificate(nil); err != nil {
		checks[0].Error = "the CA has no gateway certificate: " + err.Error()
	} else if now := g.clock.Now(); c.Leaf != nil && !now.Before(c.Leaf.NotAfter) {
		checks[0].Error = fmt.Sprintf("the gateway certificate expired at %s and was not renewed", c.Leaf.NotAfter.UTC().Format(time.RFC3339))
	} else {
		checks[0].OK = true
	}

	if err := g.checkDB(ctx); err != nil {
		checks[1].Error = err.Error()
	} else {
		checks[1].OK = true
	}

	switch {
	case !g.ran.Load():
		checks[2].Error = "the gateway is not serving yet"
	case g.draining.Load():
		checks[2].Error = "the gateway is shutting down"
	default:
		checks[2].OK = true
	}

	if h := g.audit.Health(); h.OK {
		checks[3].OK = true
	} else {
		checks[3].Error = fmt.Sprintf("the audit log cannot be written since %s (%v): tokens, enrollments, renewals and new sessions are refused until it can; %d refused and %d records lost so far",
			h.Since.UTC().Format(time.RFC3339), h.Err, h.Refused, h.Lost)
		if h.Retry != nil {
			checks[3].Error += fmt.Sprintf("; the last reopen failed: %v", h.Retry)
		}
	}
	return checks
}

// checkDB returns the cached database check, or runs one.
func (g *Gateway) checkDB(ctx context.Context) error {
	h := &g.dbHealth
	h.mu.Lock()
	if !h.at.IsZero() && time.Since(h.at) < dbCheckCacheFor {
		err := h.err
		h.mu.Unlock()
		return err
	}
	running := h.running
	if running == nil {
		running = make(chan struct{})
		h.running = running
		// The listing takes no context, so it runs in a goroutine the caller stops waiting
		// for after dbCheckTimeout. At most one is ever in flight; it is not part of the
		// gateway's WaitGroup so that a probe racing with Close cannot hold Close up.
		go func() {
			_, err := g.authority.Issued(context.Background(), dbProbe)
			if err != nil {
				err = fmt.Errorf("the CA database does not answer: %w", err)
			}
			h.mu.Lock()
			h.at, h.err, h.running = time.Now(), err, nil
			h.mu.Unlock()
			close(running)
		}()
	}
	h.mu.Unlock()

	t := time.NewTimer(dbCheckTimeout)
	defer t.Stop()
	select {
	case <-running:
		h.mu.Lock()
		defer h.mu.Unlock()
		return h.err
	case <-t.C:
		return fmt.Errorf("the CA database did not answer within %s", dbCheckTimeout)
	case <-ctx.Done():
		return errors.New("the readiness check was cancelled")
	}
}
