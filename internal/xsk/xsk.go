// Package xsk is a small AF_XDP socket built directly on golang.org/x/sys/unix.
//
// It stands in for github.com/asavie/xdp's Socket (same method names and
// meanings where they overlap) and supports copy mode only (XDP_COPY), which
// is all veth and tap offer.
//
// Frame ownership moves in a cycle: the socket's free list -> fill ring
// (kernel) -> RX ring -> caller -> Recycle; and free list -> caller (GetDescs)
// -> TX ring (kernel) -> completion ring -> free list (Complete).
//
// A Socket is not safe for concurrent use: RX and TX may be driven from
// different goroutines only if the caller serialises the calls. Poll and
// Stats only read shared ring indexes and the fd, so they may run
// concurrently with the other methods (but not with Close).
package xsk

import (
	"errors"
	"fmt"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// SocketOptions sizes the UMEM and the four rings. Ring sizes must be powers
// of two; the kernel rejects anything else with EINVAL.
type SocketOptions struct {
	NumFrames              int // UMEM frames
	FrameSize              int // 2048 or 4096
	FillRingNumDescs       int
	CompletionRingNumDescs int
	RxRingNumDescs         int // 0 = no RX ring (TX-only socket)
	TxRingNumDescs         int // 0 = no TX ring (RX-only socket)
}

// DefaultSocketOptions gives an 8 MiB UMEM whose frames can fill the fill
// ring and the TX ring at the same time.
var DefaultSocketOptions = SocketOptions{
	NumFrames:              4096,
	FrameSize:              2048,
	FillRingNumDescs:       2048,
	CompletionRingNumDescs: 2048,
	RxRingNumDescs:         2048,
	TxRingNumDescs:         2048,
}

// Desc describes one frame in the UMEM: Addr is a byte offset into the UMEM.
type Desc = unix.XDPDesc

const (
	// Copy-mode TX sends at most max_tx_budget (32 by default) frames per
	// sendto, so draining a ring takes many kicks; FlushTx keeps kicking while
	// they make progress and gives up after this many in a row that do not.
	maxStalledKicks = 32
	stallBackoff    = 20 * time.Microsecond
)

// ring is one of the four single-producer/single-consumer rings the kernel
// shares with us. producer and consumer point into the mapping; the side
// that owns an index stores it with release semantics after touching the
// entries, the other side loads it with acquire semantics before touching
// them. Go's sync/atomic is sequentially consistent, which is stronger.
type ring struct {
	mapping  []byte
	producer *uint32
	consumer *uint32
	mask     uint32
	size     uint32
	descs    []Desc   // RX and TX rings
	addrs    []uint64 // fill and completion rings
}

// Socket is an AF_XDP socket bound in copy mode to one queue of one interface.
type Socket struct {
	fd        int
	umem      []byte
	frameSize uint64
	fill      ring
	comp      ring
	rx        ring
	tx        ring
	free      []uint64 // frame base addresses owned by us and not handed out
	rxBuf     []Desc
}

// NewSocket creates an AF_XDP socket with its own UMEM and binds it in copy
// mode to queueID of ifindex. A nil opts means DefaultSocketOptions.
// Frames arriving on the queue reach the socket only once an XDP program
// redirects them into an XSKMAP entry holding FD().
func NewSocket(ifindex, queueID int, opts *SocketOptions) (*Socket, error) {
	if opts == nil {
		opts = &DefaultSocketOptions
	}
	if err := opts.validate(); err != nil {
		return nil, err
	}
	fd, err := unix.Socket(unix.AF_XDP, unix.SOCK_RAW|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("xsk: create AF_XDP socket: %w", err)
	}
	s := &Socket{fd: fd, frameSize: uint64(opts.FrameSize)}
	if err := s.setup(ifindex, queueID, opts); err != nil {
		s.Close()
		return nil, err
	}
	return s, nil
}

func (o *SocketOptions) validate() error {
	isPow2 := func(n int) bool { return n > 0 && n&(n-1) == 0 }
	switch {
	case o.FrameSize < 2048 || o.FrameSize > unix.Getpagesize() || !isPow2(o.FrameSize):
		// Aligned-chunk UMEMs need a power-of-two frame no bigger than a page.
		return fmt.Errorf("xsk: frame size %d: must be a power of two in [2048, %d]", o.FrameSize, unix.Getpagesize())
	case o.NumFrames <= 0:
		return fmt.Errorf("xsk: number of frames %d: must be positive", o.NumFrames)
	case !isPow2(o.FillRingNumDescs) || !isPow2(o.CompletionRingNumDescs):
		// Bind refuses a fresh UMEM without both rings, even for TX-only sockets.
		return fmt.Errorf("xsk: fill ring %d, completion ring %d: must be powers of two",
			o.FillRingNumDescs, o.CompletionRingNumDescs)
	case o.RxRingNumDescs == 0 && o.TxRingNumDescs == 0:
		return errors.New("xsk: rx and tx ring sizes are both 0: need at least one ring")
	case o.RxRingNumDescs != 0 && !isPow2(o.RxRingNumDescs), o.TxRingNumDescs != 0 && !isPow2(o.TxRingNumDescs):
		return fmt.Errorf("xsk: rx ring %d, tx ring %d: must be 0 or powers of two", o.RxRingNumDescs, o.TxRingNumDescs)
	}
	return nil
}

func (s *Socket) setup(ifindex, queueID int, opts *SocketOptions) error {
	var err error
	// The kernel pins these pages for the socket's lifetime, so a private
	// anonymous mapping is enough; MAP_POPULATE avoids faults on first RX.
	s.umem, err = unix.Mmap(-1, 0, opts.NumFrames*opts.FrameSize,
		unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_POPULATE)
	if err != nil {
		return fmt.Errorf("xsk: map umem: %w", err)
	}
	reg := unix.XDPUmemReg{
		Addr: uint64(uintptr(unsafe.Pointer(&s.umem[0]))),
		Len:  uint64(len(s.umem)),
		Size: uint32(opts.FrameSize),
	}
	if err := setsockopt(s.fd, unix.XDP_UMEM_REG, unsafe.Pointer(&reg), unsafe.Sizeof(reg)); err != nil {
		return fmt.Errorf("xsk: register umem: %w", err)
	}
	sizes := []struct {
		opt, n int
		name   string
	}{
		{unix.XDP_UMEM_FILL_RING, opts.FillRingNumDescs, "fill"},
		{unix.XDP_UMEM_COMPLETION_RING, opts.CompletionRingNumDescs, "completion"},
		{unix.XDP_RX_RING, opts.RxRingNumDescs, "rx"},
		{unix.XDP_TX_RING, opts.TxRingNumDescs, "tx"},
	}
	for _, sz := range sizes {
		if sz.n == 0 {
			continue
		}
		if err := unix.SetsockoptInt(s.fd, unix.SOL_XDP, sz.opt, sz.n); err != nil {
			return fmt.Errorf("xsk: size %s ring: %w", sz.name, err)
		}
	}
	var off unix.XDPMmapOffsets
	offLen := uint32(unsafe.Sizeof(off))
	if _, _, errno := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(s.fd), unix.SOL_XDP, unix.XDP_MMAP_OFFSETS,
		uintptr(unsafe.Pointer(&off)), uintptr(unsafe.Pointer(&offLen)), 0); errno != 0 {
		return fmt.Errorf("xsk: get mmap offsets: %w", errno)
	}
	if err := s.fill.mapRing(s.fd, unix.XDP_UMEM_PGOFF_FILL_RING, off.Fr, opts.FillRingNumDescs, false); err != nil {
		return fmt.Errorf("xsk: map fill ring: %w", err)
	}
	if err := s.comp.mapRing(s.fd, unix.XDP_UMEM_PGOFF_COMPLETION_RING, off.Cr, opts.CompletionRingNumDescs, false); err != nil {
		return fmt.Errorf("xsk: map completion ring: %w", err)
	}
	if opts.RxRingNumDescs > 0 {
		if err := s.rx.mapRing(s.fd, unix.XDP_PGOFF_RX_RING, off.Rx, opts.RxRingNumDescs, true); err != nil {
			return fmt.Errorf("xsk: map rx ring: %w", err)
		}
		s.rxBuf = make([]Desc, 0, opts.RxRingNumDescs)
	}
	if opts.TxRingNumDescs > 0 {
		if err := s.tx.mapRing(s.fd, unix.XDP_PGOFF_TX_RING, off.Tx, opts.TxRingNumDescs, true); err != nil {
			return fmt.Errorf("xsk: map tx ring: %w", err)
		}
	}
	s.free = make([]uint64, opts.NumFrames)
	for i := range s.free {
		// Hand out low addresses first: pop from the end of a reversed list.
		s.free[i] = uint64(opts.NumFrames-1-i) * s.frameSize
	}
	sa := &unix.SockaddrXDP{Flags: unix.XDP_COPY, Ifindex: uint32(ifindex), QueueID: uint32(queueID)}
	if err := unix.Bind(s.fd, sa); err != nil {
		return fmt.Errorf("xsk: bind ifindex %d queue %d: %w", ifindex, queueID, err)
	}
	return nil
}

