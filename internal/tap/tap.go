// Package tap opens Linux tap devices the way QEMU does: IFF_TAP|IFF_NO_PI,
// no virtio-net header, and a non-blocking file descriptor.
//
// The non-blocking mode matters beyond Go's runtime: tun only runs the XDP
// program attached to a tap natively for non-blocking writes, and QEMU's
// fd is non-blocking, so anything that stands in for a VM must behave alike.
package tap

import (
	"fmt"
	"os"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

const tunPath = "/dev/net/tun"

// Tap is one queue of a tap device. Each Read returns one whole Ethernet
// frame and each Write sends one; there is no packet-information prefix and
// no virtio-net header.
type Tap struct {
	f    *os.File
	name string
}

// Open attaches to the tap device called name in the calling thread's
// network namespace, creating it (non-persistent) if it does not exist. An
// empty name lets the kernel pick one; Name reports it.
func Open(name string) (*Tap, error) {
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		return nil, fmt.Errorf("open tap %q: %w", name, err)
	}
	// Open without os.Open: Go would register the fd with epoll right away,
	// and tun only supports poll once TUNSETIFF has attached it.
	fd, err := unix.Open(tunPath, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", tunPath, err)
	}
	ifr.SetUint16(unix.IFF_TAP | unix.IFF_NO_PI)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("attach tap %q: %w", name, err)
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("set tap %q non-blocking: %w", name, err)
	}
	// os.NewFile sees O_NONBLOCK and registers the fd with the netpoller, so
	// a Read parks the goroutine instead of a thread, and Close or a deadline
	// wakes it.
	return &Tap{f: os.NewFile(uintptr(fd), tunPath), name: ifr.Name()}, nil
}

// Create makes a persistent tap device called name (IFF_TAP|IFF_NO_PI) in
// the calling thread's network namespace, with no queue attached. It stays
// until deleted (netlink.LinkDel) or its namespace goes away; Open attaches
// to it.
func Create(name string) error {
	link := &netlink.Tuntap{
		LinkAttrs: netlink.LinkAttrs{Name: name},
		Mode:      netlink.TUNTAP_MODE_TAP,
		Flags:     netlink.TUNTAP_NO_PI,
	}
	if err := netlink.LinkAdd(link); err != nil {
		return fmt.Errorf("create tap %q: %w", name, err)
	}
	return nil
}

// File is the tap's file, to hand its fd to a VM process (QEMU's
// -netdev tap,fd=N): the child gets a duplicate.
func (t *Tap) File() *os.File { return t.f }

// Name is the interface name the kernel attached to.
func (t *Tap) Name() string { return t.name }

// Read reads one frame into b. A frame longer than b is truncated (the rest
// is lost), so b should hold MTU plus 14 bytes of Ethernet header.
func (t *Tap) Read(b []byte) (int, error) { return t.f.Read(b) }

// Write sends one whole frame to the host side of the tap.
func (t *Tap) Write(frame []byte) (int, error) { return t.f.Write(frame) }

// SetReadDeadline bounds pending and future Reads, like net.Conn.
func (t *Tap) SetReadDeadline(d time.Time) error { return t.f.SetReadDeadline(d) }

// SyscallConn gives raw access to the fd. Use it instead of os.File.Fd,
// which would switch the fd back to blocking mode.
func (t *Tap) SyscallConn() (syscall.RawConn, error) { return t.f.SyscallConn() }

// Close detaches from the device and unblocks pending Reads. A tap that Open
// created disappears with its last queue; a persistent one stays.
func (t *Tap) Close() error { return t.f.Close() }
