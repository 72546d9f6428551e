package gateway

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"path/filepath"
	"syscall"
	"time"

	"github.com/wicketgw/wicket/ca"
)

// ErrGatewayUnreachable means the admin socket could not be reached (errors.Is).
var ErrGatewayUnreachable = errors.New("gateway unreachable")

// unreachableError says, in one sentence, that the admin socket did not answer.
type unreachableError struct {
	sock, dataDir string
	err           error
}

func (e *unreachableError) Error() string { return unreachableSentence(e.sock, e.dataDir, e.err) }

// unreachableSentence says why the admin socket sock could not be dialed and what to do: a
// permission error means the gateway may well be running, under another user (the socket is
// 0600 in a 0700 directory); anything else, that it is probably not running.
func unreachableSentence(sock, dataDir string, err error) string {
	if errors.Is(err, syscall.EACCES) || errors.Is(err, syscall.EPERM) {
		return fmt.Sprintf("permission denied on %s: run as the gateway's user (the admin socket is readable by that user only)", sock)
	}
	return fmt.Sprintf("cannot reach the gateway at %s: is `wicket gateway --data-dir %s` running?", sock, dataDir)
}

func (e *unreachableError) Is(target error) bool { return target == ErrGatewayUnreachable }
func (e *unreachableError) Unwrap() error        { return e.err }

// AdminClient talks to a local gateway's admin API over <data-dir>/admin.sock.
type AdminClient struct {
	dataDir string
	sock    string
	hc      *http.Client
}

// NewAdminClient returns a client for the gateway whose data directory is dataDir.
func NewAdminClient(dataDir string) *AdminClient {
	sock := filepath.Join(dataDir, AdminSocketName)
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		},
		MaxIdleConns:    1,
		IdleConnTimeout: 10 * time.Second,
	}
	return &AdminClient{dataDir: dataDir, sock: sock, hc: &http.Client{Transport: tr, Timeout: time.Minute}}
}

// Close releases idle connections.
func (c *AdminClient) Close() { c.hc.CloseIdleConnections() }

// CreateToken mints a one-time enrollment token for role/name; ttl 0 means 15 minutes. For
// an agent, resources are granted to the name (merged with its grant) before the token is
// returned; without them the agent serves nothing until they are allowed.
func (c *AdminClient) CreateToken(ctx context.Context, role ca.Role, name string, ttl time.Duration, resources ...string) (string, error) {
	return c.token(ctx, TokenRequest{Role: string(role), Name: name, Resources: resources}, ttl)
}

// CreateACMECredential creates a one-time ACME enrollment credential (an EAB key bound
// to agent name, the gateway URL and root fingerprint); ttl 0 means 15 minutes. resources
// are granted as with CreateToken.
func (c *AdminClient) CreateACMECredential(ctx context.Context, name string, ttl time.Duration, resources ...string) (string, error) {
	return c.token(ctx, TokenRequest{Role: string(ca.RoleAgent), Name: name, ACME: true, Resources: resources}, ttl)
}

// AllowResources grants resources to agent name, effective at once for its live sessions.
func (c *AdminClient) AllowResources(ctx context.Context, name string, resources []string) (GrantResult, error) {
	var out GrantResult
	err := c.do(ctx, http.MethodPost, "/v1/agents/"+url.PathEscape(name)+"/grants", GrantRequest{Resources: resources}, &out)
	return out, err
}

// DisallowResources withdraws resources from agent name: they are no longer routed to it
// (streams open now keep running).
func (c *AdminClient) DisallowResources(ctx context.Context, name string, resources []string) (GrantResult, error) {
	var out GrantResult
	err := c.do(ctx, http.MethodPost, "/v1/agents/"+url.PathEscape(name)+"/grants",
		GrantRequest{Resources: resources, Disallow: true}, &out)
	return out, err
}

func (c *AdminClient) token(ctx context.Context, req TokenRequest, ttl time.Duration) (string, error) {
	if ttl != 0 {
		req.TTL = ttl.String()
	}
	var resp TokenResponse
	if err := c.do(ctx, http.MethodPost, "/v1/tokens", req, &resp); err != nil {
		return "", err
	}
	return resp.Token, nil
}

// Agents lists the agents the gateway knows.
func (c *AdminClient) Agents(ctx context.Context) ([]AgentInfo, error) {
	var out []AgentInfo
	err := c.do(ctx, http.MethodGet, "/v1/agents", nil, &out)
	return out, err
}

// Sessions lists the user sessions being relayed.
func (c *AdminClient) Sessions(ctx context.Context) ([]SessionInfo, error) {
	var out []SessionInfo
	err := c.do(ctx, http.MethodGet, "/v1/sessions", nil, &out)
	return out, err
}

// RevokeAgent revokes every unexpired certificate of agent name and closes its sessions.
func (c *AdminClient) RevokeAgent(ctx context.Context, name string) (RevokeResult, error) {
	var out RevokeResult
	err := c.do(ctx, http.MethodPost, "/v1/agents/"+url.PathEscape(name)+"/revoke", nil, &out)
	return out, err
}

// RevokeUser revokes every unexpired certificate of user name and closes their sessions.
func (c *AdminClient) RevokeUser(ctx context.Context, name string) (RevokeResult, error) {
	var out RevokeResult
	err := c.do(ctx, http.MethodPost, "/v1/users/"+url.PathEscape(name)+"/revoke", nil, &out)
	return out, err
}

// ForgetAgent removes an offline agent from the gateway's list of known agents.
func (c *AdminClient) ForgetAgent(ctx context.Context, name string) error {
	return c.do(ctx, http.MethodDelete, "/v1/agents/"+url.PathEscape(name), nil, nil)
}

func (c *AdminClient) do(ctx context.Context, method, path string, body, out any) error {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://wicket-admin"+path, rd)
	if err != nil {
		return err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		var op *net.OpError
		if errors.As(err, &op) && op.Op == "dial" {
			return &unreachableError{sock: c.sock, dataDir: c.dataDir, err: err}
		}
		return fmt.Errorf("admin request %s %s: %w", method, path, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return fmt.Errorf("read the gateway's answer: %w", err)
	}
	if resp.StatusCode/100 != 2 {
		var eb errorBody
		if json.Unmarshal(data, &eb) == nil && eb.Error != "" {
			return &AdminError{Status: resp.StatusCode, Message: eb.Error}
		}
		return &AdminError{Status: resp.StatusCode, Message: fmt.Sprintf("the gateway answered %s", resp.Status)}
	}
	if out != nil {
		if err := json.Unmarshal(data, out); err != nil {
			return fmt.Errorf("decode the gateway's answer: %w", err)
		}
	}
	return nil
}
