package tunnel

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"
)

// Hello is the first control message an agent sends after Dial. Later
// messages on the control stream are Hellos too, each replacing the previous
// one (e.g. when the exposed resources change).
type Hello struct {
	// Name is the agent's name. Informational: the certificate is
	// authoritative and the gateway must not trust this field.
	Name string `json:"name"`
	// Instance is random per agent process and stable across its reconnects
	// and renewals, so the gateway can tell a replacement session of the same
	// process (make-before-break) from a second process with the same name.
	Instance string `json:"instance"`
	// Version is the agent's software version.
	Version string `json:"version"`
	// Resources lists the names the agent exposes.
	Resources []string `json:"resources"`
	// ACMEHosts lists the DNS names the agent vouches for in ACME validation
	// (`--acme-host NAME=ADDR`): the gateway's ACME server routes their http-01 and
	// tls-alpn-01 validation connections to this agent (acmehost.go). Older peers omit
	// and ignore it.
	ACMEHosts []string `json:"acme_hosts,omitempty"`
	// Protocols names the protocol of each resource that is not raw TCP, by resource name:
	// [ProtocolPostgres] for a `postgres://` resource, whose sessions the gateway follows
	// statement by statement. Informational for the gateway's policy like Name: a gateway
	// that must audit a resource pins it itself (`--postgres-resources`), so an agent that
	// omits it cannot switch the audit off. Older peers omit and ignore it.
	Protocols map[string]string `json:"protocols,omitempty"`
	// RecordText lists the PostgreSQL resources whose URL opts in to keeping statement
	// texts (record=statements), not only their hashes. Older peers omit and ignore it.
	RecordText []string `json:"record_text,omitempty"`
	// Refused, in the gateway's reply to an agent's Hello, lists the announced resources
	// the gateway does not route to that agent (not granted to its name), each with the
	// sentence to log. Empty in an agent's Hello; older peers ignore it.
	Refused []Refusal `json:"refused,omitempty"`
}

// ProtocolPostgres is the [Hello.Protocols] value of a PostgreSQL resource.
const ProtocolPostgres = "postgres"

// Refusal is one announced resource the gateway refused, and why, in one sentence that
// names what the gateway's administrator can do about it.
type Refusal struct {
	Resource string `json:"resource"`
	Reason   string `json:"reason"`
}

// Withdrawn is the message the gateway sends on an agent's first control stream when a
// change of the agent's grant (`wicket agents disallow`) stops routing resources the agent
// serves, so the agent learns of it at once rather than at its next Hello. Older agents
// ignore it.
type Withdrawn struct {
	Withdrawn []Refusal `json:"withdrawn"`
}

// Control frames JSON messages on a KindControl stream: each message is a
// 4-byte big-endian length followed by that many bytes of JSON (PROTOCOL.md,
// "Control stream"). Send and Recv may be called concurrently with each other;
// concurrent Sends are serialised.
type Control struct {
	st  *Stream
	max int
	wmu sync.Mutex
	rmu sync.Mutex
}

// OpenControl opens the control stream; the dialing side calls it right after
// Dial.
func (s *Session) OpenControl(ctx context.Context) (*Control, error) {
	st, err := s.OpenStream(ctx, Header{Version: ProtocolVersion, Kind: KindControl})
	if err != nil {
		return nil, err
	}
	return st.Control(), nil
}

// Control returns the message framing for a KindControl stream. On an accepted
// stream call Reply(StatusOK, "") first.
func (st *Stream) Control() *Control {
	st.ctlOnce.Do(func() {
		st.ctl = &Control{st: st, max: st.sess.cfg.MaxControlMessageSize}
	})
	return st.ctl
}

// Stream is the underlying stream.
func (c *Control) Stream() *Stream { return c.st }

// Send writes one message. A peer that does not read it within
// ConnectionWriteTimeout makes Send fail.
func (c *Control) Send(v any) error {
	body, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("control send: encode: %w", err)
	}
	if len(body) > c.max {
		return fmt.Errorf("control send: %w: %d bytes, limit %d", ErrControlTooLarge, len(body), c.max)
	}
	msg := make([]byte, 4, 4+len(body))
	binary.BigEndian.PutUint32(msg, uint32(len(body)))
	msg = append(msg, body...)
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if err := c.st.SetWriteDeadline(time.Now().Add(c.st.sess.cfg.ConnectionWriteTimeout)); err != nil {
		return fmt.Errorf("control send: %w", err)
	}
	if _, err := c.st.Write(msg); err != nil {
		return fmt.Errorf("control send: %w", err)
	}
	return nil
}

// Recv reads one message into v (unknown JSON fields are ignored, so newer
// peers may add fields). It blocks until a message arrives; it returns io.EOF
// when the peer closed the control stream cleanly, and an error matching
// ErrControlTooLarge (after which the stream is unusable) for an oversized one.
func (c *Control) Recv(v any) error {
	c.rmu.Lock()
	defer c.rmu.Unlock()
	var p [4]byte
	if _, err := io.ReadFull(c.st, p[:]); err != nil {
		if errors.Is(err, io.ErrUnexpectedEOF) {
			return fmt.Errorf("control recv: truncated message length: %w", err)
		}
		if err == io.EOF {
			return io.EOF
		}
		return fmt.Errorf("control recv: %w", err)
	}
	n := binary.BigEndian.Uint32(p[:])
	if n > uint32(c.max) {
		c.st.Close()
		return fmt.Errorf("control recv: %w: %d bytes, limit %d", ErrControlTooLarge, n, c.max)
	}
	body := make([]byte, n)
	if _, err := io.ReadFull(c.st, body); err != nil {
		return fmt.Errorf("control recv: truncated message: %w", err)
	}
	// Control messages are rare: free the stream's receive buffer between
	// them instead of keeping it for the life of the session.
	c.st.ys.Shrink()
	if err := json.Unmarshal(body, v); err != nil {
		return fmt.Errorf("control recv: decode: %w", err)
	}
	return nil
}

// Close closes the control stream.
func (c *Control) Close() error { return c.st.Close() }
