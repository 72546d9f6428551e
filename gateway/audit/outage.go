package audit

import (
	"fmt"
	"maps"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"
)

// outage is the state of a Log that cannot write, from the failure that began it to the
// log.gap record that ends it.
type outage struct {
	first, last time.Time // the failure that began it; the latest refusal or failed retry
	cause       error     // the failure that began it
	retryErr    error     // why the latest reopen failed
	retries     int       // failed reopens
	// Events counted while the log could not be written, by record type.
	refused, lost   map[string]uint64
	nRefused, nLost uint64
	// Records written to the file whose fsync failed: their writers were told so.
	unconfirmedFrom, unconfirmedTo uint64
}

// maxCountedTypes bounds the record types an outage counts apart; the set of types is
// fixed, so this only guards against a caller inventing types.
const maxCountedTypes = 64

// breakLocked begins an outage after a failed write or fsync and starts the retry
// goroutine. Callers hold l.mu and must call l.notify after releasing it.
func (l *Log) breakLocked(cause error) {
	now := l.now()
	o := &outage{first: now, last: now, cause: cause, refused: map[string]uint64{}, lost: map[string]uint64{}}
	l.out = o
	confirmed := l.synced.Load()
	if l.noSync {
		confirmed = l.seq // without fsync, a record counts once write(2) returned
	}
	l.durable[l.epoch] = confirmed
	delete(l.durable, l.epoch-16) // a writer delayed over 16 outages only loses its nil
	l.epoch++
	if confirmed < l.seq {
		o.unconfirmedFrom, o.unconfirmedTo = confirmed+1, l.seq
	}
	for _, p := range l.pending {
		if p.seq > confirmed {
			l.countLocked(p.typ, p.access)
		}
	}
	l.pending = nil
	if !l.retrying && !l.closed {
		l.retrying = true
		l.bg.Add(1)
		go l.retryLoop()
	}
}

// countLocked counts one event the outage could not record. Callers hold l.mu.
func (l *Log) countLocked(typ string, access bool) {
	o := l.out
	o.last = l.now()
	l.failures++
	m, n := o.lost, &o.nLost
	if access {
		m, n = o.refused, &o.nRefused
	}
	*n++
	if _, ok := m[typ]; !ok && len(m) >= maxCountedTypes {
		typ = "other"
	}
	m[typ]++
}

// unavailableLocked is the error of a write refused during an outage. Callers hold l.mu.
func (l *Log) unavailableLocked() error {
	if l.out == nil {
		// A writer whose record an outage left unconfirmed, returning after it ended.
		return fmt.Errorf("%w: its fsync was not confirmed before a failure", ErrUnavailable)
	}
	return fmt.Errorf("%w since %s: %w", ErrUnavailable, l.out.first.UTC().Format(time.RFC3339), l.out.cause)
}

// Health returns the log's state.
func (l *Log) Health() Health {
	l.mu.Lock()
	defer l.mu.Unlock()
	h := Health{OK: l.out == nil, Failures: l.failures}
	if o := l.out; o != nil {
		h.Since, h.Err, h.Retry, h.Refused, h.Lost = o.first, o.cause, o.retryErr, o.nRefused, o.nLost
	}
	return h
}

// notify reports the log's health to OnStateChange. Callers hold no lock of l.
func (l *Log) notify() {
	if l.onChange == nil {
		return
	}
	l.notifyMu.Lock()
	defer l.notifyMu.Unlock()
	l.onChange(l.Health())
}

// retryLoop tries to end the outage every RetryInterval until it does or Close is called.
func (l *Log) retryLoop() {
	defer l.bg.Done()
	t := time.NewTimer(l.retry)
	defer t.Stop()
	for {
		select {
		case <-l.stop:
			return
		case <-t.C:
		}
		if done, resumed := l.tryResume(); done {
			if resumed {
				l.notify()
			}
			return
		}
		t.Reset(l.retry)
	}
}

