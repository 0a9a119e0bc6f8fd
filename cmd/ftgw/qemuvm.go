package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ftgw/ftgw/internal/tap"
	"github.com/ftgw/ftgw/pkg/datapath"
	"github.com/ftgw/ftgw/pkg/replay"
)

// preloadName is the library QEMU records with (preload/ftgw-rr.c).
const preloadName = "ftgw-rr.so"

// vmSnapshot is the tag of the VM state in the VM's image: a promoted
// secondary saves it from its replay and restarts from it; a recorder saves
// it for a new secondary (SnapshotForReplayer). One tag, so that each save
// replaces the last and the image does not grow.
const vmSnapshot = "ftgw"

// qemuVM is one copy of the VM under QEMU record/replay (recordedVM starts
// one per copy).
//
// On the primary QEMU records; its replay log, which carries the VM's input
// itself, goes to logs, and recordedVM ships it. On the secondary QEMU
// replays what the log channel delivers (Feed) through a Relay, held by
// replay-break just short of what has arrived. Going live (GoLive) replays
// to the end of the log, saves the VM and restarts it as a recorder: QEMU
// cannot leave replay mode in place.
type qemuVM struct {
	vm  VMConfig
	dir string
	dp  *datapath.Datapath
	log *slog.Logger

	// logs takes each recorder's log stream, in order: one at start on
	// a primary, one after go-live on a promoted secondary. It is the
	// engine's, and outlives the copy.
	logs chan<- recorderLog

	mu      sync.Mutex
	qemu    *replay.QEMU
	relay   *replay.Relay
	follow  context.CancelFunc // ends the replay controller
	swapped chan struct{}      // closed and replaced when qemu changes

	replayedIcount atomic.Uint64 // the replayer's icount, last read
	done           chan struct{} // closed when the engine ends
	err            error
	end            sync.Once
	stopping       atomic.Bool
	// trace is where a recorder notes its tap timestamps (the engine's,
	// reqtrace.go); nil: nowhere.
	trace atomic.Pointer[rrTrace]
}

func newQEMUVM(vm VMConfig, stateDir string, dp *datapath.Datapath, logs chan<- recorderLog, log *slog.Logger) *qemuVM {
	return &qemuVM{
		vm: vm, dir: filepath.Join(stateDir, vm.Name+"-qemu"), dp: dp, log: log.With("engine", "qemu"),
		logs: logs, swapped: make(chan struct{}), done: make(chan struct{}),
	}
}

func (e *qemuVM) machine() replay.Machine { return vmMachine(e.vm) }

// vmMachine is the machine vm's copies run, recorder and replayer alike.
func vmMachine(vm VMConfig) replay.Machine {
	q := vm.QEMU
	return replay.Machine{Kernel: q.Kernel, Initrd: q.Initrd, Cmdline: q.Cmdline, MemoryMB: q.MemoryMB,
		MAC: vm.hwAddr(), Disk: q.Disk != ""}
}

// bootDisk gives this copy, which boots the VM, its own disk: a fresh copy
// of the configured image, as the other host's copy boots from one. A disk
// left in the VM's directory by an earlier life is kept beside it, never
// overwritten: it may hold the only copy of what that VM wrote.
func (e *qemuVM) bootDisk() error {
	if e.vm.QEMU.Disk == "" {
		return nil
	}
	if err := os.MkdirAll(e.dir, 0o755); err != nil {
		return err
	}
	disk := replay.DiskPath(e.dir)
	if _, err := os.Stat(disk); err == nil {
		old := fmt.Sprintf("%s.%s", disk, time.Now().UTC().Format("20060102T150405Z"))
		if err := os.Rename(disk, old); err != nil {
			return err
		}
		e.log.Warn("the VM boots afresh from its image; the disk of its earlier life is kept", "kept", old)
	}
	return replay.CopyDisk(e.vm.QEMU.Disk, disk)
}

