package main

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/errgroup"

	"github.com/ftgw/ftgw/pkg/datapath"
	"github.com/ftgw/ftgw/pkg/lockstep"
	"github.com/ftgw/ftgw/pkg/protect"
	"github.com/ftgw/ftgw/pkg/replay"
	"github.com/ftgw/ftgw/pkg/vip"
)

// recordedVM is the engine of a real VM under QEMU record/replay. Its
// input log is the recorder's replay log, which carries the VM's input
// itself: it comes out of QEMU (run), is shipped in chunks numbered from 1
// on the log channel, and the data path's stamps are byte offsets in it
// (chunkIndex maps one to the other). A standby's QEMU replays the chunks
// as they arrive (qemuVM.Feed); a copy is rebuilt from a snapshot of the
// running recorder (snapshot, install). The primary pauses its VM while
// the standby's replay trails by more than max_lag (throttle).
type recordedVM struct {
	d *daemon
	// logs carries each recorder's log stream from the copy that records
	// to run.
	logs chan recorderLog

	// logMu orders taking the VM's log (run) against a re-protection,
	// which sends the log since its snapshot from recent and then turns
	// shipping on: no chunk is shipped twice or skipped.
	logMu    sync.Mutex
	lastRead atomic.Uint64 // the byte offset the log has been read up to
	recent   recentLog
	chunks   chunkIndex
	// shipFrom: the log position a new secondary's log starts at; the
	// part of a chunk before it is the snapshot's, not sent.
	shipFrom uint64

	// replayLag is how far the secondary's replay trails, in ns. A
	// secondary measures it in guest time against the log it has
	// received; a primary in its VM's running time (lagClock) from the
	// icount its secondary reports (peerReplayed), and pauses the VM
	// (throttles) while it exceeds the bound.
	replayLag       atomic.Int64
	lagClock        *lagClock
	peerReplayed    atomic.Uint64
	hasPeerProgress atomic.Bool
	throttles       atomic.Uint64
	// frozen: a switchover froze the VM; the throttle keeps off.
	frozen atomic.Bool

	// For `ftgw bench`'s breakdown of a request (reqtrace.go): the
	// recorders' tap timestamps (nil if it could not be made) and the
	// shipped chunks' times.
	trace      *rrTrace
	chunkTimes chunkTimes
}

func newRecordedVM(d *daemon) *recordedVM {
	e := &recordedVM{d: d, logs: make(chan recorderLog, 2), lagClock: newLagClock()}
	var err error
	if e.trace, err = newRRTrace(); err != nil {
		d.log.Warn("no request trace", "err", err)
	}
	return e
}

// copy is the QEMU running the VM on this host, or nil.
func (e *recordedVM) copy() *qemuVM {
	q, _ := e.d.currentCopy().(*qemuVM)
	return q
}

func (e *recordedVM) newCopy() *qemuVM {
	q := newQEMUVM(e.d.vm, e.d.cfg.StateDir, e.d.dp, e.logs, e.d.log)
	q.trace.Store(e.trace)
	return q
}

// run reads the log, and, whichever role the host has, reports a
// secondary's replay and throttles a primary's VM on the reports: each does
// nothing while the host has the other role.
func (e *recordedVM) run(ctx context.Context) error {
	g, ctx := errgroup.WithContext(ctx)
	g.Go(func() error { return e.readLog(ctx) })
	g.Go(func() error { return e.reportReplayProgress(ctx) })
	g.Go(func() error { return e.throttle(ctx) })
	return g.Wait()
}

// boot starts QEMU from the VM's boot, recording or replaying. A recorder
// is not waited for: the boot's log must be read (and shipped) meanwhile,
// or QEMU blocks on its full pipe; its outputs are dropped until the host
// is published active.
func (e *recordedVM) boot(ctx context.Context, record bool) error {
	q := e.newCopy()
	start := func() error { return q.StartReplay(ctx, nil) }
	if record {
		start = func() error { return q.StartRecord(ctx) }
	}
	if err := start(); err != nil {
		q.Stop()
		return fmt.Errorf("start vm %s: %w", e.d.vm.Name, err)
	}
	e.d.superviseCopy(q)
	return nil
}

