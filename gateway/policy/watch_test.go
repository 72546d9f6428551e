package policy

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
)

const (
	aliceWeb = "rules:\n  - users: [alice]\n    resources: [web]\n"
	bobWeb   = "rules:\n  - users: [bob]\n    resources: [web]\n"
	carolDB  = "rules:\n  - users: [carol]\n    resources: [postgres]\n"
	invalid  = "rules:\n  - users: [alice]\n    resourcez: [web]\n"
)

// writeByRename saves the way most editors and config tools do.
func writeByRename(t *testing.T, path, content string) {
	t.Helper()
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// syncBuffer collects log output from the watcher goroutine.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

type fixture struct {
	path    string
	w       *Watcher
	reloads chan error
	logs    *syncBuffer
}

func startWatcher(t *testing.T, initial string, interval time.Duration) *fixture {
	t.Helper()
	return startWatcherSettle(t, initial, interval, 0)
}

func startWatcherSettle(t *testing.T, initial string, interval, settle time.Duration) *fixture {
	t.Helper()
	f := &fixture{
		path:    filepath.Join(t.TempDir(), "policy.yaml"),
		reloads: make(chan error, 100),
		logs:    &syncBuffer{},
	}
	writeByRename(t, f.path, initial)
	w, err := NewWatcher(context.Background(), WatchConfig{
		Path:     f.path,
		Interval: interval,
		Settle:   settle,
		Logger:   slog.New(slog.NewTextHandler(f.logs, nil)),
		OnReload: func(err error) { f.reloads <- err },
	})
	if err != nil {
		t.Fatalf("NewWatcher: %v", err)
	}
	f.w = w
	t.Cleanup(func() { w.Close() })
	return f
}

// nextReload waits for the OnReload hook, with a deadline.
func (f *fixture) nextReload(t *testing.T) error {
	t.Helper()
	select {
	case err := <-f.reloads:
		return err
	case <-time.After(5 * time.Second):
		t.Fatal("no reload within 5s")
		return nil
	}
}

// waitPolls waits until the watcher has polled n more times.
func (f *fixture) waitPolls(t *testing.T, n int64) {
	t.Helper()
	target := f.w.polls.Load() + n
	deadline := time.Now().Add(5 * time.Second)
	tick := time.NewTicker(time.Millisecond)
	defer tick.Stop()
	for f.w.polls.Load() < target {
		if time.Now().After(deadline) {
			t.Fatalf("watcher did not poll %d times within 5s", n)
		}
		<-tick.C
	}
}

func (f *fixture) noMoreReloads(t *testing.T) {
	t.Helper()
	f.waitPolls(t, 5)
	select {
	case err := <-f.reloads:
		t.Fatalf("unexpected extra OnReload(%v)", err)
	default:
	}
}

func TestWatchReloads(t *testing.T) {
	f := startWatcher(t, aliceWeb, 2*time.Millisecond)
	if !f.w.Allow("alice", "web") || f.w.Allow("bob", "web") {
		t.Fatal("initial policy not in force")
	}

	writeByRename(t, f.path, bobWeb)
	if err := f.nextReload(t); err != nil {
		t.Fatalf("OnReload(%v) after a valid change", err)
	}
	if !f.w.Allow("bob", "web") || f.w.Allow("alice", "web") {
		t.Fatal("renamed-in policy not applied")
	}

	// Saved in place (same inode), not by rename. The new content is longer
	// and written in one call without O_TRUNC, so that no read can see it
	// torn: torn saves are TestWatchTornSave's business.
	if len(carolDB) <= len(bobWeb) {
		t.Fatal("test setup: carolDB must be longer than bobWeb")
	}
	fh, err := os.OpenFile(f.path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := fh.Write([]byte(carolDB)); err != nil {
		t.Fatal(err)
	}
	if err := fh.Close(); err != nil {
		t.Fatal(err)
	}
	if err := f.nextReload(t); err != nil {
		t.Fatalf("OnReload(%v) after an in-place change", err)
	}
	if !f.w.Allow("carol", "postgres") || f.w.Allow("bob", "web") {
		t.Fatal("in-place policy not applied")
	}
	if d := f.w.Decide("carol", "postgres"); !d.Allowed || d.Rule != 1 {
		t.Fatalf("Decide = %+v", d)
	}
	if !strings.Contains(f.logs.String(), "policy reloaded") {
		t.Fatalf("no reload log line in %q", f.logs.String())
	}
	f.noMoreReloads(t)
}

func TestWatchKeepsPolicyWhenInvalid(t *testing.T) {
	f := startWatcher(t, aliceWeb, 2*time.Millisecond)
	writeByRename(t, f.path, invalid)
	err := f.nextReload(t)
	if err == nil || !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), `unknown key "resourcez"`) || !strings.Contains(err.Error(), "line 3") {
		t.Fatalf("OnReload(%v), want the invalid key and line", err)
	}
	if !f.w.Allow("alice", "web") {
		t.Fatal("previous policy dropped after an invalid change")
	}
	f.noMoreReloads(t) // reported once, not on every poll
	logs := f.logs.String()
	if n := strings.Count(logs, "level=ERROR"); n != 1 || !strings.Contains(logs, "keeping the previous policy") {
		t.Fatalf("want exactly one error line saying the old policy is kept, got %d in %q", n, logs)
	}

	// Going back to the content in force is not a reload.
	writeByRename(t, f.path, aliceWeb)
	f.noMoreReloads(t)
	if !strings.Contains(f.logs.String(), "back to the policy in force") {
		t.Fatalf("no recovery line in %q", f.logs.String())
	}

	// A different invalid content is a new rejection, reported again.
	writeByRename(t, f.path, "rules:\n  - users: [Alice]\n    resources: [web]\n")
	if err := f.nextReload(t); err == nil || !strings.Contains(err.Error(), `"Alice"`) {
		t.Fatalf("OnReload(%v), want the bad pattern", err)
	}
	writeByRename(t, f.path, bobWeb)
	if err := f.nextReload(t); err != nil {
		t.Fatalf("OnReload(%v) after fixing the file", err)
	}
	if !f.w.Allow("bob", "web") {
		t.Fatal("fixed policy not applied")
	}
}

