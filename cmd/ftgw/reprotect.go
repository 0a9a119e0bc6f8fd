package main

import (
	"cmp"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/ftgw/ftgw/internal/lab"
	"github.com/ftgw/ftgw/pkg/guest"
	"github.com/ftgw/ftgw/pkg/lockstep"
	"github.com/ftgw/ftgw/pkg/protect"
	"github.com/ftgw/ftgw/pkg/replay"
	"github.com/ftgw/ftgw/pkg/vip"
)

// Re-protection gives a host that serves the VM alone a new secondary
// without stopping the VM. A host that serves alone dials its peer until a
// daemon there answers (seekSecondary): a host that restarted, or lost the
// VM to this one, waits for exactly that (rejoin). The survivor pauses input
// for a moment, takes its guest's state at log position P, restarts the log
// at P, turns the Output Rule back on and resumes; the state crosses the
// authenticated log channel with its SHA-256, the new secondary's VM starts
// from it and follows the log from P+1. Once it has acknowledged P the pair
// is protected.

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
}

// encodeRebaseSnapshot is a real VM's snapshot on the log channel: the
// header's length (u32, big-endian), the header in JSON, then the image.
func encodeRebaseSnapshot(h rebaseHeader, image []byte) ([]byte, error) {
	header, err := json.Marshal(h)
	if err != nil {
		return nil, err
	}
	out := binary.BigEndian.AppendUint32(make([]byte, 0, 4+len(header)+len(image)), uint32(len(header)))
	return append(append(out, header...), image...), nil
}

func decodeRebaseSnapshot(b []byte) (rebaseHeader, []byte, error) {
	var h rebaseHeader
	if len(b) < 4 || uint64(binary.BigEndian.Uint32(b)) > uint64(len(b)-4) {
		return h, nil, fmt.Errorf("real VM snapshot of %d bytes: no whole header", len(b))
	}
	n := binary.BigEndian.Uint32(b)
	if err := json.Unmarshal(b[4:4+n], &h); err != nil {
		return h, nil, fmt.Errorf("real VM snapshot header: %w", err)
	}
	image := b[4+n:]
	if len(image) == 0 || len(h.Startup) == 0 {
		return h, nil, fmt.Errorf("real VM snapshot: %d bytes of image, %d of start-up log: both are needed", len(image), len(h.Startup))
	}
	return h, image, nil
}

// consumedPosition is the log position the synthetic guest has reached.
func (d *daemon) consumedPosition() (uint64, error) {
	e, err := d.syntheticGuest()
	if err != nil {
		return 0, err
	}
	st, err := e.State()
	return st.Frames - d.inputBase.Load(), err
}

// seekSecondary lets this host, serving the VM alone, take the first
// secondary that joins: its log channel dials the peer until a daemon there
// answers, and rebuilds that daemon's VM from a snapshot.
func (d *daemon) seekSecondary() {
	if err := d.ensureHoldQueue(); err != nil {
		d.log.Error("seek a new secondary", "err", err)
		return
	}
	startHead := d.dp.Head()
	var p *lockstep.Primary
	snapshot := d.snapshotForNewSecondary
	if d.qemu != nil {
		// Chunk numbers go on from the last channel's, so the commit
		// latency clock never goes back.
		startHead = 0
		if old := d.primary(); old != nil {
			startHead = old.Head()
		}
		snapshot = func(ctx context.Context, rebase func(uint64) error) ([]byte, error) {
			return d.snapshotRecording(ctx, p, rebase)
		}
	}
	p, err := d.newPrimary(d.cfg.Peer.Address, startHead, snapshot)
	if err != nil {
		d.log.Error("seek a new secondary", "err", err)
		return
	}
	ctx := d.goChannel(p.Run)
	if d.qemu == nil {
		d.group.Go(func() error { return d.awaitProtection(ctx, p) })
	}
	d.log.Info("serving alone: waiting for a secondary to join", "peer", d.cfg.Peer.Address)
}

// lockLife takes the lifecycle's lock for a log channel's callback, but
// never against the channel being stopped by whoever holds it.
func (d *daemon) lockLife(ctx context.Context) error {
	for !d.lifeMu.TryLock() {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		time.Sleep(time.Millisecond)
	}
	return nil
}

