//go:build !linux

package gateway

import "net"

// peerActor names the other end of an admin socket connection; without peer credentials
// on this system it is only "admin.sock".
func peerActor(net.Conn) string { return "admin.sock" }
