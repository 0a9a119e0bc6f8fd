package xsk

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"github.com/ftgw/ftgw/internal/testutil"
	"net"
	"os"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

const (
	// testEtherType is IEEE 802 "local experimental"; every test frame uses
	// it so stray kernel traffic (IPv6 ND, MLD) can be told apart.
	testEtherType = 0x88b5
	metaValue     = 0x1122334455667788
	waitLimit     = 5 * time.Second
)

var testMagic = []byte("XSKT")

// vethPair creates veth0/veth1 with 192.0.2.1/24 and 192.0.2.2/24, both up.
func vethPair(t *testing.T) (veth0, veth1 netlink.Link) {
	t.Helper()
	la := netlink.NewLinkAttrs()
	la.Name = "veth0"
	if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: la, PeerName: "veth1"}); err != nil {
		t.Fatalf("add veth pair: %v", err)
	}
	for i, name := range []string{"veth0", "veth1"} {
		// IPv6 autoconfiguration would put ND and MLD frames on the wire;
		// the tests filter them anyway, so failure here is harmless.
		_ = os.WriteFile("/proc/sys/net/ipv6/conf/"+name+"/disable_ipv6", []byte("1"), 0o644)
		l, err := netlink.LinkByName(name)
		if err != nil {
			t.Fatalf("find %s: %v", name, err)
		}
		addr, err := netlink.ParseAddr(fmt.Sprintf("192.0.2.%d/24", i+1))
		if err != nil {
			t.Fatalf("parse address: %v", err)
		}
		if err := netlink.AddrAdd(l, addr); err != nil {
			t.Fatalf("add address to %s: %v", name, err)
		}
		if err := netlink.LinkSetUp(l); err != nil {
			t.Fatalf("set %s up: %v", name, err)
		}
	}
	var err error
	if veth0, err = netlink.LinkByName("veth0"); err != nil {
		t.Fatalf("find veth0: %v", err)
	}
	if veth1, err = netlink.LinkByName("veth1"); err != nil {
		t.Fatalf("find veth1: %v", err)
	}
	return veth0, veth1
}

func newSocketOrSkip(t *testing.T, ifindex int, opts *SocketOptions) *Socket {
	t.Helper()
	s, err := NewSocket(ifindex, 0, opts)
	if errors.Is(err, unix.EAFNOSUPPORT) {
		t.Skipf("AF_XDP sockets (CONFIG_XDP_SOCKETS) unavailable: %v", err)
	}
	if err != nil {
		t.Fatalf("NewSocket: %v", err)
	}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("close socket: %v", err)
		}
	})
	return s
}

// attachRedirect loads an XDP program that redirects every frame to the
// socket in XSKMAP entry 0 (falling back to XDP_PASS) and attaches it to
// ifindex. With withMeta it first grows the metadata area by 8 bytes and
// stores metaValue there.
func attachRedirect(t *testing.T, ifindex int, s *Socket, withMeta bool) {
	t.Helper()
	xsks, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.XSKMap, KeySize: 4, ValueSize: 4, MaxEntries: 1})
	if errors.Is(err, ebpf.ErrNotSupported) {
		t.Skipf("XSKMAP unsupported: %v", err)
	}
	if err != nil {
		t.Fatalf("create xskmap: %v", err)
	}
	t.Cleanup(func() { xsks.Close() })
	if err := xsks.Put(uint32(0), uint32(s.FD())); err != nil {
		t.Fatalf("put socket in xskmap: %v", err)
	}

	var insns asm.Instructions
	if withMeta {
		insns = append(insns,
			asm.Mov.Reg(asm.R6, asm.R1),
			asm.Mov.Imm(asm.R2, -8),
			asm.FnXdpAdjustMeta.Call(),
			asm.JNE.Imm(asm.R0, 0, "redirect"),
			asm.LoadMem(asm.R2, asm.R6, 0, asm.Word), // xdp_md.data
			asm.LoadMem(asm.R3, asm.R6, 8, asm.Word), // xdp_md.data_meta
			asm.Mov.Reg(asm.R4, asm.R3),
			asm.Add.Imm(asm.R4, 8),
			asm.JGT.Reg(asm.R4, asm.R2, "redirect"), // bounds check for the verifier
			asm.LoadImm(asm.R5, metaValue, asm.DWord),
			asm.StoreMem(asm.R3, 0, asm.R5, asm.DWord),
		)
	}
	insns = append(insns,
		asm.LoadMapPtr(asm.R1, xsks.FD()).WithSymbol("redirect"),
		asm.Mov.Imm(asm.R2, 0),
		asm.Mov.Imm(asm.R3, 2), // XDP_PASS when the entry is empty
		asm.FnRedirectMap.Call(),
		asm.Return(),
	)
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{Type: ebpf.XDP, Instructions: insns, License: "GPL"})
	if err != nil {
		t.Fatalf("load xdp program: %v", err)
	}
	t.Cleanup(func() { prog.Close() })
	l, err := link.AttachXDP(link.XDPOptions{Program: prog, Interface: ifindex})
	if err != nil {
		t.Fatalf("attach xdp program to ifindex %d: %v", ifindex, err)
	}
	t.Cleanup(func() { l.Close() })
}