// StartRecord boots the VM as a recorder. It does not wait for the guest:
// the boot's log must be read (and shipped) meanwhile, or QEMU blocks on its
// full pipe.
func (e *qemuVM) StartRecord(ctx context.Context) error {
	if err := e.bootDisk(); err != nil {
		return fmt.Errorf("boot: %w", err)
	}
	return e.startRecorder(ctx, "", 0, 0)
}

// recorderLog is one recorder's replay log stream: the log position (byte
// offset) it starts at, and the guest instruction count it starts at (0 at
// boot).
type recorderLog struct {
	r      io.Reader
	base   uint64
	icount uint64
}

// startRecorder starts a recording QEMU from boot or from a snapshot taken
// at guest instruction count icount, with the log's positions continuing
// at base.
func (e *qemuVM) startRecorder(ctx context.Context, loadvm string, base, icount uint64) error {
	t, err := tap.Open(e.vm.Tap)
	if err != nil {
		return err
	}
	defer t.Close() // QEMU holds its own copy
	state, err := e.dp.StateFile()
	if err != nil {
		return err
	}
	defer state.Close()
	cfg := replay.Config{
		Machine: e.machine(), Mode: replay.Record, Dir: e.dir, Tap: t.File(),
		Preload: e.vm.QEMU.Preload, State: state, LogBase: base, LoadVM: loadvm,
	}
	if tr := e.trace.Load(); tr != nil {
		cfg.Trace = tr.File()
	}
	q, err := replay.Start(ctx, cfg)
	if err != nil {
		return err
	}
	e.setQEMU(q)
	e.logs <- recorderLog{r: q.Log(), base: base, icount: icount}
	e.log.Info("recording", "pid", q.Pid(), "loadvm", loadvm, "log_base", base)
	return nil
}

// recorderSnapshot is where a new secondary's replayer starts: the image
// holding a recorder's snapshot (vmSnapshot), prepared for a replayer, the
// VM's disk at that snapshot (if it has one), the recorder's start-up
// events, and where the snapshot stands in its log.
type recorderSnapshot struct {
	image   string
	disk    string
	startup []byte
	at      replay.RecorderSnapshot
}

// StartReplay starts the replayer; it runs as the log arrives through Feed.
// It boots the VM, or, given from, loads a recorder's snapshot and follows
// that recorder's log from it (re-protection).
func (e *qemuVM) StartReplay(ctx context.Context, from *recorderSnapshot) error {
	if err := os.MkdirAll(e.dir, 0o755); err != nil {
		return err
	}
	loadvm := ""
	if from != nil {
		if err := copyFile(from.image, replay.VMStatePath(e.dir)); err != nil {
			return fmt.Errorf("restore %s: %w", from.image, err)
		}
		if e.vm.QEMU.Disk != "" {
			if from.disk == "" {
				return errors.New("restore: the snapshot has no disk, and the VM has one")
			}
			if err := copyFile(from.disk, replay.DiskPath(e.dir)); err != nil {
				return fmt.Errorf("restore %s: %w", from.disk, err)
			}
		}
		loadvm = vmSnapshot
	} else if err := e.bootDisk(); err != nil {
		return fmt.Errorf("boot: %w", err)
	}
	fifo := filepath.Join(e.dir, "replay.fifo")
	os.Remove(fifo)
	if err := replay.MakeFIFO(fifo); err != nil {
		return err
	}
	t, err := tap.Open(e.vm.Tap)
	if err != nil {
		return err
	}
	// QEMU opens the FIFO first thing, and opens QMP only once the log
	// flows: it starts in the background while the relay opens the FIFO.
	type started struct {
		q   *replay.QEMU
		err error
	}
	ready := make(chan started, 1)
	qctx, cancel := context.WithCancel(ctx)
	go func() {
		defer t.Close()
		q, err := replay.Start(qctx, replay.Config{Machine: e.machine(), Mode: replay.Replay, Dir: e.dir, Tap: t.File(), LogFIFO: fifo, LoadVM: loadvm})
		ready <- started{q, err}
	}()
	octx, ocancel := context.WithTimeout(ctx, 30*time.Second)
	w, err := replay.OpenFIFOWriter(octx, fifo)
	ocancel()
	if err != nil {
		cancel()
		return err
	}
	var relay *replay.Relay
	if from == nil {
		relay = replay.NewRelay(w, replay.StreamFraming)
	} else if relay, err = replay.NewRelayFromRecorderSnapshot(w, from.startup, from.at); err != nil {
		cancel()
		w.Close()
		return err
	}
	e.mu.Lock()
	e.relay = relay
	e.mu.Unlock()
	go func() {
		s := <-ready
		if s.err != nil {
			if !e.stopping.Load() {
				e.finish(fmt.Errorf("start replay: %w", s.err))
			}
			return
		}
		e.setQEMU(s.q)
		e.log.Info("replaying", "pid", s.q.Pid(), "loadvm", loadvm)
		fctx, fcancel := context.WithCancel(qctx)
		e.mu.Lock()
		e.follow = func() { fcancel(); cancel() }
		e.mu.Unlock()
		if err := s.q.Follow(fctx, relay, e.replayedIcount.Store); err != nil && fctx.Err() == nil {
			e.finish(fmt.Errorf("replay: %w", err))
		}
	}()
	return nil
}

