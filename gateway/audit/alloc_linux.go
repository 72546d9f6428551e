package audit

import (
	"errors"
	"os"
	"syscall"
)

// fallocKeepSize is FALLOC_FL_KEEP_SIZE: allocate blocks past the end of the file without
// making them part of it.
const fallocKeepSize = 0x01

// allocate reserves [off, off+n) with fallocate(2). Blocks already allocated cost nothing,
// so for most records (which fit in the file's last block) this is one cheap system call.
func allocate(f *os.File, off, n int64) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var aerr error
	if err := rc.Control(func(fd uintptr) {
		for {
			aerr = syscall.Fallocate(int(fd), fallocKeepSize, off, n)
			if !errors.Is(aerr, syscall.EINTR) {
				return
			}
		}
	}); err != nil {
		return err
	}
	switch {
	case aerr == nil:
		return nil
	case errors.Is(aerr, syscall.EOPNOTSUPP), errors.Is(aerr, syscall.ENOSYS):
		return errors.Join(errors.ErrUnsupported, aerr)
	}
	return &os.PathError{Op: "fallocate", Path: f.Name(), Err: aerr}
}

// freeSpace is the space left for unprivileged writers on the file system of fd.
func freeSpace(fd uintptr) (int64, error) {
	var st syscall.Statfs_t
	if err := syscall.Fstatfs(int(fd), &st); err != nil {
		return 0, err
	}
	return int64(st.Bavail) * st.Bsize, nil
}
