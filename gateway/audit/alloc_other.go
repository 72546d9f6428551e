//go:build !linux

package audit

import (
	"errors"
	"os"
)

// allocate is unsupported outside Linux: records are written unreserved, and a record cut
// short by a full disk is sealed on reopen like a torn line after a crash.
func allocate(*os.File, int64, int64) error { return errors.ErrUnsupported }

// freeSpace is unknown outside Linux; the Log then writes without checking.
func freeSpace(uintptr) (int64, error) { return 0, errors.ErrUnsupported }