// testFrames builds n distinct frames of varying length carrying their
// sequence number.
func testFrames(n int, dst, src net.HardwareAddr) [][]byte {
	frames := make([][]byte, n)
	for seq := range frames {
		f := make([]byte, 60+(seq*37)%200)
		copy(f[0:6], dst)
		copy(f[6:12], src)
		binary.BigEndian.PutUint16(f[12:14], testEtherType)
		copy(f[14:18], testMagic)
		binary.BigEndian.PutUint32(f[18:22], uint32(seq))
		for i := 22; i < len(f); i++ {
			f[i] = byte(seq*7 + i)
		}
		frames[seq] = f
	}
	return frames
}

func isTestFrame(f []byte) bool {
	return len(f) >= 22 && binary.BigEndian.Uint16(f[12:14]) == testEtherType && bytes.Equal(f[14:18], testMagic)
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// packetSocket opens an AF_PACKET socket on ifindex that receives only
// testEtherType frames, or none when receive is false.
func packetSocket(t *testing.T, ifindex int, receive bool) int {
	t.Helper()
	proto := 0
	if receive {
		proto = int(htons(testEtherType))
	}
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, proto)
	if err != nil {
		t.Fatalf("create packet socket: %v", err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	if receive {
		if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: uint16(proto), Ifindex: ifindex}); err != nil {
			t.Fatalf("bind packet socket: %v", err)
		}
		// Everything is sent before anything is read; the default receive
		// buffer would drop part of a few hundred frames.
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 16<<20); err != nil {
			t.Fatalf("grow packet socket buffer: %v", err)
		}
	}
	return fd
}

func sendPackets(t *testing.T, fd int, link netlink.Link, frames [][]byte) {
	t.Helper()
	sa := &unix.SockaddrLinklayer{Protocol: htons(testEtherType), Ifindex: link.Attrs().Index, Halen: 6}
	for i, f := range frames {
		copy(sa.Addr[:], f[0:6])
		if err := unix.Sendto(fd, f, 0, sa); err != nil {
			t.Fatalf("send frame %d: %v", i, err)
		}
	}
}

// receivePackets reads test frames from an AF_PACKET socket until it has
// want of them or waitLimit passes.
func receivePackets(t *testing.T, fd, want int) [][]byte {
	t.Helper()
	var got [][]byte
	buf := make([]byte, 2048)
	deadline := time.Now().Add(waitLimit)
	for len(got) < want && time.Now().Before(deadline) {
		pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		if _, err := unix.Poll(pfd, 100); err != nil && !errors.Is(err, unix.EINTR) {
			t.Fatalf("poll packet socket: %v", err)
		}
		for len(got) < want {
			n, _, err := unix.Recvfrom(fd, buf, unix.MSG_DONTWAIT)
			if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
				break
			}
			if err != nil {
				t.Fatalf("receive from packet socket: %v", err)
			}
			if isTestFrame(buf[:n]) {
				got = append(got, bytes.Clone(buf[:n]))
			}
		}
	}
	return got
}

// receiveXSK collects test frames (and their 8 metadata bytes) from s until
// it has want of them or waitLimit passes, recycling every frame.
func receiveXSK(t *testing.T, s *Socket, want int) (frames, metas [][]byte, others int) {
	t.Helper()
	deadline := time.Now().Add(waitLimit)
	for len(frames) < want && time.Now().Before(deadline) {
		if _, _, err := s.Poll(100 * time.Millisecond); err != nil {
			t.Fatalf("Poll: %v", err)
		}
		descs := s.Receive(want)
		for _, d := range descs {
			f := s.GetFrame(d)
			if !isTestFrame(f) {
				others++
				continue
			}
			frames = append(frames, bytes.Clone(f))
			metas = append(metas, bytes.Clone(s.Meta(d, 8)))
		}
		s.Recycle(descs)
	}
	return frames, metas, others
}

