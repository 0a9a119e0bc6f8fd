// Package outputcommit enforces the Output Rule for one VM: the guest's
// frames that guest_egress could not send at once wait in the hold queue, an
// AF_XDP socket on the VM's tap, until the secondary's ack reaches the log
// position they were stamped with; then they leave, in order, through a
// packet socket on the uplink.
package outputcommit

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ftgw/ftgw/internal/xsk"
	"github.com/ftgw/ftgw/pkg/datapath"
)

// Config of a hold queue.
type Config struct {
	// Tap is the VM's tap: held frames arrive from it.
	Tap *net.Interface
	// Uplink is where released frames go.
	Uplink *net.Interface
	// Capacity is the hold capacity the data path was loaded with; the
	// sockets' rings are sized so they never drop before it does.
	Capacity int
	Logger   *slog.Logger
}

type heldFrame struct {
	desc      xsk.Desc
	stamp     uint64
	arrivalNs uint64
}

// HoldQueue holds the guest's frames until their stamps are acknowledged.
type HoldQueue struct {
	dp  *datapath.Datapath
	rx  *xsk.Socket
	out *releaseSocket
	log *slog.Logger

	// acked is the log position acknowledged; an ack stores it and wakes
	// the releaser (acks).
	acked atomic.Uint64
	acks  chan struct{}
	// leaseUntil (MonotonicNs): acknowledged frames leave only before it,
	// unless in passthrough (SetLease).
	leaseUntil  atomic.Uint64
	passthrough atomic.Bool

	mu          sync.Mutex
	held        []heldFrame // in arrival order; the frames stay in rx's UMEM
	sendBufs    [][]byte
	latency     datapath.LatencyHistogram
	lostInQueue uint64 // frames the kernel could not put on the hold socket or send
	xskLost     uint64 // rx_dropped + rx_ring_full last seen
	released    uint64
	discarded   uint64 // held frames of a copy that stopped serving (Discard)
	// recent are the last frames released, for a benchmark's breakdown of
	// where a held reply's time went (Recent); recentN counts them all.
	recent  [recentReleased]ReleasedFrame
	recentN uint64
}

// recentReleased is how many released frames Recent remembers: more than
// one round of a benchmark's requests, few enough to copy at each call.
const recentReleased = 4096

// ReleasedFrame is one held frame's way through the queue, in
// MonotonicNs: its arrival from the tap (the data path's timestamp) and
// the end of the send that released it; and its stamp.
type ReleasedFrame struct {
	Stamp     uint64 `json:"stamp"`
	ArrivalNs uint64 `json:"arrival_ns"`
	ReleaseNs uint64 `json:"release_ns"`
}

// ringSize is the smallest power of two of at least n.
func ringSize(n int) int {
	size := 64
	for size < n {
		size *= 2
	}
	return size
}

// Open creates the hold and release sockets and plugs the hold socket into
// the data path.
func Open(dp *datapath.Datapath, cfg Config) (_ *HoldQueue, err error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	ring := ringSize(cfg.Capacity)
	q := &HoldQueue{dp: dp, log: cfg.Logger, acks: make(chan struct{}, 1)}
	defer func() {
		if err != nil {
			q.Close()
		}
	}()

	// Every held frame keeps its UMEM frame until release, so the UMEM has
	// room for a full queue plus a full fill ring: the socket never runs
	// dry before guest_egress's own capacity check drops.
	q.rx, err = xsk.NewSocket(cfg.Tap.Index, 0, &xsk.SocketOptions{
		NumFrames:              2 * ring,
		FrameSize:              4096,
		FillRingNumDescs:       ring,
		CompletionRingNumDescs: 64,
		RxRingNumDescs:         ring,
	})
	if err != nil {
		return nil, fmt.Errorf("open hold socket on %s: %w", cfg.Tap.Name, err)
	}
	q.rx.Fill(q.rx.GetDescs(q.rx.NumFreeFillSlots()))

	if q.out, err = openReleaseSocket(cfg.Uplink); err != nil {
		return nil, err
	}
	if err := dp.HoldSockets().Put(dp.Slot(), uint32(q.rx.FD())); err != nil {
		return nil, fmt.Errorf("plug hold socket into the data path: %w", err)
	}
	return q, nil
}

// Close unplugs and closes the sockets. Frames still held are dropped: they
// were never acknowledged, so no one may send them.
func (q *HoldQueue) Close() error {
	var errs []error
	if q.rx != nil {
		if err := q.dp.HoldSockets().Delete(q.dp.Slot()); err != nil && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, err)
		}
		errs = append(errs, q.rx.Close())
	}
	if q.out != nil {
		errs = append(errs, q.out.Close())
	}
	return errors.Join(errs...)
}

// mayRelease: acknowledged frames may leave now.
func (q *HoldQueue) mayRelease() bool {
	return q.passthrough.Load() || monotonicNs() < q.leaseUntil.Load()
}

