package gateway

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"strconv"
	"syscall"

	"github.com/wicketgw/wicket/gateway/audit"
)

// The errors of a refused start: each is one sentence that says what failed and what to do,
// as `wicket gateway` prints it on stderr before exiting non-zero.

// checkListen refuses a --listen address that is not HOST:PORT before anything is bound.
func checkListen(addr string) error {
	_, port, err := net.SplitHostPort(addr)
	if err == nil {
		if _, perr := strconv.ParseUint(port, 10, 16); perr != nil && port != "" {
			err = fmt.Errorf("port %q is not a number from 0 to 65535", port)
		}
	}
	if err != nil {
		var ae *net.AddrError
		if errors.As(err, &ae) {
			err = errors.New(ae.Err)
		}
		return fmt.Errorf("invalid listen address %q (%v): pass --listen HOST:PORT, for example 127.0.0.1:8443 or :8443", addr, err)
	}
	return nil
}

// listenStartError explains why the TLS port could not be bound.
func listenStartError(addr string, err error) error {
	switch {
	case errors.Is(err, syscall.EADDRINUSE):
		return fmt.Errorf("cannot listen on %s: the address is already in use (another gateway or program holds it): stop that program or pass another --listen", addr)
	case errors.Is(err, syscall.EACCES), errors.Is(err, syscall.EPERM):
		return fmt.Errorf("cannot listen on %s: permission denied (ports below 1024 need privileges): pass --listen with a port from 1024 up", addr)
	case errors.Is(err, syscall.EADDRNOTAVAIL):
		return fmt.Errorf("cannot listen on %s: no network interface of this machine has that address: pass --listen with an address of this machine", addr)
	}
	return fmt.Errorf("cannot listen on %s (%v): check --listen", addr, err)
}

// dataDirStartError explains why the data directory cannot be created or written.
func dataDirStartError(dir string, err error) error {
	why := "permission denied"
	if errors.Is(err, syscall.EROFS) {
		why = "read-only file system"
	} else if !errors.Is(err, fs.ErrPermission) {
		why = err.Error()
	}
	return fmt.Errorf("cannot write to the data directory %s (%s): make it writable by the gateway's user or pass another --data-dir", dir, why)
}

// auditStartError explains why the audit log cannot be opened: the data directory in use by
// another gateway, or not writable.
func auditStartError(dir string, err error) error {
	switch {
	case errors.Is(err, audit.ErrLocked):
		return fmt.Errorf("the data directory %s is in use by another gateway (its audit log is locked): stop that gateway or pass another --data-dir", dir)
	case errors.Is(err, syscall.EROFS), errors.Is(err, fs.ErrPermission):
		return dataDirStartError(dir, err)
	}
	return fmt.Errorf("cannot open the audit log in the data directory %s (%v): check the directory and its disk", dir, err)
}

// policyStartError explains why the policy file given with --policy cannot be used.
func policyStartError(path string, err error) error {
	if errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("the policy file %s does not exist: create it (see examples/policy.yaml) or start without --policy (everyone denied)", path)
	}
	return fmt.Errorf("the policy file cannot be used, %v: fix it and start again", err)
}
