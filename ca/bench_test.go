package ca

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"syscall"
	"testing"
	"time"

	"github.com/smallstep/certificates/authority"
	"github.com/smallstep/certificates/authority/provisioner"
)

// Benchmarks: go test -run '^$' -bench . -benchtime 3s ./ca/
//
// BenchmarkEnroll: token -> signed certificate through the HTTP handler (POST
// /1.0/sign over TLS 1.3 keep-alive connections, GOMAXPROCS parallel clients); the
// tokens and CSRs are prepared before the timer starts. BenchmarkSignInProcess is the
// baseline in the same run: the same authorization and signing, called in-process.
// BenchmarkRenew: POST /1.0/renew over mTLS keep-alive connections.
//
// benchParallelism client goroutines per GOMAXPROCS: many agents enrolling or
// renewing at once, so that database commits can overlap where the backend allows.

const benchParallelism = 4

// cpuTime is this process's user+system CPU time. Reported per operation it shows the
// work an enrollment costs independently of how busy the (shared) machine is; the
// PostgreSQL server's CPU is not included.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// report adds ops/s and CPU-ms/op.
func report(b *testing.B, cpu0 time.Duration, unit string) {
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), unit)
	b.ReportMetric(float64(cpuTime()-cpu0)/float64(time.Millisecond)/float64(b.N), "cpu-ms/op")
}

type benchDB struct {
	name string
	dsn  func(b *testing.B) string
}

var benchDBs = []benchDB{
	{"bbolt", func(*testing.B) string { return "" }},
	{"postgresql", func(b *testing.B) string { return freshPostgres(b) }},
}

type signJob struct{ body []byte }

func prepareSignJobs(b *testing.B, a *Authority, n int) []signJob {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	jobs := make([]signJob, n)
	for i := range jobs {
		name := fmt.Sprintf("bench-%d", i)
		tok, err := a.MintToken(RoleAgent, name, 0)
		if err != nil {
			b.Fatal(err)
		}
		id := a.Identity(RoleAgent, name)
		der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
			Subject: pkix.Name{CommonName: name}, URIs: []*url.URL{id.URI()},
		}, key)
		if err != nil {
			b.Fatal(err)
		}
		jobs[i].body, _ = json.Marshal(map[string]string{
			"csr": string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})), "ott": tok,
		})
	}
	return jobs
}

func BenchmarkEnroll(b *testing.B) {
	for _, db := range benchDBs {
		b.Run(db.name, func(b *testing.B) {
			e := startEnv(b, b.TempDir(), db.dsn(b), nil)
			jobs := prepareSignJobs(b, e.a, b.N)
			next := make(chan signJob, len(jobs))
			for _, j := range jobs {
				next <- j
			}
			close(next)
			tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: e.a.RootPool(), MinVersion: tls.VersionTLS13},
				ForceAttemptHTTP2: false, MaxIdleConnsPerHost: 64}
			defer tr.CloseIdleConnections()
			hc := &http.Client{Transport: tr}
			b.SetParallelism(benchParallelism)
			cpu0 := cpuTime()
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					if !postCreated(b, hc, e.url+"/1.0/sign", (<-next).body) {
						return
					}
				}
			})
			report(b, cpu0, "enroll/s")
		})
	}
}

func BenchmarkSignInProcess(b *testing.B) {
	for _, db := range benchDBs {
		b.Run(db.name, func(b *testing.B) {
			e := startEnv(b, b.TempDir(), db.dsn(b), nil)
			type job struct {
				tok string
				csr *x509.CertificateRequest
			}
			key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
			jobs := make(chan job, b.N)
			for i := range b.N {
				name := fmt.Sprintf("bench-%d", i)
				tok, _ := e.a.MintToken(RoleAgent, name, 0)
				der, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
					Subject: pkix.Name{CommonName: name}, URIs: []*url.URL{e.a.Identity(RoleAgent, name).URI()},
				}, key)
				csr, _ := x509.ParseCertificateRequest(der)
				jobs <- job{tok, csr}
			}
			close(jobs)
			ctx := provisioner.NewContextWithMethod(authority.NewContext(context.Background(), e.a.auth), provisioner.SignMethod)
			b.SetParallelism(benchParallelism)
			cpu0 := cpuTime()
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					j := <-jobs
					opts, err := e.a.auth.Authorize(ctx, j.tok)
					if err != nil {
						b.Error(err)
						return
					}
					if _, err := e.a.auth.SignWithContext(ctx, j.csr, provisioner.SignOptions{}, opts...); err != nil {
						b.Error(err)
						return
					}
				}
			})
			report(b, cpu0, "sign/s")
		})
	}
}

func BenchmarkRenew(b *testing.B) {
	for _, db := range benchDBs {
		b.Run(db.name, func(b *testing.B) {
			e := startEnv(b, b.TempDir(), db.dsn(b), nil)
			creds := mustEnroll(b, mustToken(b, e.a, RoleAgent, "renewer"))
			tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: e.a.RootPool(), MinVersion: tls.VersionTLS13,
				Certificates: []tls.Certificate{*creds.TLSCertificate()}}, MaxIdleConnsPerHost: 64}
			defer tr.CloseIdleConnections()
			hc := &http.Client{Transport: tr}
			b.SetParallelism(benchParallelism)
			cpu0 := cpuTime()
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					if !postCreated(b, hc, e.url+"/1.0/renew", nil) {
						return
					}
				}
			})
			report(b, cpu0, "renew/s")
		})
	}
}

// postCreated POSTs body to url and reports whether the CA answered 201 Created; anything
// else fails b.
func postCreated(b *testing.B, hc *http.Client, url string, body []byte) bool {
	resp, err := hc.Post(url, "application/json", bytes.NewReader(body))
	if err != nil {
		b.Error(err)
		return false
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusCreated {
		b.Errorf("POST %s: HTTP %d", url, resp.StatusCode)
		return false
	}
	return true
}

// BenchmarkECDSAP256Verify calibrates the machine in the same run: one P-256
// signature verification, the unit of work every enrollment does several of (token,
// CSR, chain).
func BenchmarkECDSAP256Verify(b *testing.B) {
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	h := make([]byte, 32)
	sig, _ := ecdsa.SignASN1(rand.Reader, k, h)
	for b.Loop() {
		if !ecdsa.VerifyASN1(&k.PublicKey, h, sig) {
			b.Fatal("verify failed")
		}
	}
}
