package metrics

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/wicketgw/wicket/gateway"
)

// readyTimeout bounds one /readyz answer; the gateway's own checks are bounded tighter.
const readyTimeout = 5 * time.Second

// Health is the JSON body of /healthz and /readyz.
type Health struct {
	// Status is "ok" or "not ready" (/readyz only).
	Status string `json:"status"`
	// Checks are the readiness checks (/readyz only); a failed one says why.
	Checks []gateway.Check `json:"checks,omitempty"`
	// Failed names the checks that failed.
	Failed []string `json:"failed,omitempty"`
}

// Handler serves /metrics (from reg), /healthz (200 while the process serves HTTP at all)
// and /readyz (200 when every readiness check of src passes, else 503 naming the failed
// ones). Anything else is 404.
func Handler(src Source, reg *prometheus.Registry, logger *slog.Logger) http.Handler {
	return handler(reg, src.Ready, logger)
}

// ReadyFunc runs readiness checks; /readyz is 200 when all pass.
type ReadyFunc func(ctx context.Context) []gateway.Check

func handler(reg *prometheus.Registry, ready ReadyFunc, logger *slog.Logger) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{
		ErrorLog:          slog.NewLogLogger(logger.Handler(), slog.LevelWarn),
		ErrorHandling:     promhttp.ContinueOnError,
		Registry:          reg,
		EnableOpenMetrics: false,
	}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		writeHealth(w, http.StatusOK, Health{Status: "ok"})
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), readyTimeout)
		defer cancel()
		h := Health{Status: "ok", Checks: ready(ctx)}
		for _, c := range h.Checks {
			if !c.OK {
				h.Failed = append(h.Failed, c.Name)
			}
		}
		status := http.StatusOK
		if len(h.Failed) > 0 {
			h.Status, status = "not ready", http.StatusServiceUnavailable
		}
		writeHealth(w, status, h)
	})
	return mux
}

func writeHealth(w http.ResponseWriter, status int, h Health) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(h)
}

// Server is the metrics listener.
type Server struct {
	ln  net.Listener
	srv *http.Server
	log *slog.Logger
}

// Listen binds addr (host:port; port 0 picks one) for the metrics endpoint of src. A host
// that is not a loopback address draws a warning: the endpoint has no authentication.
func Listen(addr string, src Source, logger *slog.Logger) (*Server, error) {
	return NewServer(addr, NewRegistry(src), src.Ready, logger)
}

// NewServer binds addr for /metrics from reg and the probes from ready; the agent's
// endpoint uses it with a registry of its own.
func NewServer(addr string, reg *prometheus.Registry, ready ReadyFunc, logger *slog.Logger) (*Server, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("metrics listener on %s: %w", addr, err)
	}
	if tcp, ok := ln.Addr().(*net.TCPAddr); ok && !tcp.IP.IsLoopback() {
		logger.Warn("the metrics listener is not on loopback: /metrics and the probes have no authentication, "+
			"so make sure only the monitoring system can reach it", "addr", ln.Addr().String())
	}
	return &Server{
		ln:  ln,
		log: logger,
		srv: &http.Server{
			Handler:           handler(reg, ready, logger),
			ReadHeaderTimeout: 5 * time.Second,
			ReadTimeout:       10 * time.Second,
			WriteTimeout:      30 * time.Second,
			IdleTimeout:       2 * time.Minute,
			ErrorLog:          slog.NewLogLogger(logger.Handler(), slog.LevelDebug),
		},
	}, nil
}

// Addr is the bound address.
func (s *Server) Addr() net.Addr { return s.ln.Addr() }

// Serve serves until ctx ends, then shuts down (waiting up to 5 s for scrapes in progress)
// and returns nil; any other error is returned.
func (s *Server) Serve(ctx context.Context) error {
	errc := make(chan error, 1)
	go func() { errc <- s.srv.Serve(s.ln) }()
	select {
	case err := <-errc:
		return fmt.Errorf("metrics listener: %w", err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	err := s.srv.Shutdown(sctx)
	if serr := <-errc; serr != nil && !errors.Is(serr, http.ErrServerClosed) {
		return fmt.Errorf("metrics listener: %w", serr)
	}
	if err != nil {
		_ = s.srv.Close()
	}
	return nil
}

// Close stops the listener at once (also when Serve was never called).
func (s *Server) Close() error {
	err := s.srv.Close()
	_ = s.ln.Close()
	return err
}
