// Package keeper is the keep-a-session loop shared by the agent and `wicket
// connect`: it dials a session to the gateway, keeps it until it ends,
// replaces it make-before-break when the certificate is renewed, and dials
// again with backoff when it is lost. The backoff starts over as soon as a
// session is established and the gateway has answered (hello or ping), so a
// gateway restarted twice in a minute is rejoined as fast as the first time.
//
// It knows nothing about what a session carries: the caller dials, serves,
// drains and closes. It must NOT sleep on the real clock (Config.After is the
// only timer) nor keep a session that ended.
package keeper

import (
	"context"
	"crypto/x509"
	"fmt"
	"time"

	"github.com/wicketgw/wicket/ca"
	"github.com/wicketgw/wicket/tunnel"
)

// Session is one established session as the loop sees it.
type Session interface {
	// Done is closed when the session has ended.
	Done() <-chan struct{}
	// Err says why it ended.
	Err() error
	// Cert is the certificate the session authenticated with.
	Cert() *x509.Certificate
}

// Config is what the loop needs from its caller. Dial is required; every
// other hook is optional.
type Config[S Session] struct {
	// Check is called before each attempt; an error is terminal: Run returns it
	// (an expired certificate: nothing more this process can do).
	Check func() error
	// Dial establishes a session and returns only once the gateway has answered
	// on it (the agent's hello, the user's ping). Required.
	Dial func(ctx context.Context) (S, error)
	// DialFailed hears an attempt that failed; a non-nil result is terminal and
	// Run returns it (the CA said the certificate is revoked).
	DialFailed func(ctx context.Context, err error) error
	// Up hears the session that became current after a reconnect.
	Up func(s S)
	// Switched hears that next replaced old after a renewal; the caller drains
	// old.
	Switched func(ctx context.Context, old, next S)
	// SwitchFailed hears a failed attempt to move to the renewed certificate;
	// the current session keeps serving and the move is retried with backoff.
	SwitchFailed func(err error)
	// Down hears that s is no longer current: cause is the session's end, or
	// ctx's error when Run is stopping. The caller closes s.
	Down func(s S, cause error)
	// Retrying hears why the session was lost and how long the loop waits.
	Retrying func(err error, wait time.Duration)
	// Renewed delivers renewed credentials (identity.Renewer.Updates).
	Renewed <-chan *ca.Credentials
	// Poke and Poked: a signal on Poke calls Poked with the current session
	// (the agent's new list of resources).
	Poke  <-chan struct{}
	Poked func(ctx context.Context, s S)
	// Backoff is the wait between attempts; it is reset once a session is
	// established. Nil: tunnel.Backoff defaults (500 ms doubling to 30 s).
	Backoff *tunnel.Backoff
	// SwitchBackoff is the wait between attempts to move to a renewed
	// certificate. Nil: 1 s doubling to 1 min.
	SwitchBackoff *tunnel.Backoff
	// After is the clock. Nil: time.After.
	After func(time.Duration) <-chan time.Time
}

// Run keeps a session until ctx ends (it returns nil) or a hook reports a
// terminal error (it returns that error).
func Run[S Session](ctx context.Context, cfg Config[S]) error {
	if cfg.Backoff == nil {
		cfg.Backoff = &tunnel.Backoff{}
	}
	if cfg.SwitchBackoff == nil {
		cfg.SwitchBackoff = &tunnel.Backoff{Initial: time.Second, Max: time.Minute}
	}
	if cfg.After == nil {
		cfg.After = time.After
	}
	for ctx.Err() == nil {
		err, terminal := keep(ctx, &cfg)
		if terminal {
			return err
		}
		if ctx.Err() != nil {
			return nil
		}
		wait := cfg.Backoff.Next()
		if cfg.Retrying != nil {
			cfg.Retrying(err, wait)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-cfg.After(wait):
		}
	}
	return nil
}

// keep runs one attempt: it dials, and keeps the session (and its
// successors after renewals) until it ends or ctx does.
func keep[S Session](ctx context.Context, cfg *Config[S]) (err error, terminal bool) {
	if cfg.Check != nil {
		if err := cfg.Check(); err != nil {
			return err, true
		}
	}
	cur, err := cfg.Dial(ctx)
	if err != nil {
		if cfg.DialFailed != nil {
			if terr := cfg.DialFailed(ctx, err); terr != nil {
				return terr, true
			}
		}
		return err, false
	}
	// Established and answered: the gateway is back, so the next loss of the
	// session starts from the shortest wait again.
	cfg.Backoff.Reset()
	if cfg.Up != nil {
		cfg.Up(cur)
	}
	var retrySwitch <-chan time.Time
	move := func() {
		retrySwitch = nil
		next, err := cfg.Dial(ctx)
		if err != nil {
			if cfg.SwitchFailed != nil {
				cfg.SwitchFailed(err)
			}
			retrySwitch = cfg.After(cfg.SwitchBackoff.Next())
			return
		}
		cfg.SwitchBackoff.Reset()
		old := cur
		cur = next
		if cfg.Switched != nil {
			cfg.Switched(ctx, old, next)
		}
	}
	for {
		select {
		case <-ctx.Done():
			if cfg.Down != nil {
				cfg.Down(cur, ctx.Err())
			}
			return ctx.Err(), false
		case <-cur.Done():
			err := fmt.Errorf("session closed: %w", cur.Err())
			if cfg.Down != nil {
				cfg.Down(cur, err)
			}
			return err, false
		case creds := <-cfg.Renewed:
			if creds != nil && len(creds.Chain) > 0 && !creds.Chain[0].Equal(cur.Cert()) {
				move()
			}
		case <-retrySwitch:
			move()
		case <-cfg.Poke:
			if cfg.Poked != nil {
				cfg.Poked(ctx, cur)
			}
		}
	}
}
