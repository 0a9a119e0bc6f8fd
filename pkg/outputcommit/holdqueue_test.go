package outputcommit_test

import (
	"bytes"
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/mdlayher/packet"
	"github.com/vishvananda/netlink"

	"github.com/ftgw/ftgw/internal/tap"
	"github.com/ftgw/ftgw/internal/testutil"
	"github.com/ftgw/ftgw/pkg/datapath"
	"github.com/ftgw/ftgw/pkg/outputcommit"
	"github.com/ftgw/ftgw/pkg/vip"
)

const testEtherType = 0x88b5

var (
	vmMAC   = net.HardwareAddr{0x02, 0xf7, 0, 0, 0, 0x0a}
	peerMAC = net.HardwareAddr{0x02, 0xf7, 0, 0, 0, 0x64}
)

// host is one protected VM's data path in a namespace of the test's own:
// uplink "up0" whose peer "peer0" plays the LAN, and tap "tap0" whose fd
// the test holds, playing the guest.
type host struct {
	dp    *datapath.Datapath
	owner *vip.Owner
	hold  *outputcommit.HoldQueue
	guest *tap.Tap
	lan   *packet.Conn // on peer0: what leaves the uplink, and where inputs come from
	peer  *net.Interface
}

func newHost(t *testing.T, capacity int) *host {
	t.Helper()
	h := newDataPath(t, capacity)
	uplink, _ := net.InterfaceByName("up0")
	tapIf, _ := net.InterfaceByName("tap0")
	hold, err := outputcommit.Open(h.dp, outputcommit.Config{Tap: tapIf, Uplink: uplink, Capacity: capacity})
	if err != nil {
		t.Fatal(err)
	}
	// A secondary that keeps answering, unless a test says otherwise.
	h.dp.SetLease(datapath.MonotonicNs() + uint64(time.Hour))
	hold.SetLease(datapath.MonotonicNs() + uint64(time.Hour))
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() { hold.Run(ctx) })
	t.Cleanup(func() {
		cancel()
		wg.Wait()
		hold.Close()
	})
	h.hold = hold
	return h
}

// newDataPath is a host without a hold queue: the data path attached to
// up0 and tap0, the owner record published (active, epoch 1), and the LAN.
func newDataPath(t *testing.T, capacity int) *host {
	t.Helper()
	testutil.InNewNetns(t)
	// Keep the kernel's own IPv6 chatter off the wire we watch.
	if err := os.WriteFile("/proc/sys/net/ipv6/conf/default/disable_ipv6", []byte("1"), 0o644); err != nil {
		t.Logf("disable ipv6: %v", err)
	}
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "up0"}, PeerName: "peer0"}
	if err := netlink.LinkAdd(veth); err != nil {
		t.Fatal(err)
	}
	if err := tap.Create("tap0"); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"up0", "peer0", "tap0"} {
		l, err := netlink.LinkByName(name)
		if err != nil {
			t.Fatal(err)
		}
		if err := netlink.LinkSetUp(l); err != nil {
			t.Fatal(err)
		}
	}
	testutil.WaitLinksUp(t, "up0", "peer0")
	uplink, _ := net.InterfaceByName("up0")
	peer, _ := net.InterfaceByName("peer0")
	tapIf, _ := net.InterfaceByName("tap0")

	cfg := datapath.DefaultConfig
	cfg.HoldCapacity = capacity
	dp, err := datapath.Load(cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dp.Close() })
	if err := dp.Attach(uplink, tapIf); err != nil {
		t.Fatal(err)
	}
	// Released frames are redirected into up0; a veth delivers those only
	// if its peer runs XDP.
	pass, err := datapath.PassProgram()
	if err != nil {
		t.Fatal(err)
	}
	defer pass.Close()
	peerLink, _ := netlink.LinkByName("peer0")
	if err := netlink.LinkSetXdpFd(peerLink, pass.FD()); err != nil {
		t.Fatal(err)
	}

	owner, err := vip.NewOwner(dp)
	if err != nil {
		t.Fatal(err)
	}
	if err := owner.Publish(vip.Record{Epoch: 1, Role: vip.RoleActive, IP: netip.MustParseAddr("192.0.2.10"), MAC: vmMAC}); err != nil {
		t.Fatal(err)
	}

	guest, err := tap.Open("tap0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { guest.Close() })
	lan, err := packet.Listen(peer, packet.Raw, testEtherType, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lan.Close() })
	return &host{dp: dp, owner: owner, guest: guest, lan: lan, peer: peer}
}

func frame(dst, src net.HardwareAddr, tag byte) []byte {
	f := make([]byte, 64)
	copy(f[0:6], dst)
	copy(f[6:12], src)
	f[12], f[13] = testEtherType>>8, testEtherType&0xff
	f[14] = tag
	return f
}

