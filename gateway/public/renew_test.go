package public

import (
	"context"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// load runs n clients that each fetch the page on a new connection (a new TLS handshake per
// request) until stop is closed; it returns the request count, the failures (with the first
// error) and the certificate serials seen.
type load struct {
	ok, failed atomic.Int64
	mu         sync.Mutex
	firstErr   string
	serials    map[string]bool
	wg         sync.WaitGroup
}

func startLoad(e *env, host string, n int, stop <-chan struct{}) *load {
	l := &load{serials: map[string]bool{}}
	c := e.client(nil, false)
	for range n {
		l.wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				status, body, _, leaf, err := get(c, e.url(host, "/load"), nil)
				if err == nil && (status != http.StatusOK || !strings.HasPrefix(body, "hello")) {
					err = &statusError{status}
				}
				l.mu.Lock()
				if err != nil {
					l.failed.Add(1)
					if l.firstErr == "" {
						l.firstErr = err.Error()
					}
				} else {
					l.ok.Add(1)
					l.serials[leaf.SerialNumber.String()] = true
				}
				l.mu.Unlock()
			}
		})
	}
	return l
}

type statusError struct{ code int }

func (e *statusError) Error() string { return http.StatusText(e.code) }

// A forced renewal (a real new order validated by Pebble over tls-alpn-01 on the listener that
// serves the load) while clients keep opening new TLS connections: no request fails, and the
// new certificate is served afterwards.
func TestForcedRenewalDropsNoRequest(t *testing.T) {
	checkLeaks(t)
	host := testHost("forced")
	e := startEnv(t, envOptions{hosts: map[string]Host{host: {Resource: "web", Access: AccessPublic}}}, nil)
	first := e.waitCert(host)

	stop := make(chan struct{})
	l := startLoad(e, host, 4, stop)
	for l.ok.Load() < 20 && l.failed.Load() == 0 {
		time.Sleep(5 * time.Millisecond) // polling; the load runs on its own
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := e.srv.RenewNow(ctx, host); err != nil {
		t.Fatal(err)
	}
	renewed, _ := e.srv.Certificate(host)
	if renewed.SerialNumber.Cmp(first.SerialNumber) == 0 {
		t.Fatal("RenewNow returned but the same certificate is served")
	}
	// Keep the load going until it has seen the new certificate.
	deadline := time.Now().Add(10 * time.Second)
	for {
		l.mu.Lock()
		seen := l.serials[renewed.SerialNumber.String()]
		l.mu.Unlock()
		if seen || time.Now().After(deadline) {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	close(stop)
	l.wg.Wait()
	t.Logf("requests: %d ok, %d failed; serials seen: %d", l.ok.Load(), l.failed.Load(), len(l.serials))
	if l.failed.Load() != 0 {
		t.Fatalf("%d requests failed during the renewal, first: %s", l.failed.Load(), l.firstErr)
	}
	if !l.serials[first.SerialNumber.String()] || !l.serials[renewed.SerialNumber.String()] {
		t.Fatalf("the load saw serials %v, want both the old %v and the new %v", l.serials, first.SerialNumber, renewed.SerialNumber)
	}
	if s := e.srv.Stats(); s.CertsRenewed != 1 || s.RenewalFailures != 0 {
		t.Fatalf("stats %+v", s)
	}
}

// Background renewal: with short-lived certificates (Pebble issues 1-hour ones here) and a
// renewal window of 99.9% of the lifetime, certmagic's maintenance loop renews on its own;
// clients see the new certificate with no failed request.
func TestBackgroundRenewalDropsNoRequest(t *testing.T) {
	checkLeaks(t)
	host := testHost("background")
	e := startEnv(t, envOptions{
		hosts:    map[string]Host{host: {Resource: "web", Access: AccessPublic}},
		validity: 3600, ratio: 0.999, interval: 200 * time.Millisecond,
	}, nil)
	first := e.waitCert(host)
	stop := make(chan struct{})
	l := startLoad(e, host, 4, stop)
	// Generous: under -race on a shared 2-core machine an ACME order can take many seconds.
	deadline := time.Now().Add(90 * time.Second)
	for {
		cur, _ := e.srv.Certificate(host)
		l.mu.Lock()
		seen := cur.SerialNumber.Cmp(first.SerialNumber) != 0 && l.serials[cur.SerialNumber.String()]
		l.mu.Unlock()
		if seen {
			break
		}
		if time.Now().After(deadline) {
			close(stop)
			l.wg.Wait()
			t.Fatalf("no background renewal served within 90s (stats %+v)", e.srv.Stats())
		}
		time.Sleep(10 * time.Millisecond)
	}
	close(stop)
	l.wg.Wait()
	t.Logf("requests: %d ok, %d failed; serials seen: %d; stats %+v", l.ok.Load(), l.failed.Load(), len(l.serials), e.srv.Stats())
	if l.failed.Load() != 0 {
		t.Fatalf("%d requests failed during background renewal, first: %s", l.failed.Load(), l.firstErr)
	}
	if e.srv.Stats().CertsRenewed == 0 {
		t.Fatal("a new certificate is served but no renewal was counted")
	}
}

// With the ACME CA gone, a renewal fails, is counted and audited, and the old certificate
// keeps serving; a gateway restarted while the CA is still gone serves the stored
// certificate and keeps retrying in the background, counting every failure.
func TestCAUnreachableKeepsServing(t *testing.T) {
	checkLeaks(t)
	host := testHost("down")
	hosts := map[string]Host{host: {Resource: "web", Access: AccessPublic}}
	storage := filepath.Join(t.TempDir(), "certmagic")
	e := startEnv(t, envOptions{hosts: hosts, storage: storage, validity: 3600}, nil)
	first := e.waitCert(host)
	e.pebble.Stop()

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := e.srv.RenewNow(ctx, host); err == nil {
		t.Fatal("renewal succeeded with the ACME CA stopped")
	}
	if s := e.srv.Stats(); s.RenewalFailures == 0 {
		t.Fatalf("the failed renewal was not counted: %+v", s)
	}
	if recs := e.audits.ofType(TypePublicCertFailed); len(recs) == 0 || recs[0].Extra["renewal"] != "true" {
		t.Fatalf("no public_cert.failed audit record for the renewal: %+v", recs)
	}
	status, _, _, leaf, err := get(e.client(nil, false), e.url(host, "/"), nil)
	if err != nil || status != http.StatusOK {
		t.Fatalf("with the CA down: %d %v", status, err)
	}
	if leaf.SerialNumber.Cmp(first.SerialNumber) != 0 {
		t.Fatal("a different certificate is served after a failed renewal")
	}

	// Restart on the same storage, CA still down, the 1-hour certificate due for renewal at once.
	e.stop()
	e2 := startEnv(t, envOptions{hosts: hosts, storage: storage, pebble: e.pebble,
		ln: listen(t), httpLn: listen(t), ratio: 0.9999, interval: 100 * time.Millisecond}, nil)
	status, _, _, leaf, err = get(e2.client(nil, false), e2.url(host, "/"), nil)
	if err != nil || status != http.StatusOK || leaf.SerialNumber.Cmp(first.SerialNumber) != 0 {
		t.Fatalf("after a restart with the CA down: %d %v", status, err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for e2.srv.Stats().RenewalFailures == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("no background renewal failure counted within 20s: %+v", e2.srv.Stats())
		}
		time.Sleep(20 * time.Millisecond)
	}
	status, _, _, leaf, err = get(e2.client(nil, false), e2.url(host, "/"), nil)
	if err != nil || status != http.StatusOK || leaf.SerialNumber.Cmp(first.SerialNumber) != 0 {
		t.Fatalf("after failed background renewals: %d %v", status, err)
	}
}