func (e *recordedVM) drop() {
	e.d.stopCopy()
	e.frozen.Store(false) // a switchover's freeze ends with its copy
}

func (e *recordedVM) follow(cfg *lockstep.SecondaryConfig) error {
	cfg.OnLog = func(pos uint64, chunk []byte) error {
		q := e.copy()
		if q == nil {
			return fmt.Errorf("feed replay: no replayer: %w", errCopyCannotTake)
		}
		if err := q.Feed(chunk); err != nil {
			// The relay takes whatever arrives; an error is a replay
			// that has failed.
			return fmt.Errorf("%w: %w", errCopyCannotTake, err)
		}
		return nil
	}
	return nil
}

// tookIn: a replaying copy takes in, when it goes live, all it received; a
// recorder has taken in what its log holds.
func (e *recordedVM) tookIn(pos uint64) (bool, error) {
	if q := e.copy(); q != nil && q.replaying() {
		return true, nil
	}
	return e.lastRead.Load() >= pos, nil
}

// goLive: the replayer must first reach the end of the log and become a
// running VM: until then nothing serves the VM's clients.
func (e *recordedVM) goLive(ctx context.Context, received uint64) (time.Duration, error) {
	q := e.copy()
	if q == nil {
		return 0, errors.New("go live: no replayer runs here")
	}
	return q.GoLive(ctx)
}

// freeze: a real VM never sits still by itself (its recorder logs clock
// checkpoints while idle): a switchover freezes it, so that its log ends.
func (e *recordedVM) freeze(frozen bool) error {
	q := e.copy()
	if q == nil {
		return errors.New("no vm runs here")
	}
	if frozen {
		e.frozen.Store(true)
		if err := q.Pause(true); err != nil {
			e.frozen.Store(false)
			return err
		}
		return nil
	}
	err := q.Pause(false)
	e.frozen.Store(false)
	return err
}

// newChannel: chunk numbers go on from the last channel's, so the commit
// latency clock never goes back.
func (e *recordedVM) newChannel() uint64 {
	e.hasPeerProgress.Store(false) // a new secondary's replay is not the old one's
	if old := e.d.primary(); old != nil {
		return old.Head()
	}
	return 0
}

// ackedStamp: the byte offset the acknowledged chunk ends at.
func (e *recordedVM) ackedStamp(pos uint64) uint64 {
	e.chunkTimes.ack(pos)
	return e.chunks.acked(pos)
}

func (e *recordedVM) peerProgress(replayed uint64) {
	e.peerReplayed.Store(replayed)
	e.hasPeerProgress.Store(true)
}

// peerCaughtUp: a new secondary must also have replayed to within max_lag,
// or a failover would first replay the backlog.
func (e *recordedVM) peerCaughtUp() (bool, uint64) {
	lag, ok := e.peerLag()
	return ok && lag <= e.d.vm.QEMU.MaxLag, e.peerReplayed.Load()
}

func (e *recordedVM) status(s *Status) {
	if q := e.copy(); q != nil {
		s.Replay = q.progress()
	}
	if rp := s.Reprotect; rp != nil && rp.Error == "" {
		if lag, ok := e.peerLag(); ok {
			rp.ReplayLagSeconds = lag.Seconds()
		}
	}
}

// replayMaxLag is qemu.max_lag as a metric, so that an alert compares
// the replay lag with each VM's own bound instead of a copy of it.
var replayMaxLag = prometheus.NewDesc("ftgw_replay_max_lag_seconds",
	"Real VMs: qemu.max_lag, the replay lag beyond which the primary pauses its VM.", []string{"vm"}, nil)