// SnapshotForReplayer saves the recording VM's state for a new secondary
// (pkg/replay/rebase.go): the VM pauses for the savevm. clocksAt gives the
// clock values the log carried up to the snapshot. It returns the image a
// replayer loads, the VM's disk as it was at the snapshot (nil without a
// disk), where the snapshot stands in the log, and how long the VM paused.
func (e *qemuVM) SnapshotForReplayer(clocksAt func(logOffset int64) (replay.Clocks, error)) (image, disk []byte, at replay.RecorderSnapshot, paused time.Duration, err error) {
	e.mu.Lock()
	q := e.qemu
	e.mu.Unlock()
	if q == nil {
		return nil, nil, at, 0, errors.New("snapshot: the VM is not running")
	}
	start := time.Now()
	if err := q.SaveRecorderVM(vmSnapshot); err != nil {
		return nil, nil, at, 0, fmt.Errorf("snapshot: %w", err)
	}
	paused = time.Since(start)
	// The copy is patched for a replayer; the recorder's own image is
	// left as QEMU wrote it.
	copyPath := filepath.Join(e.dir, "for-replayer.qcow2")
	defer os.Remove(copyPath)
	if err := copyFile(replay.VMStatePath(e.dir), copyPath); err != nil {
		return nil, nil, at, paused, fmt.Errorf("snapshot: %w", err)
	}
	if at, err = replay.PrepareRecorderSnapshot(copyPath, vmSnapshot, clocksAt); err != nil {
		return nil, nil, at, paused, fmt.Errorf("snapshot: %w", err)
	}
	if image, err = os.ReadFile(copyPath); err != nil {
		return nil, nil, at, paused, err
	}
	if e.vm.QEMU.Disk == "" {
		return image, nil, at, paused, nil
	}
	// The VM runs on meanwhile: the export reads the disk's snapshot,
	// which its writes do not touch.
	diskPath := filepath.Join(e.dir, "disk-for-replayer.qcow2")
	defer os.Remove(diskPath)
	if err := replay.ExportDiskSnapshot(e.dir, vmSnapshot, diskPath); err != nil {
		return nil, nil, at, paused, fmt.Errorf("snapshot: %w", err)
	}
	disk, err = os.ReadFile(diskPath)
	return image, disk, at, paused, err
}

// maxReplayBacklog bounds the log a standby holds in memory that its
// replayer has not taken yet. The primary's lag throttle keeps the replay
// within max_lag of the VM's running time, which bounds this by the log
// rate; a replayer that stops taking log (hung, or a log far denser than
// the throttle assumes) would otherwise grow the standby without bound.
const maxReplayBacklog = 256 << 20

