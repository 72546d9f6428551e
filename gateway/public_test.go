package gateway

import (
	"context"
	"crypto/tls"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/wicketgw/wicket/ca"
	"github.com/wicketgw/wicket/gateway/public"
)

// With a public listener configured on the built-in CA: the gateway's ACME directory is on
// (allowed exactly the published names), and the public listener's dialer reaches the agent
// exposing the resource.
func TestPublicListenerWiring(t *testing.T) {
	checkLeaks(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	tg := startGateway(t, func(c *Config) {
		c.Public = &PublicConfig{Publish: []string{"web=web.wicket.test,public"}, ACMECA: "internal",
			Listener: ln, HTTPListen: "off"}
	})
	echo := echoServer(t)
	if _, err := tg.connectAgent(tg.enroll(ca.RoleAgent, "site"), "i", map[string]string{"web": echo}); err != nil {
		t.Fatal(err)
	}

	host, _, _ := net.SplitHostPort(tg.PublicAddr())
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: tg.Authority().RootPool(), ServerName: host}}
	defer tr.CloseIdleConnections()
	resp, err := (&http.Client{Transport: tr, Timeout: 10 * time.Second}).Get("https://" + tg.Addr().String() + "/acme/acme/directory")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), "newOrder") {
		t.Fatalf("ACME directory: %s %s", resp.Status, body)
	}
	tr.CloseIdleConnections()

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := tg.DialResource(ctx, "web", public.Meta{Host: "web.wicket.test", Remote: "127.0.0.1:1"})
	if err != nil {
		t.Fatalf("DialResource: %v", err)
	}
	if _, err := c.Write([]byte("GET")); err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 3)
	if _, err := io.ReadFull(c, b); err != nil || string(b) != "GET" {
		t.Fatalf("through the dialed stream: %q %v", b, err)
	}
	c.Close()
	if _, err := tg.DialResource(ctx, "nothing", public.Meta{}); err == nil || !strings.Contains(err.Error(), "no connected agent exposes resource nothing") {
		t.Fatalf("DialResource to an unexposed resource: %v", err)
	}
	tg.stop()
}