func (r *ring) mapRing(fd int, pgoff int64, off unix.XDPRingOffset, n int, descRing bool) error {
	entrySize := uint64(unsafe.Sizeof(uint64(0)))
	if descRing {
		entrySize = uint64(unsafe.Sizeof(Desc{}))
	}
	mem, err := unix.Mmap(fd, pgoff, int(off.Desc+uint64(n)*entrySize),
		unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE)
	if err != nil {
		return err
	}
	r.mapping = mem
	r.producer = (*uint32)(unsafe.Pointer(&mem[off.Producer]))
	r.consumer = (*uint32)(unsafe.Pointer(&mem[off.Consumer]))
	r.size = uint32(n)
	r.mask = uint32(n - 1)
	if descRing {
		r.descs = unsafe.Slice((*Desc)(unsafe.Pointer(&mem[off.Desc])), n)
	} else {
		r.addrs = unsafe.Slice((*uint64)(unsafe.Pointer(&mem[off.Desc])), n)
	}
	return nil
}

// Index arithmetic relies on uint32 wrap-around: the indexes run freely and
// only the mask maps them to slots.

// freeSlots is for rings we produce into (fill, TX).
func (r *ring) freeSlots() uint32 {
	if r.mapping == nil {
		return 0
	}
	return r.size - (*r.producer - atomic.LoadUint32(r.consumer))
}

