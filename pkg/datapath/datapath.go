// Package datapath loads the gateway's BPF programs (bpf/gateway.c) once per
// host, attaches them to the host's uplink and each protected VM's tap, and
// exposes the state each VM shares with its daemon: the log positions, the
// log ring, the hold queue's socket map, the owner map and the counters, all
// in the VM's slot of the host's maps.
package datapath

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sync/atomic"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

// Types shared with the BPF programs.
type (
	OwnerRecord = gatewayOwnerRecord
	Role        = gatewayRole
	Counter     = gatewayCounter
	LogRecord   = gatewayLogRecord
	HoldMeta    = gatewayHoldMeta
)

const (
	RoleNone    = gatewayRoleROLE_NONE
	RoleStandby = gatewayRoleROLE_STANDBY
	RoleActive  = gatewayRoleROLE_ACTIVE
	// RoleDraining takes no more input but still lets the guest's
	// outputs out under the Output Rule: a planned switchover.
	RoleDraining = gatewayRoleROLE_DRAINING

	// OwnerPassthrough in OwnerRecord.Flags turns output commit off: the
	// guest's outputs leave at once (input is still logged).
	OwnerPassthrough = 1
	// OwnerHoldAll sends every output through the hold queue, acked or
	// not, to measure the hold-and-release path.
	OwnerHoldAll = 2
	// OwnerEngineLogs says the VM engine logs its own input (QEMU's replay
	// log): input is delivered in order but not logged, and the engine
	// writes the head (see StateMapFD).
	OwnerEngineLogs = 4
	// OwnerGuestPaced says the guest publishes how far it has taken its
	// input (GuestCounter): input is not logged while the guest is
	// Config.GuestBudget frames behind, where its tap would drop it after
	// it was logged.
	OwnerGuestPaced = 8

	// MaxFrame is the largest frame the log carries (MAX_FRAME in gateway.h).
	MaxFrame = 9216

	// LatencyBuckets is the number of buckets of the fast-path latency
	// histogram: bucket i counts latencies below 2^i ns.
	LatencyBuckets = len(gatewayLatencyHist{}.Buckets)
)

// Config says how to load the programs.
type Config struct {
	// SerializerCPU is the CPU that gives every input frame its log position
	// and delivers it to the guest.
	SerializerCPU int
	// HoldCapacity bounds the frames held at once; more are dropped.
	HoldCapacity int
	// LogRingBytes sizes the ring that carries the log to the daemon: a
	// power of two, at least a page.
	LogRingBytes int
	// SerializerQueue is the CPUMAP queue size in frames.
	SerializerQueue int
	// GuestBudget is how many frames ahead of a paced guest
	// (OwnerGuestPaced) input may be logged: less than its tap's queue.
	GuestBudget int
}

// DefaultConfig is what the daemon uses unless told otherwise.
var DefaultConfig = Config{
	SerializerCPU:   0,
	HoldCapacity:    4096,
	LogRingBytes:    8 << 20,
	SerializerQueue: 2048,
	GuestBudget:     2048,
}

func (c Config) validate() error {
	cpus, err := ebpf.PossibleCPU()
	if err != nil {
		return err
	}
	switch {
	case c.SerializerCPU < 0 || c.SerializerCPU >= cpus:
		return fmt.Errorf("serializer cpu %d: this host has CPUs 0-%d", c.SerializerCPU, cpus-1)
	case c.HoldCapacity < 1:
		return fmt.Errorf("hold capacity %d: must be at least 1", c.HoldCapacity)
	case c.LogRingBytes < unix.Getpagesize() || c.LogRingBytes&(c.LogRingBytes-1) != 0:
		return fmt.Errorf("log ring size %d: must be a power of two of at least a page", c.LogRingBytes)
	case c.SerializerQueue < 1:
		return fmt.Errorf("serializer queue %d: must be at least 1", c.SerializerQueue)
	case c.GuestBudget < 1:
		return fmt.Errorf("guest budget %d: must be at least 1", c.GuestBudget)
	}
	return nil
}

// MaxVMs is how many VMs one host's data path protects at most (MAX_VMS in
// gateway.h): every per-VM map has this many slots.
const MaxVMs = 256

// Host is the programs and maps a host loads once for every VM it protects.
// Each VM has a slot in the per-VM maps (its Datapath, from AddVM); the
// uplink's programs find a frame's VM through the index maps.
type Host struct {
	objs  gatewayObjects
	spec  *ebpf.CollectionSpec // for the per-VM inner maps
	links []link.Link
	cfg   Config
}