func (e *recordedVM) collect(c *collector, ch chan<- prometheus.Metric) {
	vm := e.d.vm.Name
	ch <- prometheus.MustNewConstMetric(c.replayLag, prometheus.GaugeValue, time.Duration(e.replayLag.Load()).Seconds(), vm)
	ch <- prometheus.MustNewConstMetric(replayMaxLag, prometheus.GaugeValue, e.d.vm.QEMU.MaxLag.Seconds(), vm)
	ch <- prometheus.MustNewConstMetric(c.throttles, prometheus.CounterValue, float64(e.throttles.Load()), vm)
	ch <- prometheus.MustNewConstMetric(c.throttled, prometheus.CounterValue, e.lagClock.frozenFor().Seconds(), vm)
}

func (e *recordedVM) dataPathLogs() bool { return false }

func (e *recordedVM) close() error { return nil }

// readLog ships each recorder's replay log as it comes out of QEMU, in
// chunks of whatever the pipe holds: a protected primary ships them, any
// other host only drains the pipe so that QEMU never blocks on it.
func (e *recordedVM) readLog(ctx context.Context) error {
	buf := make([]byte, lockstep.MaxPayload)
	for {
		var stream recorderLog
		select {
		case <-ctx.Done():
			return nil
		case stream = <-e.logs:
		}
		e.logMu.Lock()
		e.lastRead.Store(stream.base)
		e.recent.restart(stream.base)
		e.shipFrom = 0
		e.logMu.Unlock()
		// How far the VM has run, and when, for the throttle: the log is
		// flushed before every transmit and every 4 KiB, so it trails
		// the VM by little.
		e.lagClock.restart(stream.icount)
		for {
			n, err := stream.r.Read(buf)
			if n > 0 {
				e.lagClock.logged(stream.icount + e.shipChunk(buf[:n], datapath.MonotonicNs()))
			}
			if err != nil {
				// EOF or a closed pipe: that QEMU is gone; the engine
				// reports why, and a go-live sends the next stream.
				if !errors.Is(err, io.EOF) && !errors.Is(err, os.ErrClosed) {
					e.d.log.Warn("read replay log", "err", err)
				}
				break
			}
		}
	}
}

// shipChunk ships the next chunk of the VM's log if there is a secondary,
// and keeps it in the recent log. It returns the icount the log has
// reached since its recorder started. readNs is when it was read.
func (e *recordedVM) shipChunk(chunk []byte, readNs uint64) (icount uint64) {
	d := e.d
	e.logMu.Lock()
	defer e.logMu.Unlock()
	end := e.lastRead.Add(uint64(len(chunk)))
	send := chunk
	if cut := e.shipFrom; end-uint64(len(chunk)) < cut {
		// Log from before a new secondary's snapshot, which QEMU had
		// not flushed when it saved it.
		send = chunk[min(uint64(len(chunk)), cut-(end-uint64(len(chunk)))):]
	}
	if d.shipping.Load() && len(send) > 0 {
		pos := e.queueChunk(end)
		if err := d.primary().QueueLog(pos, send); err != nil {
			d.logCannotCarry(pos, err)
		} else {
			d.primary().Flush()
			e.chunkTimes.shipped(pos, end, readNs)
		}
	}
	// After the send: a reply held for this chunk does not wait for the
	// scan.
	e.recent.append(chunk)
	return e.recent.icount()
}

// queueChunk numbers the next chunk of log, which ends at byte offset end.
func (e *recordedVM) queueChunk(end uint64) (pos uint64) {
	pos = e.chunks.add(end)
	e.d.ackClock.append(pos)
	return pos
}

// chunkIndex maps the log channel's positions (one per chunk of replay log)
// to the byte offsets the chunks end at, which is what the data path's
// stamps are, for the chunks not yet acknowledged.
type chunkIndex struct {
	mu   sync.Mutex
	next uint64   // position of ends[0]
	ends []uint64 // byte offset after each unacknowledged chunk
	last uint64   // byte offset after the last acknowledged chunk
}

