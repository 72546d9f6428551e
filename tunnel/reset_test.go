package tunnel

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"
)

// A stream the server resets mid-transfer ends at the client with
// ErrStreamReset, never a clean EOF, while other streams on the same session,
// busy at the same time, keep every byte in order: the RST frame goes between
// yamux's frames, not inside one.
func TestResetReachesPeerBetweenFrames(t *testing.T) {
	checkLeaks(t)
	p := newPKI(t)
	chunk := []byte(strings.Repeat("r", 40<<10))
	srv := startServer(t, p, testConfig(), func(st *Stream) {
		if st.Header().Resource == "echo" {
			echo(st)
			return
		}
		st.Reply(StatusOK, "")
		for i := 0; i < 25; i++ { // 1 MB, then cut
			if _, err := st.Write(chunk); err != nil {
				st.Close()
				return
			}
		}
		st.Reset()
	})
	s := dialTest(t, p, srv.addr(), testConfig())

	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for i := 0; i < 8; i++ {
		wg.Add(2)
		go func() {
			defer wg.Done()
			st, err := s.OpenStream(context.Background(), Header{Kind: KindData, Resource: "cut"})
			if err != nil {
				errs <- err
				return
			}
			defer st.Close()
			st.SetDeadline(time.Now().Add(20 * time.Second))
			n, err := io.Copy(io.Discard, st)
			if !errors.Is(err, ErrStreamReset) {
				errs <- fmt.Errorf("cut stream ended with %v after %d bytes, want ErrStreamReset (nil: a clean EOF)", err, n)
			}
		}()
		go func() {
			defer wg.Done()
			roundTrip(t, s, strings.Repeat("e", 300<<10))
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	roundTrip(t, s, "the session is intact after the resets")
	s.Close()
	srv.close()
}

// When Relay fails, it resets its tunnel streams, so the far end of the
// tunnel sees the cut: here the relay's context ends mid-stream.
func TestRelayResetsStreamsOnFailure(t *testing.T) {
	checkLeaks(t)
	p := newPKI(t)
	ctx, cancel := context.WithCancel(context.Background())
	relayed := make(chan error, 1)
	srv := startServer(t, p, testConfig(), func(st *Stream) {
		st.Reply(StatusOK, "")
		a, b := net.Pipe()
		go func() { io.Copy(io.Discard, b); b.Close() }()
		_, _, err := Relay(ctx, st, a)
		relayed <- err
	})
	s := dialTest(t, p, srv.addr(), testConfig())
	st, err := s.OpenStream(context.Background(), Header{Kind: KindData, Resource: "x"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := st.Write([]byte("some bytes")); err != nil {
		t.Fatal(err)
	}
	st.SetReadDeadline(time.Now().Add(10 * time.Second))
	read := make(chan error, 1)
	go func() { _, err := io.Copy(io.Discard, st); read <- err }()
	time.Sleep(50 * time.Millisecond)
	cancel()
	if err := <-relayed; !errors.Is(err, context.Canceled) {
		t.Fatalf("relay error = %v, want context.Canceled", err)
	}
	if err := <-read; !errors.Is(err, ErrStreamReset) {
		t.Fatalf("the far end read %v, want ErrStreamReset", err)
	}
	st.Close()
	s.Close()
	srv.close()
}

// A stream closed normally still ends with a clean EOF at the peer, and
// Reset after Close sends nothing.
func TestCloseIsNotReset(t *testing.T) {
	checkLeaks(t)
	p := newPKI(t)
	srv := startServer(t, p, testConfig(), func(st *Stream) {
		st.Reply(StatusOK, "")
		st.Write([]byte("whole"))
		st.Close()
		st.Reset()
	})
	s := dialTest(t, p, srv.addr(), testConfig())
	st, err := s.OpenStream(context.Background(), Header{Kind: KindData, Resource: "x"})
	if err != nil {
		t.Fatal(err)
	}
	st.SetReadDeadline(time.Now().Add(10 * time.Second))
	got, err := io.ReadAll(st)
	if err != nil || string(got) != "whole" {
		t.Fatalf("read %q, %v; want \"whole\" and a clean EOF", got, err)
	}
	st.Close()
	s.Close()
	srv.close()
}