func TestWatchMissingFile(t *testing.T) {
	f := startWatcher(t, aliceWeb, 2*time.Millisecond)
	if err := os.Remove(f.path); err != nil {
		t.Fatal(err)
	}
	if err := f.nextReload(t); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("OnReload(%v), want ErrNotExist", err)
	}
	if !f.w.Allow("alice", "web") {
		t.Fatal("previous policy dropped when the file vanished")
	}
	f.noMoreReloads(t)
	writeByRename(t, f.path, bobWeb)
	if err := f.nextReload(t); err != nil {
		t.Fatalf("OnReload(%v) after the file came back", err)
	}
	if !f.w.Allow("bob", "web") {
		t.Fatal("policy not applied after the file came back")
	}
}

// handClock is the watcher's clock in tests that call poll themselves.
type handClock struct{ t time.Time }

func (c *handClock) now() time.Time          { return c.t }
func (c *handClock) advance(d time.Duration) { c.t = c.t.Add(d) }

// A save caught half-written is not enforced: a change is acted on only once
// it has held for Settle, counted from the last time it was seen to change.
// Driven by hand (the goroutine never ticks; the clock is the test's).
func TestWatchWaitsForStableContent(t *testing.T) {
	f := startWatcherSettle(t, aliceWeb, time.Hour, time.Second)
	clk := &handClock{t: time.Unix(1000, 0)}
	f.w.now = clk.now
	full := "rules:\n  - users:\n      - bob\n      - alice-contractor\n    resources: [web]\n"
	torn := "rules:\n  - users:\n      - bob\n      - alice\n    resources: [web]\n" // what a torn read could look like
	os.WriteFile(f.path, []byte(torn), 0o600)
	if d := f.w.poll(); d <= 0 || d > time.Second/4 {
		t.Fatalf("a change seen: next read in %v, want within a quarter of Settle", d)
	}
	clk.advance(900 * time.Millisecond)
	os.WriteFile(f.path, []byte(full), 0o600)
	f.w.poll() // changed again: it settles from now
	clk.advance(900 * time.Millisecond)
	f.w.poll()
	// The old rule (two polls one interval apart agree) would apply full now;
	// it has held for 0.9 s < Settle.
	if f.w.Allow("bob", "web") {
		t.Fatal("a content that held for less than Settle was applied")
	}
	clk.advance(200 * time.Millisecond)
	if d := f.w.poll(); d != time.Hour {
		t.Fatalf("after applying, next read in %v, want Interval", d)
	}
	if err := f.nextReload(t); err != nil {
		t.Fatal(err)
	}
	if !f.w.Allow("alice-contractor", "web") || f.w.Allow("alice", "web") {
		t.Fatal("the torn intermediate content was applied")
	}
	// A file missing for less than Settle (an editor between rename and write)
	// is not reported.
	os.Remove(f.path)
	f.w.poll()
	clk.advance(500 * time.Millisecond)
	writeByRename(t, f.path, bobWeb)
	f.w.poll()
	clk.advance(1100 * time.Millisecond)
	f.w.poll()
	if err := f.nextReload(t); err != nil {
		t.Fatalf("a short disappearance was reported: %v", err)
	}
	if !f.w.Allow("bob", "web") {
		t.Fatal("the content written after the disappearance was not applied")
	}
}

