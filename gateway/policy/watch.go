package policy

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"
)

// DefaultInterval is how often a Watcher polls when WatchConfig.Interval is 0.
const DefaultInterval = time.Second

// WatchConfig configures [NewWatcher].
type WatchConfig struct {
	// Path is the policy file. Required; it must exist and be valid at start.
	Path string
	// Interval between polls. Default DefaultInterval (1 s). A change is
	// applied once it has been seen unchanged on two consecutive polls, so
	// it takes effect 1 to 2 intervals after the file is saved.
	Interval time.Duration
	// Logger receives one line per applied reload and one per rejected
	// change. Default: discard.
	Logger *slog.Logger
	// OnReload, if set, is called from the watcher goroutine after each
	// change of the file: with nil when the new policy is in force, or with
	// the reason it was rejected (invalid, unreadable, deleted) while the
	// previous policy stays in force. Each distinct rejection is reported
	// once, not on every poll. The gateway uses it to write a
	// policy.reloaded audit record. It must not block for long: polling
	// waits for it.
	OnReload func(err error)
}

// Watcher holds the current policy of a file and reloads it when the file
// changes. Its methods are safe for concurrent use.
//
// It polls rather than using inotify: every interval it reads the file and
// compares a SHA-256 of the content with the policy in force. Reading a small
// file once a second costs 11-14 µs (BenchmarkPoll), needs no dependency, survives editors
// that save by rename and directories that are replaced (Kubernetes ConfigMap
// symlink swaps), and, unlike comparing mtime and size, cannot miss an edit
// that keeps the file's size and lands in the same coarse kernel timestamp
// tick as the previous write.
//
// A new content is applied only after it was read identically on two
// consecutive polls: a save caught half-written must not be enforced, since a
// truncated block list can be valid YAML that names a different user ("alice"
// from "alice-contractor").
type Watcher struct {
	cfg    WatchConfig
	log    *slog.Logger
	cur    atomic.Pointer[Policy]
	cancel context.CancelFunc
	done   chan struct{}
	once   sync.Once

	// Owned by the polling goroutine.
	inForce  [32]byte // hash of the content in force
	pending  string   // a new state (content hash or read error) seen once, waiting to be seen again
	rejected string   // the last rejection reported, to report each one once

	polls atomic.Int64 // completed polls; lets tests wait for progress without sleeping
}

// Watch is NewWatcher with only the path, logger and interval set.
func Watch(ctx context.Context, path string, logger *slog.Logger, interval time.Duration) (*Watcher, error) {
	return NewWatcher(ctx, WatchConfig{Path: path, Logger: logger, Interval: interval})
}

// NewWatcher loads the policy file (an error if it is missing or invalid,
// so a gateway never starts with a policy it cannot read) and starts polling
// it until ctx ends or Close is called.
func NewWatcher(ctx context.Context, cfg WatchConfig) (*Watcher, error) {
	if cfg.Path == "" {
		return nil, errors.New("policy watcher: no policy file given")
	}
	if cfg.Interval < 0 {
		return nil, fmt.Errorf("policy watcher: negative interval %v", cfg.Interval)
	}
	if cfg.Interval == 0 {
		cfg.Interval = DefaultInterval
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	data, err := readFile(cfg.Path)
	if err != nil {
		return nil, err
	}
	p, err := Parse(data)
	if err != nil {
		return nil, fmt.Errorf("policy file %s: %w", cfg.Path, err)
	}
	ctx, cancel := context.WithCancel(ctx)
	w := &Watcher{cfg: cfg, log: log, cancel: cancel, done: make(chan struct{})}
	w.cur.Store(p)
	w.inForce = sha256.Sum256(data)
	go w.run(ctx)
	return w, nil
}

// Allow reports whether user may reach resource under the policy in force.
func (w *Watcher) Allow(user, resource string) bool { return w.cur.Load().Allow(user, resource) }

// Decide is Allow with the rule that decided.
func (w *Watcher) Decide(user, resource string) Decision {
	return w.cur.Load().Decide(user, resource)
}

// Policy returns the policy in force.
func (w *Watcher) Policy() *Policy { return w.cur.Load() }

// Close stops polling and waits for the goroutine to end. It is idempotent
// and always returns nil.
func (w *Watcher) Close() error {
	w.once.Do(w.cancel)
	<-w.done
	return nil
}

func (w *Watcher) run(ctx context.Context) {
	defer close(w.done)
	t := time.NewTicker(w.cfg.Interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			w.poll()
			w.polls.Add(1)
		}
	}
}

func (w *Watcher) poll() {
	data, err := readFile(w.cfg.Path)
	if err != nil {
		// A file missing for one poll is an editor between rename and write.
		if !w.seenTwice("read error: " + err.Error()) {
			return
		}
		w.reject(err)
		return
	}
	h := sha256.Sum256(data)
	if h == w.inForce {
		w.pending = ""
		if w.rejected != "" {
			w.rejected = ""
			w.log.Info("policy file is back to the policy in force", "path", w.cfg.Path)
		}
		return
	}
	if !w.seenTwice(fmt.Sprintf("content %x", h)) {
		return
	}
	p, err := Parse(data)
	if err != nil {
		w.reject(fmt.Errorf("policy file %s: %w", w.cfg.Path, err))
		return
	}
	w.cur.Store(p)
	w.inForce = h
	w.pending = ""
	w.rejected = ""
	w.log.Info("policy reloaded", "path", w.cfg.Path, "rules", p.Len())
	if w.cfg.OnReload != nil {
		w.cfg.OnReload(nil)
	}
}

// seenTwice reports whether state was also what the previous poll saw, so
// that only a state that held for a whole interval is acted on.
func (w *Watcher) seenTwice(state string) bool {
	if w.pending == state {
		return true
	}
	w.pending = state
	return false
}

func (w *Watcher) reject(err error) {
	if err.Error() == w.rejected {
		return
	}
	w.rejected = err.Error()
	w.log.Error("policy file change rejected, keeping the previous policy", "path", w.cfg.Path, "err", err)
	if w.cfg.OnReload != nil {
		w.cfg.OnReload(err)
	}
}
