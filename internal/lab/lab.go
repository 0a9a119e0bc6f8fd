// Package lab builds the two-host lab on one machine: network namespaces for
// the primary host, the secondary host and a client, joined by a bridge, with
// a direct replication link between the hosts. Its names and addresses are a
// contract that the docs, the tests and users rely on.
package lab

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/ftgw/ftgw/internal/netnsutil"
	"github.com/ftgw/ftgw/pkg/datapath"
)

// The lab's names and addresses.
const (
	NSPrimary   = "ftgw-a"
	NSSecondary = "ftgw-b"
	NSClient    = "ftgw-c"
	NSLAN       = "ftgw-lan"

	Uplink      = "eth0"
	ReplLink    = "repl0"
	Tap         = "tap0"
	Bridge      = "br0"
	VMName      = "vm1"
	MetricsPort = 9477
	LogPort     = 7100
	KVPort      = 7000
)

var (
	VMIP        = netip.MustParseAddr("192.0.2.10")
	VMMAC       = net.HardwareAddr{0x02, 0x46, 0x54, 0x47, 0x00, 0x0a}
	PrimaryIP   = netip.MustParsePrefix("192.0.2.1/24")
	SecondaryIP = netip.MustParsePrefix("192.0.2.2/24")
	ClientIP    = netip.MustParsePrefix("192.0.2.100/24")
	ReplPrimary = netip.MustParsePrefix("198.18.0.1/30")
	ReplSecond  = netip.MustParsePrefix("198.18.0.2/30")
)

// MaxVMs is how many VMs the lab protects at most: VM i sits at
// 192.0.2.(9+i), and the client's 192.0.2.100 must stay above them all.
const MaxVMs = 64

// LabVM is the address of one of the lab's VMs.
type LabVM struct {
	Name string
	IP   netip.Addr
	MAC  net.HardwareAddr
	Tap  string
}

// VM is the lab's VM number i, from 1 to MaxVMs: vm<i> at 192.0.2.(9+i),
// MAC 02:46:54:47:00:(9+i), on tap<i-1>. VM(1) is VMName at VMIP with VMMAC
// on Tap, the single VM's names, so a lab of one VM is the lab it always
// was. It panics outside 1..MaxVMs: callers check the count first.
func VM(i int) LabVM {
	if i < 1 || i > MaxVMs {
		panic(fmt.Sprintf("lab.VM(%d): want 1 to %d", i, MaxVMs))
	}
	host := byte(VMIP.As4()[3]) + byte(i-1)
	ip := VMIP.As4()
	ip[3] = host
	mac := slices.Clone(VMMAC)
	mac[5] = host
	return LabVM{Name: fmt.Sprintf("vm%d", i), IP: netip.AddrFrom4(ip), MAC: mac, Tap: fmt.Sprintf("tap%d", i-1)}
}

// VMs lists the lab's first n VMs, VM(1) first.
func VMs(n int) []LabVM {
	vms := make([]LabVM, n)
	for i := range vms {
		vms[i] = VM(i + 1)
	}
	return vms
}

// Host is one of the lab's namespaces with an uplink on the LAN.
type Host struct {
	NS     string
	Port   string // the uplink's peer on the bridge
	Addr   netip.Prefix
	Repl   netip.Prefix // zero for the client
	daemon bool
}

// Hosts of the lab, primary first.
var Hosts = []Host{
	{NS: NSPrimary, Port: "a", Addr: PrimaryIP, Repl: ReplPrimary, daemon: true},
	{NS: NSSecondary, Port: "b", Addr: SecondaryIP, Repl: ReplSecond, daemon: true},
	{NS: NSClient, Port: "c", Addr: ClientIP},
}

// Namespaces lists every namespace the lab creates.
func Namespaces() []string { return []string{NSPrimary, NSSecondary, NSClient, NSLAN} }

// Exists reports whether any of the lab's namespaces is there.
func Exists() bool {
	for _, ns := range Namespaces() {
		if _, err := os.Stat("/run/netns/" + ns); err == nil {
			return true
		}
	}
	return false
}