// Feed takes the next chunk of the primary's log. A replayer that has
// fallen more than maxReplayBacklog behind is refused: this copy is given
// up and rebuilt.
func (e *qemuVM) Feed(chunk []byte) error {
	e.mu.Lock()
	r := e.relay
	e.mu.Unlock()
	if r == nil {
		return errors.New("feed replay: no replayer")
	}
	if err := checkReplayBacklog(r.Pending(), len(chunk)); err != nil {
		return err
	}
	_, err := r.Write(chunk)
	return err
}

func checkReplayBacklog(pending, more int) error {
	if pending+more > maxReplayBacklog {
		return fmt.Errorf("feed replay: the replayer has %d bytes of log to take, and %d more would pass the bound of %d", pending, more, maxReplayBacklog)
	}
	return nil
}

// GoLive turns the replaying secondary into the VM: it replays the log it
// received to its end, saves the VM there and restarts it recording from
// that state. It returns how long the replay of the remaining log took.
func (e *qemuVM) GoLive(ctx context.Context) (drain time.Duration, err error) {
	start := time.Now()
	e.mu.Lock()
	q, relay, stopFollow := e.qemu, e.relay, e.follow
	e.mu.Unlock()
	if q == nil || relay == nil {
		return 0, errors.New("go live: the replayer never started")
	}
	if stopFollow != nil {
		stopFollow()
	}
	// Everything received is whole events in the FIFO or already read.
	if err := q.ReplayToEnd(ctx, relay); err != nil {
		return 0, fmt.Errorf("go live: %w", err)
	}
	drain = time.Since(start)
	at, err := q.Icount()
	if err != nil {
		return drain, fmt.Errorf("go live: %w", err)
	}
	tail := relay.TailInput()
	if err := q.SaveVM(vmSnapshot); err != nil {
		return drain, fmt.Errorf("go live: %w", err)
	}
	relay.Close()
	e.swapping(func() { q.Stop() })
	if err := e.startRecorder(ctx, vmSnapshot, e.dp.Head(), at); err != nil {
		return drain, fmt.Errorf("go live: %w", err)
	}
	if err := e.redeliver(ctx, tail); err != nil {
		return drain, fmt.Errorf("go live: %w", err)
	}
	e.mu.Lock()
	e.relay = nil
	q = e.qemu
	e.mu.Unlock()
	// The guest's NIC announces itself, as after a live migration.
	if err := q.Execute("announce-self", map[string]any{"initial": 50, "max": 550, "rounds": 3, "step": 100}, nil); err != nil {
		e.log.Warn("announce-self", "err", err)
	}
	return drain, nil
}

// redeliver gives the guest, as new input, the frames the log delivered
// after its last instruction event: the replay stopped short of them, but
// the primary's guest may have answered them, so they must not be lost
// (Relay.TailInput). It runs while this host's outputs are still
// suppressed, and waits (briefly) for the guest's answers to go quiet: a
// client that already had them from the old primary would take a second
// copy for the answer to its next request.
func (e *qemuVM) redeliver(ctx context.Context, frames [][]byte) error {
	if len(frames) == 0 {
		return nil
	}
	ifc, err := net.InterfaceByName(e.vm.Tap)
	if err != nil {
		return err
	}
	feeder, err := newGuestFeeder(ifc)
	if err != nil {
		return err
	}
	defer feeder.Close()
	before := e.suppressed()
	for _, f := range frames {
		if err := feeder.Feed(f); err != nil {
			return fmt.Errorf("redeliver the log's tail: %w", err)
		}
	}
	// Quiet: answers came and none for quietFor, or none at all by
	// answerWait. Either way nothing is lost: these outputs are dropped.
	const answerWait, quietFor = 300 * time.Millisecond, 30 * time.Millisecond
	deadline := time.Now().Add(answerWait)
	last, lastChange := before, time.Now()
	for time.Now().Before(deadline) && ctx.Err() == nil {
		time.Sleep(5 * time.Millisecond)
		if n := e.suppressed(); n != last {
			last, lastChange = n, time.Now()
		}
		if last != before && time.Since(lastChange) >= quietFor {
			break
		}
	}
	e.log.Info("redelivered the log's tail", "frames", len(frames), "answers_suppressed", last-before)
	return nil
}