func compareFrames(t *testing.T, got, want [][]byte) {
	t.Helper()
	if len(got) != len(want) {
		t.Errorf("received %d test frames, want %d", len(got), len(want))
	}
	for i := range min(len(got), len(want)) {
		if !bytes.Equal(got[i], want[i]) {
			t.Errorf("frame %d differs:\n got %x\nwant %x", i, got[i], want[i])
			return
		}
	}
}

func checkMeta(t *testing.T, metas [][]byte) {
	t.Helper()
	for i, m := range metas {
		if len(m) != 8 || binary.NativeEndian.Uint64(m) != metaValue {
			t.Errorf("frame %d metadata = %x, want %x in host order", i, m, uint64(metaValue))
			return
		}
	}
}

func fillAll(t *testing.T, s *Socket) {
	t.Helper()
	descs := s.GetDescs(s.NumFreeFillSlots())
	if n := s.Fill(descs); n != len(descs) {
		t.Fatalf("Fill placed %d of %d frames", n, len(descs))
	}
}

func logStats(t *testing.T, s *Socket) {
	t.Helper()
	st, err := s.Stats()
	if err != nil {
		t.Fatalf("Stats: %v", err)
	}
	t.Logf("stats: %+v", st)
}

func TestOptionsValidation(t *testing.T) {
	bad := map[string]SocketOptions{
		"frame size not power of two": {NumFrames: 8, FrameSize: 3000, FillRingNumDescs: 8, CompletionRingNumDescs: 8, RxRingNumDescs: 8},
		"frame size too small":        {NumFrames: 8, FrameSize: 1024, FillRingNumDescs: 8, CompletionRingNumDescs: 8, RxRingNumDescs: 8},
		"no frames":                   {NumFrames: 0, FrameSize: 2048, FillRingNumDescs: 8, CompletionRingNumDescs: 8, RxRingNumDescs: 8},
		"fill ring not power of two":  {NumFrames: 8, FrameSize: 2048, FillRingNumDescs: 6, CompletionRingNumDescs: 8, RxRingNumDescs: 8},
		"no completion ring":          {NumFrames: 8, FrameSize: 2048, FillRingNumDescs: 8, RxRingNumDescs: 8},
		"neither rx nor tx":           {NumFrames: 8, FrameSize: 2048, FillRingNumDescs: 8, CompletionRingNumDescs: 8},
		"tx ring not power of two":    {NumFrames: 8, FrameSize: 2048, FillRingNumDescs: 8, CompletionRingNumDescs: 8, TxRingNumDescs: 12},
	}
	for name, opts := range bad {
		if s, err := NewSocket(1, 0, &opts); err == nil {
			s.Close()
			t.Errorf("%s: NewSocket succeeded", name)
		}
	}
	if err := DefaultSocketOptions.validate(); err != nil {
		t.Errorf("DefaultSocketOptions invalid: %v", err)
	}
}

func TestBindErrorNamesInterface(t *testing.T) {
	testutil.InNewNetns(t)
	_, err := NewSocket(9999, 3, nil)
	if errors.Is(err, unix.EAFNOSUPPORT) {
		t.Skipf("AF_XDP sockets (CONFIG_XDP_SOCKETS) unavailable: %v", err)
	}
	if err == nil {
		t.Fatal("NewSocket on a missing interface succeeded")
	}
	if want := "xsk: bind ifindex 9999 queue 3: "; len(err.Error()) < len(want) || err.Error()[:len(want)] != want {
		t.Errorf("error %q does not start with %q", err, want)
	}
}