// pending is for rings we consume from (RX, completion); for rings we
// produce into it counts entries the kernel has not consumed yet.
func (r *ring) pending() uint32 {
	if r.mapping == nil {
		return 0
	}
	return atomic.LoadUint32(r.producer) - atomic.LoadUint32(r.consumer)
}

func setsockopt(fd, opt int, val unsafe.Pointer, size uintptr) error {
	_, _, errno := unix.Syscall6(unix.SYS_SETSOCKOPT, uintptr(fd), unix.SOL_XDP, uintptr(opt), uintptr(val), size, 0)
	if errno != 0 {
		return errno
	}
	return nil
}

// FD returns the socket's file descriptor, for an XSKMAP entry.
func (s *Socket) FD() int { return s.fd }

// frameBase maps any address inside a frame to the frame's start. RX
// descriptors point past the kernel's headroom, not at the frame start.
func (s *Socket) frameBase(addr uint64) uint64 { return addr &^ (s.frameSize - 1) }

// GetFrame returns the UMEM bytes d describes. Its capacity stops at the
// frame's end, so appending cannot spill into the next frame.
func (s *Socket) GetFrame(d Desc) []byte {
	end := s.frameBase(d.Addr) + s.frameSize
	return s.umem[d.Addr : d.Addr+uint64(d.Len) : end]
}

// Meta returns the n bytes just before the frame data of an RX descriptor:
// in copy mode the kernel copies the XDP metadata area (grown with
// bpf_xdp_adjust_meta) into the UMEM directly in front of the data, inside
// the frame's 256-byte XDP_PACKET_HEADROOM. It returns nil if n reaches
// before the frame start.
func (s *Socket) Meta(d Desc, n int) []byte {
	if n < 0 || uint64(n) > d.Addr-s.frameBase(d.Addr) {
		return nil
	}
	return s.umem[d.Addr-uint64(n) : d.Addr : d.Addr]
}

// NumFreeFrames reports how many frames GetDescs can still hand out.
func (s *Socket) NumFreeFrames() int { return len(s.free) }

// NumFreeFillSlots reports how many frames Fill can place now.
func (s *Socket) NumFreeFillSlots() int { return int(s.fill.freeSlots()) }

// NumFreeTxSlots reports how many descriptors Transmit can place now.
func (s *Socket) NumFreeTxSlots() int { return int(s.tx.freeSlots()) }

// NumTxPending reports TX descriptors the kernel has not consumed yet.
func (s *Socket) NumTxPending() int { return int(s.tx.pending()) }