// quietTick is how often Run looks at the hold socket while the queue is
// empty, instead of being woken by every frame that arrives.
const quietTick = time.Millisecond

// Run takes frames off the hold socket until ctx is done, and releases
// what each ack covers. Frames whose stamp is already acknowledged (the ack
// can overtake them) leave at once, or within quietTick of arriving at an
// empty queue (below).
//
// While the queue holds frames, Run sleeps on the hold socket and takes
// each frame as it comes: behind held frames, a frame may be acknowledged
// already (the ack overtook it) and must not wait for the next ack. An
// empty queue only receives frames that guest_egress found unacknowledged
// (it sends a frame straight out when nothing is held and its stamp is
// acknowledged), and the releaser takes those when the ack that covers them
// arrives. Then Run only looks every quietTick, for the rare frame that
// arrived just after the releaser's look (the ack raced guest_egress):
// being woken by every held reply put a wakeup of the daemon, on the other
// CPU, right where the log channel needs the CPUs (on the lab, 2 vCPUs, it
// added 60µs at p50 to a held reply's wait).
func (q *HoldQueue) Run(ctx context.Context) error {
	var releaser sync.WaitGroup
	releaser.Go(func() { q.releaseOnAck(ctx) })
	defer releaser.Wait()
	lastStats := time.Now()
	tick := time.NewTimer(quietTick)
	defer tick.Stop()
	for ctx.Err() == nil {
		n := 1
		if q.quiet() {
			tick.Reset(quietTick)
			select {
			case <-ctx.Done():
			case <-tick.C:
			}
		} else {
			var err error
			if n, _, err = q.rx.Poll(100 * time.Millisecond); err != nil {
				return fmt.Errorf("poll hold socket: %w", err)
			}
		}
		if n > 0 {
			q.mu.Lock()
			q.takeLocked()
			q.releaseLocked()
			q.mu.Unlock()
		}
		if time.Since(lastStats) > 100*time.Millisecond {
			lastStats = time.Now()
			if err := q.reconcileLost(); err != nil {
				q.log.Warn("read hold socket statistics", "err", err)
			}
		}
	}
	return nil
}

// quiet: nothing is held, and the rule is on (see Run).
func (q *HoldQueue) quiet() bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.held) == 0 && !q.passthrough.Load()
}

// takeLocked moves every frame waiting on the hold socket to the queue.
func (q *HoldQueue) takeLocked() {
	for {
		descs := q.rx.Receive(64)
		if len(descs) == 0 {
			return
		}
		for _, d := range descs {
			m := q.rx.Meta(d, 16)
			q.held = append(q.held, heldFrame{
				desc:      d,
				stamp:     binary.NativeEndian.Uint64(m[0:8]),
				arrivalNs: binary.NativeEndian.Uint64(m[8:16]),
			})
		}
	}
}

// ReleaseUpTo records that the secondary holds the log up to pos; Run's
// releaser then sends every frame, in order, up to the first whose stamp is
// still beyond it. It never waits for a release: its caller is the log
// channel's reader, and a flush of the release socket can take a second
// under load, far longer than the failure timeout a stalled reader would
// then miss heartbeats for.
func (q *HoldQueue) ReleaseUpTo(pos uint64) {
	for {
		old := q.acked.Load()
		if pos <= old || q.acked.CompareAndSwap(old, pos) {
			break
		}
	}
	q.wake()
}

// SetLease lets acknowledged frames leave until untilNs (MonotonicNs) and
// wakes the releaser: frames acknowledged while no lease held leave now.
// Past the lease the secondary may have declared this host failed and
// taken over: a host that was paused or cut off must not release beside
// it, whatever it acknowledged before. Passthrough needs no lease.
func (q *HoldQueue) SetLease(untilNs uint64) {
	q.leaseUntil.Store(untilNs)
	q.wake()
}

func (q *HoldQueue) wake() {
	select {
	case q.acks <- struct{}{}:
	default: // a wakeup is pending already
	}
}

// releaseOnAck sends what the acks cover, until ctx is done.
func (q *HoldQueue) releaseOnAck(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-q.acks:
		}
		q.mu.Lock()
		// A reply can still sit on the socket, its reader not yet awake:
		// take it now rather than let the ack wait for that wakeup.
		q.takeLocked()
		q.releaseLocked()
		q.mu.Unlock()
	}
}

// SetPassthrough turns output commit off (everything held leaves now, and
// the data path sends new frames at once) or back on.
func (q *HoldQueue) SetPassthrough(on bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.passthrough.Store(on)
	q.releaseLocked()
}

