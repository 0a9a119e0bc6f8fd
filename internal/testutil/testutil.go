// Package testutil holds what the project's tests share: the root gate and
// network namespaces that tests create for themselves.
package testutil

import (
	"os"
	"runtime"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// RequireRoot skips tests that need to load BPF programs or create devices.
func RequireRoot(tb testing.TB) {
	tb.Helper()
	if os.Geteuid() != 0 {
		tb.Skip("needs root: loads BPF programs and creates network devices")
	}
}

// InNewNetns moves the calling goroutine, locked to its OS thread, into a
// fresh network namespace for the rest of the test, and returns it. The
// namespace goes away when the test ends and its last user is gone.
func InNewNetns(tb testing.TB) netns.NsHandle {
	tb.Helper()
	RequireRoot(tb)
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		tb.Fatalf("get current netns: %v", err)
	}
	ns, err := netns.New()
	if err != nil {
		orig.Close()
		runtime.UnlockOSThread()
		tb.Fatalf("create netns: %v", err)
	}
	tb.Cleanup(func() {
		if err := netns.Set(orig); err != nil {
			// Stay locked: the thread dies with the goroutine instead of
			// running others in the wrong namespace.
			tb.Errorf("restore netns: %v", err)
			return
		}
		orig.Close()
		ns.Close()
		runtime.UnlockOSThread()
	})
	return ns
}

// WaitLinksUp waits until each named link is operationally up: a veth drops
// what it is given before its carrier comes on.
func WaitLinksUp(tb testing.TB, names ...string) {
	tb.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for _, name := range names {
		for {
			l, err := netlink.LinkByName(name)
			if err == nil && l.Attrs().OperState == netlink.OperUp {
				break
			}
			if time.Now().After(deadline) {
				tb.Fatalf("link %s not up after 5s", name)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
}

// LinkUp gives the link name the address addr (a prefix like
// "192.0.2.1/24"; none if empty) and sets it up: the host's end of a tap.
func LinkUp(tb testing.TB, name, addr string) {
	tb.Helper()
	link, err := netlink.LinkByName(name)
	if err != nil {
		tb.Fatal(err)
	}
	if addr != "" {
		a, err := netlink.ParseAddr(addr)
		if err != nil {
			tb.Fatal(err)
		}
		if err := netlink.AddrAdd(link, a); err != nil {
			tb.Fatalf("add %s to %s: %v", addr, name, err)
		}
	}
	if err := netlink.LinkSetUp(link); err != nil {
		tb.Fatalf("set %s up: %v", name, err)
	}
}