// GetDescs hands out up to n free frames, each with Len set to the whole
// frame. Use them for Fill, or write a packet into GetFrame, shorten Len and
// Transmit.
func (s *Socket) GetDescs(n int) []Desc {
	n = min(max(n, 0), len(s.free))
	descs := make([]Desc, n)
	for i := range descs {
		descs[i] = Desc{Addr: s.free[len(s.free)-1-i], Len: uint32(s.frameSize)}
	}
	s.free = s.free[:len(s.free)-n]
	return descs
}

// Fill puts as many of descs on the fill ring as fit and returns how many it
// placed; the caller keeps ownership of the rest.
func (s *Socket) Fill(descs []Desc) int {
	n := min(uint32(len(descs)), s.fill.freeSlots())
	prod := *s.fill.producer
	for i := range n {
		s.fill.addrs[(prod+i)&s.fill.mask] = s.frameBase(descs[i].Addr)
	}
	// Publish the addresses before the kernel can see the new producer.
	atomic.StoreUint32(s.fill.producer, prod+n)
	return int(n)
}

// Recycle returns frames from Receive to the fill ring, or to the free list
// when the fill ring is full.
func (s *Socket) Recycle(descs []Desc) {
	n := s.Fill(descs)
	for _, d := range descs[n:] {
		s.free = append(s.free, s.frameBase(d.Addr))
	}
}

// Receive consumes up to num descriptors from the RX ring. The returned slice
// is reused by the next Receive; the frames belong to the caller until it
// passes them to Recycle (or Fill, or Transmit).
func (s *Socket) Receive(num int) []Desc {
	n := min(uint32(max(num, 0)), s.rx.pending())
	s.rxBuf = s.rxBuf[:0]
	cons := *s.rx.consumer
	for i := range n {
		s.rxBuf = append(s.rxBuf, s.rx.descs[(cons+i)&s.rx.mask])
	}
	// Release the slots only after the descriptors have been copied out.
	atomic.StoreUint32(s.rx.consumer, cons+n)
	return s.rxBuf
}

// Transmit places as many of descs on the TX ring as fit, kicks the kernel
// until it has consumed the ring (bounded; see FlushTx) and reaps the
// completion ring. It returns how many descriptors it placed; their frames
// come back to the free list once completed. Kick errors are not reported
// here: call FlushTx to learn why descriptors are still pending.
func (s *Socket) Transmit(descs []Desc) int {
	n := min(uint32(len(descs)), s.tx.freeSlots())
	if n == 0 && len(descs) > 0 {
		// The ring may be full of descriptors an earlier stalled kick left.
		_ = s.FlushTx()
		n = min(uint32(len(descs)), s.tx.freeSlots())
	}
	if n == 0 {
		return 0
	}
	prod := *s.tx.producer
	for i := range n {
		s.tx.descs[(prod+i)&s.tx.mask] = descs[i]
	}
	atomic.StoreUint32(s.tx.producer, prod+n)
	_ = s.FlushTx()
	return int(n)
}

// FlushTx kicks the kernel until it has consumed every TX descriptor, reaping
// completions between kicks. Copy mode sends only a small batch per sendto
// and answers EAGAIN when the batch is used up, the completion ring is full
// or the driver queue is busy; those, EBUSY (frame dropped by the driver),
// ENOBUFS and EINTR are retried, up to maxStalledKicks kicks in a row that
// consume nothing. Other errors are returned at once. An error wrapping
// EAGAIN means descriptors are still queued; a later kick or Poll sends them.
func (s *Socket) FlushTx() error {
	if s.tx.mapping == nil {
		return nil
	}
	var lastErr error
	stalled := 0
	for kicks := 0; ; kicks++ {
		before := atomic.LoadUint32(s.tx.consumer)
		if before == *s.tx.producer {
			s.Complete()
			return nil
		}
		if stalled >= maxStalledKicks {
			return fmt.Errorf("xsk: drain tx ring: %d descriptors left after %d kicks (last error %v): %w",
				s.tx.pending(), kicks, lastErr, unix.EAGAIN)
		}
		err := s.kick()
		s.Complete()
		switch {
		case err == nil, errors.Is(err, unix.EAGAIN), errors.Is(err, unix.EBUSY),
			errors.Is(err, unix.ENOBUFS), errors.Is(err, unix.EINTR):
			lastErr = err
		default:
			return fmt.Errorf("xsk: kick tx: %w", err)
		}
		if atomic.LoadUint32(s.tx.consumer) != before {
			stalled = 0
			continue
		}
		stalled++
		// Nothing moved: usually skbs still in flight hold completion slots.
		// Give them time to be freed instead of spinning on the syscall.
		time.Sleep(time.Duration(stalled) * stallBackoff)
	}
}