// A save that writes the file in place in two parts, with a pause between (an
// editor or a tool that truncates, then writes), must never be enforced half
// written: alice, allowed by the old policy and by the new one, is never denied
// while it happens. The first part alone is a valid policy without alice.
func TestWatchTornSave(t *testing.T) {
	const (
		first  = "rules:\n  - users: [carol]\n    resources: [web]\n"
		second = "  - users: [alice]\n    resources: [web]\n"
		pause  = 200 * time.Millisecond
	)
	// Settle is far beyond the pause, so that a writer delayed by a loaded
	// machine still finishes within it; the interval polls many times in it.
	f := startWatcherSettle(t, aliceWeb, 5*time.Millisecond, 3*time.Second)

	stop := make(chan struct{})
	var denied, samples int
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			samples++
			if !f.w.Decide("alice", "web").Allowed {
				denied++
			}
		}
	}()

	fh, err := os.OpenFile(f.path, os.O_WRONLY|os.O_TRUNC, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := fh.WriteString(first); err != nil {
		t.Fatal(err)
	}
	time.Sleep(pause) // the editor's pause, not a wait for an event
	if _, err := fh.WriteString(second); err != nil {
		t.Fatal(err)
	}
	if err := fh.Close(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for !f.w.Allow("carol", "web") {
		if time.Now().After(deadline) {
			t.Fatal("the completed save was not applied within 10s")
		}
		time.Sleep(time.Millisecond) // polling interval
	}
	close(stop)
	wg.Wait()
	if denied > 0 {
		t.Fatalf("alice was denied in %d of %d decisions during the save", denied, samples)
	}
	if !f.w.Allow("alice", "web") {
		t.Fatal("the completed save is not the policy in force")
	}
	if err := f.nextReload(t); err != nil {
		t.Fatalf("OnReload(%v) for the completed save", err)
	}
	f.noMoreReloads(t) // one reload: the parts were never applied or reported
}

// An empty file, or one without rules, never replaces the policy in force;
// "rules: []" does: that is how to deny everyone.
func TestWatchReloadNoRules(t *testing.T) {
	f := startWatcherSettle(t, aliceWeb, 2*time.Millisecond, 20*time.Millisecond)
	for _, content := range []string{"", "rules:\n", "# emptied of its rules\n{}\n"} {
		writeByRename(t, f.path, content)
		err := f.nextReload(t)
		if !errors.Is(err, ErrNoRules) || !strings.HasPrefix(err.Error(), "policy file "+f.path+" has no rules: ") {
			t.Fatalf("OnReload(%v) for %q, want %q", err, content, "policy file "+f.path+" has no rules: ...")
		}
		if !f.w.Allow("alice", "web") {
			t.Fatalf("the policy in force was dropped for %q", content)
		}
	}
	if logs := f.logs.String(); strings.Count(logs, "keeping the previous policy") != 3 || !strings.Contains(logs, "has no rules") {
		t.Fatalf("want one line per rejection saying why, got %q", logs)
	}
	writeByRename(t, f.path, "rules: []\n")
	if err := f.nextReload(t); err != nil {
		t.Fatalf("OnReload(%v) for an explicit deny-all", err)
	}
	if f.w.Allow("alice", "web") || f.w.Policy().Len() != 0 {
		t.Fatal(`"rules: []" did not deny everyone`)
	}
}

func TestWatchStartErrors(t *testing.T) {
	dir := t.TempDir()
	bad := filepath.Join(dir, "bad.yaml")
	os.WriteFile(bad, []byte(invalid), 0o600)
	good := filepath.Join(dir, "good.yaml")
	os.WriteFile(good, []byte(aliceWeb), 0o600)
	empty := filepath.Join(dir, "empty.yaml")
	os.WriteFile(empty, nil, 0o600)
	for _, c := range []struct {
		name string
		cfg  WatchConfig
		want string
	}{
		{"missing", WatchConfig{Path: filepath.Join(dir, "nope.yaml")}, "no such file"},
		{"empty", WatchConfig{Path: empty}, "policy file " + empty + " has no rules: it is empty"},
		{"negative settle", WatchConfig{Path: good, Settle: -1}, "negative settle"},
		{"invalid", WatchConfig{Path: bad}, `unknown key "resourcez"`},
		{"no path", WatchConfig{}, "no policy file"},
		{"negative interval", WatchConfig{Path: good, Interval: -1}, "negative interval"},
	} {
		w, err := NewWatcher(context.Background(), c.cfg)
		if err == nil {
			w.Close()
			t.Errorf("%s: NewWatcher succeeded", c.name)
			continue
		}
		if !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: error %q does not contain %q", c.name, err, c.want)
		}
	}
}

