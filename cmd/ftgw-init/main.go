// Command ftgw-init is /init, PID 1, of the Linux guest that `make guest`
// builds (scripts/build-guest.sh): Debian's cloud kernel, an initramfs with
// this static binary and the virtio-net and virtio-blk drivers, and
// optionally a disk.
//
// It brings up the network from the kernel command line and serves the same
// UDP key-value protocol as the synthetic guest (pkg/guest), with the same
// guest.Store, on the guest kernel's own network stack. The kernel answers
// ARP and ping. After each request it prints one line to the console,
//
//	ftgw-kv req=<requests> puts=<PUTs> digest=<sha256 hex of the store>
//
// so that a test can read the state of a VM, and compare a primary's and a
// secondary's executions, without adding a command to the protocol.
//
// With ftgw.disk, the store outlives the VM: every PUT that succeeds is
// appended to a log on that block device (guest.DiskLog) and synced before
// it is applied and answered, and at boot the log is replayed into the
// store, which prints
//
//	ftgw-init loaded <PUTs> puts from <device>
//
// before the ready line. A PUT the disk has no room for is answered
// "ERR disk full" and not applied. A failed write or sync of the disk is
// fatal (below): the guest cannot tell what the disk holds after one.
// Without ftgw.disk, no disk driver is loaded and nothing changes.
//
// It also serves the bulk protocol (pkg/guest, BulkPort) on TCP: a client
// asks for a number of bytes and gets exactly that many of a pattern that
// depends only on their offset, then the end of the stream; `ftgw bench`
// measures the VM's transfer rate with it. After each transfer it prints
//
//	ftgw-bulk conn=<connections> bytes=<pattern bytes sent> [err=<why>]
//
// The VM is recorded and replayed by QEMU, so nothing here reads a clock,
// sets a timer or draws randomness (but for the wait for a disk that is
// late, see waitForBlockDevice): what it does depends only on its inputs
// (the command line, the disk's log, the datagrams and the TCP streams, in
// the order the guest kernel delivers them).
//
// Kernel command line:
//
//	ftgw.ip=<IPv4>/<prefix>   the address of eth0 (required)
//	ftgw.disk=/dev/<name>     the virtio-blk device (or partition) that
//	                          holds the key-value log, from its first byte
//	                          on; all zeros is an empty log (optional)
//
// On any failure it prints "ftgw-init: fatal: ..." and powers the VM off:
// PID 1 must never exit (the kernel panics), and a VM that stops is noticed
// at once by whoever runs it, where one that hangs is only noticed at a
// timeout. If even the power-off fails, it pauses forever.
package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/ftgw/ftgw/pkg/guest"
)

const (
	// modulesDir holds the driver modules, flat, and loadOrderFile, which
	// lists their file names in dependency order. The build script writes
	// both, because it is what knows the kernel's configuration (which
	// drivers are modules) and their dependencies (from modprobe).
	modulesDir    = "/lib/modules"
	loadOrderFile = "load-order"

	// ifName is the virtio-net device's name: with no udev in the guest,
	// the kernel's own name is kept.
	ifName = "eth0"
)

func main() {
	defer func() {
		// A panic would make PID 1 exit; power off with the reason instead.
		if r := recover(); r != nil {
			halt(fmt.Errorf("panic: %v", r))
		}
	}()
	halt(run())
}

func run() error {
	if err := mountFilesystems(); err != nil {
		return err
	}
	cmdline, err := os.ReadFile("/proc/cmdline")
	if err != nil {
		return fmt.Errorf("read kernel command line: %w", err)
	}
	cfg, err := parseCmdline(string(cmdline))
	if err != nil {
		return err
	}
	// Before the NIC exists, so that it never gets an IPv6 address: IPv6
	// would have the guest send router solicitations, DAD and MLD on its
	// own, where the synthetic guest only ever sends replies.
	if err := disableIPv6(); err != nil {
		return err
	}
	if err := loadModules(modulesDir, loadOrderFile); err != nil {
		return err
	}
	store := guest.NewStore()
	var log *guest.DiskLog // nil: the store lives in memory only
	if cfg.disk != "" {
		if store, log, err = openDiskStore(cfg.disk); err != nil {
			return err
		}
		fmt.Printf("ftgw-init loaded %d puts from %s\n", store.Puts(), cfg.disk)
	}
	if err := configureNetwork(cfg); err != nil {
		return err
	}
	conn, err := net.ListenUDP("udp4", &net.UDPAddr{Port: guest.KVPort})
	if err != nil {
		return fmt.Errorf("listen on udp port %d: %w", guest.KVPort, err)
	}
	defer conn.Close()
	// KeepAlive -1: no keep-alive timer on the bulk connections; a
	// transfer ends when its stream does.
	bulk, err := (&net.ListenConfig{KeepAlive: -1}).Listen(context.Background(), "tcp4", fmt.Sprintf(":%d", guest.BulkPort))
	if err != nil {
		return fmt.Errorf("listen on tcp port %d: %w", guest.BulkPort, err)
	}
	defer bulk.Close()
	fmt.Printf("ftgw-init ready ip=%s\n", cfg.ip)
	errc := make(chan error, 2)
	go func() { errc <- serveBulk(bulk) }()
	go func() { errc <- serve(conn, store, log) }()
	return <-errc
}