// Datapath is one VM's part of its host's data path: its slot in the
// per-VM maps, its own log state and log ring, and its tap.
type Datapath struct {
	host  *Host
	slot  uint32
	state *gatewayLogState // memory-mapped: no syscalls on the ack path
	mem   []byte
	// The VM's inner maps, in the host's state and log_rings maps.
	stateMap, ring *ebpf.Map
	tap            *net.Interface
	tapLink        link.Link
	routes         []routeKey // the index entries Route wrote
	ownsHost       bool       // Load made the host for this VM alone
}

type routeKey struct {
	m   *ebpf.Map
	key any
}

// Spec returns the collection spec with the load-time constants of cfg set.
func Spec(cfg Config) (*ebpf.CollectionSpec, error) {
	spec, err := loadGateway()
	if err != nil {
		return nil, fmt.Errorf("load gateway spec: %w", err)
	}
	if err := spec.Variables["serializer_cpu"].Set(uint32(cfg.SerializerCPU)); err != nil {
		return nil, fmt.Errorf("set serializer_cpu: %w", err)
	}
	if err := spec.Variables["hold_capacity"].Set(uint64(cfg.HoldCapacity)); err != nil {
		return nil, fmt.Errorf("set hold_capacity: %w", err)
	}
	if err := spec.Variables["guest_budget"].Set(uint64(cfg.GuestBudget)); err != nil {
		return nil, fmt.Errorf("set guest_budget: %w", err)
	}
	spec.Maps[gatewayMapLogRings].InnerMap.MaxEntries = uint32(cfg.LogRingBytes)
	return spec, nil
}

// LoadHost loads the programs and maps into the kernel without attaching
// them.
func LoadHost(cfg Config, opts *ebpf.CollectionOptions) (_ *Host, err error) {
	if err := cfg.validate(); err != nil {
		return nil, fmt.Errorf("datapath config: %w", err)
	}
	spec, err := Spec(cfg)
	if err != nil {
		return nil, err
	}
	h := &Host{cfg: cfg, spec: spec}
	if err := spec.LoadAndAssign(&h.objs, opts); err != nil {
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) {
			return nil, fmt.Errorf("load gateway: %w (verifier log: %+v)", err, ve)
		}
		return nil, fmt.Errorf("load gateway: %w", err)
	}
	defer func() {
		if err != nil {
			h.Close()
		}
	}()
	serializer := gatewayBpfCpumapVal{Qsize: uint32(cfg.SerializerQueue)}
	serializer.BpfProg.Fd = int32(h.objs.SerializeInput.FD())
	if err := h.objs.Serializer.Put(uint32(cfg.SerializerCPU), serializer); err != nil {
		return nil, fmt.Errorf("start serializer on cpu %d: %w", cfg.SerializerCPU, err)
	}
	return h, nil
}

// AttachUplink attaches the uplink's programs and points the VMs' fast
// path at it. Frames for a VM pass untouched until its owner record is
// published.
func (h *Host) AttachUplink(uplink *net.Interface) error {
	if err := h.SetUplink(uplink); err != nil {
		return err
	}
	l, err := link.AttachXDP(link.XDPOptions{Program: h.objs.UplinkIngress, Interface: uplink.Index})
	if err != nil {
		return fmt.Errorf("attach xdp to %s: %w", uplink.Name, err)
	}
	h.links = append(h.links, l)
	l, err = link.AttachTCX(link.TCXOptions{Program: h.objs.UplinkEgress, Attach: ebpf.AttachTCXEgress, Interface: uplink.Index})
	if err != nil {
		return fmt.Errorf("attach tc egress to %s: %w", uplink.Name, err)
	}
	h.links = append(h.links, l)
	return nil
}

// SetUplink points the VMs' fast path at uplink without attaching a
// program to it.
func (h *Host) SetUplink(uplink *net.Interface) error {
	if err := h.objs.ToUplink.Put(uint32(0), uint32(uplink.Index)); err != nil {
		return fmt.Errorf("set uplink device %s: %w", uplink.Name, err)
	}
	return nil
}