func TestWatchStopsOnCloseAndContext(t *testing.T) {
	t.Cleanup(func() { goleak.VerifyNone(t) })
	path := filepath.Join(t.TempDir(), "p.yaml")
	os.WriteFile(path, []byte(aliceWeb), 0o600)

	w, err := Watch(context.Background(), path, nil, time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	w.Close() // idempotent
	if !w.Allow("alice", "web") {
		t.Fatal("a closed watcher forgot its policy")
	}

	ctx, cancel := context.WithCancel(context.Background())
	w, err = Watch(ctx, path, nil, time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	cancel()
	select {
	case <-w.done:
	case <-time.After(5 * time.Second):
		t.Fatal("watcher goroutine still running after its context ended")
	}
	w.Close()
}

func TestWatchConcurrentAllow(t *testing.T) {
	f := startWatcher(t, aliceWeb, time.Millisecond)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
					// Every policy in this test allows exactly one of these.
					p := f.w.Policy()
					a, b := p.Allow("alice", "web"), p.Allow("bob", "web")
					if a == b {
						t.Errorf("inconsistent policy: alice=%v bob=%v", a, b)
						return
					}
				}
			}
		}()
	}
	for i := range 6 {
		content := bobWeb
		if i%2 == 1 {
			content = aliceWeb
		}
		writeByRename(t, f.path, content)
		if err := f.nextReload(t); err != nil {
			t.Fatal(err)
		}
	}
	close(stop)
	wg.Wait()
}
