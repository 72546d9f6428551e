// Package loopback gives tests the targets that tunnel, agent and gateway tests all need on
// 127.0.0.1: an echo server, a server running any handler, and an address nothing listens on.
package loopback

import (
	"io"
	"net"
	"sync"
	"testing"
)

// EchoServer starts a TCP server on 127.0.0.1 that echoes every connection and half-closes
// its side once the client has half-closed (so half-close can be checked end to end). The
// listener and every connection still open are closed when the test ends, and its goroutines
// are waited for. It returns the server's address.
func EchoServer(t testing.TB) string {
	t.Helper()
	return Serve(t, func(c net.Conn) {
		_, _ = io.Copy(c, c)
		_ = c.(*net.TCPConn).CloseWrite()
	})
}

// Serve starts a TCP server on 127.0.0.1 that runs handle for every connection, each in its
// own goroutine, and closes the connection when handle returns. When the test ends the
// listener and every connection still open are closed and the goroutines are waited for, so a
// test's leak check sees none of them. It returns the server's address.
func Serve(t testing.TB, handle func(c net.Conn)) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		conns = map[net.Conn]struct{}{}
	)
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns[c] = struct{}{}
			mu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer func() {
					mu.Lock()
					delete(conns, c)
					mu.Unlock()
					c.Close()
				}()
				handle(c)
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return ln.Addr().String()
}

// ClosedPort returns a 127.0.0.1 address on which nothing listens: dialing it is refused.
func ClosedPort(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}