// restart numbers chunks from position head+1 on, for a new secondary, with
// the log up to byte offset acked taken as acknowledged.
func (c *chunkIndex) restart(head, acked uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.next, c.ends, c.last = head+1, nil, acked
}

// add records a chunk ending at byte offset end and returns its position.
func (c *chunkIndex) add(end uint64) uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.next == 0 {
		c.next = 1
	}
	c.ends = append(c.ends, end)
	return c.next + uint64(len(c.ends)) - 1
}

// acked forgets the chunks up to position pos and returns the byte offset
// the log is acknowledged to.
func (c *chunkIndex) acked(pos uint64) uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	if pos >= c.next && c.next != 0 {
		n := min(pos-c.next+1, uint64(len(c.ends)))
		if n > 0 {
			c.last = c.ends[n-1]
			c.ends = c.ends[:copy(c.ends, c.ends[n:])]
			c.next += n
		}
	}
	return c.last
}

// reportReplayProgress tells the primary, with every heartbeat, how far
// this secondary's replay has got, and keeps the secondary's own lag metric
// (the log received that is not replayed yet).
func (e *recordedVM) reportReplayProgress(ctx context.Context) error {
	d := e.d
	tick := time.NewTicker(d.cfg.Heartbeat)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
		q := e.copy()
		if q == nil {
			continue
		}
		if lag, replayed, ok := q.ReplayLag(); ok && d.secondary() != nil {
			e.replayLag.Store(int64(lag))
			d.secondary().SetProgress(replayed)
		}
	}
}

// throttle pauses the primary's VM while its secondary's replay trails by
// more than max_lag, and lets it run again once the lag is half that: a
// secondary that falls behind without bound would take as long to go live.
//
// The lag is how long the VM has run since its log reached the instruction
// count the secondary last reported replaying (lagClock). That covers all
// the log not yet replayed, wherever it is (the network, the relay, the
// FIFO), and a late report can only make the lag look larger: the throttle
// errs towards pausing early, never late. The count is read from the log,
// not over QMP: each QMP command wakes the recorder's main loop, which logs
// a clock checkpoint that the replayer must then take too.
func (e *recordedVM) throttle(ctx context.Context) error {
	d := e.d
	maxLag := d.vm.QEMU.MaxLag
	tick := time.NewTicker(max(d.cfg.Heartbeat/2, time.Millisecond))
	defer tick.Stop()
	paused := false
	// A replay that stops moving while the VM is frozen has replayed all
	// it may: it is held short of the log's end (pkg/replay/hold.go), at
	// a point that can be a while before it in the VM's running time.
	// Frozen, the VM would never log what lets the replay on: thaw.
	stallAfter := 25 * d.cfg.Heartbeat
	var replayed uint64
	var moved time.Time
	var trend catchUpTrend
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
		if e.frozen.Load() {
			// The switchover froze the VM, and thaws it if it gives up.
			if paused {
				e.lagClock.thaw()
				paused = false
			}
			continue
		}
		if n := e.peerReplayed.Load(); n != replayed {
			replayed, moved = n, time.Now()
		}
		// No report (yet) from the secondary of this channel: a new one,
		// or none at all, is no reason to keep the VM frozen.
		lag, ok := e.peerLag()
		if ok {
			e.replayLag.Store(int64(lag))
		}
		q := e.copy()
		if q == nil {
			// The copy is gone, and with it a freeze.
			if paused {
				e.lagClock.thaw()
				paused = false
			}
			continue
		}
		// A new secondary is throttled too (snapshot): without it, one
		// whose replay is slower than the VM would trail for good. But it
		// starts behind by all the VM ran while it loaded the snapshot,
		// and one that catches up on its own (an idle or light guest)
		// needs no pause.
		catchingUp := false
		if ok && d.state() == protect.Reprotecting {
			catchingUp = trend.note(time.Now(), lag)
		} else {
			trend = catchUpTrend{}
		}
		switch {
		case !paused && ok && d.shipping.Load() && lag > maxLag && !catchingUp:
			if err := q.Pause(true); err != nil {
				d.log.Warn("throttle: pause the vm", "err", err)
				continue
			}
			e.lagClock.freeze()
			paused = true
			e.throttles.Add(1)
		case paused && (!ok || lag < maxLag/2 || !d.shipping.Load() || time.Since(moved) >= stallAfter):
			if err := q.Pause(false); err != nil {
				d.log.Warn("throttle: resume the vm", "err", err)
				continue
			}
			e.lagClock.thaw()
			paused = false
		}
	}
}