// input sends a frame to the VM from the LAN and waits for the guest to
// get it, so the log head has moved.
func (h *host) input(t *testing.T, tag byte) {
	t.Helper()
	in := frame(vmMAC, peerMAC, tag)
	if _, err := h.lan.WriteTo(in, &packet.Addr{HardwareAddr: vmMAC}); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 2048)
	h.guest.SetReadDeadline(time.Now().Add(2 * time.Second))
	for {
		n, err := h.guest.Read(buf)
		if err != nil {
			t.Fatalf("guest did not get input %d: %v", tag, err)
		}
		if bytes.Equal(buf[:n], in) {
			return
		}
	}
}

// output has the guest send a frame to the LAN.
func (h *host) output(t *testing.T, tag byte) []byte {
	t.Helper()
	out := frame(peerMAC, vmMAC, tag)
	if _, err := h.guest.Write(out); err != nil {
		t.Fatal(err)
	}
	return out
}

// onWire returns the frames from the VM that reach the LAN within d.
func (h *host) onWire(t *testing.T, d time.Duration) [][]byte {
	t.Helper()
	var got [][]byte
	buf := make([]byte, 2048)
	h.lan.SetReadDeadline(time.Now().Add(d))
	for {
		n, _, err := h.lan.ReadFrom(buf)
		if err != nil {
			if !errors.Is(err, os.ErrDeadlineExceeded) {
				t.Fatal(err)
			}
			return got
		}
		if bytes.Equal(buf[6:12], vmMAC) {
			got = append(got, append([]byte(nil), buf[:n]...))
		}
	}
}