// AddVM gives the VM in slot its own log state and log ring. The slot must
// be free: one VM per slot, 0 to MaxVMs-1.
func (h *Host) AddVM(slot int) (_ *Datapath, err error) {
	if slot < 0 || slot >= MaxVMs {
		return nil, fmt.Errorf("vm slot %d: want 0 to %d", slot, MaxVMs-1)
	}
	d := &Datapath{host: h, slot: uint32(slot)}
	defer func() {
		if err != nil {
			d.Close()
		}
	}()
	if d.stateMap, err = ebpf.NewMap(h.spec.Maps[gatewayMapState].InnerMap); err != nil {
		return nil, fmt.Errorf("create log state of vm slot %d: %w", slot, err)
	}
	if d.ring, err = ebpf.NewMap(h.spec.Maps[gatewayMapLogRings].InnerMap); err != nil {
		return nil, fmt.Errorf("create log ring of vm slot %d: %w", slot, err)
	}
	d.mem, err = unix.Mmap(d.stateMap.FD(), 0, unix.Getpagesize(), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("mmap log state: %w", err)
	}
	d.state = (*gatewayLogState)(unsafe.Pointer(&d.mem[0]))
	if err := h.objs.State.Put(d.slot, d.stateMap); err != nil {
		return nil, fmt.Errorf("vm slot %d: %w", slot, err)
	}
	if err := h.objs.LogRings.Put(d.slot, d.ring); err != nil {
		return nil, fmt.Errorf("vm slot %d: %w", slot, err)
	}
	return d, nil
}

// Close detaches and unloads everything. Close the VMs' Datapaths first.
func (h *Host) Close() error {
	var errs []error
	for _, l := range h.links {
		errs = append(errs, l.Close())
	}
	errs = append(errs, h.objs.Close())
	return errors.Join(errs...)
}

// Load loads a host's data path for one VM, in slot 0: Close unloads both.
func Load(cfg Config, opts *ebpf.CollectionOptions) (*Datapath, error) {
	h, err := LoadHost(cfg, opts)
	if err != nil {
		return nil, err
	}
	d, err := h.AddVM(0)
	if err != nil {
		return nil, errors.Join(err, h.Close())
	}
	d.ownsHost = true
	return d, nil
}

// Attach attaches the host's uplink programs and the VM's tap: for a
// data path from Load.
func (d *Datapath) Attach(uplink, tap *net.Interface) error {
	if err := d.host.AttachUplink(uplink); err != nil {
		return err
	}
	return d.AttachTap(tap)
}

// AttachTap makes tap the VM's: the serializer delivers its input there,
// and guest_egress, attached to it, treats what the guest sends.
func (d *Datapath) AttachTap(tap *net.Interface) error {
	if err := d.SetTap(tap); err != nil {
		return err
	}
	l, err := link.AttachXDP(link.XDPOptions{Program: d.host.objs.GuestEgress, Interface: tap.Index})
	if err != nil {
		return fmt.Errorf("attach xdp to %s: %w", tap.Name, err)
	}
	d.tapLink = l
	return nil
}

// SetTap points the VM's slot at tap without attaching a program to it.
func (d *Datapath) SetTap(tap *net.Interface) error {
	if err := d.host.objs.ToGuest.Put(d.slot, uint32(tap.Index)); err != nil {
		return fmt.Errorf("set guest device %s: %w", tap.Name, err)
	}
	if err := d.host.objs.VmByTap.Put(uint32(tap.Index), d.slot); err != nil {
		return fmt.Errorf("index tap %s: %w", tap.Name, err)
	}
	d.tap = tap
	return nil
}

// Route sends the uplink's frames for mac, and ARP requests for ip, to this
// VM, and lets the VM's released frames from mac through uplink_egress's
// check. The VM's owner record still decides what happens to them.
func (d *Datapath) Route(ip netip.Addr, mac net.HardwareAddr) error {
	if !ip.Is4() || len(mac) != 6 {
		return fmt.Errorf("route vm slot %d: want an IPv4 address and a 6-byte MAC, have %s and %s", d.slot, ip, mac)
	}
	var macKey uint64
	copy((*[8]byte)(unsafe.Pointer(&macKey))[:], mac)
	ip4 := ip.As4()
	ipKey := *(*uint32)(unsafe.Pointer(&ip4)) // network byte order, as the program reads it
	for _, r := range []routeKey{{d.host.objs.VmByMac, macKey}, {d.host.objs.VmByIp, ipKey}} {
		if err := r.m.Put(r.key, d.slot); err != nil {
			return fmt.Errorf("route %s %s to vm slot %d: %w", ip, mac, d.slot, err)
		}
		d.routes = append(d.routes, r)
	}
	return nil
}

// PassProgram loads a program that passes everything. A veth drops frames
// redirected into it unless its peer runs an XDP program; the lab puts this
// one on the bridge side of each host's uplink.
func PassProgram() (*ebpf.Program, error) {
	spec, err := loadGateway()
	if err != nil {
		return nil, fmt.Errorf("load gateway spec: %w", err)
	}
	prog, err := ebpf.NewProgram(spec.Programs[gatewayProgXdpPass])
	if err != nil {
		return nil, fmt.Errorf("load xdp_pass: %w", err)
	}
	return prog, nil
}