// mountFilesystems mounts /proc (the command line, sysctls), /sys and /dev.
//
// Output needs nothing mounted: fds 0, 1 and 2 are the console already. The
// kernel opens /dev/console for init from the /dev/console node of its
// built-in initramfs (usr/default_cpio_list), which ours is unpacked over;
// mounting devtmpfs on /dev hides the node but not the open fds. Without
// them the Go runtime would abort before main, as it could not put
// /dev/null in their place.
func mountFilesystems() error {
	for _, fs := range []struct{ fstype, target string }{
		{"proc", "/proc"},
		{"sysfs", "/sys"},
		{"devtmpfs", "/dev"},
	} {
		if err := mount(fs.fstype, fs.target); err != nil {
			return err
		}
	}
	return nil
}

func mount(fstype, target string) error {
	if err := os.MkdirAll(target, 0o755); err != nil {
		return fmt.Errorf("create %s: %w", target, err)
	}
	if err := unix.Mount(fstype, target, fstype, unix.MS_NOSUID|unix.MS_NOEXEC, ""); err != nil {
		return fmt.Errorf("mount %s on %s: %w", fstype, target, err)
	}
	return nil
}

// config is what the kernel command line tells the init.
type config struct {
	ip   netip.Prefix // eth0's address and subnet
	disk string       // the key-value log's block device; "": none
}

// parseCmdline reads the ftgw.* parameters from the kernel command line.
// Unknown ftgw.* parameters and repeats are errors, so that a typo fails
// loudly instead of booting a guest that is silently configured otherwise.
//
// The kernel keeps dotted parameters (module.param=value) from init's
// arguments and environment, which is why the init reads /proc/cmdline.
func parseCmdline(cmdline string) (config, error) {
	var cfg config
	for _, param := range strings.Fields(cmdline) {
		key, value, _ := strings.Cut(param, "=")
		if !strings.HasPrefix(key, "ftgw.") {
			continue
		}
		switch key {
		case "ftgw.ip":
			if cfg.ip.IsValid() {
				return config{}, errors.New("kernel command line: ftgw.ip given twice")
			}
			p, err := netip.ParsePrefix(value)
			if err != nil || !p.Addr().Is4() || p.Bits() == 0 {
				return config{}, fmt.Errorf("kernel command line: ftgw.ip=%q: want an IPv4 address with a prefix length, like 192.0.2.1/24", value)
			}
			cfg.ip = p
		case "ftgw.disk":
			if cfg.disk != "" {
				return config{}, errors.New("kernel command line: ftgw.disk given twice")
			}
			if !strings.HasPrefix(value, "/dev/") || len(value) == len("/dev/") {
				return config{}, fmt.Errorf("kernel command line: ftgw.disk=%q: want a block device, like /dev/vda", value)
			}
			cfg.disk = value
		default:
			return config{}, fmt.Errorf("kernel command line: unknown parameter %q", key)
		}
	}
	if !cfg.ip.IsValid() {
		return config{}, errors.New("kernel command line: ftgw.ip=<address>/<prefix length> is missing")
	}
	return cfg, nil
}

// disableIPv6 turns IPv6 off for every interface created from now on (and
// for lo, which exists already). A kernel without IPv6 needs nothing done.
func disableIPv6() error {
	for _, conf := range []string{"default", "all"} {
		path := "/proc/sys/net/ipv6/conf/" + conf + "/disable_ipv6"
		err := os.WriteFile(path, []byte("1\n"), 0)
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("disable ipv6: %w", err)
		}
	}
	return nil
}

// loadModules loads the modules listed in dir's file orderFile, in that
// order: each only after those it depends on.
func loadModules(dir, orderFile string) error {
	order, err := os.ReadFile(filepath.Join(dir, orderFile))
	if err != nil {
		return fmt.Errorf("read module load order: %w", err)
	}
	for _, name := range strings.Fields(string(order)) {
		if err := loadModule(filepath.Join(dir, name)); err != nil {
			return err
		}
	}
	return nil
}

