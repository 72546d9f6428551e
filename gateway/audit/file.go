package audit

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
)

// File is the part of an open file a [Log] uses. The default [Options.OpenFile] gives an
// *os.File with Allocate added; tests substitute a File that fails on demand, which is how
// the handling of a full or failing disk is tested without one.
type File interface {
	io.Writer
	io.ReaderAt
	Sync() error
	Stat() (fs.FileInfo, error)
	Chmod(mode fs.FileMode) error
	Close() error
	// Fd is the file descriptor, for the exclusive lock.
	Fd() uintptr
	// Allocate reserves n bytes of disk space at offset off without changing the file's
	// size, so that writing those bytes afterwards cannot fail for lack of space. It
	// returns an error wrapping errors.ErrUnsupported where the file system cannot.
	Allocate(off, n int64) error
}

// osFile is the production File.
type osFile struct{ *os.File }

func (f osFile) Allocate(off, n int64) error { return allocate(f.File, off, n) }

// openOSFile is the default Options.OpenFile.
func openOSFile(name string, flag int, perm fs.FileMode) (File, error) {
	f, err := os.OpenFile(name, flag, perm)
	if err != nil {
		return nil, err
	}
	return osFile{f}, nil
}

// reserveAhead is how far past the end of the file a reservation reaches: one
// fallocate(2) covers the next 16 KiB of records (some fifty), so that reserving costs
// almost nothing per record, and a nearly full disk still takes records one by one.
const reserveAhead = 16 << 10

// reserve makes room for n more bytes at the end of the file before they are written, so
// that a full disk refuses the whole record instead of taking part of it: a write cut short
// leaves a torn line that only a reopen can seal, a refused reservation leaves nothing.
// Where the file system cannot reserve, the write goes ahead unreserved (and a torn line is
// sealed on reopen, as after a crash). Callers hold l.mu.
func (l *Log) reserve(n int64) error {
	if l.noAlloc || l.size+n <= l.reserved {
		return nil
	}
	err := l.f.Allocate(l.size, n+reserveAhead)
	if err == nil {
		l.reserved = l.size + n + reserveAhead
		return nil
	}
	if errors.Is(err, errors.ErrUnsupported) {
		l.noAlloc = true
		return nil
	}
	// Less than reserveAhead left: reserve the record alone, as long as it fits.
	if err = l.f.Allocate(l.size, n); err == nil {
		l.reserved = l.size + n
		return nil
	}
	return fmt.Errorf("reserve %d bytes in audit log %s: %w", n, l.path, err)
}
