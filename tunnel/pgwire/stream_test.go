package pgwire

import (
	"encoding/binary"
	"runtime"
	"testing"
)

// TestStreamsUnbuffered: a huge DataRow and CopyData from the server, and a
// Bind with huge parameters and CopyData from the client, pass through the
// taps without being kept: the bytes allocated stay far below their size.
func TestStreamsUnbuffered(t *testing.T) {
	const size = 48 << 20
	chunk := make([]byte, 32<<10) // a relay read
	for i := range chunk {
		chunk[i] = 'v'
	}
	header := func(typ byte, body int) []byte {
		return binary.BigEndian.AppendUint32([]byte{typ}, uint32(body+4))
	}
	pass := func(tp *tap, head []byte, body int) {
		if _, err := tp.Write(head); err != nil {
			t.Fatal(err)
		}
		for body > 0 {
			n := min(body, len(chunk))
			if _, err := tp.Write(chunk[:n]); err != nil {
				t.Fatal(err)
			}
			body -= n
		}
	}
	toServer, toClient := tapPair(Options{})
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)

	pass(toClient, header('D', size), size)
	pass(toClient, header('d', size), size)
	bind := append(header('B', size), "portal\x00stmt\x00"...)
	pass(toServer, bind, size-len("portal\x00stmt\x00"))
	pass(toServer, header('d', size), size)

	runtime.ReadMemStats(&after)
	if got := after.TotalAlloc - before.TotalAlloc; got > 1<<20 {
		t.Fatalf("passing 4 messages of %d MiB allocated %d bytes", size>>20, got)
	}
	for _, c := range []*tap{toServer, toClient} {
		if sent := c.Conn.(*sinkConn).n; sent != 2*(size+5) {
			t.Fatalf("forwarded %d bytes, want %d", sent, 2*(size+5))
		}
	}
	q := toServer.f.tr.queue
	if len(q) != 1 || q[0].op != 'B' || q[0].name != "portal" || q[0].stmt != "stmt" {
		t.Fatalf("the Bind was tracked as %+v", q)
	}
}