// snapshotForNewSecondary is the survivor's half of a re-protection, run
// by the log channel when a secondary that holds none of the log connects.
// The VM never pauses:
//
//  1. From the last log position read, X, every frame is queued for the new
//     secondary and every output of input after X waits for its ack: the
//     Output Rule is on again.
//  2. Once the guest has consumed X, its state is taken at whatever
//     position P >= X it has reached (the guest answers between frames).
//  3. The log restarts at P (rebase): the frames queued after P follow the
//     state. Outputs stamped up to P may leave: the state holds their
//     input, and no copy that lacks it can take over (this host was alone
//     until now, and the new one is not caught up).
func (d *daemon) snapshotForNewSecondary(ctx context.Context, rebase func(uint64) error) ([]byte, error) {
	if err := d.lockLife(ctx); err != nil {
		return nil, err
	}
	defer d.lifeMu.Unlock()
	from := d.state()
	if from != protect.Unprotected && from != protect.Reprotecting {
		return nil, fmt.Errorf("reprotect: this host is %s, not serving", from)
	}
	start := time.Now()
	rec := d.owner.Current()

	d.logMu.Lock() // readLog takes no frame meanwhile: none falls between
	queuedFrom := d.lastRead.Load()
	err := rebase(queuedFrom)
	if err == nil {
		d.shipping.Store(true)
	}
	d.logMu.Unlock()
	if err != nil {
		return nil, err
	}
	// The log up to X needs no ack: this host served it alone.
	d.gate.Ack(queuedFrom)
	if err := d.gate.Enforce(rec); err != nil {
		return nil, err
	}
	if from == protect.Unprotected {
		d.fire(protect.PeerJoined)
	}

	var state guest.State
	err = waitUntil(ctx, 5*time.Second, "the guest to consume the log", func() (bool, error) {
		consumed, err := d.consumedPosition()
		return consumed >= queuedFrom, err
	})
	if err == nil {
		var e *syntheticEngine
		if e, err = d.syntheticGuest(); err == nil {
			state, err = e.State()
		}
	}
	var raw []byte
	if err == nil {
		raw, err = json.Marshal(state)
	}
	position := state.Frames - d.inputBase.Load()
	if err == nil {
		// The guest may have consumed frames the log reader has not
		// taken from the ring yet: they must be queued before the log
		// can restart after them.
		err = waitUntil(ctx, 5*time.Second, "the log reader to reach the snapshot", func() (bool, error) {
			return d.lastRead.Load() >= position, nil
		})
	}
	if err == nil {
		err = rebase(position)
	}
	if err != nil {
		// The Output Rule stays on: the channel tries again, or the
		// re-protection is abandoned through the arbiter.
		return nil, err
	}
	d.reprotectAt.Store(position)
	d.gate.Ack(position)
	d.mu.Lock()
	d.reprotecting = &reprotectStatus{TakeoverAfter: position}
	d.mu.Unlock()
	d.log.Info("re-protecting: snapshot taken, the VM never paused", "queued_from", queuedFrom, "position", position,
		"bytes", len(raw), "took", time.Since(start))
	return raw, nil
}