// catchUpTrend tells a new secondary that catches up from one that falls
// behind, over windows of catchUpWindow: catching up is shrinking the lag by
// at least a quarter of each window (replaying at 1.25 times the VM's pace
// or faster), so a lag of L is gone within 4L. The first window gets the
// benefit of the doubt.
type catchUpTrend struct {
	at        time.Time
	lag       time.Duration
	catchesUp bool
}

const catchUpWindow = 500 * time.Millisecond

// note takes a lag sample and reports whether the secondary catches up.
func (c *catchUpTrend) note(now time.Time, lag time.Duration) bool {
	switch {
	case c.at.IsZero():
		c.at, c.lag, c.catchesUp = now, lag, true
	case now.Sub(c.at) >= catchUpWindow:
		c.catchesUp = lag <= c.lag-now.Sub(c.at)/4
		c.at, c.lag = now, lag
	}
	return c.catchesUp
}

// peerLag is how far the secondary's replay trails this primary's VM, in
// the VM's running time (lagClock), from the secondary's last progress
// report; ok is false until there is one.
func (e *recordedVM) peerLag() (lag time.Duration, ok bool) {
	if !e.hasPeerProgress.Load() {
		return 0, false
	}
	return e.lagClock.behind(e.peerReplayed.Load()), true
}

// rebaseHeader says where a real VM's new secondary starts: from the
// survivor's recorder snapshot (its image follows the header), saved where
// the recorder had logged up to Icount, with the recorder's start-up events
// in front of its log (replay.NewRelayFromRecorderSnapshot). The log since
// the snapshot follows on the channel. The new secondary may not take over
// before it has the log up to TakeoverAfter: outputs up to there have left
// unprotected.
type rebaseHeader struct {
	Icount        uint64 `json:"icount"`
	Startup       []byte `json:"startup"`
	TakeoverAfter uint64 `json:"takeover_after"`
	// DiskBytes is the length of the VM's disk at the snapshot, which
	// ends the record; 0 for a VM without a disk.
	DiskBytes int `json:"disk_bytes,omitempty"`
}

// encodeRebaseSnapshot is a real VM's snapshot on the log channel: the
// header's length (u32, big-endian), the header in JSON, the image, then
// the disk (h.DiskBytes of it).
func encodeRebaseSnapshot(h rebaseHeader, image, disk []byte) ([]byte, error) {
	h.DiskBytes = len(disk)
	header, err := json.Marshal(h)
	if err != nil {
		return nil, err
	}
	out := binary.BigEndian.AppendUint32(make([]byte, 0, 4+len(header)+len(image)+len(disk)), uint32(len(header)))
	return append(append(append(out, header...), image...), disk...), nil
}

