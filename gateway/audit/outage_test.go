package audit

import (
	"bytes"
	"encoding/json"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// faultyDisk opens real files whose writes, fsyncs, reservations and opens fail while a
// fault is set: the outage state machine is tested without filling a disk (test/
// fills a real one).
type faultyDisk struct {
	mu       sync.Mutex
	writeErr error // a Write fails with it, after putting the next of partials bytes in the file
	partials []int
	syncErr  error
	allocErr error // nil: reservations work; errors.ErrUnsupported: the file system cannot
	allocMax int64 // if set, a reservation of more bytes fails with ENOSPC (a nearly full disk)
	openErr  error
	opens    int
}

func (d *faultyDisk) set(f func(d *faultyDisk)) {
	d.mu.Lock()
	defer d.mu.Unlock()
	f(d)
}

func (d *faultyDisk) open(name string, flag int, perm fs.FileMode) (File, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.opens++
	if d.openErr != nil {
		return nil, &os.PathError{Op: "open", Path: name, Err: d.openErr}
	}
	f, err := os.OpenFile(name, flag, perm)
	if err != nil {
		return nil, err
	}
	return &faultyFile{File: f, d: d}, nil
}

type faultyFile struct {
	*os.File
	d *faultyDisk
}

func (f *faultyFile) Write(b []byte) (int, error) {
	f.d.mu.Lock()
	err, partial := f.d.writeErr, 0
	if err != nil && len(f.d.partials) > 0 {
		partial, f.d.partials = f.d.partials[0], f.d.partials[1:]
	}
	f.d.mu.Unlock()
	if err == nil {
		return f.File.Write(b)
	}
	n, _ := f.File.Write(b[:min(partial, len(b))])
	return n, &os.PathError{Op: "write", Path: f.Name(), Err: err}
}

func (f *faultyFile) Sync() error {
	f.d.mu.Lock()
	err := f.d.syncErr
	f.d.mu.Unlock()
	if err != nil {
		return &os.PathError{Op: "sync", Path: f.Name(), Err: err}
	}
	return f.File.Sync()
}

func (f *faultyFile) Allocate(off, n int64) error {
	f.d.mu.Lock()
	err, most := f.d.allocErr, f.d.allocMax
	f.d.mu.Unlock()
	if err == nil && most > 0 && n > most {
		return syscall.ENOSPC
	}
	return err
}

// stepClock is a clock the test sets.
type stepClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *stepClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *stepClock) Set(t time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = t
}

// healthLog records OnStateChange calls.
type healthLog struct {
	mu  sync.Mutex
	got []bool
}

func (h *healthLog) add(x Health) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if n := len(h.got); n == 0 || h.got[n-1] != x.OK {
		h.got = append(h.got, x.OK)
	}
}

func (h *healthLog) states() []bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]bool(nil), h.got...)
}

func openFaulty(t *testing.T, d *faultyDisk, clock *stepClock, noSync bool, h *healthLog) (*Log, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "audit.log")
	opts := Options{Now: clock.Now, NoSync: noSync, RetryInterval: 5 * time.Millisecond, OpenFile: d.open}
	if h != nil {
		opts.OnStateChange = h.add
	}
	l, err := OpenWithOptions(path, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return l, path
}

// waitHealthy polls until the log can be written again.
func waitHealthy(t *testing.T, l *Log) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !l.Health().OK {
		if time.Now().After(deadline) {
			t.Fatalf("the log did not come back within 10s: %+v", l.Health())
		}
		time.Sleep(time.Millisecond) // polling interval
	}
}

func lastRecords(t *testing.T, path string, n int) []Record {
	t.Helper()
	lines := readLines(t, path)
	var out []Record
	for _, line := range lines[len(lines)-n:] {
		var r Record
		if err := json.Unmarshal(line, &r); err != nil {
			t.Fatalf("line %q: %v", line, err)
		}
		out = append(out, r)
	}
	return out
}