// snapshotRecording is a real VM survivor's half of a re-protection, run
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
func (d *daemon) snapshotRecording(ctx context.Context, p *lockstep.Primary, rebase func(uint64) error) ([]byte, error) {
	if err := d.lockLife(ctx); err != nil {
		return nil, err
	}
	defer d.lifeMu.Unlock()
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
	image, snap, paused, err := d.qemu.SnapshotForReplayer(func(off int64) (clocks replay.Clocks, err error) {
		// QEMU may not have flushed the log up to its snapshot yet.
		err = waitUntil(ctx, 5*time.Second, "the recorder's log to reach its snapshot", func() (ok bool, err error) {
			d.logMu.Lock()
			defer d.logMu.Unlock()
			clocks, ok, err = d.recent.clocksAt(off)
			return ok, err
		})
		return clocks, err
	})
	if err != nil {
		return fail(err)
	}

	d.logMu.Lock()
	defer d.logMu.Unlock()
	base := d.recent.base
	startup, sinceSnapshot, err := d.recent.since(snap.LogOffset)
	if err != nil {
		return fail(err)
	}
	position := p.Head()
	h := rebaseHeader{Icount: snap.Icount, Startup: startup,
		TakeoverAfter: position + uint64((len(sinceSnapshot)+lockstep.MaxPayload-1)/lockstep.MaxPayload)}
	blob, err := encodeRebaseSnapshot(h, image)
	if err == nil {
		err = rebase(position)
	}
	if err != nil {
		return nil, err
	}
	snapshotAt := base + uint64(snap.LogOffset)
	released := max(d.lastRead.Load(), snapshotAt)
	d.chunks.restart(position, released)
	d.shipFrom = released
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
		if err := p.QueueLog(d.queueChunk(snapshotAt+uint64(off+len(chunk))), chunk); err != nil {
			return nil, fmt.Errorf("reprotect: queue the log since the snapshot: %w", err)
		}
	}
	d.shipping.Store(true)
	d.fire(protect.PeerJoined)
	d.mu.Lock()
	d.reprotecting = &reprotectStatus{TakeoverAfter: h.TakeoverAfter, PausedSeconds: paused.Seconds(), ImageBytes: len(image)}
	d.mu.Unlock()
	d.group.Go(func() error { return d.awaitProtection(ctx, p) })
	d.log.Info("re-protecting from a snapshot of the running VM", "paused", paused, "image_bytes", len(image),
		"snapshot_icount", snap.Icount, "snapshot_at", snapshotAt, "released", released, "position", position,
		"takeover_after", h.TakeoverAfter)
	return blob, nil
}

// reprotectTimeout bounds how long output may wait for a new secondary
// that does not come, or stops making progress.
const reprotectTimeout = 10 * time.Second

// awaitProtection declares the pair protected once the new secondary on
// channel p holds the log up to the position it was rebuilt at
// (reprotectAt): from then on its copy of the VM can take over, and losing
// it is a failure to handle. A replayed VM's new secondary must also have
// replayed to within max_lag, or a failover would first replay the
// backlog. A new secondary that stops making progress
// is given up on through the arbiter (protect.ReprotectFailed): it may
// already count as the VM's copy, so serving alone again at the same epoch
// could make two hosts serve.
func (d *daemon) awaitProtection(ctx context.Context, p *lockstep.Primary) error {
	deadline := time.Now().Add(reprotectTimeout)
	var lastAcked, lastReplayed, lastPosition uint64
	for ctx.Err() == nil {
		switch d.state() {
		case protect.Unprotected:
			// Waiting for a secondary to join: as long as it takes.
			time.Sleep(5 * time.Millisecond)
			continue
		case protect.Reprotecting:
		default:
			return nil
		}
		position := d.reprotectAt.Load()
		acked, replayed := p.Acked(), d.peerReplayed.Load()
		if acked != lastAcked || replayed != lastReplayed || position != lastPosition {
			lastAcked, lastReplayed, lastPosition = acked, replayed, position
			deadline = time.Now().Add(reprotectTimeout)
		}
		ready := p.Synced() && acked >= position
		if d.lagClock != nil {
			lag, ok := d.peerLag()
			ready = ready && ok && lag <= d.vm.QEMU.MaxLag
		}
		if ready {
			if _, err := d.life.FireIf(protect.Reprotecting, protect.PeerCaughtUp); err != nil {
				continue
			}
			d.mu.Lock()
			d.lastReprotect, d.reprotecting = d.reprotecting, nil
			d.mu.Unlock()
			d.log.Info("re-protected", "position", position, "unprotected_total", d.life.AloneFor())
			return nil
		}
		if time.Now().After(deadline) {
			failed := fmt.Errorf("the new secondary made no progress for %s", reprotectTimeout)
			d.log.Error("re-protection abandoned", "err", failed)
			d.mu.Lock()
			d.reprotecting = &reprotectStatus{TakeoverAfter: position, Error: failed.Error()}
			d.mu.Unlock()
			d.logMu.Lock()
			d.shipping.Store(false)
			d.logMu.Unlock()
			d.arbitrate(d.runCtx, protect.Reprotecting, protect.ReprotectFailed, causeSecondaryLost, 0)
			return nil
		}
		time.Sleep(time.Millisecond)
	}
	return nil
}

