package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/user"
	"slices"
	"strconv"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Who may use the control socket. The socket is created 0600 and owned by
// the daemon's user, or 0660 with --control-group; the kernel checks that
// mode at connect. The daemon checks again with the peer's credentials
// (SO_PEERCRED, SO_PEERGROUPS), so a socket whose mode was widened still
// gives nothing to others: root, the daemon's own user and, with
// --control-group, the group's members are served; anyone else gets a
// one-line refusal. (The credentials are those of the process that
// connected: a connection it hands to another process keeps its rights.)

// controlAccess is the control socket's access rule.
type controlAccess struct {
	uid   int    // the daemon's effective uid (root is always allowed)
	gid   int    // --control-group's gid, or -1
	group string // its name, for messages
}

// peerCred is the credentials of the process that connected, as the kernel
// recorded them at connect.
type peerCred struct {
	pid, uid, gid int
	groups        []int // supplementary groups
	err           error // the credentials could not be read
	groupsErr     error // the supplementary groups could not be read
}

type peerKey struct{}

// lookupGroup resolves --control-group: a group name or a numeric gid.
func lookupGroup(name string) (int, error) {
	g, err := user.LookupGroup(name)
	if err != nil {
		var unknown user.UnknownGroupError
		if !errors.As(err, &unknown) {
			return 0, err
		}
		if g, err = user.LookupGroupId(name); err != nil {
			return 0, fmt.Errorf("no group %q", name)
		}
	}
	return strconv.Atoi(g.Gid)
}

// restrictSocket gives the socket at path to the access rule's
// group, mode 0660. Without a group the socket stays as created, 0600.
func (a *controlAccess) restrictSocket(path string) error {
	if a.gid < 0 {
		return nil
	}
	if err := os.Lchown(path, -1, a.gid); err != nil {
		return fmt.Errorf("control socket group %s: %w", a.group, err)
	}
	if err := os.Chmod(path, 0o660); err != nil {
		return fmt.Errorf("control socket mode: %w", err)
	}
	return nil
}

// readPeerCred reads the peer's credentials of a Unix connection.
func readPeerCred(c net.Conn) peerCred {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return peerCred{err: fmt.Errorf("a %T is not a Unix socket connection", c)}
	}
	rc, err := uc.SyscallConn()
	if err != nil {
		return peerCred{err: err}
	}
	var p peerCred
	cerr := rc.Control(func(fd uintptr) {
		var u *unix.Ucred
		u, p.err = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
		if p.err != nil {
			p.err = fmt.Errorf("SO_PEERCRED: %w", p.err)
			return
		}
		p.pid, p.uid, p.gid = int(u.Pid), int(u.Uid), int(u.Gid)
		p.groups, p.groupsErr = peerGroups(int(fd))
	})
	if cerr != nil {
		p.err = cerr
	}
	return p
}

// peerGroups reads SO_PEERGROUPS: the peer's supplementary groups at
// connect (Linux 4.13). x/sys/unix has no typed getter for it.
func peerGroups(fd int) ([]int, error) {
	buf := make([]uint32, 64)
	for {
		n := uint32(len(buf) * 4)
		_, _, errno := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), unix.SOL_SOCKET, unix.SO_PEERGROUPS,
			uintptr(unsafe.Pointer(&buf[0])), uintptr(unsafe.Pointer(&n)), 0)
		switch {
		case errno == syscall.ERANGE && int(n/4) > len(buf):
			buf = make([]uint32, n/4)
			continue
		case errno != 0:
			return nil, fmt.Errorf("SO_PEERGROUPS: %w", errno)
		}
		groups := make([]int, 0, n/4)
		for _, g := range buf[:n/4] {
			groups = append(groups, int(g))
		}
		return groups, nil
	}
}

// allowed reports whether p may use the control socket.
func (a *controlAccess) allowed(p peerCred) bool {
	switch {
	case p.err != nil:
		return false
	case p.uid == 0 || p.uid == a.uid:
		return true
	case a.gid >= 0:
		// Without the supplementary groups (a kernel without
		// SO_PEERGROUPS) only the primary group counts.
		return p.gid == a.gid || p.groupsErr == nil && slices.Contains(p.groups, a.gid)
	}
	return false
}

// who names the users the socket serves, for refusals.
func (a *controlAccess) who() string {
	w := "root"
	if a.uid != 0 {
		w += " and uid " + strconv.Itoa(a.uid)
	}
	if a.gid >= 0 {
		w += " and members of group " + a.group
	}
	return w
}

// connContext records each connection's peer credentials in its
// requests' context (http.Server.ConnContext).
func (a *controlAccess) connContext(ctx context.Context, c net.Conn) context.Context {
	return context.WithValue(ctx, peerKey{}, readPeerCred(c))
}

// guard serves only the requests of allowed peers; the others get 403 and
// a one-line reason.
func (a *controlAccess) guard(log *slog.Logger, h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		p, ok := req.Context().Value(peerKey{}).(peerCred)
		if !ok {
			p.err = errors.New("no peer credentials")
		}
		if a.allowed(p) {
			h.ServeHTTP(w, req)
			return
		}
		if p.err != nil {
			log.Warn("control request refused: peer credentials unknown", "err", p.err, "path", req.URL.Path)
			apiError(w, http.StatusForbidden, ExitFailed, "permission denied: the daemon could not identify the caller (%v)", p.err)
			return
		}
		log.Warn("control request refused", "uid", p.uid, "gid", p.gid, "pid", p.pid, "path", req.URL.Path)
		apiError(w, http.StatusForbidden, ExitFailed,
			"permission denied: uid %d may not use the control socket (only %s may)", p.uid, a.who())
	})
}
