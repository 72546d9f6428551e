package pgwire

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"
)

// tcpPair returns the two ends of a loopback TCP connection.
func tcpPair(t testing.TB) (client, server net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	type res struct {
		c   net.Conn
		err error
	}
	ch := make(chan res, 1)
	go func() {
		c, err := ln.Accept()
		ch <- res{c, err}
	}()
	client, err = net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	r := <-ch
	if r.err != nil {
		t.Fatal(r.err)
	}
	server = r.c
	for _, c := range []net.Conn{client, server} {
		c.SetDeadline(time.Now().Add(testTimeout))
	}
	t.Cleanup(func() { client.Close(); server.Close() })
	return client, server
}

func startupBytes(t *testing.T, version uint32, params map[string]string) []byte {
	t.Helper()
	b, err := (&pgproto3.StartupMessage{ProtocolVersion: pgproto3.ProtocolVersionNumber, Parameters: params}).Encode(nil)
	if err != nil {
		t.Fatal(err)
	}
	binary.BigEndian.PutUint32(b[4:], version)
	return b
}

func request(code uint32) []byte {
	return binary.BigEndian.AppendUint32(binary.BigEndian.AppendUint32(nil, 8), code)
}

// readStartupFrom runs ReadStartup on the server end while the client end
// writes in and reads everything the server answers until it closes.
func readStartupFrom(t *testing.T, in []byte) (*Startup, []byte, error) {
	t.Helper()
	client, server := tcpPair(t)
	type res struct {
		s   *Startup
		err error
	}
	ch := make(chan res, 1)
	go func() {
		s, err := ReadStartup(server)
		server.Close()
		ch <- res{s, err}
	}()
	client.Write(in)
	client.(*net.TCPConn).CloseWrite() // a short packet then ends in EOF
	answer, _ := io.ReadAll(client)
	r := <-ch
	return r.s, answer, r.err
}

func TestReadStartup(t *testing.T) {
	leakCheck(t)
	params := map[string]string{"user": "alice", "application_name": "psql"}
	msg := startupBytes(t, protocol30, params)
	for _, tc := range []struct {
		name   string
		in     []byte
		answer string
	}{
		{"plain", msg, ""},
		{"ssl then startup", append(request(codeSSL), msg...), "N"},
		{"gssenc, ssl, startup", append(append(request(codeGSSENC), request(codeSSL)...), msg...), "NN"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, answer, err := readStartupFrom(t, tc.in)
			if err != nil {
				t.Fatal(err)
			}
			if string(answer) != tc.answer {
				t.Errorf("answered %q, want %q", answer, tc.answer)
			}
			if !bytes.Equal(s.Raw, msg) {
				t.Errorf("Raw is not the StartupMessage as sent")
			}
			if s.User != "alice" || s.Database != "alice" || s.Params["application_name"] != "psql" || s.Cancel != nil {
				t.Errorf("startup %+v", s)
			}
		})
	}
	withDB := startupBytes(t, protocol30, map[string]string{"user": "alice", "database": "ledger"})
	s, _, err := readStartupFrom(t, withDB)
	if err != nil || s.Database != "ledger" {
		t.Fatalf("database %v, %v", s, err)
	}
	cancel, _ := (&pgproto3.CancelRequest{ProcessID: 4242, SecretKey: 0xdeadbeef}).Encode(nil)
	s, _, err = readStartupFrom(t, cancel)
	if err != nil || s.Cancel == nil || s.Cancel.ProcessID != 4242 || s.Cancel.SecretKey != 0xdeadbeef || !bytes.Equal(s.Raw, cancel) {
		t.Fatalf("cancel request %+v, %v", s, err)
	}
	// The largest packet PostgreSQL accepts is accepted.
	big := map[string]string{"user": "alice"}
	big["options"] = strings.Repeat("x", MaxStartupSize-len(startupBytes(t, protocol30, map[string]string{"user": "alice", "options": ""})))
	bigMsg := startupBytes(t, protocol30, big)
	if len(bigMsg) != MaxStartupSize {
		t.Fatalf("test packet is %d bytes", len(bigMsg))
	}
	if _, _, err := readStartupFrom(t, bigMsg); err != nil {
		t.Fatalf("a %d-byte startup packet: %v", MaxStartupSize, err)
	}
}

