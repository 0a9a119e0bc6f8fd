package lab

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/ftgw/ftgw/internal/netnsutil"
	"github.com/ftgw/ftgw/internal/tap"
	"github.com/ftgw/ftgw/pkg/guest"
	"github.com/ftgw/ftgw/pkg/replay"
)

// A plain VM is the lab's real VM run alone: plain QEMU (replay.Plain), no
// ftgw, on a tap in a private network namespace whose host side is its only
// client. `ftgw bench` measures it as the unprotected baseline, and the
// tests boot a host's copy of a VM's disk in it, to see what the disk
// alone holds.

// The plain VM's network, in its private namespace: TEST-NET-3 (RFC 5737),
// which nothing else on the machine routes.
var (
	PlainHostAddr = netip.MustParsePrefix("203.0.113.1/24")
	PlainVMAddr   = netip.MustParsePrefix("203.0.113.10/24")
)

// PlainVM is a running plain VM.
type PlainVM struct {
	ns  *netnsutil.Private
	q   *replay.QEMU
	dir string
}

// PlainMachine is m with the guest's address (ftgw-init's ftgw.ip) moved
// to the plain VM's network: the only change to its command line.
func PlainMachine(m replay.Machine) replay.Machine {
	var params []string
	for _, p := range strings.Fields(m.Cmdline) {
		if strings.HasPrefix(p, "ftgw.ip=") {
			p = "ftgw.ip=" + PlainVMAddr.String()
		}
		params = append(params, p)
	}
	m.Cmdline = strings.Join(params, " ")
	return m
}

// PlainVMConfig is what a plain VM runs.
type PlainVMConfig struct {
	// Machine is the VM, with its address as the protected copies have it
	// (StartPlainVM moves it, PlainMachine).
	Machine replay.Machine
	// Disk is the image a VM with Machine.Disk boots with. It is copied
	// first: the plain VM never writes the caller's file.
	Disk string
	// Trace, if set, is where the preloaded library (Preload) notes the
	// tap's timestamps (replay.Config.Trace): `ftgw bench`'s breakdown.
	Preload string
	Trace   *os.File
}

// StartPlainVM boots cfg's machine and waits until its guest is ready.
func StartPlainVM(ctx context.Context, cfg PlainVMConfig) (_ *PlainVM, err error) {
	m := cfg.Machine
	p := &PlainVM{}
	defer func() {
		if err != nil {
			p.Close()
		}
	}()
	if p.dir, err = os.MkdirTemp("", "ftgw-plain-vm-"); err != nil {
		return nil, err
	}
	if m.Disk {
		if err := replay.CopyDisk(cfg.Disk, replay.DiskPath(p.dir)); err != nil {
			return nil, err
		}
	}
	if p.ns, err = netnsutil.NewPrivate(); err != nil {
		return nil, err
	}
	var t *tap.Tap
	err = p.ns.Do(func() error {
		var err error
		if t, err = tap.Open(Tap); err != nil {
			return err
		}
		l, err := netlink.LinkByName(t.Name())
		if err != nil {
			return err
		}
		addr := &netlink.Addr{IPNet: &net.IPNet{IP: PlainHostAddr.Addr().AsSlice(), Mask: net.CIDRMask(PlainHostAddr.Bits(), 32)}}
		if err := netlink.AddrAdd(l, addr); err != nil {
			return fmt.Errorf("add %s to %s: %w", PlainHostAddr, t.Name(), err)
		}
		if err := netlink.LinkSetUp(l); err != nil {
			return fmt.Errorf("set %s up: %w", t.Name(), err)
		}
		return nil
	})
	if err != nil {
		if t != nil {
			t.Close()
		}
		return nil, err
	}
	stderr, err := os.Create(filepath.Join(p.dir, "qemu.log"))
	if err != nil {
		t.Close()
		return nil, err
	}
	defer stderr.Close() // QEMU holds its own copy
	sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	p.q, err = replay.Start(sctx, replay.Config{Machine: PlainMachine(m), Mode: replay.Plain, Dir: p.dir, Tap: t.File(), Stderr: stderr,
		Preload: cfg.Preload, Trace: cfg.Trace})
	cancel()
	t.Close() // QEMU holds its own copy
	if err != nil {
		return nil, fmt.Errorf("%w; %s", err, Tail(filepath.Join(p.dir, "qemu.log"), 5))
	}
	bctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	if err := replay.WaitSerial(bctx, p.dir, "ftgw-init ready"); err != nil {
		return nil, fmt.Errorf("%w; its console ends:\n%s", err, Tail(replay.SerialPath(p.dir), 5))
	}
	return p, nil
}

// DialKV dials the guest's key-value port.
func (p *PlainVM) DialKV(timeout time.Duration) (c *guest.Client, err error) {
	err = p.ns.Do(func() (err error) {
		c, err = guest.Dial(net.JoinHostPort(PlainVMAddr.Addr().String(), strconv.Itoa(guest.KVPort)), timeout)
		return err
	})
	return c, err
}

// DialBulk opens a bulk stream from the guest.
func (p *PlainVM) DialBulk(ctx context.Context) (c net.Conn, err error) {
	err = p.ns.Do(func() (err error) {
		var d net.Dialer
		c, err = d.DialContext(ctx, "tcp", net.JoinHostPort(PlainVMAddr.Addr().String(), strconv.Itoa(guest.BulkPort)))
		return err
	})
	return c, err
}

// Pid is QEMU's process ID.
func (p *PlainVM) Pid() int { return p.q.Pid() }

// Console is the guest's serial console so far.
func (p *PlainVM) Console() string {
	b, _ := os.ReadFile(replay.SerialPath(p.dir))
	return string(b)
}

// Close stops the VM; its tap, and then the namespace, go with it.
func (p *PlainVM) Close() {
	if p.q != nil {
		p.q.Stop()
	}
	if p.ns != nil {
		p.ns.Close()
	}
	if p.dir != "" {
		os.RemoveAll(p.dir)
	}
}

// Tail is the last lines of the file at path, for an error message.
func Tail(path string, lines int) string {
	raw, _ := os.ReadFile(path)
	all := strings.Split(strings.TrimRight(string(raw), "\n"), "\n")
	return strings.Join(all[max(0, len(all)-lines):], "\n")
}