func (q *HoldQueue) releaseLocked() {
	if !q.mayRelease() {
		return // until the lease is renewed (SetLease wakes the releaser)
	}
	n := 0
	acked := q.acked.Load()
	passthrough := q.passthrough.Load()
	for n < len(q.held) && (passthrough || q.held[n].stamp <= acked) {
		n++
	}
	if n == 0 {
		return
	}
	taken := 0
	for taken < n {
		chunk := q.held[taken:min(n, taken+256)]
		sent := q.transmit(chunk)
		taken += sent
		if sent < len(chunk) {
			break // the lease ran out meanwhile: the rest stays held
		}
	}
	q.held = append(q.held[:0], q.held[taken:]...)
}

// transmit sends frames, in order, straight from the hold socket's UMEM,
// and reports how many it is done with. It stops early when the lease runs
// out. The kernel checks the lease again in the send itself
// (uplink_egress): a frame refused there stays held, as if this check had
// failed. Only when frames are on the wire does the data path learn they
// are gone: from then on it may send new frames straight out, and they must
// not overtake these.
func (q *HoldQueue) transmit(frames []heldFrame) int {
	bufs := q.sendBufs[:0]
	for _, f := range frames {
		bufs = append(bufs, q.rx.GetFrame(f.desc))
	}
	q.sendBufs = bufs
	done, stalled := 0, 0
	for done < len(frames) && q.mayRelease() {
		n, err := q.out.send(bufs[done:])
		if n == 0 {
			if !q.mayRelease() {
				break // uplink_egress refused it: past the lease
			}
			if stalled++; stalled < 100 && (errors.Is(err, unix.EINTR) || errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.ENOBUFS)) {
				continue
			}
			// The kernel will not take this frame: drop it rather than
			// stall every frame behind it.
			q.lostInQueue++
			q.log.Warn("release socket refused a frame", "len", len(bufs[done]), "err", err)
			n = 1
		} else {
			now := monotonicNs()
			for _, f := range frames[done : done+n] {
				q.latency.Observe(now - f.arrivalNs)
				q.recent[q.recentN%recentReleased] = ReleasedFrame{Stamp: f.stamp, ArrivalNs: f.arrivalNs, ReleaseNs: now}
				q.recentN++
			}
		}
		done += n
		stalled = 0
	}
	q.recycle(frames[:done])
	q.released += uint64(done)
	q.dp.AddReleased(uint64(done))
	return done
}

// recycle gives the frames' UMEM space back to the hold socket.
func (q *HoldQueue) recycle(frames []heldFrame) {
	descs := make([]xsk.Desc, 0, len(frames))
	for _, f := range frames {
		descs = append(descs, f.desc)
	}
	q.rx.Recycle(descs)
}

// Discard drops every frame held, unsent: the copy that produced them
// stopped serving (another host holds a newer epoch), so they may never
// leave, whatever was acknowledged.
func (q *HoldQueue) Discard() {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.takeLocked()
	n := uint64(len(q.held))
	q.recycle(q.held)
	q.held = q.held[:0]
	if n > 0 {
		q.discarded += n
		q.dp.AddReleased(n)
		q.log.Info("discarded the outputs of a copy that no longer serves", "frames", n)
	}
}

// reconcileLost accounts for frames guest_egress counted as held that the
// kernel could not queue on the hold socket, so the data path's pending
// count returns to zero once the queue drains.
func (q *HoldQueue) reconcileLost() error {
	st, err := q.rx.Stats()
	if err != nil {
		return err
	}
	lost := st.Rx_dropped + st.Rx_ring_full
	q.mu.Lock()
	defer q.mu.Unlock()
	if delta := lost - q.xskLost; delta > 0 {
		q.xskLost = lost
		q.lostInQueue += delta
		q.dp.AddReleased(delta)
	}
	return nil
}

// Stats is a snapshot of the hold queue.
type Stats struct {
	Held     int
	Acked    uint64
	Released uint64
	// Lost counts frames counted as held that never made it out: refused
	// by the kernel on the way into the hold socket or out of the release
	// socket.
	Lost uint64
	// Discarded counts frames dropped unsent because the copy that
	// produced them stopped serving (Discard).
	Discarded uint64
	Latency   datapath.LatencyHistogram
}

// Stats returns a snapshot.
func (q *HoldQueue) Stats() Stats {
	q.mu.Lock()
	defer q.mu.Unlock()
	return Stats{Held: len(q.held), Acked: q.acked.Load(), Released: q.released, Lost: q.lostInQueue, Discarded: q.discarded, Latency: q.latency}
}

// Recent returns the last frames released (up to recentReleased) that
// arrived at or after sinceNs, oldest first.
func (q *HoldQueue) Recent(sinceNs uint64) []ReleasedFrame {
	q.mu.Lock()
	defer q.mu.Unlock()
	var out []ReleasedFrame
	for i := q.recentN - min(q.recentN, recentReleased); i < q.recentN; i++ {
		if f := q.recent[i%recentReleased]; f.ArrivalNs >= sinceNs {
			out = append(out, f)
		}
	}
	return out
}

func monotonicNs() uint64 { return datapath.MonotonicNs() }
