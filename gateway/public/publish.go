package public

import (
	"fmt"
	"strings"
)

// ParsePublish parses the gateway's --publish flag values, "RESOURCE=HOST[,ACCESS]" with
// ACCESS "users" (the default: a Wicket user certificate is required) or "public", e.g.
// "web=web.example.com,public", into Config.Hosts. The same host twice is an error.
func ParsePublish(specs []string) (map[string]Host, error) {
	hosts := make(map[string]Host, len(specs))
	for _, spec := range specs {
		resource, rest, ok := strings.Cut(spec, "=")
		if !ok || resource == "" || rest == "" {
			return nil, fmt.Errorf("%w: --publish %q is not RESOURCE=HOST[,public|users]", ErrConfig, spec)
		}
		host, access, _ := strings.Cut(rest, ",")
		h := Host{Resource: strings.TrimSpace(resource), Access: Access(strings.TrimSpace(access))}
		if h.Access == "" {
			h.Access = AccessUsers
		}
		if h.Access != AccessPublic && h.Access != AccessUsers {
			return nil, fmt.Errorf("%w: --publish %q: access %q is neither %q nor %q", ErrConfig, spec, access, AccessPublic, AccessUsers)
		}
		host = strings.ToLower(strings.TrimSuffix(strings.TrimSpace(host), "."))
		if _, dup := hosts[host]; dup {
			return nil, fmt.Errorf("%w: --publish: host %s is published twice", ErrConfig, host)
		}
		hosts[host] = h
	}
	return hosts, nil
}
