package ca

import (
	"bytes"
	"crypto/tls"
	"encoding/json"
	"encoding/pem"
	"net"
	"net/http"
	"strings"
	"testing"

	"go.step.sm/crypto/jose"
)

// TestEnrollPinsRoot: a server that serves the right root (it is public) but whose
// TLS certificate comes from another CA is refused before the token is sent.
func TestEnrollPinsRoot(t *testing.T) {
	good := startEnv(t, t.TempDir(), "", nil)
	evil := startEnv(t, t.TempDir(), "", nil)

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var gotToken bool
	mux := http.NewServeMux()
	mux.HandleFunc("/root/", func(w http.ResponseWriter, r *http.Request) {
		_ = json.NewEncoder(w).Encode(map[string]string{
			"ca": string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: good.a.Root().Raw})),
		})
	})
	mux.HandleFunc("/1.0/sign", func(w http.ResponseWriter, r *http.Request) { gotToken = true })
	srv := &http.Server{Handler: mux, TLSConfig: &tls.Config{GetCertificate: evil.a.GetCertificate, MinVersion: tls.VersionTLS13}}
	srv.ErrorLog = newDiscardLog()
	go func() { _ = srv.ServeTLS(ln, "", "") }()
	defer srv.Close()

	// A genuine token of the good CA whose URL points at the impostor.
	tok := signToken(t, good.a, RoleAgent, func(c *tokenClaims) {
		c.Subject = "pinned"
		c.SANs = []string{"spiffe://wicket.local/agent/pinned"}
		c.Audience = jose.Audience{"https://" + ln.Addr().String() + "/1.0/sign"}
	})
	_, err = Enroll(ctx10s(t), tok)
	wantErr(t, err, ErrUnknownCA)
	if gotToken {
		t.Fatal("the token was sent to a server not certified by the pinned root")
	}
	// A token whose sha names a root the server does not have.
	tok2 := signToken(t, good.a, RoleAgent, func(c *tokenClaims) {
		c.Subject = "pinned"
		c.SANs = []string{"spiffe://wicket.local/agent/pinned"}
		c.Audience = jose.Audience{evil.url + "/1.0/sign"}
	})
	_, err = Enroll(ctx10s(t), tok2)
	wantErr(t, err, ErrUnknownCA)
}

func TestInspectTokenAndMalformedRequests(t *testing.T) {
	for _, bad := range []string{"", "abc", "a.b.c", strings.Repeat("x", 5000)} {
		_, err := InspectToken(bad)
		wantErr(t, err, ErrTokenInvalid)
	}
	// net/http lingers ~500ms on a connection whose oversized body it refused.
	t.Cleanup(func() { waitNoGoroutine(t, "net/http.(*conn).closeWriteAndWait") })
	e := startEnv(t, t.TempDir(), "", nil)
	tok := mustToken(t, e.a, RoleUser, "carol")
	info, err := InspectToken(tok)
	if err != nil {
		t.Fatal(err)
	}
	if info.URL != e.url || info.RootFingerprint != e.a.RootFingerprint() || info.Identity != e.a.Identity(RoleUser, "carol") {
		t.Fatalf("InspectToken = %+v", info)
	}
	for _, name := range []string{"", "A", "-a", "a-", "a_b", "a/b", strings.Repeat("a", 64), "../x"} {
		if _, err := e.a.MintToken(RoleAgent, name, 0); err == nil {
			t.Fatalf("MintToken accepted name %q", name)
		}
	}
	if _, err := e.a.MintToken(RoleAgent, "ok", 25*60*60*1e9); err == nil {
		t.Fatal("MintToken accepted a ttl over 24h")
	}
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: e.a.RootPool()}}
	defer tr.CloseIdleConnections()
	hc := &http.Client{Transport: tr}
	for _, tc := range []struct {
		body   []byte
		status int
	}{
		{bytes.Repeat([]byte("x"), 2<<20), http.StatusRequestEntityTooLarge},
		{[]byte("not json"), http.StatusUnauthorized},
		{[]byte(`{"csr":"x","ott":"y"}`), http.StatusUnauthorized},
	} {
		resp, err := hc.Post(e.url+"/1.0/sign", "application/json", bytes.NewReader(tc.body))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != tc.status {
			t.Fatalf("body %.20q: HTTP %d, want %d", tc.body, resp.StatusCode, tc.status)
		}
	}
}
