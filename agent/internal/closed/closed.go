// Package closed tells an ordinary end of a relayed connection from a
// failure, so that logs do not cry wolf: a client or server that closes its
// socket while the other direction still flows makes the relay see "connection
// reset by peer", "broken pipe" or "transport endpoint is not connected",
// which is how TCP connections normally end. It must NOT hide anything else.
package closed

import (
	"context"
	"errors"
	"syscall"
)

// ByPeer reports whether err only says that one end closed the connection.
func ByPeer(err error) bool {
	return errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) ||
		errors.Is(err, syscall.ENOTCONN) || errors.Is(err, context.Canceled)
}
