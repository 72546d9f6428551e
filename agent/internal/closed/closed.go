// Package closed tells an ordinary end of a relayed connection from a
// failure, so that logs do not cry wolf: a client or server that closes its
// socket while the other direction still flows makes the relay see "connection
// reset by peer", "broken pipe" or "transport endpoint is not connected",
// which is how TCP connections normally end. It must NOT hide anything else.
//
// It also ends a relayed TCP connection the way the relay ended (Held, End):
// with FIN after a clean end, with RST after a failure, so that a client or
// resource reading to end-of-file never takes a cut transfer for a whole one.
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
