package tap

import (
	"bytes"
	"encoding/binary"
	"errors"
	"github.com/ftgw/ftgw/internal/testutil"
	"net"
	"os"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

func rawFd(t *testing.T, tp *Tap) int {
	t.Helper()
	rc, err := tp.SyscallConn()
	if err != nil {
		t.Fatalf("syscall conn: %v", err)
	}
	var fd int
	if err := rc.Control(func(f uintptr) { fd = int(f) }); err != nil {
		t.Fatalf("control: %v", err)
	}
	return fd
}

func TestOpenFlags(t *testing.T) {
	testutil.InNewNetns(t)
	tp, err := Open("ftgwt0")
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	if tp.Name() != "ftgwt0" {
		t.Errorf("Name() = %q, want ftgwt0", tp.Name())
	}
	link, err := netlink.LinkByName("ftgwt0")
	if err != nil {
		t.Fatalf("link by name: %v", err)
	}
	if link.Type() != "tuntap" {
		t.Errorf("link type = %q, want tuntap", link.Type())
	}

	fd := rawFd(t, tp)
	fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
	if err != nil {
		t.Fatalf("F_GETFL: %v", err)
	}
	if fl&unix.O_NONBLOCK == 0 {
		t.Errorf("fd is blocking; QEMU's (and XDP-native tun writes) need O_NONBLOCK")
	}
	ifr, err := unix.NewIfreq("")
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.IoctlIfreq(fd, unix.TUNGETIFF, ifr); err != nil {
		t.Fatalf("TUNGETIFF: %v", err)
	}
	flags := ifr.Uint16()
	if flags&unix.IFF_TAP == 0 || flags&unix.IFF_NO_PI == 0 || flags&unix.IFF_VNET_HDR != 0 {
		t.Errorf("tun flags = %#x, want IFF_TAP|IFF_NO_PI without IFF_VNET_HDR", flags)
	}

	if err := tp.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if _, err := netlink.LinkByName("ftgwt0"); err == nil {
		t.Errorf("non-persistent tap still exists after Close")
	}
}

func TestOpenPersistent(t *testing.T) {
	testutil.InNewNetns(t)
	if err := Create("ftgwt1"); err != nil {
		t.Fatalf("Create: %v", err)
	}
	for i := 0; i < 2; i++ { // attach, detach, and attach again
		tp, err := Open("ftgwt1")
		if err != nil {
			t.Fatalf("Open #%d: %v", i, err)
		}
		if err := tp.Close(); err != nil {
			t.Fatalf("Close #%d: %v", i, err)
		}
	}
	if _, err := netlink.LinkByName("ftgwt1"); err != nil {
		t.Errorf("persistent tap gone after Close: %v", err)
	}
}

func TestReadBlocksInNetpoller(t *testing.T) {
	testutil.InNewNetns(t)
	tp, err := Open("ftgwt2")
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	defer tp.Close()

	// A deadline only works for fds in the netpoller.
	if err := tp.SetReadDeadline(time.Now().Add(50 * time.Millisecond)); err != nil {
		t.Fatalf("SetReadDeadline: %v", err)
	}
	buf := make([]byte, 2048)
	if _, err := tp.Read(buf); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("Read with deadline: err = %v, want deadline exceeded", err)
	}

	// And Close wakes a parked Read.
	if err := tp.SetReadDeadline(time.Time{}); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		_, err := tp.Read(buf)
		done <- err
	}()
	time.Sleep(20 * time.Millisecond)
	tp.Close()
	select {
	case err := <-done:
		if !errors.Is(err, os.ErrClosed) {
			t.Errorf("Read after Close: err = %v, want os.ErrClosed", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Close did not unblock Read")
	}
}

// TestFrames writes an ARP request for the host's address into the tap and
// expects the kernel's ARP reply back: whole frames, no prefix either way.
func TestFrames(t *testing.T) {
	testutil.InNewNetns(t)
	tp, err := Open("ftgwt3")
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	defer tp.Close()
	link, err := netlink.LinkByName("ftgwt3")
	if err != nil {
		t.Fatal(err)
	}
	addr, _ := netlink.ParseAddr("192.0.2.1/24")
	if err := netlink.AddrAdd(link, addr); err != nil {
		t.Fatalf("add addr: %v", err)
	}
	if err := netlink.LinkSetUp(link); err != nil {
		t.Fatalf("link up: %v", err)
	}
	hostMAC := link.Attrs().HardwareAddr

	ourMAC := net.HardwareAddr{0x02, 0, 0, 0, 0, 0x02}
	req := make([]byte, 0, 42)
	req = append(req, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff)
	req = append(req, ourMAC...)
	req = binary.BigEndian.AppendUint16(req, 0x0806)
	req = append(req, 0, 1, 8, 0, 6, 4, 0, 1) // Ethernet/IPv4, request
	req = append(req, ourMAC...)
	req = append(req, 192, 0, 2, 2)
	req = append(req, 0, 0, 0, 0, 0, 0)
	req = append(req, 192, 0, 2, 1)
	if n, err := tp.Write(req); err != nil || n != len(req) {
		t.Fatalf("Write = %d, %v", n, err)
	}

	if err := tp.SetReadDeadline(time.Now().Add(5 * time.Second)); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 2048)
	for i := 0; i < 100; i++ { // skip IPv6 chatter; bounded by count and deadline
		n, err := tp.Read(buf)
		if err != nil {
			t.Fatalf("Read: %v", err)
		}
		f := buf[:n]
		if n < 42 || binary.BigEndian.Uint16(f[12:14]) != 0x0806 {
			continue
		}
		if !bytes.Equal(f[0:6], ourMAC) || !bytes.Equal(f[6:12], hostMAC) {
			t.Fatalf("ARP reply MACs dst=%x src=%x, want %s from %s", f[0:6], f[6:12], ourMAC, hostMAC)
		}
		if op := binary.BigEndian.Uint16(f[20:22]); op != 2 {
			t.Fatalf("ARP op = %d, want reply", op)
		}
		if !bytes.Equal(f[22:28], hostMAC) || !bytes.Equal(f[28:32], []byte{192, 0, 2, 1}) {
			t.Fatalf("ARP reply sender = %x %x", f[22:28], f[28:32])
		}
		return
	}
	t.Fatal("no ARP reply among 100 frames")
}