// SetTxBudget raises how many frames one copy-mode kick may send, from the
// kernel's default of 32, to save syscalls. The kernel accepts values from 32
// to the TX ring size and answers EACCES otherwise; kernels before 6.17 lack
// the option (XDP_MAX_TX_SKB_BUDGET) and answer ENOPROTOOPT.
func (s *Socket) SetTxBudget(n int) error {
	if err := unix.SetsockoptInt(s.fd, unix.SOL_XDP, unix.XDP_MAX_TX_SKB_BUDGET, n); err != nil {
		return fmt.Errorf("xsk: set tx budget %d: %w", n, err)
	}
	return nil
}

// kick asks the kernel to transmit. Copy mode refuses blocking sends.
func (s *Socket) kick() error {
	return unix.Sendto(s.fd, nil, unix.MSG_DONTWAIT, nil)
}

// Complete reaps the completion ring, returning those frames to the free
// list, and reports how many it reaped.
func (s *Socket) Complete() int {
	n := s.comp.pending()
	cons := *s.comp.consumer
	for i := range n {
		s.free = append(s.free, s.frameBase(s.comp.addrs[(cons+i)&s.comp.mask]))
	}
	atomic.StoreUint32(s.comp.consumer, cons+n)
	return int(n)
}

// Poll waits up to timeout (negative: forever) until RX descriptors are
// ready or, while TX descriptors are pending, the TX ring is writable. In
// copy mode the kernel's poll itself sends a batch of pending TX, and it
// reports writable whenever the ring is at most half full, so with TX
// pending Poll mostly returns at once. It returns the number of RX
// descriptors ready for Receive and of completions ready for Complete,
// without consuming either, which keeps it safe to call concurrently with
// the other methods.
func (s *Socket) Poll(timeout time.Duration) (numReceived, numCompleted int, err error) {
	var events int16
	if s.rx.mapping != nil {
		events |= unix.POLLIN
	}
	if s.tx.pending() > 0 {
		events |= unix.POLLOUT
	}
	fds := []unix.PollFd{{Fd: int32(s.fd), Events: events}}
	deadline := time.Now().Add(timeout)
	for {
		ms := -1
		if timeout >= 0 {
			// Round up so a sub-millisecond timeout still waits.
			ms = int((time.Until(deadline) + time.Millisecond - 1) / time.Millisecond)
			ms = max(ms, 0)
		}
		_, err = unix.Poll(fds, ms)
		if !errors.Is(err, unix.EINTR) {
			break
		}
	}
	if err != nil {
		return 0, 0, fmt.Errorf("xsk: poll socket: %w", err)
	}
	return int(s.rx.pending()), int(s.comp.pending()), nil
}

// Stats returns the kernel's drop and error counters for the socket.
func (s *Socket) Stats() (unix.XDPStatistics, error) {
	var st unix.XDPStatistics
	size := uint32(unsafe.Sizeof(st))
	if _, _, errno := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(s.fd), unix.SOL_XDP, unix.XDP_STATISTICS,
		uintptr(unsafe.Pointer(&st)), uintptr(unsafe.Pointer(&size)), 0); errno != 0 {
		return st, fmt.Errorf("xsk: get statistics: %w", errno)
	}
	return st, nil
}

// Close closes the socket and unmaps the rings and the UMEM. The kernel keeps
// its own page references until the socket is fully released, so unmapping
// right after close is safe. Close is idempotent.
func (s *Socket) Close() error {
	var errs []error
	if s.fd >= 0 {
		if err := unix.Close(s.fd); err != nil {
			errs = append(errs, fmt.Errorf("xsk: close socket: %w", err))
		}
		s.fd = -1
	}
	for _, r := range []*ring{&s.fill, &s.comp, &s.rx, &s.tx} {
		if r.mapping != nil {
			if err := unix.Munmap(r.mapping); err != nil {
				errs = append(errs, fmt.Errorf("xsk: unmap ring: %w", err))
			}
			*r = ring{}
		}
	}
	if s.umem != nil {
		if err := unix.Munmap(s.umem); err != nil {
			errs = append(errs, fmt.Errorf("xsk: unmap umem: %w", err))
		}
		s.umem = nil
	}
	s.free = nil
	return errors.Join(errs...)
}
