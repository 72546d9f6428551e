package ca

import (
	"crypto/tls"
	"crypto/x509"
	"net"
	"sync"
	"testing"
	"time"
)

func TestGatewayCertificateRotation(t *testing.T) {
	var mu sync.Mutex
	var waits []time.Duration
	tick := make(chan time.Time)
	type issued struct {
		serial  string
		renewal bool
	}
	var reported []issued
	e := startEnv(t, t.TempDir(), "", func(c *Config) {
		c.OnGatewayCertificate = func(serial string, _ time.Time, renewal bool) {
			mu.Lock()
			reported = append(reported, issued{serial, renewal})
			mu.Unlock()
		}
		c.GatewayLifetime = 30 * time.Minute
		c.ServerNames = []string{"gw.example.com", "10.1.2.3"}
		c.After = func(d time.Duration) <-chan time.Time {
			mu.Lock()
			waits = append(waits, d)
			mu.Unlock()
			return tick
		}
	})
	first, _ := e.a.GetCertificate(nil)
	leaf := first.Leaf
	if leaf.NotAfter.Sub(leaf.NotBefore) < 30*time.Minute || leaf.NotAfter.Sub(leaf.NotBefore) > 32*time.Minute {
		t.Fatalf("gateway lifetime %s", leaf.NotAfter.Sub(leaf.NotBefore))
	}
	id, err := ParseIdentity(leaf)
	if err != nil || id.Role != RoleGateway || id.Name != "gateway" {
		t.Fatalf("gateway identity %v %v", id, err)
	}
	if len(leaf.DNSNames) != 1 || leaf.DNSNames[0] != "gw.example.com" || len(leaf.IPAddresses) != 2 {
		t.Fatalf("gateway SANs %v %v", leaf.DNSNames, leaf.IPAddresses)
	}
	hasServer := false
	for _, u := range leaf.ExtKeyUsage {
		hasServer = hasServer || u == x509.ExtKeyUsageServerAuth
	}
	if !hasServer {
		t.Fatal("gateway certificate lacks server auth")
	}
	// The loop asked to wait about 2/3 of the lifetime (minus at most 5% jitter).
	deadline := time.Now().Add(5 * time.Second)
	for {
		mu.Lock()
		n := len(waits)
		mu.Unlock()
		if n > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("renewal never scheduled")
		}
		time.Sleep(time.Millisecond)
	}
	mu.Lock()
	w := waits[0]
	mu.Unlock()
	life := leaf.NotAfter.Sub(leaf.NotBefore)
	if w > life*2/3 || w < life*2/3-life/20-2*time.Minute {
		t.Fatalf("renewal scheduled in %s for a %s certificate", w, life)
	}
	tick <- time.Now()
	// A new handshake sees the new certificate, without restart.
	deadline = time.Now().Add(10 * time.Second)
	for {
		c, _ := e.a.GetCertificate(nil)
		if c.Leaf.SerialNumber.Cmp(leaf.SerialNumber) != 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("gateway certificate not rotated")
		}
		time.Sleep(5 * time.Millisecond)
	}
	conn, err := tls.Dial("tcp", e.ln.Addr().String(), &tls.Config{RootCAs: e.a.RootPool(), ServerName: "127.0.0.1", MinVersion: tls.VersionTLS13})
	if err != nil {
		t.Fatal(err)
	}
	served := conn.ConnectionState().PeerCertificates[0]
	conn.Close()
	if served.SerialNumber.Cmp(leaf.SerialNumber) == 0 {
		t.Fatal("server still serves the old certificate")
	}
	if ip := net.ParseIP("127.0.0.1"); !containsIP(served.IPAddresses, ip) {
		t.Fatalf("served certificate lacks the URL host: %v", served.IPAddresses)
	}
	// Both issuances were reported (for the gateway's metrics and audit), the second as a renewal.
	mu.Lock()
	defer mu.Unlock()
	want := []issued{{leaf.SerialNumber.String(), false}, {served.SerialNumber.String(), true}}
	if len(reported) != 2 || reported[0] != want[0] || reported[1] != want[1] {
		t.Fatalf("OnGatewayCertificate saw %+v, want %+v", reported, want)
	}
}

func containsIP(l []net.IP, ip net.IP) bool {
	for _, x := range l {
		if x.Equal(ip) {
			return true
		}
	}
	return false
}
