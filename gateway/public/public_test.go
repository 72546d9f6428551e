package public

import (
	"crypto/tls"
	"io/fs"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
)

// A browser-like client (Pebble's root only) fetches a page of the demo target through a
// certificate certmagic obtained from Pebble with tls-alpn-01 on the HTTPS listener.
func TestObtainTLSALPNAndServe(t *testing.T) {
	checkLeaks(t)
	host := testHost("alpn")
	e := startEnv(t, envOptions{
		hosts:      map[string]Host{host: {Resource: "web", Access: AccessPublic}},
		challenges: []string{ChallengeTLSALPN01},
	}, nil)
	leaf := e.waitCert(host)
	if len(leaf.DNSNames) != 1 || leaf.DNSNames[0] != host {
		t.Fatalf("certificate names %v, want [%s]", leaf.DNSNames, host)
	}
	if n := e.httpLn.n.Load(); n != 0 {
		t.Fatalf("the HTTP listener saw %d connections; only tls-alpn-01 was enabled", n)
	}

	status, body, hdr, served, err := get(e.client(nil, false), e.url(host, "/index.html?token=secret"), map[string]string{UserHeader: "mallory"})
	if err != nil {
		t.Fatal(err)
	}
	if status != http.StatusOK || body != "hello from the demo target: GET /index.html" {
		t.Fatalf("got %d %q", status, body)
	}
	if served.SerialNumber.Cmp(leaf.SerialNumber) != 0 {
		t.Fatalf("served serial %v, managed %v", served.SerialNumber, leaf.SerialNumber)
	}
	if got := hdr.Get("X-Seen-User"); got != "" {
		t.Fatalf("the target saw %s %q on a public host; a client-sent identity must be dropped", UserHeader, got)
	}
	if got := hdr.Get("X-Seen-Host"); !strings.HasPrefix(got, host) {
		t.Fatalf("the target saw Host %q, want the published host", got)
	}

	recs := e.audits.ofType(TypeHTTPRequest)
	if len(recs) != 1 {
		t.Fatalf("%d http.request records, want 1: %+v", len(recs), recs)
	}
	r := recs[0]
	if r.Extra["host"] != host || r.Extra["path"] != "/index.html" || r.Extra["status"] != "200" ||
		r.Resource != "web" || r.Outcome != "ok" || r.BytesDown != int64(len(body)) || r.TLSVersion == "" {
		t.Fatalf("audit record %+v", r)
	}
	for _, r := range e.audits.recs {
		for k, v := range r.Extra {
			if strings.Contains(v, "secret") {
				t.Fatalf("audit record %s leaks the query string in %s=%q", r.Type, k, v)
			}
		}
	}
	if s := e.srv.Stats(); s.CertsObtained != 1 || s.ObtainFailures != 0 {
		t.Fatalf("stats %+v", s)
	}

	// TLS 1.3 by default; TLS 1.2 only with ECDHE and AEAD; nothing older.
	tlsDial := func(c *tls.Config) (*tls.Conn, error) {
		c.RootCAs, c.ServerName = e.pebble.IssuedRoots, host
		return tls.Dial("tcp", e.ln.Addr().String(), c)
	}
	if c, err := tlsDial(&tls.Config{}); err != nil || c.ConnectionState().Version != tls.VersionTLS13 {
		t.Fatalf("default handshake: %v", err)
	} else {
		c.Close()
	}
	if c, err := tlsDial(&tls.Config{MaxVersion: tls.VersionTLS12}); err != nil || c.ConnectionState().Version != tls.VersionTLS12 {
		t.Fatalf("TLS 1.2 handshake: %v", err)
	} else {
		c.Close()
	}
	for name, c := range map[string]*tls.Config{
		"TLS 1.1":     {MinVersion: tls.VersionTLS10, MaxVersion: tls.VersionTLS11},
		"TLS 1.2 CBC": {MaxVersion: tls.VersionTLS12, CipherSuites: []uint16{tls.TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA}},
	} {
		if conn, err := tlsDial(c); err == nil {
			conn.Close()
			t.Errorf("%s handshake accepted", name)
		}
	}

	// Private keys (certificate and ACME account) are 0600, directories 0700.
	var keys int
	err = filepath.WalkDir(e.storage, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		switch {
		case d.IsDir() && fi.Mode().Perm() != 0o700:
			t.Errorf("directory %s has mode %v, want 0700", p, fi.Mode().Perm())
		case strings.HasSuffix(p, ".key"):
			keys++
			if fi.Mode().Perm() != 0o600 {
				t.Errorf("key %s has mode %v, want 0600", p, fi.Mode().Perm())
			}
		}
		return nil
	})
	if err != nil || keys < 2 {
		t.Fatalf("walk storage: %v; %d private keys found, want the account's and the certificate's", err, keys)
	}
}

// certmagic obtains the certificate with http-01, answered on the plain HTTP listener, which
// otherwise redirects published hosts to HTTPS and refuses other names.
func TestObtainHTTP01AndRedirect(t *testing.T) {
	checkLeaks(t)
	host := testHost("http01")
	e := startEnv(t, envOptions{
		hosts:      map[string]Host{host: {Resource: "web", Access: AccessPublic}},
		challenges: []string{ChallengeHTTP01},
	}, nil)
	e.waitCert(host)
	if n := e.httpLn.n.Load(); n == 0 {
		t.Fatal("the HTTP listener saw no connection, but only http-01 was enabled")
	}
	status, body, _, _, err := get(e.client(nil, false), e.url(host, "/"), nil)
	if err != nil || status != http.StatusOK || !strings.HasPrefix(body, "hello from the demo target") {
		t.Fatalf("got %d %q %v", status, body, err)
	}

	plain := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	resp, err := plain.Get("http://" + e.httpLn.Addr().String() + "/a/b?c=d")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNotFound {
		t.Fatalf("an unpublished Host got %d on the HTTP listener, want 404 (no open redirect)", resp.StatusCode)
	}
	req, _ := http.NewRequest(http.MethodGet, "http://"+e.httpLn.Addr().String()+"/a/b?c=d", nil)
	req.Host = host
	resp, err = plain.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if want := e.url(host, "/a/b?c=d"); resp.StatusCode != http.StatusPermanentRedirect || resp.Header.Get("Location") != want {
		t.Fatalf("redirect %d to %q, want 308 to %q", resp.StatusCode, resp.Header.Get("Location"), want)
	}
}