// Slot is the VM's slot in the host's per-VM maps.
func (d *Datapath) Slot() uint32 { return d.slot }

// Close takes the VM out of the host's maps and detaches its tap; a data
// path from Load unloads the host too.
func (d *Datapath) Close() error {
	var errs []error
	if d.tapLink != nil {
		errs = append(errs, d.tapLink.Close())
	}
	objs := &d.host.objs
	if d.tap != nil {
		errs = append(errs, ignoreNotExist(objs.VmByTap.Delete(uint32(d.tap.Index))), ignoreNotExist(objs.ToGuest.Delete(d.slot)))
	}
	for _, r := range d.routes {
		errs = append(errs, ignoreNotExist(r.m.Delete(r.key)))
	}
	if d.stateMap != nil {
		errs = append(errs, ignoreNotExist(objs.State.Delete(d.slot)), ignoreNotExist(objs.LogRings.Delete(d.slot)),
			ignoreNotExist(objs.Owner.Delete(d.slot)))
	}
	if d.mem != nil {
		errs = append(errs, unix.Munmap(d.mem))
		d.mem, d.state = nil, nil
	}
	for _, m := range []*ebpf.Map{d.stateMap, d.ring} {
		if m != nil {
			errs = append(errs, m.Close())
		}
	}
	if d.ownsHost {
		errs = append(errs, d.host.Close())
	}
	return errors.Join(errs...)
}

func ignoreNotExist(err error) error {
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return nil
	}
	return err
}

// Head is the last log position: the serializer's, or the engine's under
// OwnerEngineLogs.
func (d *Datapath) Head() uint64 { return atomic.LoadUint64(&d.state.Head) }

// SetHead sets the head for an engine that logs its own input, before it
// starts writing it.
func (d *Datapath) SetHead(pos uint64) { atomic.StoreUint64(&d.state.Head, pos) }

// StateFile returns a new descriptor of the memory-mapped log state, for a VM
// engine that writes the head itself (OwnerEngineLogs): QEMU's preloaded
// library maps it. The caller closes it.
func (d *Datapath) StateFile() (*os.File, error) {
	fd, err := unix.FcntlInt(uintptr(d.stateMap.FD()), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("dup log state map: %w", err)
	}
	return os.NewFile(uintptr(fd), "ftgw-log-state"), nil
}

// Acked is the position up to which the secondary has the log.
func (d *Datapath) Acked() uint64 { return atomic.LoadUint64(&d.state.Acked) }

// SetAcked publishes the secondary's acknowledged position to the fast path.
// Only the daemon's ack handler calls it, in increasing order.
func (d *Datapath) SetAcked(pos uint64) { atomic.StoreUint64(&d.state.Acked, pos) }

// SetLease publishes the lease to the fast path: until untilNs
// (CLOCK_MONOTONIC, MonotonicNs), the secondary cannot have declared this
// host failed, and acknowledged output may leave; after it, output waits
// (outputcommit.Gate.Lease). Output in passthrough needs no lease.
func (d *Datapath) SetLease(untilNs uint64) { atomic.StoreUint64(&d.state.LeaseUntil, untilNs) }

// SetInputBase publishes where the paced guest's count of its input starts
// in the log: GuestCounter's count minus base is the log position it has
// taken its input up to (OwnerGuestPaced).
func (d *Datapath) SetInputBase(base uint64) { atomic.StoreUint64(&d.state.InputBase, base) }

// GuestCounter is a paced guest's side of the log state (OwnerGuestPaced):
// it publishes how many frames it has taken from its tap. The guest gets
// the state from the daemon as a file (Datapath.StateFile).
type GuestCounter struct {
	mem   []byte
	state *gatewayLogState
}

// OpenGuestCounter maps the log state f for a guest.
func OpenGuestCounter(f *os.File) (*GuestCounter, error) {
	mem, err := unix.Mmap(int(f.Fd()), 0, unix.Getpagesize(), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("mmap log state: %w", err)
	}
	return &GuestCounter{mem: mem, state: (*gatewayLogState)(unsafe.Pointer(&mem[0]))}, nil
}

// Taken publishes the count of frames the guest has taken in.
func (c *GuestCounter) Taken(n uint64) { atomic.StoreUint64(&c.state.GuestTaken, n) }

// HoldBacklog is the number of the guest's outputs in the hold queue, as
// guest_egress counts them against its capacity: a guest that waits while
// it is near the capacity loses nothing to hold_full.
func (c *GuestCounter) HoldBacklog() uint64 {
	released := atomic.LoadUint64(&c.state.Released)
	return atomic.LoadUint64(&c.state.HeldIn) - released
}

