package public

import (
	"bufio"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"
)

// A "users" host asks for a client certificate and forwards only requests whose certificate
// the VerifyUser hook accepts (and Allow allows); the target learns the user from
// X-Wicket-User, never from the client. A public host on the same listener asks for nothing.
func TestUsersHostRequiresUserCertificate(t *testing.T) {
	checkLeaks(t)
	var (
		private = testHost("private")
		open    = testHost("open")
	)
	uca := newTestUserCA(t)
	e := startEnv(t, envOptions{
		hosts: map[string]Host{
			private: {Resource: "web", Access: AccessUsers},
			open:    {Resource: "web", Access: AccessPublic},
		},
		verifyUser: uca.verify,
		allow:      func(user, resource string) bool { return user == "alice" && resource == "web" },
	}, nil)
	e.waitCert(private)
	e.waitCert(open)

	status, body, _, _, err := get(e.client(nil, false), e.url(private, "/"), nil)
	if err != nil || status != http.StatusUnauthorized || !strings.Contains(body, "Wicket user certificate") {
		t.Fatalf("without a certificate: %d %q %v", status, body, err)
	}
	other := newTestUserCA(t)
	status, body, _, _, err = get(e.client(other.issue(t, "alice"), false), e.url(private, "/"), nil)
	if err != nil || status != http.StatusForbidden || !strings.Contains(body, "not issued by this gateway's CA") {
		t.Fatalf("with a foreign certificate: %d %q %v", status, body, err)
	}
	status, body, _, _, err = get(e.client(uca.issue(t, "bob"), false), e.url(private, "/"), nil)
	if err != nil || status != http.StatusForbidden || !strings.Contains(body, "bob is not allowed") {
		t.Fatalf("with a user the policy refuses: %d %q %v", status, body, err)
	}
	alice := e.client(uca.issue(t, "alice"), true)
	status, body, hdr, _, err := get(alice, e.url(private, "/docs"), map[string]string{UserHeader: "root"})
	if err != nil || status != http.StatusOK || !strings.HasPrefix(body, "hello") {
		t.Fatalf("with alice's certificate: %d %q %v", status, body, err)
	}
	if got := hdr.Get("X-Seen-User"); got != "alice" {
		t.Fatalf("the target saw %s %q, want alice", UserHeader, got)
	}

	// A streamed response authorized by a certificate ends when that certificate expires.
	expires := time.Now().Add(2 * time.Second).Truncate(time.Second) // certificates have 1 s resolution
	resp, err := e.client(uca.issueUntil(t, "alice", expires), false).Get(e.url(private, "/hang"))
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("hang: %v %v", resp, err)
	}
	rest, _ := io.ReadAll(resp.Body) // returns when the proxy ends the stream
	resp.Body.Close()
	if ended := time.Now(); ended.Before(expires) || ended.After(expires.Add(5*time.Second)) || string(rest) != "started\n" {
		t.Fatalf("stream read %q and ended %v after the certificate expired", rest, ended.Sub(expires))
	}

	var cut bool
	for _, r := range e.audits.ofType(TypeHTTPRequest) {
		if r.Extra["path"] == "/hang" {
			cut = r.Outcome == "error" && strings.Contains(r.Reason, "user certificate expired")
		}
	}
	if !cut {
		t.Fatalf("the stream cut at certificate expiry is not audited as such: %+v", e.audits.ofType(TypeHTTPRequest))
	}

	// The public host does not ask for a certificate at all.
	var asked bool
	cfg := &tls.Config{RootCAs: e.pebble.IssuedRoots, ServerName: open,
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			asked = true
			return &tls.Certificate{}, nil
		}}
	c, err := tls.Dial("tcp", e.ln.Addr().String(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	if asked {
		t.Fatal("a public host requested a client certificate")
	}
	// A connection set up for the public host cannot be used for the users host.
	status, _, _, _, err = get(e.client(nil, false), e.url(open, "/"), map[string]string{})
	if err != nil || status != http.StatusOK {
		t.Fatalf("public host: %d %v", status, err)
	}
	req, _ := http.NewRequest(http.MethodGet, e.url(open, "/"), nil)
	req.Host = private
	resp, err = e.client(nil, false).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusMisdirectedRequest {
		t.Fatalf("Host %s over a connection for %s: %d, want 421", private, open, resp.StatusCode)
	}
	// An unpublished name gets no certificate at all.
	if c, err := tls.Dial("tcp", e.ln.Addr().String(), &tls.Config{RootCAs: e.pebble.IssuedRoots, ServerName: "other.wicket.test"}); err == nil {
		c.Close()
		t.Fatal("a handshake for an unpublished name succeeded")
	}

	var denied, okUser int
	for _, r := range e.audits.ofType(TypeHTTPRequest) {
		switch {
		case r.Outcome == "denied" && r.Extra["host"] == private:
			denied++
		case r.User == "alice" && r.Extra["status"] == "200":
			okUser++
		}
	}
	if denied != 4 || okUser != 2 {
		t.Fatalf("audit: %d denied for %s (want 4: no cert, foreign, bob, misdirected) and %d ok for alice (want 2)", denied, private, okUser)
	}
	metas := e.dialer.metas
	if len(metas) == 0 || metas[0].User != "alice" || metas[0].Host != private {
		t.Fatalf("dial metadata %+v", metas)
	}
}

// An HTTP Upgrade (WebSocket-style) passes through both ways, and a streamed response reaches
// the client chunk by chunk while the target is still writing.
func TestUpgradeAndStreamingPassThrough(t *testing.T) {
	checkLeaks(t)
	host := testHost("stream")
	next := make(chan struct{})
	mux := http.NewServeMux()
	mux.HandleFunc("/ws", upgradeEcho)
	mux.HandleFunc("/events", func(w http.ResponseWriter, r *http.Request) {
		for i := range 3 {
			fmt.Fprintf(w, "event %d\n", i)
			http.NewResponseController(w).Flush()
			select {
			case <-next: // the client has read this event
			case <-r.Context().Done():
				return
			case <-time.After(10 * time.Second):
				return
			}
		}
	})
	e := startEnv(t, envOptions{hosts: map[string]Host{host: {Resource: "web", Access: AccessPublic}}}, mux)
	e.waitCert(host)

	// Streaming: each event arrives before the target writes the next one.
	resp, err := e.client(nil, false).Get(e.url(host, "/events"))
	if err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(resp.Body)
	for i := range 3 {
		line, err := br.ReadString('\n')
		if err != nil || line != fmt.Sprintf("event %d\n", i) {
			t.Fatalf("event %d: %q %v", i, line, err)
		}
		next <- struct{}{}
	}
	resp.Body.Close()

	// Upgrade over HTTP/1.1.
	c, cr := e.upgrade(host, nil)
	defer c.Close()
	for _, msg := range []string{"ping", "hello"} {
		if _, err := io.WriteString(c, msg); err != nil {
			t.Fatal(err)
		}
		got := make([]byte, len(msg))
		if _, err := io.ReadFull(cr, got); err != nil || string(got) != strings.ToUpper(msg) {
			t.Fatalf("echo %q: %q %v", msg, got, err)
		}
	}
	c.Close()

	deadline := time.Now().Add(5 * time.Second)
	for {
		var rec *struct{ up, down int64 }
		for _, r := range e.audits.ofType(TypeHTTPRequest) {
			if r.Extra["path"] == "/ws" && r.Extra["status"] == "101" {
				rec = &struct{ up, down int64 }{r.BytesUp, r.BytesDown}
			}
		}
		if rec != nil {
			if rec.up < int64(len("pinghello")) || rec.down < int64(len("PINGHELLO")) {
				t.Fatalf("upgraded connection audited with %d bytes up, %d down", rec.up, rec.down)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no audit record for the upgraded connection after it closed")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// A resource no agent serves: the client gets a 502 with a plain sentence, the audit record
// says why, and nothing internal leaks into the page.
func TestBackendUnavailable(t *testing.T) {
	checkLeaks(t)
	host := testHost("gone")
	e := startEnv(t, envOptions{hosts: map[string]Host{host: {Resource: "nobody", Access: AccessPublic}}}, nil)
	e.waitCert(host)
	status, body, _, _, err := get(e.client(nil, false), e.url(host, "/"), nil)
	if err != nil || status != http.StatusBadGateway || strings.Contains(body, "agent") || !strings.Contains(body, "cannot be reached") {
		t.Fatalf("got %d %q %v", status, body, err)
	}
	recs := e.audits.ofType(TypeHTTPRequest)
	if len(recs) != 1 || recs[0].Outcome != "error" || !strings.Contains(recs[0].Reason, "no connected agent exposes resource nobody") {
		t.Fatalf("audit %+v", recs)
	}
	if s := e.srv.Stats(); s.BackendErrors != 1 {
		t.Fatalf("stats %+v", s)
	}
}

// Revoking a user certificate (Server.Cut, which the gateway calls from its revocation paths)
// ends a streamed response and an upgraded connection it authorized at once, audited as such;
// another user's stream is untouched.
func TestCutEndsRequestsOfARevokedCertificate(t *testing.T) {
	checkLeaks(t)
	host := testHost("revoke")
	uca := newTestUserCA(t)
	mux := http.NewServeMux()
	mux.Handle("/", demoHandler())
	mux.HandleFunc("/ws", upgradeEcho)
	e := startEnv(t, envOptions{
		hosts:      map[string]Host{host: {Resource: "web", Access: AccessUsers}},
		verifyUser: uca.verify,
	}, mux)
	e.waitCert(host)

	aliceCert, bobCert := uca.issue(t, "alice"), uca.issue(t, "bob")
	stream := func(cert *tls.Certificate) (*http.Response, *bufio.Reader) {
		resp, err := e.client(cert, false).Get(e.url(host, "/hang"))
		if err != nil || resp.StatusCode != http.StatusOK {
			t.Fatalf("stream: %v %v", resp, err)
		}
		br := bufio.NewReader(resp.Body)
		if line, err := br.ReadString('\n'); err != nil || line != "started\n" {
			t.Fatalf("stream start: %q %v", line, err)
		}
		return resp, br
	}
	aliceResp, aliceBody := stream(aliceCert)
	defer aliceResp.Body.Close()
	bobResp, _ := stream(bobCert)
	defer bobResp.Body.Close()

	// An upgraded connection of alice's, over HTTP/1.1.
	c, cr := e.upgrade(host, aliceCert)
	defer c.Close()

	aliceSerial := serialOf(t, aliceCert)
	if got := e.srv.UserSerials(); !slices.Contains(got, aliceSerial) || len(got) != 2 {
		t.Fatalf("UserSerials = %v, want alice's and bob's", got)
	}
	start := time.Now()
	if n := e.srv.Cut([]string{aliceSerial}); n != 2 {
		t.Fatalf("Cut = %d requests, want 2 (the stream and the upgraded connection)", n)
	}
	if rest, _ := io.ReadAll(aliceBody); len(rest) != 0 {
		t.Fatalf("after the cut the stream still delivered %q", rest)
	}
	if _, err := io.ReadAll(cr); err != nil && !errors.Is(err, io.EOF) {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			t.Fatal("the upgraded connection stayed open after the cut")
		}
	}
	if d := time.Since(start); d > time.Second {
		t.Fatalf("cut took %v, want well under a second", d)
	}
	// Alice's handlers unregister as they finish; bob's stream stays open throughout.
	for wait := time.Now().Add(5 * time.Second); ; {
		got := e.srv.UserSerials()
		if len(got) == 1 && got[0] == serialOf(t, bobCert) {
			break
		}
		if !slices.Contains(got, serialOf(t, bobCert)) || time.Now().After(wait) {
			t.Fatalf("after the cut UserSerials = %v, want only bob's", got)
		}
		time.Sleep(5 * time.Millisecond)
	}
	bobResp.Body.Close()

	deadline := time.Now().Add(5 * time.Second)
	for {
		var cut int
		for _, r := range e.audits.ofType(TypeHTTPRequest) {
			if r.User == "alice" && r.Outcome == "error" && r.Reason == "the response was cut off: the user certificate was revoked" {
				cut++
			}
		}
		if cut == 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("want 2 audit records of alice's requests cut by the revocation: %+v", e.audits.ofType(TypeHTTPRequest))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func serialOf(t *testing.T, c *tls.Certificate) string {
	leaf, err := x509.ParseCertificate(c.Certificate[0])
	if err != nil {
		t.Fatal(err)
	}
	return leaf.SerialNumber.String()
}

// upgradeEcho answers an "Upgrade: echo" request with 101 and then echoes in upper case
// until the other side closes.
func upgradeEcho(w http.ResponseWriter, r *http.Request) {
	if r.Header.Get("Upgrade") != "echo" {
		http.Error(w, "upgrade required", http.StatusUpgradeRequired)
		return
	}
	c, brw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		return
	}
	defer c.Close()
	fmt.Fprint(brw, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n")
	brw.Flush()
	buf := make([]byte, 64)
	for {
		n, err := brw.Read(buf)
		if err != nil {
			return
		}
		if _, err := c.Write([]byte(strings.ToUpper(string(buf[:n])))); err != nil {
			return
		}
	}
}

// upgrade opens an HTTP/1.1 connection to host (with cert as the client certificate, if
// any), upgrades it on /ws and returns it with a reader positioned after the 101 answer.
func (e *env) upgrade(host string, cert *tls.Certificate) (*tls.Conn, *bufio.Reader) {
	e.t.Helper()
	cfg := &tls.Config{RootCAs: e.pebble.IssuedRoots, ServerName: host, NextProtos: []string{"http/1.1"}}
	if cert != nil {
		cfg.Certificates = []tls.Certificate{*cert}
	}
	c, err := tls.Dial("tcp", e.ln.Addr().String(), cfg)
	if err != nil {
		e.t.Fatal(err)
	}
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintf(c, "GET /ws HTTP/1.1\r\nHost: %s\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n", host)
	cr := bufio.NewReader(c)
	if up, err := http.ReadResponse(cr, nil); err != nil || up.StatusCode != http.StatusSwitchingProtocols {
		c.Close()
		e.t.Fatalf("upgrade: %v %v", up, err)
	}
	return c, cr
}
