package outputcommit

import (
	"fmt"
	"net"
	"runtime"
	"unsafe"

	"golang.org/x/sys/unix"
)

// releaseSocket sends released frames out of the uplink: a raw packet
// socket, not AF_XDP, because an AF_XDP socket's transmits bypass traffic
// control, and the kernel's check of the lease (uplink_egress, TC egress on
// the uplink) must see every frame inside the very system call that sends
// it. The frames are sent straight from the hold socket's UMEM, a batch per
// sendmmsg.
type releaseSocket struct {
	fd   int
	hdrs []unix.Mmsghdr
	iovs []unix.Iovec
}

func openReleaseSocket(uplink *net.Interface) (*releaseSocket, error) {
	// Protocol 0: this socket only sends; it receives nothing.
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open release socket: %w", err)
	}
	s := &releaseSocket{fd: fd}
	if err := unix.Bind(fd, &unix.SockaddrLinklayer{Ifindex: uplink.Index}); err != nil {
		s.Close()
		return nil, fmt.Errorf("bind release socket to %s: %w", uplink.Name, err)
	}
	// Room for a whole batch of full-size frames in flight.
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, 4<<20); err != nil {
		s.Close()
		return nil, fmt.Errorf("size release socket: %w", err)
	}
	return s, nil
}

// send sends frames, in order, and reports how many the kernel took: it
// stops at the first one it refused, with the reason.
func (s *releaseSocket) send(frames [][]byte) (int, error) {
	s.hdrs, s.iovs = s.hdrs[:0], s.iovs[:0]
	for _, f := range frames {
		s.iovs = append(s.iovs, unix.Iovec{Base: &f[0], Len: uint64(len(f))})
	}
	for i := range s.iovs {
		s.hdrs = append(s.hdrs, unix.Mmsghdr{Hdr: unix.Msghdr{Iov: &s.iovs[i], Iovlen: 1}})
	}
	n, _, errno := unix.Syscall6(unix.SYS_SENDMMSG, uintptr(s.fd), uintptr(unsafe.Pointer(&s.hdrs[0])), uintptr(len(s.hdrs)), 0, 0, 0)
	runtime.KeepAlive(s.iovs)
	if errno != 0 {
		return 0, fmt.Errorf("sendmmsg: %w", errno)
	}
	return int(n), nil
}

func (s *releaseSocket) Close() error { return unix.Close(s.fd) }