// A write cut short by a full disk (on a file system that cannot reserve space) leaves
// part of a line: the log refuses everything at once and counts it, seals the cut line
// when it can write again, and says in a log.gap record what it refused and lost, when.
func TestOutageCutLineIsSealedAndGapRecorded(t *testing.T) {
	disk := &faultyDisk{allocErr: errors.ErrUnsupported}
	clock := &stepClock{t: t0}
	var states healthLog
	l, path := openFaulty(t, disk, clock, false, &states)
	for i := 1; i <= 2; i++ {
		if err := l.Write(sampleRecord(i)); err != nil {
			t.Fatal(err)
		}
	}
	before, _ := os.ReadFile(path)

	// The retry fails as long as the disk is full.
	disk.set(func(d *faultyDisk) { d.writeErr, d.partials = syscall.ENOSPC, []int{17} })
	failAt := t0.Add(time.Minute)
	clock.Set(failAt)
	err := l.WriteAccess(Record{Type: TypeSessionStarted, User: "alice", SessionID: "s-3"})
	if !errors.Is(err, ErrUnavailable) || !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("the failing write returned %v, want ErrUnavailable wrapping ENOSPC", err)
	}
	h := l.Health()
	if h.OK || !h.Since.Equal(failAt) || !errors.Is(h.Err, syscall.ENOSPC) || h.Failures != 1 || h.Refused != 1 {
		t.Fatalf("Health after the failure = %+v", h)
	}
	after, _ := os.ReadFile(path)
	if len(after) != len(before)+17 {
		t.Fatalf("the cut write left %d bytes, want 17", len(after)-len(before))
	}

	// While unavailable every write is refused at once, and counted.
	clock.Set(failAt.Add(time.Second))
	if err := l.Admit(TypeTokenCreated); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("Admit = %v, want ErrUnavailable", err)
	}
	if err := l.WriteAccess(Record{Type: TypeUserEnrolled, User: "bob"}); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("WriteAccess = %v", err)
	}
	lastAt := failAt.Add(2 * time.Second)
	clock.Set(lastAt)
	for i := 0; i < 2; i++ {
		if err := l.Write(sampleRecord(4 + i)); !errors.Is(err, ErrUnavailable) {
			t.Fatalf("Write = %v", err)
		}
	}
	if err := l.Write(Record{Type: TypeTLSRefused}); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("Write = %v", err)
	}
	if h := l.Health(); h.OK || h.Refused != 3 || h.Lost != 3 || h.Failures != 6 {
		t.Fatalf("Health = %+v, want 3 refused, 3 lost, 6 failures", h)
	}
	if b, _ := os.ReadFile(path); !bytes.Equal(b, after) {
		t.Fatal("a write during the outage reached the file")
	}
	// Retries keep failing while the disk is full.
	deadline := time.Now().Add(10 * time.Second)
	for disk.openCount() < 4 {
		if time.Now().After(deadline) {
			t.Fatal("the log did not retry")
		}
		time.Sleep(time.Millisecond) // polling interval
	}
	if h := l.Health(); h.OK || !errors.Is(h.Retry, syscall.ENOSPC) {
		t.Fatalf("Health while retrying = %+v, want a retry error naming ENOSPC", h)
	}

	clock.Set(lastAt.Add(time.Minute))
	disk.set(func(d *faultyDisk) { d.writeErr = nil })
	waitHealthy(t, l)
	deadline = time.Now().Add(10 * time.Second)
	for got := states.states(); len(got) != 2 || got[0] || !got[1]; got = states.states() {
		if time.Now().After(deadline) {
			t.Fatalf("OnStateChange saw %v, want [false true]", got)
		}
		time.Sleep(time.Millisecond) // polling interval
	}
	if err := l.Write(sampleRecord(9)); err != nil {
		t.Fatalf("Write after the outage: %v", err)
	}
	l.Close()

	recs := lastRecords(t, path, 3)
	sealed, gap, next := recs[0], recs[1], recs[2]
	if sealed.Type != TypeLogRecovered || sealed.Extra["torn_bytes"] != "17" {
		t.Fatalf("first record after the outage = %+v, want log.recovered sealing the 17 cut bytes", sealed)
	}
	want := map[string]string{
		"first_failure": failAt.Format(time.RFC3339Nano), "refused": "3", "lost": "3",
		"refused_types": "session.started=1,token.created=1,user.enrolled=1",
		"lost_types":    "session.ended=2,tls.refused=1",
	}
	for k, v := range want {
		if gap.Extra[k] != v {
			t.Errorf("log.gap extra %s = %q, want %q", k, gap.Extra[k], v)
		}
	}
	if gap.Type != TypeLogGap || gap.Outcome != OutcomeError || !strings.Contains(gap.Extra["error"], "no space left") ||
		gap.Extra["last_failure"] < lastAt.Format(time.RFC3339Nano) || gap.Extra["retries"] == "0" ||
		!strings.Contains(gap.Reason, "3 access-creating events were refused") {
		t.Errorf("log.gap = %+v", gap)
	}
	if _, ok := gap.Extra["unconfirmed_seqs"]; ok {
		t.Errorf("log.gap names unconfirmed records, but no fsync failed: %+v", gap.Extra)
	}
	if next.SessionID != "s-9" || next.Seq != gap.Seq+1 {
		t.Errorf("record after the gap = %+v", next)
	}
	res, err := VerifyFile(path)
	if err != nil {
		t.Fatalf("the log does not verify after the outage: %v", err)
	}
	if len(res.Sealed) != 1 || res.Records != 5 {
		t.Fatalf("VerifyFile = %+v, want 5 records and one sealed line", res)
	}
}

