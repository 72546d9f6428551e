// Package loopback gives tests the targets that tunnel, agent and gateway tests all need on
// 127.0.0.1: an echo server, a server running any handler, an address nothing listens on, and
// silent connections from a hostile source.
package loopback

import (
	"io"
	"net"
	"sync"
	"syscall"
	"testing"
	"time"
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

// SilentConns opens n TCP connections to addr from the local address from (such as
// 127.0.0.2, to play a hostile source on loopback) that never send a byte, 32 dials at a
// time, and returns them; they are closed when the test ends. The test fails when the
// process may not hold that many files open, or when fewer than nine in ten could be
// opened. How long the opening took is logged.
func SilentConns(t testing.TB, addr string, from net.IP, n int) []net.Conn {
	t.Helper()
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	// Go raises the soft limit to the hard one at start; the server under test may
	// share this process, so each connection may cost two descriptors.
	if need := uint64(2*n + 1000); lim.Cur < need {
		t.Fatalf("this test holds %d connections and may open only %d files: raise the limit (ulimit -n %d)", n, lim.Cur, need)
	}
	var (
		mu    sync.Mutex
		conns []net.Conn
		wg    sync.WaitGroup
		next  = make(chan struct{})
	)
	t.Cleanup(func() {
		for _, c := range conns {
			_ = c.Close()
		}
	})
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: from}, Timeout: 10 * time.Second}
	start := time.Now()
	for range 32 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range next {
				if c, err := d.Dial("tcp", addr); err == nil {
					mu.Lock()
					conns = append(conns, c)
					mu.Unlock()
				}
			}
		}()
	}
	for range n {
		next <- struct{}{}
	}
	close(next)
	wg.Wait()
	t.Logf("%d silent connections from %s opened in %s", len(conns), from, time.Since(start).Round(time.Millisecond))
	if len(conns) < n*9/10 {
		t.Fatalf("only %d of %d silent connections could be opened", len(conns), n)
	}
	return conns
}
