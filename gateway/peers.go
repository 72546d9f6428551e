package gateway

import (
	"crypto/x509"
	"sync"
	"sync/atomic"
	"time"

	"github.com/wicketgw/wicket/ca"
	"github.com/wicketgw/wicket/tunnel"
)

// Reasons a gateway closes a live session, as written to the audit log.
const (
	reasonRevoked  = "certificate revoked"
	reasonExpired  = "certificate expired"
	reasonShutdown = "gateway shutting down"
)

// peer is one live mTLS session of an agent or a user, tracked so that it can be closed the
// moment its certificate is revoked or expires.
type peer struct {
	id       string
	ident    ca.Identity
	serial   string // leaf serial, decimal (step-ca's convention)
	notAfter time.Time
	remote   string
	since    time.Time
	tlsVer   string
	cipher   string
	sess     *tunnel.Session

	closeReason atomic.Pointer[string]
	stopTimer   func() bool
	// notify, when set, tells the peer why the gateway is closing its session, just before
	// it does (agents: a control message), so its log can say "revoked" in words.
	notify atomic.Pointer[func(reason string)]
}

func newPeer(id string, ident ca.Identity, leaf *x509.Certificate, sess *tunnel.Session, remote string, now time.Time) *peer {
	return &peer{
		id:       id,
		ident:    ident,
		serial:   leaf.SerialNumber.String(),
		notAfter: leaf.NotAfter,
		remote:   remote,
		since:    now,
		sess:     sess,
	}
}

// closeWith records why the gateway closed the session (first reason wins) and closes it.
// It reports whether this call gave the reason.
func (p *peer) closeWith(reason string) bool {
	first := p.closeReason.CompareAndSwap(nil, &reason)
	if n := p.notify.Load(); first && n != nil {
		(*n)(reason)
	}
	_ = p.sess.Close()
	return first
}

// reason is why the session ended: the gateway's reason, or "connection closed".
func (p *peer) reason() string {
	if r := p.closeReason.Load(); r != nil {
		return *r
	}
	return "connection closed"
}

// peerIndex holds every live peer, by serial for revocation.
type peerIndex struct {
	mu       sync.Mutex
	closed   bool
	bySerial map[string]map[*peer]struct{}
}

func newPeerIndex() *peerIndex {
	return &peerIndex{bySerial: map[string]map[*peer]struct{}{}}
}

// add registers p; it reports false once the index is closed (shutdown), and the caller must
// then close the session itself.
func (x *peerIndex) add(p *peer) bool {
	x.mu.Lock()
	defer x.mu.Unlock()
	if x.closed {
		return false
	}
	set := x.bySerial[p.serial]
	if set == nil {
		set = map[*peer]struct{}{}
		x.bySerial[p.serial] = set
	}
	set[p] = struct{}{}
	return true
}

func (x *peerIndex) remove(p *peer) {
	x.mu.Lock()
	defer x.mu.Unlock()
	if set := x.bySerial[p.serial]; set != nil {
		delete(set, p)
		if len(set) == 0 {
			delete(x.bySerial, p.serial)
		}
	}
}

// closeSerials closes every live session whose certificate has one of serials, and returns
// those it closed first (not already closed for another reason).
func (x *peerIndex) closeSerials(serials []string, reason string) []*peer {
	x.mu.Lock()
	var victims []*peer
	for _, s := range serials {
		for p := range x.bySerial[s] {
			victims = append(victims, p)
		}
	}
	x.mu.Unlock()
	return closeFirst(victims, reason)
}

func closeFirst(victims []*peer, reason string) []*peer {
	var out []*peer
	for _, p := range victims {
		if p.closeWith(reason) {
			out = append(out, p)
		}
	}
	return out
}

// ofIdentity returns the live sessions of id.
func (x *peerIndex) ofIdentity(id ca.Identity) []*peer {
	x.mu.Lock()
	defer x.mu.Unlock()
	var out []*peer
	for _, set := range x.bySerial {
		for p := range set {
			if p.ident == id {
				out = append(out, p)
			}
		}
	}
	return out
}

// closeIdentity closes every live session of id, whatever its certificate, and returns
// those it closed first.
func (x *peerIndex) closeIdentity(id ca.Identity, reason string) []*peer {
	return closeFirst(x.ofIdentity(id), reason)
}

// serials returns the serials of all live sessions.
func (x *peerIndex) serials() []string {
	x.mu.Lock()
	defer x.mu.Unlock()
	out := make([]string, 0, len(x.bySerial))
	for s := range x.bySerial {
		out = append(out, s)
	}
	return out
}

// identityOf returns the identity holding serial among live sessions.
func (x *peerIndex) identityOf(serial string) (ca.Identity, bool) {
	x.mu.Lock()
	defer x.mu.Unlock()
	for p := range x.bySerial[serial] {
		return p.ident, true
	}
	return ca.Identity{}, false
}

// closeAll closes every session and refuses later adds.
func (x *peerIndex) closeAll(reason string) {
	x.mu.Lock()
	x.closed = true
	var all []*peer
	for _, set := range x.bySerial {
		for p := range set {
			all = append(all, p)
		}
	}
	x.mu.Unlock()
	// In parallel: each close may wait on a slow peer for up to notifyTimeout.
	var wg sync.WaitGroup
	for _, p := range all {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p.closeWith(reason)
		}()
	}
	wg.Wait()
}
