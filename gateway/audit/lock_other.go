//go:build !(linux || darwin || freebsd || netbsd || openbsd || dragonfly)

package audit

// lockFile is a no-op where flock is unavailable: there, running two
// gateways on one data directory is not detected.
func lockFile(uintptr) error { return nil }