func (d *faultyDisk) openCount() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.opens
}

// partialsLeft is how many cut writes the disk still has to make.
func (d *faultyDisk) partialsLeft() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return len(d.partials)
}

// Where the file system reserves space, a full disk refuses a record whole: nothing of
// it reaches the file, and no seal is needed afterwards.
func TestOutageFullDiskWritesNothing(t *testing.T) {
	disk := &faultyDisk{}
	clock := &stepClock{t: t0}
	l, path := openFaulty(t, disk, clock, true, nil)
	// A log that has room reserved takes records into it (that is the point); a log
	// with none left refuses the next one.
	before, _ := os.ReadFile(path)
	disk.set(func(d *faultyDisk) { d.allocErr = syscall.ENOSPC })
	if err := l.WriteAccess(Record{Type: TypeTokenCreated, User: "bob"}); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("WriteAccess on a full disk = %v", err)
	}
	if after, _ := os.ReadFile(path); !bytes.Equal(before, after) {
		t.Fatalf("a refused reservation still wrote %d bytes", len(after)-len(before))
	}
	disk.set(func(d *faultyDisk) { d.allocErr = nil })
	waitHealthy(t, l)
	l.Close()
	gap := lastRecords(t, path, 1)[0]
	if gap.Type != TypeLogGap || gap.Extra["refused"] != "1" || gap.Extra["lost"] != "0" || gap.Seq != 1 {
		t.Fatalf("last record = %+v, want log.gap seq 1 with 1 refused", gap)
	}
	if res, err := VerifyFile(path); err != nil || len(res.Sealed) != 0 || res.Records != 1 {
		t.Fatalf("VerifyFile = %+v, %v", res, err)
	}
}

// After a failed fsync, the records written since the last good one are in the file but
// not confirmed: their writers get an error (and refuse), and the log.gap record names
// them, so the file does not silently claim what the gateway refused.
func TestOutageFailedFsyncNamesUnconfirmedRecords(t *testing.T) {
	disk := &faultyDisk{}
	clock := &stepClock{t: t0}
	l, path := openFaulty(t, disk, clock, false, nil)
	if err := l.Write(sampleRecord(1)); err != nil {
		t.Fatal(err)
	}
	disk.set(func(d *faultyDisk) { d.syncErr = syscall.EIO })
	if err := l.WriteAccess(Record{Type: TypeSessionStarted, SessionID: "s-2"}); !errors.Is(err, ErrUnavailable) || !errors.Is(err, syscall.EIO) {
		t.Fatalf("WriteAccess with a failing fsync = %v", err)
	}
	disk.set(func(d *faultyDisk) { d.syncErr = nil })
	waitHealthy(t, l)
	l.Close()
	recs := lastRecords(t, path, 2)
	if recs[0].SessionID != "s-2" || recs[1].Type != TypeLogGap || recs[1].Extra["unconfirmed_seqs"] != "2-2" ||
		recs[1].Extra["refused_types"] != "session.started=1" {
		t.Fatalf("records after the failed fsync = %+v", recs)
	}
	if _, err := VerifyFile(path); err != nil {
		t.Fatal(err)
	}
}

// Writers waiting for a shared fsync when it fails all learn that their records were
// not confirmed, and each is counted once.
func TestOutageConcurrentWritersCountedOnce(t *testing.T) {
	disk := &faultyDisk{}
	clock := &stepClock{t: t0}
	l, path := openFaulty(t, disk, clock, false, nil)
	disk.set(func(d *faultyDisk) { d.syncErr = syscall.EIO })
	const writers = 8
	var wg sync.WaitGroup
	errs := make(chan error, writers)
	for i := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- l.Write(sampleRecord(i))
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if !errors.Is(err, ErrUnavailable) {
			t.Fatalf("a writer whose fsync failed got %v", err)
		}
	}
	if h := l.Health(); h.Lost != writers || h.Failures != writers {
		t.Fatalf("Health = %+v, want each of the %d writers counted once", h, writers)
	}
	disk.set(func(d *faultyDisk) { d.syncErr = nil })
	waitHealthy(t, l)
	l.Close()
	if _, err := VerifyFile(path); err != nil {
		t.Fatal(err)
	}
}