func decodeRebaseSnapshot(b []byte) (h rebaseHeader, image, disk []byte, err error) {
	if len(b) < 4 || uint64(binary.BigEndian.Uint32(b)) > uint64(len(b)-4) {
		return h, nil, nil, fmt.Errorf("real VM snapshot of %d bytes: no whole header", len(b))
	}
	n := binary.BigEndian.Uint32(b)
	if err := json.Unmarshal(b[4:4+n], &h); err != nil {
		return h, nil, nil, fmt.Errorf("real VM snapshot header: %w", err)
	}
	rest := b[4+n:]
	if h.DiskBytes < 0 || h.DiskBytes > len(rest) {
		return h, nil, nil, fmt.Errorf("real VM snapshot: a disk of %d bytes in %d bytes after the header", h.DiskBytes, len(rest))
	}
	image, disk = rest[:len(rest)-h.DiskBytes], rest[len(rest)-h.DiskBytes:]
	if len(image) == 0 || len(h.Startup) == 0 {
		return h, nil, nil, fmt.Errorf("real VM snapshot: %d bytes of image, %d of start-up log: both are needed", len(image), len(h.Startup))
	}
	if len(disk) == 0 {
		disk = nil
	}
	return h, image, disk, nil
}

// snapshot is a real VM survivor's half of a re-protection, run
// by the log channel p when a secondary that holds none of the log
// connects. It re-bases the new secondary on a snapshot of the running VM
// (pkg/replay/rebase.go), however long the VM ran alone:
//
//  1. The recorder saves the VM's state: the VM pauses for the savevm,
//     a fraction of a second.
//  2. A copy of the image is made loadable by a replayer, and says where
//     in the recorder's log the snapshot stands (S).
//  3. Under logMu, the log read so far (R) is known. The log from S goes
//     to the new secondary: what was read since S from the recent log now,
//     the rest as it is read (shipFrom cuts what was read before S).
//  4. Outputs stamped up to max(R, S) may leave: the snapshot and the log
//     sent with it hold their input, and the new secondary may not take
//     over before it has that log (TakeoverAfter). The Output Rule holds
//     for everything after.
func (e *recordedVM) snapshot(ctx context.Context, p *lockstep.Primary, rebase func(uint64) error) ([]byte, error) {
	d := e.d
	if from := d.state(); from != protect.Unprotected {
		// One re-protection per channel: a new secondary that lost its
		// connection meanwhile is given up on through the arbiter, and
		// the next channel starts afresh.
		return nil, fmt.Errorf("reprotect: this host is %s, not serving alone", from)
	}
	fail := func(err error) ([]byte, error) {
		err = fmt.Errorf("reprotect: %w", err)
		d.mu.Lock()
		d.reprotecting = &reprotectStatus{Error: err.Error()}
		d.mu.Unlock()
		return nil, err
	}
	q := e.copy()
	if q == nil {
		return fail(errors.New("no vm runs here"))
	}
	image, disk, snap, paused, err := q.SnapshotForReplayer(func(off int64) (clocks replay.Clocks, err error) {
		// QEMU may not have flushed the log up to its snapshot yet.
		err = waitUntil(ctx, 5*time.Second, "the recorder's log to reach its snapshot", func() (ok bool, err error) {
			e.logMu.Lock()
			defer e.logMu.Unlock()
			clocks, ok, err = e.recent.clocksAt(off)
			return ok, err
		})
		return clocks, err
	})
	if err != nil {
		return fail(err)
	}

	e.logMu.Lock()
	defer e.logMu.Unlock()
	base := e.recent.base
	startup, sinceSnapshot, err := e.recent.since(snap.LogOffset)
	if err != nil {
		return fail(err)
	}
	position := p.Head()
	h := rebaseHeader{Icount: snap.Icount, Startup: startup,
		TakeoverAfter: position + uint64((len(sinceSnapshot)+lockstep.MaxPayload-1)/lockstep.MaxPayload)}
	blob, err := encodeRebaseSnapshot(h, image, disk)
	if err == nil {
		err = rebase(position)
	}
	if err != nil {
		return nil, err
	}
	snapshotAt := base + uint64(snap.LogOffset)
	released := max(e.lastRead.Load(), snapshotAt)
	e.chunks.restart(position, released)
	e.shipFrom = released
	d.reprotectAt.Store(h.TakeoverAfter)
	// The Output Rule holds again from here, before the secondary is even
	// up: every output of input after what was released waits for its ack.
	d.gate.Ack(released)
	rec := d.owner.Current()
	rec.Role = vip.RoleActive
	if err := d.gate.Enforce(rec); err != nil {
		return nil, err
	}
	for off := 0; off < len(sinceSnapshot); off += lockstep.MaxPayload {
		chunk := sinceSnapshot[off:min(len(sinceSnapshot), off+lockstep.MaxPayload)]
		if err := p.QueueLog(e.queueChunk(snapshotAt+uint64(off+len(chunk))), chunk); err != nil {
			return nil, fmt.Errorf("reprotect: queue the log since the snapshot: %w", err)
		}
	}
	d.shipping.Store(true)
	d.fire(protect.PeerJoined)
	d.mu.Lock()
	d.reprotecting = &reprotectStatus{TakeoverAfter: h.TakeoverAfter, PausedSeconds: paused.Seconds(), ImageBytes: len(image), DiskBytes: len(disk)}
	d.mu.Unlock()
	d.log.Info("re-protecting from a snapshot of the running VM", "paused", paused, "image_bytes", len(image), "disk_bytes", len(disk),
		"snapshot_icount", snap.Icount, "snapshot_at", snapshotAt, "released", released, "position", position,
		"takeover_after", h.TakeoverAfter)
	return blob, nil
}

