package closed

import (
	"errors"
	"io"
	"net"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// pair returns both ends of a loopback TCP connection.
func pair(t *testing.T) (near, far net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		accepted <- c
	}()
	far, err = net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	near = <-accepted
	if near == nil {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { near.Close(); far.Close() })
	return near, far
}

// TestEnd: a relay that failed resets the connection (the peer's read fails
// with ECONNRESET); one that ended cleanly closes it with FIN (EOF).
func TestEnd(t *testing.T) {
	for _, tc := range []struct {
		relayErr error
		want     error
	}{{nil, io.EOF}, {errors.New("session closed"), syscall.ECONNRESET}} {
		near, far := pair(t)
		held := Held(near)
		// The relay's Close only wakes a pending Read; the connection stays open.
		readDone := make(chan error, 1)
		go func() {
			_, err := held.Read(make([]byte, 1))
			readDone <- err
		}()
		held.Close()
		select {
		case err := <-readDone:
			if err == nil {
				t.Fatal("a read on a held connection succeeded after Close")
			}
		case <-time.After(10 * time.Second):
			t.Fatal("Close did not wake a pending Read")
		}
		if err := held.SetWriteDeadline(time.Now().Add(time.Minute)); err != nil {
			t.Fatal(err)
		}
		if _, err := held.Write([]byte("x")); err == nil {
			t.Fatal("a write on a held connection succeeded after Close")
		}
		End(near, tc.relayErr)
		_ = far.SetReadDeadline(time.Now().Add(10 * time.Second))
		_, err := far.Read(make([]byte, 1))
		if !errors.Is(err, tc.want) {
			t.Errorf("relay error %v: the peer read %v, want %v", tc.relayErr, err, tc.want)
		}
	}
}