// Build creates the namespaces and links. It fails if the lab exists.
func Build() (err error) {
	if Exists() {
		return errors.New("the lab exists already: run `ftgw lab down` first")
	}
	defer func() {
		if err != nil {
			err = errors.Join(err, Remove())
		}
	}()
	handles := map[string]netns.NsHandle{}
	for _, name := range Namespaces() {
		h, err := newNamed(name)
		if err != nil {
			return err
		}
		defer h.Close()
		handles[name] = h
	}

	lan, err := netlink.NewHandleAt(handles[NSLAN])
	if err != nil {
		return err
	}
	defer lan.Close()
	br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: Bridge}}
	if err := lan.LinkAdd(br); err != nil {
		return fmt.Errorf("create bridge: %w", err)
	}
	if err := lan.LinkSetUp(br); err != nil {
		return err
	}

	for _, host := range Hosts {
		if err := addVeth(lan, Bridge, host.Port, handles[host.NS], Uplink, host.Addr); err != nil {
			return fmt.Errorf("uplink of %s: %w", host.NS, err)
		}
	}
	// The replication link is a cable of its own between the two hosts.
	if err := addPair(handles[NSPrimary], ReplLink, ReplPrimary, handles[NSSecondary], ReplLink, ReplSecond); err != nil {
		return fmt.Errorf("replication link: %w", err)
	}
	for _, name := range []string{NSPrimary, NSSecondary, NSClient, NSLAN} {
		if err := upLoopback(handles[name]); err != nil {
			return err
		}
	}
	for _, host := range Hosts {
		if err := netnsutil.Do(host.NS, func() error { return disableTxChecksum(Uplink) }); err != nil {
			return err
		}
		if err := spreadByCPU(host.Port); err != nil {
			return err
		}
	}
	// A veth drops what XDP redirects into it unless its peer runs XDP
	// too: the bridge ports of the hosts carry the VM's released frames.
	return netnsutil.Do(NSLAN, func() error {
		for _, host := range Hosts[:2] {
			if err := attachPass(host.Port); err != nil {
				return err
			}
		}
		return nil
	})
}

// spreadByCPU maps each transmit queue of a bridge port to one CPU (XPS), so
// the CPU that forwards a frame picks the host's receive queue, as a
// multi-queue NIC spreads flows. Without it the bridge reuses the queue the
// frame came in on, and all input would arrive on one queue. sysfs shows a
// namespace's devices only to a process that mounted it there, hence ip.
func spreadByCPU(port string) error {
	for q := range 2 {
		mask := fmt.Sprintf("%x", 1<<(q%runtime.NumCPU()))
		path := fmt.Sprintf("/sys/class/net/%s/queues/tx-%d/xps_cpus", port, q)
		cmd := exec.Command("ip", "netns", "exec", NSLAN, "sh", "-c", fmt.Sprintf("echo %s > %s", mask, path))
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("set xps of %s queue %d: %v: %s", port, q, err, out)
		}
	}
	return nil
}

// newNamed creates a named namespace the way `ip netns add` does, without
// leaving the calling thread in it.
func newNamed(name string) (netns.NsHandle, error) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	orig, err := netns.Get()
	if err != nil {
		return 0, err
	}
	defer orig.Close()
	h, err := netns.NewNamed(name)
	if err != nil {
		return 0, fmt.Errorf("create netns %s: %w", name, err)
	}
	if err := netns.Set(orig); err != nil {
		// This thread is stuck in the new namespace; never reuse it.
		runtime.LockOSThread()
		return 0, fmt.Errorf("leave netns %s: %w", name, err)
	}
	return h, nil
}