func (h *host) waitHeld(t *testing.T, n int) {
	t.Helper()
	deadline := time.Now().Add(2 * time.Second)
	for h.hold.Stats().Held != n {
		if time.Now().After(deadline) {
			t.Fatalf("hold queue has %d frames, want %d", h.hold.Stats().Held, n)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func (h *host) ack(pos uint64) {
	h.dp.SetAcked(pos)
	h.hold.ReleaseUpTo(pos)
}

func counter(t *testing.T, dp *datapath.Datapath, c datapath.Counter) uint64 {
	t.Helper()
	counts, err := dp.Counters()
	if err != nil {
		t.Fatal(err)
	}
	return counts[c].Packets
}

func expectFrames(t *testing.T, got [][]byte, want ...[]byte) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("%d frames on the wire, want %d", len(got), len(want))
	}
	for i := range want {
		if !bytes.Equal(got[i], want[i]) {
			t.Errorf("frame %d on the wire is %x, want %x", i, got[i][:16], want[i][:16])
		}
	}
}

func TestAckReleasesExactlyUpToItsPosition(t *testing.T) {
	h := newHost(t, 16)

	h.input(t, 1)
	first := h.output(t, 1) // stamped 1
	h.input(t, 2)
	second := h.output(t, 2) // stamped 2
	if h.dp.Head() != 2 {
		t.Fatalf("head %d, want 2", h.dp.Head())
	}
	h.waitHeld(t, 2)
	expectFrames(t, h.onWire(t, 200*time.Millisecond))

	h.ack(1)
	expectFrames(t, h.onWire(t, 300*time.Millisecond), first)
	h.waitHeld(t, 1)

	h.ack(2)
	expectFrames(t, h.onWire(t, 300*time.Millisecond), second)
	h.waitHeld(t, 0)
	if p := h.dp.Pending(); p != 0 {
		t.Errorf("data path sees %d pending after the queue drained", p)
	}

	// Everything acknowledged and nothing held: straight out.
	fastBefore := counter(t, h.dp, datapath.CounterTxFast)
	third := h.output(t, 3)
	expectFrames(t, h.onWire(t, 300*time.Millisecond), third)
	if n := counter(t, h.dp, datapath.CounterTxFast) - fastBefore; n != 1 {
		t.Errorf("tx_fast moved by %d, want 1", n)
	}
}

// While anything is held, even an already acknowledged frame queues behind it.
func TestLaterFramesQueueBehindHeldOnes(t *testing.T) {
	h := newHost(t, 16)
	h.input(t, 1)
	held := h.output(t, 1) // stamped 1, not acked
	h.waitHeld(t, 1)

	// An ack of 0 changes nothing, but the fast path must not let the
	// next frame overtake the held one even if its own stamp were acked.
	h.ack(0)
	h.dp.SetAcked(1) // the fast path's view only: stamp 1 now counts as acked
	behind := h.output(t, 2)
	h.waitHeld(t, 2)
	expectFrames(t, h.onWire(t, 200*time.Millisecond))

	h.hold.ReleaseUpTo(1)
	expectFrames(t, h.onWire(t, 300*time.Millisecond), held, behind)
}

// An ack can reach the hold queue before the frame it covers reaches the
// hold socket (guest_egress read the older ack): the frame then lands on an
// empty queue, acknowledged, and no ack is coming to take it. Run, which is
// not woken by frames at an empty queue, must still send it.
func TestAnAcknowledgedFrameAtAnEmptyQueueLeavesWithoutAnotherAck(t *testing.T) {
	h := newHost(t, 16)
	h.input(t, 1)
	first := h.output(t, 1)
	h.waitHeld(t, 1)
	// The queue's view only: guest_egress still sees 0, as if the ack
	// were on its way to the data path.
	h.hold.ReleaseUpTo(1)
	expectFrames(t, h.onWire(t, 300*time.Millisecond), first)
	h.waitHeld(t, 0) // the releaser is done with that ack

	heldBefore := counter(t, h.dp, datapath.CounterTxHeld)
	late := h.output(t, 1)
	expectFrames(t, h.onWire(t, 300*time.Millisecond), late)
	if n := counter(t, h.dp, datapath.CounterTxHeld) - heldBefore; n != 1 {
		t.Errorf("tx_held moved by %d, want 1: the frame did not go through the hold queue", n)
	}
	h.waitHeld(t, 0)
}

func TestFullHoldQueueDropsAndCounts(t *testing.T) {
	h := newHost(t, 2)
	h.input(t, 1)
	a, b := h.output(t, 1), h.output(t, 2)
	h.waitHeld(t, 2)
	fullBefore := counter(t, h.dp, datapath.CounterTxHoldFull)
	h.output(t, 3)
	if n := counter(t, h.dp, datapath.CounterTxHoldFull) - fullBefore; n != 1 {
		t.Errorf("tx_hold_full moved by %d, want 1", n)
	}
	expectFrames(t, h.onWire(t, 200*time.Millisecond))
	h.ack(1)
	expectFrames(t, h.onWire(t, 300*time.Millisecond), a, b)
}

// The gate moves the rule as a whole: Open lets out what waits, in order,
// and then everything at once; Enforce makes new outputs wait again; Ack
// releases up to its position and never goes back.
func TestGateOpensEnforcesAndAcks(t *testing.T) {
	h := newHost(t, 16)
	gate := outputcommit.NewGate(h.dp, h.hold, h.owner)
	h.input(t, 1)
	first := h.output(t, 1) // stamped 1, held
	h.waitHeld(t, 1)

	if err := gate.Open(h.owner.Current()); err != nil {
		t.Fatal(err)
	}
	expectFrames(t, h.onWire(t, 300*time.Millisecond), first)
	if !h.owner.Current().Passthrough {
		t.Error("open gate: the owner record still enforces the rule")
	}
	h.input(t, 2)
	second := h.output(t, 2) // stamped 2, passes: the rule is off
	expectFrames(t, h.onWire(t, 300*time.Millisecond), second)

	gate.Ack(2) // what this host served alone needs no ack
	if err := gate.Enforce(h.owner.Current()); err != nil {
		t.Fatal(err)
	}
	h.input(t, 3)
	third := h.output(t, 3) // stamped 3: waits
	h.waitHeld(t, 1)
	expectFrames(t, h.onWire(t, 200*time.Millisecond))
	gate.Ack(1) // late and lower: changes nothing
	if gate.Acked() != 2 || h.dp.Acked() != 2 {
		t.Errorf("acked went back: gate %d, data path %d", gate.Acked(), h.dp.Acked())
	}
	expectFrames(t, h.onWire(t, 200*time.Millisecond))
	gate.Ack(3)
	expectFrames(t, h.onWire(t, 300*time.Millisecond), third)
	if err := gate.Mode("bogus"); err == nil {
		t.Error("mode bogus accepted")
	}
}

// Past its lease a host releases nothing, acknowledged or not, neither on
// the fast path nor from the queue: the secondary may have taken over. A
// renewed lease lets out what waited, in order.
func TestNothingLeavesPastTheLease(t *testing.T) {
	h := newHost(t, 16)
	gate := outputcommit.NewGate(h.dp, h.hold, h.owner)
	h.input(t, 1)
	gate.Ack(1)
	gate.Lease(datapath.MonotonicNs() - 1)
	first := h.output(t, 1) // stamped 1, acked, nothing held: held all the same
	h.waitHeld(t, 1)
	h.input(t, 2)
	second := h.output(t, 2) // stamped 2
	h.waitHeld(t, 2)
	gate.Ack(2)
	expectFrames(t, h.onWire(t, 200*time.Millisecond))

	gate.Lease(datapath.MonotonicNs() + uint64(time.Hour))
	expectFrames(t, h.onWire(t, 300*time.Millisecond), first, second)
	h.waitHeld(t, 0)
	third := h.output(t, 3) // the lease holds again: straight out
	expectFrames(t, h.onWire(t, 300*time.Millisecond), third)
}

// The kernel has the last word on a release (uplink_egress): a send of the
// VM's frame past the lease is refused inside the system call, so a daemon
// stopped between its own check and the send sends nothing when it resumes.
// The socket here makes no check of its own, as if that check had passed
// just before the lease ran out. The host's own frames are not the VM's:
// they pass.
func TestTheKernelRefusesAReleasePastTheLease(t *testing.T) {
	h := newDataPath(t, 16)
	uplink, _ := net.InterfaceByName("up0")
	raw, err := packet.Listen(uplink, packet.Raw, 0, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	send := func(src net.HardwareAddr, tag byte) ([]byte, error) {
		out := frame(peerMAC, src, tag)
		_, err := raw.WriteTo(out, &packet.Addr{HardwareAddr: peerMAC})
		return out, err
	}
	refused := func() uint64 { return counter(t, h.dp, datapath.CounterTxReleaseRefused) }

	h.dp.SetLease(datapath.MonotonicNs() - 1)
	if _, err := send(vmMAC, 1); err == nil {
		t.Error("a send past the lease was not refused")
	}
	hostMAC := net.HardwareAddr{0x02, 0xf7, 0, 0, 0, 0x01}
	if _, err := send(hostMAC, 9); err != nil {
		t.Fatalf("the host's own frame past the lease: %v", err)
	}
	if got := h.onWire(t, 200*time.Millisecond); len(got) != 0 {
		t.Fatalf("%d of the VM's frames left past the lease", len(got))
	}
	if n := refused(); n != 1 {
		t.Errorf("tx_release_refused %d, want 1", n)
	}

	// A fenced host (standby) may not release even under a lease.
	h.dp.SetLease(datapath.MonotonicNs() + uint64(time.Hour))
	if err := h.owner.Publish(vip.Record{Epoch: 2, Role: vip.RoleStandby, IP: netip.MustParseAddr("192.0.2.10"), MAC: vmMAC}); err != nil {
		t.Fatal(err)
	}
	if _, err := send(vmMAC, 2); err == nil {
		t.Error("a send while standby was not refused")
	}
	expectFrames(t, h.onWire(t, 200*time.Millisecond))

	// Serving under a lease, or alone: out.
	if err := h.owner.Publish(vip.Record{Epoch: 3, Role: vip.RoleActive, IP: netip.MustParseAddr("192.0.2.10"), MAC: vmMAC}); err != nil {
		t.Fatal(err)
	}
	leased, err := send(vmMAC, 3)
	if err != nil {
		t.Fatalf("send under the lease: %v", err)
	}
	h.dp.SetLease(datapath.MonotonicNs() - 1)
	if err := h.owner.Publish(vip.Record{Epoch: 4, Role: vip.RoleActive, Passthrough: true, IP: netip.MustParseAddr("192.0.2.10"), MAC: vmMAC}); err != nil {
		t.Fatal(err)
	}
	alone, err := send(vmMAC, 4)
	if err != nil {
		t.Fatalf("send while serving alone: %v", err)
	}
	expectFrames(t, h.onWire(t, 300*time.Millisecond), leased, alone)
	if n := refused(); n != 2 {
		t.Errorf("tx_release_refused %d, want 2", n)
	}
}

// A fenced host discards what it held and what a refused kick left on the
// release ring: its copy no longer serves, so none of it may ever leave,
// even once the host serves again.
func TestDiscardDropsEverythingAStaleCopyProduced(t *testing.T) {
	h := newHost(t, 16)
	gate := outputcommit.NewGate(h.dp, h.hold, h.owner)
	h.input(t, 1)
	h.output(t, 1) // stamped 1: held
	h.waitHeld(t, 1)
	gate.Lease(datapath.MonotonicNs() - 1)
	gate.Ack(1) // acknowledged, but past the lease
	expectFrames(t, h.onWire(t, 200*time.Millisecond))

	gate.Discard()
	h.waitHeld(t, 0)
	if st := h.hold.Stats(); st.Discarded != 1 {
		t.Errorf("discarded %d, want 1", st.Discarded)
	}
	if p := h.dp.Pending(); p != 0 {
		t.Errorf("data path still counts %d pending", p)
	}
	gate.Lease(datapath.MonotonicNs() + uint64(time.Hour))
	next := h.output(t, 2) // acked stamp, nothing pending: straight out
	expectFrames(t, h.onWire(t, 300*time.Millisecond), next)
}