func TestReceive(t *testing.T) {
	for _, withMeta := range []bool{false, true} {
		t.Run(fmt.Sprintf("meta=%v", withMeta), func(t *testing.T) {
			testutil.InNewNetns(t)
			veth0, veth1 := vethPair(t)
			s := newSocketOrSkip(t, veth1.Attrs().Index, &SocketOptions{
				NumFrames: 512, FrameSize: 2048, FillRingNumDescs: 256, CompletionRingNumDescs: 64, RxRingNumDescs: 256,
			})
			fillAll(t, s)
			attachRedirect(t, veth1.Attrs().Index, s, withMeta)

			frames := testFrames(100, veth1.Attrs().HardwareAddr, veth0.Attrs().HardwareAddr)
			sendPackets(t, packetSocket(t, veth0.Attrs().Index, false), veth0, frames)
			got, metas, others := receiveXSK(t, s, len(frames))
			t.Logf("received %d test frames, %d other frames", len(got), others)
			compareFrames(t, got, frames)
			if withMeta {
				checkMeta(t, metas)
			}

			start := time.Now()
			if n, c, err := s.Poll(30 * time.Millisecond); err != nil || n != 0 || c != 0 {
				t.Errorf("idle Poll = %d, %d, %v; want 0, 0, nil", n, c, err)
			}
			if waited := time.Since(start); waited < 25*time.Millisecond {
				t.Errorf("idle Poll returned after %v, want about 30ms", waited)
			}

			// With the fill ring full, Recycle must keep frames on the free list.
			fillAll(t, s)
			freeBefore := s.NumFreeFrames()
			extra := s.GetDescs(4)
			s.Recycle(extra)
			if got := s.NumFreeFrames(); got != freeBefore {
				t.Errorf("after Recycle with a full fill ring: %d free frames, want %d", got, freeBefore)
			}
			logStats(t, s)
		})
	}
}

func TestTransmit(t *testing.T) {
	// A completion ring smaller than the kick batch makes the kernel stop
	// each kick early with EAGAIN until completions are reaped.
	for _, compRing := range []int{512, 16} {
		t.Run(fmt.Sprintf("completion-ring=%d", compRing), func(t *testing.T) { testTransmit(t, compRing) })
	}
}

func testTransmit(t *testing.T, compRing int) {
	testutil.InNewNetns(t)
	veth0, veth1 := vethPair(t)
	opts := SocketOptions{NumFrames: 1024, FrameSize: 2048, FillRingNumDescs: 64, CompletionRingNumDescs: compRing, TxRingNumDescs: 512}
	s := newSocketOrSkip(t, veth0.Attrs().Index, &opts)
	rxFd := packetSocket(t, veth1.Attrs().Index, true)

	frames := testFrames(300, veth1.Attrs().HardwareAddr, veth0.Attrs().HardwareAddr)
	descs := s.GetDescs(len(frames))
	if len(descs) != len(frames) {
		t.Fatalf("GetDescs returned %d frames, want %d", len(descs), len(frames))
	}
	for i, f := range frames {
		descs[i].Len = uint32(copy(s.GetFrame(descs[i]), f))
	}
	if n := s.Transmit(descs); n != len(descs) {
		t.Fatalf("Transmit placed %d of %d descriptors", n, len(descs))
	}
	if err := s.FlushTx(); err != nil {
		t.Errorf("FlushTx: %v", err)
	}
	if p := s.NumTxPending(); p != 0 {
		t.Errorf("%d descriptors still on the tx ring after Transmit", p)
	}
	compareFrames(t, receivePackets(t, rxFd, len(frames)), frames)

	// Completions trail the kernel's consumption of the TX ring by the time
	// it takes to free the skbs.
	deadline := time.Now().Add(waitLimit)
	for s.NumFreeFrames() < opts.NumFrames && time.Now().Before(deadline) {
		if _, _, err := s.Poll(10 * time.Millisecond); err != nil {
			t.Fatalf("Poll: %v", err)
		}
		s.Complete()
	}
	if got := s.NumFreeFrames(); got != opts.NumFrames {
		t.Errorf("%d frames free after completion, want %d", got, opts.NumFrames)
	}
	logStats(t, s)
	if err := s.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
	// The cleanup closes again, checking that Close is idempotent.
}

