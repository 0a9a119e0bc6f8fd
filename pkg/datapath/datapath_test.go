package datapath_test

import (
	"bytes"
	"encoding/binary"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/ringbuf"

	"github.com/ftgw/ftgw/internal/testutil"
	"github.com/ftgw/ftgw/pkg/datapath"
	"github.com/ftgw/ftgw/pkg/vip"
)

// XDP actions as the kernel numbers them.
const (
	xdpAborted  = 0
	xdpDrop     = 1
	xdpPass     = 2
	xdpRedirect = 4
)

var (
	vmIP      = netip.MustParseAddr("192.0.2.10")
	vmMAC     = net.HardwareAddr{0x02, 0xf7, 0, 0, 0, 0x0a}
	otherMAC  = net.HardwareAddr{0x02, 0xf7, 0, 0, 0, 0x0b}
	clientMAC = net.HardwareAddr{0x02, 0xf7, 0, 0, 0, 0x64}
	broadcast = net.HardwareAddr{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}
)

func TestCounterNames(t *testing.T) {
	seen := map[string]bool{}
	for c := range datapath.Counter(datapath.NumCounters) {
		name := c.String()
		if strings.HasPrefix(name, "counter(") || seen[name] {
			t.Errorf("counter %d has no unique name: %q", c, name)
		}
		seen[name] = true
	}
}

func ether(dst, src net.HardwareAddr, etherType uint16, payload []byte) []byte {
	f := append(append(append([]byte{}, dst...), src...), byte(etherType>>8), byte(etherType))
	return append(f, payload...)
}

func arpRequest(target netip.Addr) []byte {
	p := []byte{0, 1, 8, 0, 6, 4, 0, 1}
	p = append(p, clientMAC...)
	p = append(p, 192, 0, 2, 100)
	p = append(p, 0, 0, 0, 0, 0, 0)
	t := target.As4()
	p = append(p, t[:]...)
	return ether(broadcast, clientMAC, 0x0806, p)
}

func udpTo(dst net.HardwareAddr, size int) []byte {
	payload := make([]byte, size-14)
	for i := range payload {
		payload[i] = byte(i)
	}
	if len(payload) > 0 {
		payload[0] = 0x45
	}
	return ether(dst, clientMAC, 0x0800, payload)
}

func vlanTagged(dst net.HardwareAddr) []byte {
	inner := udpTo(dst, 64)[12:]
	return ether(dst, clientMAC, 0x8100, append([]byte{0, 10}, inner...))
}

type lab struct {
	d          *datapath.Datapath
	owner      *vip.Owner
	serializer *ebpf.Program // serialize_input as a plain XDP program
}