// suppressed counts the guest's outputs this host has dropped.
func (e *qemuVM) suppressed() uint64 {
	c, err := e.dp.Counters()
	if err != nil {
		return 0
	}
	return c[datapath.CounterTxSuppressed].Packets
}

// setQEMU makes q the engine's QEMU and watches it: its exit ends the engine
// unless the engine is stopping or replacing it.
func (e *qemuVM) setQEMU(q *replay.QEMU) {
	e.mu.Lock()
	e.qemu = q
	swapped := e.swapped
	e.mu.Unlock()
	go func() {
		select {
		case <-q.Done():
			if !e.stopping.Load() {
				e.finish(fmt.Errorf("qemu exited: %v", q.Wait()))
			}
		case <-swapped:
		}
	}()
}

// swapping runs fn, which ends the current QEMU, without ending the engine.
func (e *qemuVM) swapping(fn func()) {
	e.mu.Lock()
	close(e.swapped)
	e.swapped = make(chan struct{})
	e.mu.Unlock()
	fn()
}

// progress is the replay's progress, or nil when this copy does not
// replay.
func (e *qemuVM) progress() *replayProgress {
	e.mu.Lock()
	relay := e.relay
	e.mu.Unlock()
	if relay == nil {
		return nil
	}
	fwd := relay.Forwarded()
	return &replayProgress{LogIcount: fwd.Icount, LogBytes: fwd.Bytes, RelayPending: relay.Pending(), ReplayedIcount: e.replayedIcount.Load()}
}

// Pause freezes (or thaws) the VM's QEMU: the throttle. It freezes the
// process rather than stopping the VM over QMP (replay.QEMU.Freeze says why).
func (e *qemuVM) Pause(pause bool) error {
	e.mu.Lock()
	q := e.qemu
	e.mu.Unlock()
	if q == nil {
		return errors.New("no vm")
	}
	if pause {
		return q.Freeze()
	}
	return q.Thaw()
}

// ReplayLag is how far the replay trails the log received, in guest time
// (each instruction is 2^IcountShift ns): the part of the primary's
// execution the secondary would still have to replay before it could go
// live; and the icount the replay has reached.
func (e *qemuVM) ReplayLag() (lag time.Duration, replayed uint64, ok bool) {
	e.mu.Lock()
	relay := e.relay
	e.mu.Unlock()
	if relay == nil {
		return 0, 0, false
	}
	// What has arrived counts, not only what the FIFO took: the relay's
	// backlog must be replayed before a go-live too.
	received, done := relay.Received(), e.replayedIcount.Load()
	if received < done {
		return 0, done, true
	}
	return time.Duration((received - done) << replay.IcountShift), done, true
}

func (e *qemuVM) finish(err error) {
	e.end.Do(func() {
		e.err = err
		close(e.done)
	})
}

func (e *qemuVM) Wait() error {
	<-e.done
	return e.err
}

func (e *qemuVM) Stop() error {
	e.stopping.Store(true)
	e.mu.Lock()
	q, relay, follow := e.qemu, e.relay, e.follow
	e.mu.Unlock()
	if follow != nil {
		follow()
	}
	if relay != nil {
		relay.Close()
	}
	if q != nil {
		q.Stop()
	}
	e.finish(nil)
	return nil
}

// copyFile copies src to dst, replacing it.
func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	return writeFile(dst, in)
}

// writeFile writes what r holds to dst, replacing it.
func writeFile(dst string, r io.Reader) error {
	out, err := os.Create(dst)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, r); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// replaying reports whether this copy follows a primary's log (it has not
// gone live).
func (e *qemuVM) replaying() bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.relay != nil
}