func TestReadStartupRefuses(t *testing.T) {
	leakCheck(t)
	user := map[string]string{"user": "alice"}
	tooBig := binary.BigEndian.AppendUint32(nil, MaxStartupSize+1)
	for _, tc := range []struct {
		name string
		in   []byte
		want error
	}{
		{"too large", append(tooBig, make([]byte, 64)...), ErrStartupTooLarge},
		{"huge length", []byte{0x7f, 0xff, 0xff, 0xff, 0, 3, 0, 0}, ErrStartupTooLarge},
		{"protocol 3.2", startupBytes(t, 3<<16|2, user), ErrProtocolVersion},
		{"protocol 2.0", startupBytes(t, 2<<16, user), ErrProtocolVersion},
		{"three encryption requests", append(append(request(codeSSL), request(codeGSSENC)...), request(codeSSL)...), ErrBadStartup},
		{"unknown request", request(1234<<16 | 5555), ErrBadStartup},
		{"short length", []byte{0, 0, 0, 3, 0, 0, 0, 0}, ErrBadStartup},
		{"truncated", startupBytes(t, protocol30, user)[:12], ErrBadStartup},
		{"no user", startupBytes(t, protocol30, map[string]string{"database": "x"}), ErrBadStartup},
		{"unterminated", append(binary.BigEndian.AppendUint32(binary.BigEndian.AppendUint32(nil, 13), protocol30), 'u', 's', 'e', 'r', 0), ErrBadStartup},
		{"short cancel", append(binary.BigEndian.AppendUint32(binary.BigEndian.AppendUint32(nil, 12), codeCancel), 1, 2, 3, 4), ErrBadStartup},
		{"long ssl request", append(binary.BigEndian.AppendUint32(binary.BigEndian.AppendUint32(nil, 12), codeSSL), 1, 2, 3, 4), ErrBadStartup},
		{"nothing", nil, ErrBadStartup},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, _, err := readStartupFrom(t, tc.in)
			if !errors.Is(err, tc.want) {
				t.Fatalf("err = %v, want %v", err, tc.want)
			}
			if strings.Count(err.Error(), ". ") > 0 {
				t.Errorf("error is more than one sentence: %v", err)
			}
		})
	}
}

// TestReadStartupDirectTLS: a client that opens with TLS (PostgreSQL 17
// sslnegotiation=direct) gets a TLS alert, so its own error is clear.
func TestReadStartupDirectTLS(t *testing.T) {
	leakCheck(t)
	client, server := tcpPair(t)
	ch := make(chan error, 1)
	go func() {
		_, err := ReadStartup(server)
		server.Close()
		ch <- err
	}()
	tc := tls.Client(client, &tls.Config{ServerName: "db", InsecureSkipVerify: true, NextProtos: []string{"postgresql"}})
	herr := tc.HandshakeContext(context.Background())
	if herr == nil || !strings.Contains(herr.Error(), "handshake failure") {
		t.Errorf("client handshake error %v, want a TLS handshake failure alert", herr)
	}
	if err := <-ch; !errors.Is(err, ErrDirectTLS) {
		t.Fatalf("ReadStartup returned %v, want ErrDirectTLS", err)
	}
}

func TestErrorMessage(t *testing.T) {
	b := ErrorMessage("08P01", "the client sent garbage")
	if b[0] != 'E' || int(binary.BigEndian.Uint32(b[1:])) != len(b)-1 {
		t.Fatalf("framing of %q", b)
	}
	var e pgproto3.ErrorResponse
	if err := e.Decode(b[5:]); err != nil {
		t.Fatal(err)
	}
	if e.Severity != "FATAL" || e.SeverityUnlocalized != "FATAL" || e.Code != "08P01" || e.Message != "wicket: the client sent garbage" {
		t.Fatalf("decoded %+v", e)
	}
}