func load(t *testing.T, cfg datapath.Config) *lab {
	t.Helper()
	testutil.RequireRoot(t)
	d, err := datapath.Load(cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	owner, err := vip.NewOwner(d)
	if err != nil {
		t.Fatal(err)
	}
	return &lab{d: d, owner: owner}
}

func (l *lab) publish(t *testing.T, role vip.Role, passthrough bool) {
	t.Helper()
	if err := l.owner.Publish(vip.Record{Epoch: 1, Role: role, IP: vmIP, MAC: vmMAC, Passthrough: passthrough}); err != nil {
		t.Fatal(err)
	}
}

func (l *lab) counters(t *testing.T) [datapath.NumCounters]datapath.Count {
	t.Helper()
	c, err := l.d.Counters()
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// xdpMD is struct xdp_md, the context a test run may give an XDP program.
type xdpMD struct {
	Data, DataEnd, DataMeta, IngressIfindex, RxQueueIndex, EgressIfindex uint32
}

// runOptions runs frame as if it arrived on lo, which stands in for the
// VM's tap: guest_egress finds the VM by the tap a frame came from.
func (l *lab) runOptions(t *testing.T, prog *ebpf.Program, frame []byte) *ebpf.RunOptions {
	t.Helper()
	if prog.Type() != ebpf.XDP {
		return &ebpf.RunOptions{Data: frame}
	}
	lo, err := net.InterfaceByName("lo")
	if err != nil {
		t.Fatal(err)
	}
	return &ebpf.RunOptions{Data: frame, Context: xdpMD{DataEnd: uint32(len(frame)), IngressIfindex: uint32(lo.Index)}}
}

// run runs prog once on frame and checks the action and that exactly the
// counters in want moved, each by one frame of the input's size.
func (l *lab) run(t *testing.T, prog *ebpf.Program, frame []byte, action uint32, want ...datapath.Counter) {
	t.Helper()
	before := l.counters(t)
	ret, err := prog.Run(l.runOptions(t, prog, frame))
	if err != nil {
		t.Fatalf("run: %v", err)
	}
	if ret != action {
		t.Errorf("action %d, want %d", ret, action)
	}
	after := l.counters(t)
	for c := range datapath.Counter(datapath.NumCounters) {
		var wantDelta datapath.Count
		for _, w := range want {
			if w == c {
				wantDelta = datapath.Count{Packets: 1, Bytes: uint64(len(frame))}
			}
		}
		got := datapath.Count{Packets: after[c].Packets - before[c].Packets, Bytes: after[c].Bytes - before[c].Bytes}
		if got != wantDelta {
			t.Errorf("counter %s moved by %+v, want %+v", c, got, wantDelta)
		}
	}
}

func TestUplinkIngress(t *testing.T) {
	l := load(t, datapath.DefaultConfig)
	prog := l.d.Host().Programs()["uplink_ingress"]

	truncatedARP := arpRequest(vmIP)[:14+20]
	arpNotEthernet := arpRequest(vmIP)
	arpNotEthernet[15] = 6 // hardware type IEEE 802

	for _, tc := range []struct {
		name   string
		role   vip.Role
		frame  []byte
		action uint32
		count  []datapath.Counter
	}{
		{"unicast to the vm", vip.RoleActive, udpTo(vmMAC, 100), xdpRedirect, nil},
		{"arp request for the vm ip", vip.RoleActive, arpRequest(vmIP), xdpRedirect, nil},
		{"vlan-tagged frame to the vm mac", vip.RoleActive, vlanTagged(vmMAC), xdpRedirect, nil},
		{"unicast to another host", vip.RoleActive, udpTo(otherMAC, 100), xdpPass, nil},
		{"arp request for another ip", vip.RoleActive, arpRequest(netip.MustParseAddr("192.0.2.1")), xdpPass, nil},
		{"truncated arp request", vip.RoleActive, truncatedARP, xdpPass, nil},
		{"arp of another hardware type", vip.RoleActive, arpNotEthernet, xdpPass, nil},
		{"vlan-tagged broadcast", vip.RoleActive, vlanTagged(broadcast), xdpPass, nil},
		{"bare ethernet header to the vm", vip.RoleActive, udpTo(vmMAC, 14), xdpRedirect, nil},
		{"standby: frame to the vm", vip.RoleStandby, udpTo(vmMAC, 100), xdpDrop, []datapath.Counter{datapath.CounterRxStandby}},
		{"standby: arp for the vm", vip.RoleStandby, arpRequest(vmIP), xdpDrop, []datapath.Counter{datapath.CounterRxStandby}},
		{"standby: other traffic", vip.RoleStandby, udpTo(otherMAC, 100), xdpPass, nil},
		{"no role: frame to the vm", vip.RoleNone, udpTo(vmMAC, 100), xdpPass, nil},
		{"draining: frame to the vm", vip.RoleDraining, udpTo(vmMAC, 100), xdpDrop, []datapath.Counter{datapath.CounterRxStandby}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l.publish(t, tc.role, false)
			l.run(t, prog, tc.frame, tc.action, tc.count...)
		})
	}
	// Frames shorter than an Ethernet header cannot be fed through
	// BPF_PROG_TEST_RUN (it refuses them); the program passes them to the
	// host stack: they are no VM's.
}

func TestUplinkIngressWithoutOwnerPassesEverything(t *testing.T) {
	l := load(t, datapath.DefaultConfig)
	l.run(t, l.d.Host().Programs()["uplink_ingress"], udpTo(vmMAC, 100), xdpPass)
}

// serializer loads the data path a second time with serialize_input as a
// plain XDP program: BPF_PROG_TEST_RUN refuses CPUMAP programs.
func serializer(t *testing.T, cfg datapath.Config) (*lab, *ebpf.Program) {
	l := load(t, cfg)
	spec, err := datapath.Spec(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ps := spec.Programs["serialize_input"].Copy()
	ps.AttachType = ebpf.AttachNone
	// Share the loaded maps so the test sees what the program writes.
	var objs struct {
		Prog *ebpf.Program `ebpf:"serialize_input"`
	}
	spec.Programs = map[string]*ebpf.ProgramSpec{"serialize_input": ps}
	replacements := map[string]*ebpf.Map{}
	for name, m := range l.d.Host().Maps() {
		replacements[name] = m
	}
	if err := spec.LoadAndAssign(&objs, &ebpf.CollectionOptions{MapReplacements: replacements}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { objs.Prog.Close() })
	l.serializer = objs.Prog

	lo, err := net.InterfaceByName("lo")
	if err != nil {
		t.Fatal(err)
	}
	// Redirects need a target device; lo stands in for the tap and uplink.
	if err := l.d.Host().SetUplink(lo); err != nil {
		t.Fatal(err)
	}
	if err := l.d.SetTap(lo); err != nil {
		t.Fatal(err)
	}
	return l, objs.Prog
}

func readLog(t *testing.T, r *ringbuf.Reader) (datapath.LogRecord, []byte) {
	t.Helper()
	r.SetDeadline(time.Now().Add(time.Second))
	rec, err := r.Read()
	if err != nil {
		t.Fatalf("read log ring: %v", err)
	}
	var hdr datapath.LogRecord
	if _, err := binary.Decode(rec.RawSample, binary.NativeEndian, &hdr); err != nil {
		t.Fatal(err)
	}
	return hdr, rec.RawSample[binary.Size(hdr) : binary.Size(hdr)+int(hdr.Len)]
}

func TestSerializeInputLogsEveryFrameInOrder(t *testing.T) {
	l, prog := serializer(t, datapath.DefaultConfig)
	l.publish(t, vip.RoleActive, false)
	r, err := ringbuf.NewReader(l.d.LogRing())
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()

	// One size in each log slot class, and at the slot edges.
	sizes := []int{14, 60, 128, 129, 256, 600, 1024, 1500, 1536, 1537, 2048, 3000}
	for i, size := range sizes {
		frame := udpTo(vmMAC, size)
		l.run(t, prog, frame, xdpRedirect, datapath.CounterRxLogged)
		hdr, logged := readLog(t, r)
		if hdr.Position != uint64(i+1) || l.d.Head() != uint64(i+1) {
			t.Errorf("size %d: position %d, head %d, want %d", size, hdr.Position, l.d.Head(), i+1)
		}
		if !bytes.Equal(logged, frame) {
			t.Errorf("size %d: logged frame differs from the input", size)
		}
	}
}

// Two VMs on one host: each frame is logged in its own VM's ring, at its
// VM's next position, and counted for that VM alone.
func TestSerializeInputKeepsVMsApart(t *testing.T) {
	l, prog := serializer(t, datapath.DefaultConfig)
	l.publish(t, vip.RoleActive, false)
	other, err := l.d.Host().AddVM(1)
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	otherOwner, err := vip.NewOwner(other)
	if err != nil {
		t.Fatal(err)
	}
	lo, err := net.InterfaceByName("lo")
	if err != nil {
		t.Fatal(err)
	}
	if err := other.SetTap(lo); err != nil { // its input's way in: only where it goes matters here
		t.Fatal(err)
	}
	otherIP := netip.MustParseAddr("192.0.2.11")
	if err := otherOwner.Publish(vip.Record{Epoch: 1, Role: vip.RoleActive, IP: otherIP, MAC: otherMAC}); err != nil {
		t.Fatal(err)
	}
	rings := map[*datapath.Datapath]*ringbuf.Reader{}
	for _, d := range []*datapath.Datapath{l.d, other} {
		r, err := ringbuf.NewReader(d.LogRing())
		if err != nil {
			t.Fatal(err)
		}
		defer r.Close()
		rings[d] = r
	}

	for i, step := range []struct {
		to    *datapath.Datapath
		frame []byte
	}{
		{l.d, udpTo(vmMAC, 100)},
		{other, udpTo(otherMAC, 200)},
		{other, arpRequest(otherIP)},
		{l.d, arpRequest(vmIP)},
	} {
		before, _ := step.to.Counters()
		idle := l.d
		if step.to == l.d {
			idle = other
		}
		idleBefore, _ := idle.Counters()
		headBefore := step.to.Head()
		ret, err := prog.Run(l.runOptions(t, prog, step.frame))
		if err != nil || ret != xdpRedirect {
			t.Fatalf("step %d: action %d (%v), want a redirect", i, ret, err)
		}
		hdr, logged := readLog(t, rings[step.to])
		if hdr.Position != headBefore+1 || !bytes.Equal(logged, step.frame) {
			t.Errorf("step %d: logged position %d in slot %d, want %d and the frame", i, hdr.Position, step.to.Slot(), headBefore+1)
		}
		if n := rings[idle].AvailableBytes(); n != 0 {
			t.Errorf("step %d: %d bytes in the other VM's ring", i, n)
		}
		after, _ := step.to.Counters()
		idleAfter, _ := idle.Counters()
		if after[datapath.CounterRxLogged].Packets != before[datapath.CounterRxLogged].Packets+1 || idleAfter != idleBefore {
			t.Errorf("step %d: rx_logged %d -> %d on the VM, other VM's counters moved: %v", i,
				before[datapath.CounterRxLogged].Packets, after[datapath.CounterRxLogged].Packets, idleAfter != idleBefore)
		}
	}
	if l.d.Head() != 2 || other.Head() != 2 {
		t.Errorf("heads %d and %d, want 2 each", l.d.Head(), other.Head())
	}

	// A VM that leaves the host takes its frames with it.
	if err := other.Close(); err != nil {
		t.Fatal(err)
	}
	ret, err := prog.Run(l.runOptions(t, prog, udpTo(otherMAC, 100)))
	if err != nil || ret != xdpDrop {
		t.Errorf("frame for a closed VM: action %d (%v), want a drop", ret, err)
	}
}

func TestSerializeInputStandbyDropsWithoutLogging(t *testing.T) {
	l, prog := serializer(t, datapath.DefaultConfig)
	l.publish(t, vip.RoleStandby, false)
	l.run(t, prog, udpTo(vmMAC, 100), xdpDrop, datapath.CounterRxStandby)
	if l.d.Head() != 0 {
		t.Errorf("head %d after a standby frame, want 0", l.d.Head())
	}
}

// QEMU logs its own input: the serializer only delivers, and the head is the
// engine's to write.
func TestSerializeInputLeavesEngineLoggedInputToTheEngine(t *testing.T) {
	l, prog := serializer(t, datapath.DefaultConfig)
	if err := l.owner.Publish(vip.Record{Epoch: 1, Role: vip.RoleActive, IP: vmIP, MAC: vmMAC, EngineLogs: true}); err != nil {
		t.Fatal(err)
	}
	r, err := ringbuf.NewReader(l.d.LogRing())
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	l.d.SetHead(4096)
	l.run(t, prog, udpTo(vmMAC, 100), xdpRedirect, datapath.CounterRxEngineLogs)
	if l.d.Head() != 4096 {
		t.Errorf("head %d, want the engine's 4096", l.d.Head())
	}
	if r.AvailableBytes() != 0 {
		t.Errorf("%d bytes in the log ring, want none", r.AvailableBytes())
	}

	// The engine's head stamps the guest's output like the serializer's.
	egress := l.d.Host().Programs()["guest_egress"]
	l.d.SetLease(datapath.MonotonicNs() + uint64(time.Hour))
	l.d.SetAcked(4095)
	l.run(t, egress, udpTo(clientMAC, 100), xdpDrop, datapath.CounterTxNoHoldSocket)
	l.d.SetAcked(4096)
	l.run(t, egress, udpTo(clientMAC, 100), xdpRedirect, datapath.CounterTxFast)
}

func TestSerializeInputDropsWhenLogIsFull(t *testing.T) {
	cfg := datapath.DefaultConfig
	cfg.LogRingBytes = os.Getpagesize()
	l, prog := serializer(t, cfg)
	l.publish(t, vip.RoleActive, false)

	// A 1500-byte frame takes a 1536-byte slot plus headers: two fit in a
	// page, the third does not, and must not reach the guest.
	frame := udpTo(vmMAC, 1500)
	l.run(t, prog, frame, xdpRedirect, datapath.CounterRxLogged)
	l.run(t, prog, frame, xdpRedirect, datapath.CounterRxLogged)
	l.run(t, prog, frame, xdpDrop, datapath.CounterRxLogFull)
	if l.d.Head() != 2 {
		t.Errorf("head %d, want 2: a dropped frame must not take a position", l.d.Head())
	}
}

// A paced guest is never handed more than its budget of logged frames it
// has not taken: its tap would drop the rest after they were logged, and
// the secondary's guest would take frames this one never saw. Past the
// budget, input is dropped before it is logged.
func TestSerializeInputKeepsAPacedGuestWithinItsBudget(t *testing.T) {
	cfg := datapath.DefaultConfig
	cfg.GuestBudget = 2
	l, prog := serializer(t, cfg)
	if err := l.owner.Publish(vip.Record{Epoch: 1, Role: vip.RoleActive, IP: vmIP, MAC: vmMAC, GuestPaced: true}); err != nil {
		t.Fatal(err)
	}
	f, err := l.d.StateFile()
	if err != nil {
		t.Fatal(err)
	}
	guest, err := datapath.OpenGuestCounter(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	defer guest.Close()

	frame := udpTo(vmMAC, 100)
	l.run(t, prog, frame, xdpRedirect, datapath.CounterRxLogged)
	l.run(t, prog, frame, xdpRedirect, datapath.CounterRxLogged)
	l.run(t, prog, frame, xdpDrop, datapath.CounterRxGuestBehind) // 2 frames in flight
	if l.d.Head() != 2 {
		t.Fatalf("head %d, want 2: a frame dropped for the guest took a position", l.d.Head())
	}
	guest.Taken(1)
	l.run(t, prog, frame, xdpRedirect, datapath.CounterRxLogged)
	l.run(t, prog, frame, xdpDrop, datapath.CounterRxGuestBehind)
	// A guest restored from a snapshot counts on from its snapshot's
	// count: the base says where that is in the log.
	l.d.SetInputBase(100)
	guest.Taken(102) // position 2 of 3
	l.run(t, prog, frame, xdpRedirect, datapath.CounterRxLogged)
	l.run(t, prog, frame, xdpDrop, datapath.CounterRxGuestBehind)

	// A guest that does not publish is not paced.
	l.publish(t, vip.RoleActive, false)
	l.run(t, prog, frame, xdpRedirect, datapath.CounterRxLogged)
}

func TestGuestEgress(t *testing.T) {
	l, _ := serializer(t, datapath.DefaultConfig)
	prog := l.d.Host().Programs()["guest_egress"]
	frame := udpTo(clientMAC, 100)
	l.d.SetLease(datapath.MonotonicNs() + uint64(time.Hour))

	t.Run("standby suppresses output", func(t *testing.T) {
		l.publish(t, vip.RoleStandby, false)
		l.run(t, prog, frame, xdpDrop, datapath.CounterTxSuppressed)
	})
	t.Run("no role suppresses output", func(t *testing.T) {
		l.publish(t, vip.RoleNone, false)
		l.run(t, prog, frame, xdpDrop, datapath.CounterTxSuppressed)
	})
	t.Run("draining still lets output out", func(t *testing.T) {
		l.publish(t, vip.RoleDraining, false)
		l.d.SetAcked(l.d.Head())
		l.run(t, prog, frame, xdpRedirect, datapath.CounterTxFast)
	})
	t.Run("nothing pending goes straight out", func(t *testing.T) {
		l.publish(t, vip.RoleActive, false)
		before, err := l.d.FastLatency()
		if err != nil {
			t.Fatal(err)
		}
		l.run(t, prog, frame, xdpRedirect, datapath.CounterTxFast)
		after, err := l.d.FastLatency()
		if err != nil {
			t.Fatal(err)
		}
		var observed uint64
		for i := range after.Buckets {
			observed += after.Buckets[i] - before.Buckets[i]
		}
		if observed != 1 {
			t.Errorf("fast latency histogram took %d observations, want 1", observed)
		}
	})
	t.Run("unacknowledged stamp without a hold socket is dropped", func(t *testing.T) {
		l.publish(t, vip.RoleActive, false)
		// Advance the head past the ack: the secondary has not acked it.
		if head := l.serializeOne(t); head <= l.d.Acked() {
			t.Fatalf("head %d not past acked %d", head, l.d.Acked())
		}
		l.run(t, prog, frame, xdpDrop, datapath.CounterTxNoHoldSocket)
	})
	t.Run("passthrough ignores the ack", func(t *testing.T) {
		l.publish(t, vip.RoleActive, true)
		l.run(t, prog, frame, xdpRedirect, datapath.CounterTxFast)
	})
	t.Run("hold-all holds even an acked stamp", func(t *testing.T) {
		if err := l.owner.Publish(vip.Record{Epoch: 1, Role: vip.RoleActive, IP: vmIP, MAC: vmMAC, HoldAll: true}); err != nil {
			t.Fatal(err)
		}
		l.d.SetAcked(l.d.Head())
		l.run(t, prog, frame, xdpDrop, datapath.CounterTxNoHoldSocket)
	})
	t.Run("acked stamp goes straight out", func(t *testing.T) {
		l.publish(t, vip.RoleActive, false)
		l.d.SetAcked(l.d.Head())
		l.run(t, prog, frame, xdpRedirect, datapath.CounterTxFast)
	})
	t.Run("acked stamp waits once the lease has run out", func(t *testing.T) {
		// A host paused or cut off past its lease may have been taken
		// over: it must not release beside the new primary.
		l.publish(t, vip.RoleActive, false)
		l.d.SetAcked(l.d.Head())
		l.d.SetLease(datapath.MonotonicNs() - 1)
		l.run(t, prog, frame, xdpDrop, datapath.CounterTxNoHoldSocket)
		l.publish(t, vip.RoleActive, true)
		l.run(t, prog, frame, xdpRedirect, datapath.CounterTxFast) // alone: no lease needed
		l.d.SetLease(datapath.MonotonicNs() + uint64(time.Hour))
	})
	t.Run("runt frame", func(t *testing.T) {
		// BPF_PROG_TEST_RUN refuses frames under 14 bytes; the shortest
		// it takes is a bare header, which is a frame to hold or send.
		l.publish(t, vip.RoleActive, false)
		l.run(t, prog, frame[:14], xdpRedirect, datapath.CounterTxFast)
	})
}

// serializeOne logs one input frame so that the head moves past the ack.
func (l *lab) serializeOne(t *testing.T) uint64 {
	t.Helper()
	if _, err := l.serializer.Run(&ebpf.RunOptions{Data: udpTo(vmMAC, 60)}); err != nil {
		t.Fatal(err)
	}
	return l.d.Head()
}

// The owner record must never be seen torn. Two records that differ in every
// field are published in turn while other goroutines run uplink_ingress on
// frames to each record's MAC. Under record A (active, MAC A) a frame to MAC B
// passes and one to MAC A is redirected; under B (standby, MAC B) a frame to
// MAC B is dropped and one to MAC A passes. A torn mix shows up as an action
// neither record can produce: a redirected frame to MAC B (A's role, B's MAC)
// or a dropped frame to MAC A (B's role, A's MAC).
func TestOwnerRecordNeverTears(t *testing.T) {
	l := load(t, datapath.DefaultConfig)
	prog := l.d.Host().Programs()["uplink_ingress"]
	macA, macB := vmMAC, otherMAC
	recA := vip.Record{Epoch: 1, Role: vip.RoleActive, IP: netip.MustParseAddr("192.0.2.10"), MAC: macA}
	recB := vip.Record{Epoch: 2, Role: vip.RoleStandby, IP: netip.MustParseAddr("192.0.2.11"), MAC: macB}
	frameA, frameB := udpTo(macA, 64), udpTo(macB, 64)

	const (
		maxPublishes = 20000
		maxDuration  = 3 * time.Second
	)
	var (
		stop           atomic.Bool
		torn, ofA, ofB atomic.Uint64
		wg             sync.WaitGroup
		firstErr       error
		errOnce        sync.Once
		deadline       = time.Now().Add(maxDuration)
	)
	fail := func(err error) { errOnce.Do(func() { firstErr = err }); stop.Store(true) }

	for range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; !stop.Load() && i < 10*maxPublishes; i++ {
				retA, err := prog.Run(&ebpf.RunOptions{Data: frameA})
				if err != nil {
					fail(err)
					return
				}
				retB, err := prog.Run(&ebpf.RunOptions{Data: frameB})
				if err != nil {
					fail(err)
					return
				}
				switch {
				case retB == xdpRedirect || retA == xdpDrop:
					torn.Add(1)
				case retA == xdpRedirect:
					ofA.Add(1)
				case retB == xdpDrop:
					ofB.Add(1)
				}
			}
		}()
	}
	publishes := 0
	for ; publishes < maxPublishes && time.Now().Before(deadline) && !stop.Load(); publishes++ {
		rec := recA
		if publishes%2 == 1 {
			rec = recB
		}
		if err := l.owner.Publish(rec); err != nil {
			fail(err)
		}
	}
	stop.Store(true)
	wg.Wait()
	if firstErr != nil {
		t.Fatal(firstErr)
	}
	t.Logf("%d publishes; readers saw A %d times, B %d times, torn %d times", publishes, ofA.Load(), ofB.Load(), torn.Load())
	if torn.Load() != 0 {
		t.Errorf("readers saw a torn owner record %d times", torn.Load())
	}
	if ofA.Load() == 0 || ofB.Load() == 0 {
		t.Errorf("readers did not see both records (A %d, B %d): the race did not happen", ofA.Load(), ofB.Load())
	}
}