// labReprotect builds a new secondary for the lab host that serves the VM
// alone, on the other host, and waits until the pair is protected.
func labReprotect(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("lab reprotect", flag.ContinueOnError)
	dir := fs.String("dir", defaultLabDir, "the lab's directory")
	if err := fs.Parse(args); err != nil {
		return err
	}
	r, err := reprotect(ctx, *dir)
	if err != nil {
		return err
	}
	fmt.Printf("re-protected: %s follows %s from log position %d (epoch %d) after %s; %s served the VM alone for %.3fs in all\n",
		r.secondary, r.survivor, r.position, r.epoch, r.took.Round(100*time.Microsecond), r.survivor, r.unprotected)
	if r.imageBytes > 0 {
		fmt.Printf("the VM paused %.3fs while its state (%d bytes) was saved for the new secondary\n", r.pausedSeconds, r.imageBytes)
	}
	return nil
}

type reprotection struct {
	survivor, secondary string
	position, epoch     uint64
	took                time.Duration
	unprotected         float64 // seconds the survivor has served alone, in all
	// A real VM: how long it paused for its snapshot, and the image size.
	pausedSeconds float64
	imageBytes    int
}

func reprotect(ctx context.Context, dir string) (r reprotection, err error) {
	var survivor, other lab.Host
	for i, host := range lab.Hosts[:2] {
		if s, err := daemonStatus(dir, host.NS); err == nil && (s.State == protect.Unprotected.String() || s.State == protect.Reprotecting.String()) {
			survivor, other = host, lab.Hosts[1-i]
		}
	}
	if survivor.NS == "" {
		return r, errors.New("no lab host serves the VM alone: nothing to re-protect")
	}
	r.survivor, r.secondary = survivor.NS, other.NS
	// Whatever is left of the other host's daemon and VM goes; its daemon
	// starts again as it was, joins the survivor and is rebuilt.
	if err := lab.Crash(other.NS); err != nil {
		return r, err
	}
	time.Sleep(100 * time.Millisecond)
	cfg, err := loadConfig(filepath.Join(hostDir(dir, other.NS), "ftgw.yaml"))
	if err != nil {
		return r, err
	}
	start := time.Now()
	if err := startDaemon(ctx, dir, other.NS, cfg); err != nil {
		return r, err
	}
	// A real VM's new secondary starts QEMU, loads the snapshot and
	// replays to within max_lag first.
	realVM := cfg.VMs[0].Engine == engineQEMU
	timeout := 10 * time.Second
	if realVM {
		timeout = 2 * time.Minute
	}
	var s Status
	lastReport := time.Now()
	err = waitUntil(ctx, timeout, "the pair to be protected", func() (bool, error) {
		s, err = daemonStatus(dir, survivor.NS)
		if rp := cmp.Or(s.Reprotect, s.LastReprotect); err == nil && rp != nil {
			r.position, r.pausedSeconds, r.imageBytes = rp.TakeoverAfter, rp.PausedSeconds, rp.ImageBytes
		}
		switch {
		case err != nil:
			return false, err
		case s.State == protect.Protected.String():
			return true, nil
		case realVM && s.Reprotect != nil && s.Reprotect.Error != "":
			return false, fmt.Errorf("%s gave up: %s", survivor.NS, s.Reprotect.Error)
		case s.State != protect.Unprotected.String() && s.State != protect.Reprotecting.String() && s.State != protect.Arbitrating.String():
			return false, fmt.Errorf("%s is %s", survivor.NS, s.State)
		}
		if rp := s.Reprotect; rp != nil && time.Since(lastReport) >= 5*time.Second {
			lastReport = time.Now()
			fmt.Fprintf(os.Stderr, "re-protecting: %s acked log position %d of %d, replay lag %.1fs\n",
				other.NS, rp.Acked, rp.TakeoverAfter, rp.ReplayLagSeconds)
		}
		return false, nil
	})
	r.took, r.unprotected, r.epoch = time.Since(start), s.UnprotectedSeconds, s.Epoch
	return r, err
}