func (c *GuestCounter) Close() error { return unix.Munmap(c.mem) }

// Pending is the number of frames in the hold queue as the programs see it.
func (d *Datapath) Pending() uint64 {
	released := atomic.LoadUint64(&d.state.Released)
	return atomic.LoadUint64(&d.state.HeldIn) - released
}

// HeldIn is the number of frames ever sent to the hold queue.
func (d *Datapath) HeldIn() uint64 { return atomic.LoadUint64(&d.state.HeldIn) }

// AddReleased records n held frames as gone (sent, or lost on the way into
// the hold socket). Call it only after released frames are on the wire:
// once Pending reaches zero the fast path may send the next frame at once.
func (d *Datapath) AddReleased(n uint64) { atomic.AddUint64(&d.state.Released, n) }

// OwnerMap is the outer map whose slot Slot() holds the VM's owner record.
func (d *Datapath) OwnerMap() *ebpf.Map { return d.host.objs.Owner }

// LogRing is the ring the serializer writes the VM's log records to.
func (d *Datapath) LogRing() *ebpf.Map { return d.ring }

// HoldSockets is the XSKMAP whose entry Slot() is the VM's hold queue socket.
func (d *Datapath) HoldSockets() *ebpf.Map { return d.host.objs.HoldXsks }

// Maps returns the host's maps by name, for tests and tools.
func (h *Host) Maps() map[string]*ebpf.Map {
	return map[string]*ebpf.Map{
		gatewayMapOwner:         h.objs.Owner,
		gatewayMapOwnerTemplate: h.objs.OwnerTemplate,
		gatewayMapState:         h.objs.State,
		gatewayMapLogRings:      h.objs.LogRings,
		gatewayMapSerializer:    h.objs.Serializer,
		gatewayMapToGuest:       h.objs.ToGuest,
		gatewayMapToUplink:      h.objs.ToUplink,
		gatewayMapHoldXsks:      h.objs.HoldXsks,
		gatewayMapCounters:      h.objs.Counters,
		gatewayMapFastLatency:   h.objs.FastLatency,
		gatewayMapDaemonTypes:   h.objs.DaemonTypes,
		gatewayMapVmByTap:       h.objs.VmByTap,
		gatewayMapVmByMac:       h.objs.VmByMac,
		gatewayMapVmByIp:        h.objs.VmByIp,
	}
}

// Programs returns the host's programs by name, for tests and tools.
func (h *Host) Programs() map[string]*ebpf.Program {
	return map[string]*ebpf.Program{
		gatewayProgUplinkIngress:  h.objs.UplinkIngress,
		gatewayProgSerializeInput: h.objs.SerializeInput,
		gatewayProgGuestEgress:    h.objs.GuestEgress,
		gatewayProgUplinkEgress:   h.objs.UplinkEgress,
		gatewayProgXdpPass:        h.objs.XdpPass,
	}
}

// Host is the host data path the VM's slot is in.
func (d *Datapath) Host() *Host { return d.host }

// BlastCounter counts the guest's BLAST frames where the bench's client
// receives them, and drops them there (count_blast).
type BlastCounter struct {
	objs struct {
		Prog     *ebpf.Program `ebpf:"count_blast"`
		Received *ebpf.Map     `ebpf:"blast_received"`
	}
	link link.Link
}

// AttachBlastCounter attaches count_blast to ifindex, in the calling
// thread's network namespace.
func AttachBlastCounter(ifindex int) (*BlastCounter, error) {
	spec, err := loadGateway()
	if err != nil {
		return nil, fmt.Errorf("load gateway spec: %w", err)
	}
	c := &BlastCounter{}
	if err := spec.LoadAndAssign(&c.objs, nil); err != nil {
		return nil, fmt.Errorf("load count_blast: %w", err)
	}
	c.link, err = link.AttachXDP(link.XDPOptions{Program: c.objs.Prog, Interface: ifindex})
	if err != nil {
		c.objs.Prog.Close()
		c.objs.Received.Close()
		return nil, fmt.Errorf("attach count_blast: %w", err)
	}
	return c, nil
}

// Received is how many BLAST frames have arrived, summed over CPUs.
func (c *BlastCounter) Received() (uint64, error) {
	var perCPU []uint64
	if err := c.objs.Received.Lookup(uint32(0), &perCPU); err != nil {
		return 0, fmt.Errorf("read blast counter: %w", err)
	}
	var n uint64
	for _, v := range perCPU {
		n += v
	}
	return n, nil
}

// Close detaches and unloads the counter.
func (c *BlastCounter) Close() error {
	return errors.Join(c.link.Close(), c.objs.Prog.Close(), c.objs.Received.Close())
}