func loadModule(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("load module: %w", err)
	}
	defer f.Close()
	// The virtio device's probe runs inside this call: when the last
	// module is in, eth0 (or the disk) exists.
	err = unix.FinitModule(int(f.Fd()), "", 0)
	if err != nil && !errors.Is(err, unix.EEXIST) { // EEXIST: loaded already
		return fmt.Errorf("load module %s: %w", path, err)
	}
	return nil
}

// configureNetwork brings up lo and eth0 with cfg's address; the prefix
// gives the on-link route. No default route: the guest only answers.
func configureNetwork(cfg config) error {
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		return fmt.Errorf("find lo: %w", err)
	}
	if err := netlink.LinkSetUp(lo); err != nil {
		return fmt.Errorf("set lo up: %w", err)
	}
	eth, err := netlink.LinkByName(ifName)
	if err != nil {
		return fmt.Errorf("find %s (is the VM's NIC virtio-net?): %w", ifName, err)
	}
	addr := &netlink.Addr{IPNet: &net.IPNet{
		IP:   cfg.ip.Addr().AsSlice(),
		Mask: net.CIDRMask(cfg.ip.Bits(), 32),
	}}
	if err := netlink.AddrAdd(eth, addr); err != nil {
		return fmt.Errorf("add %s to %s: %w", cfg.ip, ifName, err)
	}
	if err := netlink.LinkSetUp(eth); err != nil {
		return fmt.Errorf("set %s up: %w", ifName, err)
	}
	return nil
}

// serve answers requests one at a time, in the order the kernel queued
// them, logging the PUTs to log if there is one, and returns only if the
// socket or the log fails.
func serve(conn *net.UDPConn, store *guest.Store, log *guest.DiskLog) error {
	buf := make([]byte, 1<<16)
	var requests uint64
	for {
		n, from, err := conn.ReadFromUDPAddrPort(buf)
		if err != nil {
			return fmt.Errorf("receive request: %w", err)
		}
		// No reply can reach port 0; the synthetic guest ignores such
		// requests without applying them, and so does this one.
		if from.Port() == 0 {
			continue
		}
		reply, err := applyLogged(store, log, string(buf[:n]))
		if err != nil {
			return err
		}
		requests++
		// Printed before the reply is sent, so that a client holding the
		// reply knows the line is on its way to the console.
		fmt.Printf("ftgw-kv req=%d puts=%d digest=%s\n", requests, store.Puts(), store.Digest())
		if _, err := conn.WriteToUDPAddrPort([]byte(reply), from); err != nil {
			// The client's loss, not the guest's: keep serving.
			fmt.Printf("ftgw-init: send reply to %v: %v\n", from, err)
		}
	}
}

// maxBulkConns bounds the bulk transfers served at once. With no clock
// there is no timeout: a client that connects and never asks, or stops
// reading, holds its connection until the guest kernel's TCP gives up on
// it. Beyond the bound a connection is closed at once, so such clients
// cannot make the guest grow.
const maxBulkConns = 4

// serveBulk accepts bulk connections and serves each in a goroutine of its
// own, and returns only if the listener fails.
func serveBulk(ln net.Listener) error {
	slots := make(chan struct{}, maxBulkConns)
	var conns uint64
	for {
		c, err := ln.Accept()
		if err != nil {
			return fmt.Errorf("accept bulk connection: %w", err)
		}
		conns++
		select {
		case slots <- struct{}{}:
		default:
			fmt.Printf("ftgw-bulk conn=%d bytes=0 err=busy\n", conns)
			c.Close()
			continue
		}
		go func(conn uint64) {
			defer func() { <-slots }()
			sent, err := guest.ServeBulk(c)
			c.Close()
			if err != nil {
				fmt.Printf("ftgw-bulk conn=%d bytes=%d err=%q\n", conn, sent, err.Error())
				return
			}
			fmt.Printf("ftgw-bulk conn=%d bytes=%d\n", conn, sent)
		}(conns)
	}
}

// halt reports err and powers the VM off; it never returns.
func halt(err error) {
	fmt.Fprintf(os.Stderr, "ftgw-init: fatal: %v; powering off\n", err)
	err = unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF)
	fmt.Fprintf(os.Stderr, "ftgw-init: power off: %v; pausing forever\n", err)
	for {
		// Not select{}: with no other goroutine, the Go runtime would call
		// that a deadlock and exit.
		unix.Pause()
	}
}
