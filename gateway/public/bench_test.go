package public

import (
	"crypto/tls"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"testing"
)

// BenchmarkProxiedRequest measures one small GET through the public listener (TLS 1.3,
// keep-alive, HTTP/2 from the client; the reverse proxy; a pooled backend connection from
// the StreamDialer) against BenchmarkDirectRequest, the same GET over TLS 1.3 straight to an
// HTTPS server with the same handler: the difference is what the public listener costs.
// The agent's tunnel stream is not in this path (the fake dialer dials the target directly).
//
//	go test ./gateway/public/ -run '^$' -bench 'Request$' -benchmem
func BenchmarkProxiedRequest(b *testing.B) {
	host := testHost("bench")
	e := startEnv(b, envOptions{hosts: map[string]Host{host: {Resource: "web", Access: AccessPublic}}}, nil)
	e.waitCert(host)
	c := e.client(nil, true)
	url := e.url(host, "/bench")
	benchGet(b, c, url)
}

func BenchmarkDirectRequest(b *testing.B) {
	srv := httptest.NewUnstartedServer(demoHandler())
	srv.EnableHTTP2 = true
	srv.Config.ErrorLog = log.New(io.Discard, "", 0)
	srv.StartTLS()
	defer srv.Close()
	tr := srv.Client().Transport.(*http.Transport).Clone()
	tr.TLSClientConfig.MinVersion = tls.VersionTLS13
	defer tr.CloseIdleConnections()
	benchGet(b, &http.Client{Transport: tr}, srv.URL+"/bench")
}

func benchGet(b *testing.B, c *http.Client, url string) {
	b.ReportAllocs()
	b.SetParallelism(4)
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			resp, err := c.Get(url)
			if err != nil {
				b.Error(err)
				return
			}
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				b.Errorf("status %d", resp.StatusCode)
				return
			}
		}
	})
}