// TestKickBatch measures how many TX descriptors one copy-mode sendto
// consumes, which is why Transmit has to kick in a loop.
func TestKickBatch(t *testing.T) {
	testutil.InNewNetns(t)
	veth0, veth1 := vethPair(t)
	s := newSocketOrSkip(t, veth0.Attrs().Index, &SocketOptions{
		NumFrames: 256, FrameSize: 2048, FillRingNumDescs: 64, CompletionRingNumDescs: 256, TxRingNumDescs: 256,
	})
	rxFd := packetSocket(t, veth1.Attrs().Index, true)
	frames := testFrames(200, veth1.Attrs().HardwareAddr, veth0.Attrs().HardwareAddr)
	descs := s.GetDescs(len(frames))
	for i, f := range frames {
		descs[i].Len = uint32(copy(s.GetFrame(descs[i]), f))
	}
	placeTx(s, descs)

	batches := kickUntilDrained(t, s, 3)
	t.Logf("descriptors consumed per kick, default budget: %v", batches)
	if len(batches) < 2 || batches[0] == 0 || batches[0] >= uint32(len(descs)) {
		t.Errorf("first kick consumed %v of %d descriptors; expected a partial batch", batches, len(descs))
	}
	compareFrames(t, receivePackets(t, rxFd, len(frames)), frames)

	err := s.SetTxBudget(128)
	if errors.Is(err, unix.ENOPROTOOPT) {
		t.Skipf("kernel lacks XDP_MAX_TX_SKB_BUDGET: %v", err)
	}
	if err != nil {
		t.Fatalf("SetTxBudget: %v", err)
	}
	if err := s.SetTxBudget(1); !errors.Is(err, unix.EACCES) {
		t.Errorf("SetTxBudget(1) = %v, want EACCES", err)
	}
	descs = s.GetDescs(len(frames))
	if len(descs) != len(frames) {
		t.Fatalf("GetDescs returned %d frames after completion, want %d", len(descs), len(frames))
	}
	for i, f := range frames {
		descs[i].Len = uint32(copy(s.GetFrame(descs[i]), f))
	}
	placeTx(s, descs)
	batches = kickUntilDrained(t, s, 3)
	t.Logf("descriptors consumed per kick, budget 128: %v", batches)
	if len(batches) == 0 || batches[0] != 128 {
		t.Errorf("kicks consumed %v with budget 128", batches)
	}
	compareFrames(t, receivePackets(t, rxFd, len(frames)), frames)
}

// placeTx puts descs on the TX ring without Transmit's drain loop.
func placeTx(s *Socket, descs []Desc) {
	prod := *s.tx.producer
	for i, d := range descs {
		s.tx.descs[(prod+uint32(i))&s.tx.mask] = d
	}
	atomic.StoreUint32(s.tx.producer, prod+uint32(len(descs)))
}

// kickUntilDrained kicks one sendto at a time and records how many TX
// descriptors each consumed.
func kickUntilDrained(t *testing.T, s *Socket, maxIdle int) []uint32 {
	t.Helper()
	var batches []uint32
	idle := 0
	for kicks := 0; s.NumTxPending() > 0 && kicks < 64 && idle < maxIdle; kicks++ {
		before := atomic.LoadUint32(s.tx.consumer)
		err := s.kick()
		consumed := atomic.LoadUint32(s.tx.consumer) - before
		batches = append(batches, consumed)
		if err != nil && !errors.Is(err, unix.EAGAIN) {
			t.Fatalf("kick %d: %v", kicks, err)
		}
		if consumed == 0 {
			idle++
		}
		s.Complete()
	}
	if p := s.NumTxPending(); p != 0 {
		t.Errorf("%d descriptors left on the tx ring", p)
	}
	return batches
}

// TestTransmitToXSK sends from an AF_XDP socket on veth0 to one on veth1,
// more frames than veth1's XDP ring (256) holds, so the kernel pushes back.
func TestTransmitToXSK(t *testing.T) {
	testutil.InNewNetns(t)
	veth0, veth1 := vethPair(t)
	rx := newSocketOrSkip(t, veth1.Attrs().Index, &SocketOptions{
		NumFrames: 2048, FrameSize: 2048, FillRingNumDescs: 2048, CompletionRingNumDescs: 64, RxRingNumDescs: 2048,
	})
	fillAll(t, rx)
	attachRedirect(t, veth1.Attrs().Index, rx, true)
	tx := newSocketOrSkip(t, veth0.Attrs().Index, &SocketOptions{
		NumFrames: 2048, FrameSize: 2048, FillRingNumDescs: 64, CompletionRingNumDescs: 2048, TxRingNumDescs: 1024,
	})

	frames := testFrames(1000, veth1.Attrs().HardwareAddr, veth0.Attrs().HardwareAddr)
	descs := tx.GetDescs(len(frames))
	for i, f := range frames {
		descs[i].Len = uint32(copy(tx.GetFrame(descs[i]), f))
	}
	if n := tx.Transmit(descs); n != len(descs) {
		t.Fatalf("Transmit placed %d of %d descriptors", n, len(descs))
	}
	if err := tx.FlushTx(); err != nil {
		t.Errorf("FlushTx: %v", err)
	}
	got, metas, others := receiveXSK(t, rx, len(frames))
	t.Logf("received %d test frames, %d other frames", len(got), others)
	compareFrames(t, got, frames)
	checkMeta(t, metas)
	logStats(t, tx)
	logStats(t, rx)
}