// install rebuilds this host's real VM from the owner's snapshot of its
// running VM (rebaseHeader), for the log channel s: a replayer that loads
// it and follows the owner's log from there, which arrives from pos+1.
func (e *recordedVM) install(s *lockstep.Secondary, pos uint64, state []byte) error {
	d := e.d
	h, image, disk, err := decodeRebaseSnapshot(state)
	if err != nil {
		return fmt.Errorf("install snapshot: %w", err)
	}
	from := d.state()
	if from != protect.Joining && from != protect.Standby || d.secondary() != s {
		return fmt.Errorf("install snapshot: this host is %s now", from)
	}
	d.stopCopy()
	path := filepath.Join(d.cfg.StateDir, d.vm.Name+"-restore.qcow2")
	if err := os.WriteFile(path, image, 0o600); err != nil {
		return fmt.Errorf("install snapshot: %w", err)
	}
	defer os.Remove(path)
	snap := &recorderSnapshot{image: path, startup: h.Startup,
		at: replay.RecorderSnapshot{Icount: h.Icount}}
	if disk != nil {
		snap.disk = filepath.Join(d.cfg.StateDir, d.vm.Name+"-restore-disk.qcow2")
		if err := os.WriteFile(snap.disk, disk, 0o600); err != nil {
			return fmt.Errorf("install snapshot: %w", err)
		}
		defer os.Remove(snap.disk)
	}
	d.takeoverAfter.Store(h.TakeoverAfter)
	q := e.newCopy()
	if err := q.StartReplay(d.runCtx, snap); err != nil {
		q.Stop()
		return fmt.Errorf("install snapshot: start vm %s: %w", d.vm.Name, err)
	}
	d.superviseCopy(q)
	_, err = d.life.FireIf(from, protect.SnapshotInstalled)
	if err == nil && d.secondary() != s {
		err = errors.New("a newer log channel replaced this one")
	}
	if err != nil {
		// The lifecycle moved on while QEMU started: this copy is not
		// the one to keep.
		d.stopCopy()
		return fmt.Errorf("install snapshot: %w", err)
	}
	d.log.Info("rebuilding the real VM from a snapshot of the owner's", "position", pos, "snapshot_icount", h.Icount,
		"image_bytes", len(image), "disk_bytes", len(disk), "takeover_after", h.TakeoverAfter)
	return nil
}