// A log file that vanished during an outage is not recreated (that would start a new
// chain behind the operator's back): the outage lasts, and Close says what it cost.
func TestOutageMissingFileIsNotRecreated(t *testing.T) {
	disk := &faultyDisk{}
	clock := &stepClock{t: t0}
	l, path := openFaulty(t, disk, clock, true, nil)
	disk.set(func(d *faultyDisk) { d.allocErr = syscall.EROFS })
	if err := l.Write(sampleRecord(1)); !errors.Is(err, syscall.EROFS) {
		t.Fatalf("Write = %v", err)
	}
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	disk.set(func(d *faultyDisk) { d.allocErr = nil })
	deadline := time.Now().Add(10 * time.Second)
	for h := l.Health(); !errors.Is(h.Retry, fs.ErrNotExist); h = l.Health() {
		if h.OK || time.Now().After(deadline) {
			t.Fatalf("Health = %+v, want an outage whose retries fail because the file is gone", h)
		}
		time.Sleep(time.Millisecond) // polling interval
	}
	if _, err := os.Stat(path); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("the log was recreated: %v", err)
	}
	err := l.Close()
	if err == nil || !strings.Contains(err.Error(), "0 access-creating events were refused and 1 records lost") {
		t.Fatalf("Close during an outage = %v, want the counts", err)
	}
}

// The limit of repair: on a file system that cannot reserve space, a seal that is
// itself cut short leaves a line that no interrupted write of one record explains.
// The log then stays closed and says why, rather than chaining onto it.
func TestOutageCutSealStaysClosed(t *testing.T) {
	disk := &faultyDisk{allocErr: errors.ErrUnsupported}
	clock := &stepClock{t: t0}
	l, _ := openFaulty(t, disk, clock, true, nil)
	disk.set(func(d *faultyDisk) { d.writeErr, d.partials = syscall.ENOSPC, []int{5, 5} })
	if err := l.Write(sampleRecord(1)); !errors.Is(err, ErrUnavailable) {
		t.Fatal(err)
	}
	for disk.partialsLeft() > 0 { // the first retry cuts its seal short (it was opened and written)
		time.Sleep(time.Millisecond) // polling interval
	}
	disk.set(func(d *faultyDisk) { d.writeErr = nil })
	deadline := time.Now().Add(10 * time.Second)
	for h := l.Health(); h.Retry == nil || !strings.Contains(h.Retry.Error(), "is not a valid audit record"); h = l.Health() {
		if h.OK || time.Now().After(deadline) {
			t.Fatalf("Health = %+v, want an outage that names the unrepairable line", h)
		}
		time.Sleep(time.Millisecond) // polling interval
	}
	if err := l.WriteAccess(Record{Type: TypeSessionStarted}); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("WriteAccess = %v, want ErrUnavailable", err)
	}
}

// A disk with less room than a reservation ahead still takes records, each reserved
// alone, until it has no room for one.
func TestNearlyFullDiskStillWrites(t *testing.T) {
	disk := &faultyDisk{allocMax: 1000}
	l, path := openFaulty(t, disk, &stepClock{t: t0}, true, nil)
	for i := range 5 {
		if err := l.Write(sampleRecord(i)); err != nil {
			t.Fatalf("Write with room for one record at a time: %v", err)
		}
	}
	disk.set(func(d *faultyDisk) { d.allocMax = 10 })
	if err := l.Write(sampleRecord(6)); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("Write with no room = %v", err)
	}
	l.Close()
	if res, err := VerifyFile(path); err != nil || res.Records != 5 || res.TornTail {
		t.Fatalf("VerifyFile = %+v, %v", res, err)
	}
}

func TestReservedTypesRefused(t *testing.T) {
	l := openLog(t, filepath.Join(t.TempDir(), "audit.log"))
	for _, typ := range []string{TypeLogRecovered, TypeLogGap} {
		if err := l.Write(Record{Type: typ}); err == nil || errors.Is(err, ErrUnavailable) {
			t.Fatalf("Write(%s) = %v, want a refusal that is not an outage", typ, err)
		}
	}
	if !l.Health().OK {
		t.Fatal("a refused record made the log unavailable")
	}
}