// tryResume reopens the file, seals what a failed write left of a line (as Open seals a
// torn tail after a crash) and writes the outage's log.gap record. done is true when the
// outage is over or the log closed; resumed when the log can be written again.
func (l *Log) tryResume() (done, resumed bool) {
	l.syncMu.Lock()
	defer l.syncMu.Unlock()
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		l.retrying = false
		return true, false
	}
	o := l.out
	fail := func(err error) (bool, bool) {
		o.retries++
		o.retryErr, o.last = err, l.now()
		return false, false
	}
	if err := l.reopenLocked(); err != nil {
		return fail(err)
	}
	line, err := l.encode(o.record())
	if err == nil {
		err = l.appendLine(nil, line)
	}
	if err == nil && !l.noSync {
		if err = l.f.Sync(); err != nil {
			err = fmt.Errorf("fsync audit log %s: %w", l.path, err)
		}
	}
	if err != nil {
		// Whatever this left in the file is sealed by the next reopen.
		return fail(err)
	}
	l.synced.Store(l.seq)
	l.out, l.retrying = nil, false
	return true, true
}

// checkRoom is the fallback for file systems that cannot reserve space: before
// sealing a cut line and writing the log.gap record, it waits until the file system reports room for two
// records of the largest size. Without it, a disk that filled again would cut the
// record short, and a cut line right after a sealed one is beyond what Open repairs.
func (l *Log) checkRoom() error {
	if !l.noAlloc {
		return nil // the write reserves its room
	}
	free, err := freeSpace(l.f.Fd())
	if err != nil || free >= 2*MaxRecordSize {
		return nil // unknown: write and see
	}
	return fmt.Errorf("audit log %s: only %d bytes free on its file system", l.path, free)
}

// reopenLocked replaces the file descriptor with a new one for the same path, locked and
// resumed as Open does. The path is not created: a log that vanished is not silently
// replaced by a new chain, and the outage lasts until an operator restarts the gateway.
// Callers hold l.syncMu and l.mu.
func (l *Log) reopenLocked() error {
	if l.f != nil {
		// The lock goes with the descriptor; a second gateway on this data directory is
		// refused at its admin socket before it could hold the log for long.
		_ = l.f.Close()
		l.f = nil
	}
	f, err := l.openFile(l.path, os.O_RDWR|os.O_APPEND, 0)
	if err != nil {
		return fmt.Errorf("reopen audit log: %w", err)
	}
	l.f = f
	if err := l.checkRoom(); err != nil {
		_ = f.Close()
		l.f = nil
		return err
	}
	if err := l.init(false); err != nil {
		_ = f.Close()
		l.f = nil
		return err
	}
	return nil
}

// record is the log.gap record that ends the outage.
func (o *outage) record() Record {
	cause := o.cause.Error()
	if len(cause) > 300 {
		cause = cause[:300]
	}
	extra := map[string]string{
		"first_failure": o.first.UTC().Format(time.RFC3339Nano),
		"last_failure":  o.last.UTC().Format(time.RFC3339Nano),
		"error":         cause,
		"refused":       strconv.FormatUint(o.nRefused, 10),
		"lost":          strconv.FormatUint(o.nLost, 10),
		"retries":       strconv.Itoa(o.retries),
	}
	if len(o.refused) > 0 {
		extra["refused_types"] = formatCounts(o.refused)
	}
	if len(o.lost) > 0 {
		extra["lost_types"] = formatCounts(o.lost)
	}
	if o.unconfirmedFrom != 0 {
		extra["unconfirmed_seqs"] = fmt.Sprintf("%d-%d", o.unconfirmedFrom, o.unconfirmedTo)
	}
	reason := fmt.Sprintf("the audit log could not be written from %s to %s: %d access-creating events were refused and the records of %d other events were lost",
		extra["first_failure"], extra["last_failure"], o.nRefused, o.nLost)
	if o.unconfirmedFrom != 0 {
		reason += fmt.Sprintf("; records %s are in the file but their fsync failed, so their writers were told they were not written", extra["unconfirmed_seqs"])
	}
	return Record{Type: TypeLogGap, Outcome: OutcomeError, Reason: reason, Extra: extra}
}

// formatCounts is "type=n,type=n" in type order.
func formatCounts(m map[string]uint64) string {
	var b strings.Builder
	for i, k := range slices.Sorted(maps.Keys(m)) {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString(k)
		b.WriteByte('=')
		b.WriteString(strconv.FormatUint(m[k], 10))
	}
	return b.String()
}
