package gateway

import (
	"fmt"
	"net"
	"os/user"
	"strconv"
	"syscall"
)

// peerActor names the local user on the other end of an admin socket connection, from the
// kernel's peer credentials: "uid 1000 (alice)".
func peerActor(c net.Conn) string {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return "admin.sock"
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return "admin.sock"
	}
	var cred *syscall.Ucred
	_ = raw.Control(func(fd uintptr) {
		cred, _ = syscall.GetsockoptUcred(int(fd), syscall.SOL_SOCKET, syscall.SO_PEERCRED)
	})
	if cred == nil {
		return "admin.sock"
	}
	uid := strconv.FormatUint(uint64(cred.Uid), 10)
	if u, err := user.LookupId(uid); err == nil {
		return fmt.Sprintf("uid %s (%s)", uid, u.Username)
	}
	return "uid " + uid
}
