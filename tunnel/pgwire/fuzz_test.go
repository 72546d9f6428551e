package pgwire

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"testing"
	"time"
)

// sinkConn is a net.Conn that accepts every write: a tap's destination in
// tests that feed a tap directly.
type sinkConn struct{ n int64 }

func (c *sinkConn) Read([]byte) (int, error)         { return 0, io.EOF }
func (c *sinkConn) Write(p []byte) (int, error)      { c.n += int64(len(p)); return len(p), nil }
func (c *sinkConn) Close() error                     { return nil }
func (c *sinkConn) LocalAddr() net.Addr              { return &net.TCPAddr{} }
func (c *sinkConn) RemoteAddr() net.Addr             { return &net.TCPAddr{} }
func (c *sinkConn) SetDeadline(time.Time) error      { return nil }
func (c *sinkConn) SetReadDeadline(time.Time) error  { return nil }
func (c *sinkConn) SetWriteDeadline(time.Time) error { return nil }

// tapPair is the two taps of one Follow, writing to sinks.
func tapPair(o Options) (toServer, toClient *tap) {
	o = o.withDefaults()
	f := &follower{o: o, tr: newTracker(o.Now, o.MaxPending, o.MaxTracked)}
	toClient = &tap{Conn: &sinkConn{}, f: f, toClient: true, atBoundary: true}
	toServer = &tap{Conn: &sinkConn{}, f: f, peer: toClient, atBoundary: true}
	return toServer, toClient
}

// randomStream is mostly well-framed messages of the types either side uses,
// with random bodies, lengths and corruptions: random bytes alone would end
// at the first header.
func randomStream(r *rand.Rand) []byte {
	const types = "QPBEDCSHFdcfpXRKSZCENATtDIGHWdcVvs123nq\x00\xff"
	var b []byte
	for range r.IntN(40) {
		body := make([]byte, r.IntN(64))
		for i := range body {
			switch r.IntN(4) {
			case 0:
				body[i] = 0
			case 1:
				body[i] = types[r.IntN(len(types))]
			default:
				body[i] = byte(r.Uint32())
			}
		}
		length := uint32(len(body) + 4)
		switch r.IntN(20) {
		case 0:
			length = r.Uint32()
		case 1:
			length = uint32(r.IntN(4))
		}
		b = append(b, types[r.IntN(len(types))])
		b = binary.BigEndian.AppendUint32(b, length)
		b = append(b, body...)
	}
	return b
}

// feed writes b to t in random chunks, as reads of a relay would come.
func feed(r *rand.Rand, t *tap, b []byte) error {
	for len(b) > 0 {
		n := 1 + r.IntN(min(len(b), 97))
		if _, err := t.Write(b[:n]); err != nil {
			return err
		}
		b = b[n:]
	}
	return nil
}

func checkFuzzErr(t *testing.T, err error) {
	t.Helper()
	if err != nil && !errors.Is(err, ErrProtocolViolation) {
		t.Fatalf("a tap failed with %v, not a protocol violation", err)
	}
}

// TestRandomStreams feeds random streams to both directions of a Follow
// state: no panic, only protocol violations, bounded buffers.
func TestRandomStreams(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for range 3000 {
		toServer, toClient := tapPair(Options{MaxMessage: 1 << 10, MaxPending: 64, MaxTracked: 1 << 12})
		cs, ss := randomStream(r), randomStream(r)
		checkFuzzErr(t, feed(r, toServer, cs))
		checkFuzzErr(t, feed(r, toClient, ss))
		for _, tp := range []*tap{toServer, toClient} {
			if cap(tp.held) > 1<<10+5 || cap(tp.prefix) > bindPrefix {
				t.Fatalf("held %d bytes, prefix %d", cap(tp.held), cap(tp.prefix))
			}
		}
		if len(toServer.f.tr.queue) > 64 {
			t.Fatalf("queue holds %d requests over the cap", len(toServer.f.tr.queue))
		}
		toServer.f.tr.drain()
	}
}

// FuzzTaps is the same as a fuzz target: go test -fuzz FuzzTaps.
func FuzzTaps(f *testing.F) {
	r := rand.New(rand.NewPCG(3, 4))
	for range 20 {
		f.Add(randomStream(r), randomStream(r), uint64(r.Uint32()))
	}
	f.Fuzz(func(t *testing.T, client, server []byte, seed uint64) {
		r := rand.New(rand.NewPCG(seed, seed))
		toServer, toClient := tapPair(Options{MaxMessage: 1 << 10, MaxPending: 64, MaxTracked: 1 << 12})
		checkFuzzErr(t, feed(r, toServer, client))
		checkFuzzErr(t, feed(r, toClient, server))
	})
}

// TestFollowRandomPeers runs Follow between a random client and a random
// server on loopback: every session ends, none panics.
func TestFollowRandomPeers(t *testing.T) {
	leakCheck(t)
	r := rand.New(rand.NewPCG(5, 6))
	for range 30 {
		script := randomStream(r)
		garbage := randomStream(r)
		dial := fakeServer(t, script)
		p := startProxy(t, func(p *followProxy) { p.dial = dial })
		c := dialRaw(t, p)
		c.send(startupMessage())
		c.conn.Write(garbage)
		c.conn.(*net.TCPConn).CloseWrite()
		io.Copy(io.Discard, c.conn)
		s := p.waitEnded(t)
		if s.err != nil && !errors.Is(s.err, ErrProtocolViolation) && !isConnErr(s.err) {
			t.Fatalf("Follow returned %v", s.err)
		}
	}
}

func isConnErr(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) || errors.Is(err, net.ErrClosed) || errors.Is(err, context.Canceled)
}