func addVeth(lan *netlink.Handle, bridge, port string, hostNS netns.NsHandle, name string, addr netip.Prefix) error {
	// Two queues each way, so input for the VM is processed on both CPUs
	// at once, as on a multi-queue NIC: the serializer must order it.
	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: port, NumTxQueues: 2, NumRxQueues: 2},
		PeerName:      name,
		PeerNamespace: netlink.NsFd(hostNS),
	}
	if err := lan.LinkAdd(veth); err != nil {
		return fmt.Errorf("create veth %s: %w", port, err)
	}
	br, err := lan.LinkByName(bridge)
	if err != nil {
		return err
	}
	link, err := lan.LinkByName(port)
	if err != nil {
		return err
	}
	if err := lan.LinkSetMaster(link, br); err != nil {
		return err
	}
	if err := lan.LinkSetUp(link); err != nil {
		return err
	}
	return configure(hostNS, name, addr)
}

func addPair(nsA netns.NsHandle, nameA string, addrA netip.Prefix, nsB netns.NsHandle, nameB string, addrB netip.Prefix) error {
	h, err := netlink.NewHandleAt(nsA)
	if err != nil {
		return err
	}
	defer h.Close()
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: nameA}, PeerName: nameB, PeerNamespace: netlink.NsFd(nsB)}
	if err := h.LinkAdd(veth); err != nil {
		return fmt.Errorf("create veth %s: %w", nameA, err)
	}
	if err := configure(nsA, nameA, addrA); err != nil {
		return err
	}
	return configure(nsB, nameB, addrB)
}

func configure(ns netns.NsHandle, name string, addr netip.Prefix) error {
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return err
	}
	defer h.Close()
	link, err := h.LinkByName(name)
	if err != nil {
		return err
	}
	ipnet := &net.IPNet{IP: addr.Addr().AsSlice(), Mask: net.CIDRMask(addr.Bits(), 32)}
	if err := h.AddrAdd(link, &netlink.Addr{IPNet: ipnet}); err != nil {
		return fmt.Errorf("address %s on %s: %w", addr, name, err)
	}
	return h.LinkSetUp(link)
}

func upLoopback(ns netns.NsHandle) error {
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return err
	}
	defer h.Close()
	lo, err := h.LinkByName("lo")
	if err != nil {
		return err
	}
	return h.LinkSetUp(lo)
}

// attachPass attaches xdp_pass the legacy way, so it outlives this process.
func attachPass(name string) error {
	iface, err := net.InterfaceByName(name)
	if err != nil {
		return err
	}
	prog, err := datapath.PassProgram()
	if err != nil {
		return err
	}
	defer prog.Close()
	link, err := netlink.LinkByName(name)
	if err != nil {
		return err
	}
	if err := netlink.LinkSetXdpFdWithFlags(link, prog.FD(), 0); err != nil {
		return fmt.Errorf("attach xdp_pass to %s (ifindex %d): %w", name, iface.Index, err)
	}
	return nil
}

// Remove deletes every namespace of the lab; the devices in them go too.
func Remove() error {
	var errs []error
	for _, name := range Namespaces() {
		if _, err := os.Stat("/run/netns/" + name); err != nil {
			continue
		}
		if err := netns.DeleteNamed(name); err != nil {
			errs = append(errs, fmt.Errorf("delete netns %s: %w", name, err))
		}
	}
	return errors.Join(errs...)
}

// Crash kills every process of a lab host at once, as a host crash.
func Crash(ns string) error {
	out, err := exec.Command("ip", "netns", "pids", ns).Output()
	if err != nil {
		return fmt.Errorf("list processes of %s: %w", ns, err)
	}
	for _, f := range strings.Fields(string(out)) {
		if pid, err := strconv.Atoi(f); err == nil {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	}
	return nil
}

// SetReplLink brings the replication link between the hosts up or down
// (down: both hosts alive, each cut off from the other).
func SetReplLink(up bool) error {
	state := map[bool]string{true: "up", false: "down"}[up]
	if out, err := exec.Command("ip", "-n", NSSecondary, "link", "set", ReplLink, state).CombinedOutput(); err != nil {
		return fmt.Errorf("set %s %s: %v: %s", ReplLink, state, err, out)
	}
	return nil
}
