package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"

	"github.com/ftgw/ftgw/pkg/datapath"
	"github.com/ftgw/ftgw/pkg/guest"
	"github.com/ftgw/ftgw/pkg/lockstep"
	"github.com/ftgw/ftgw/pkg/protect"
)

// syntheticVM is the engine of the synthetic guest (`ftgw guest`, a
// key-value server that stands in for a VM). Its input log is the data
// path's: every frame for the VM is logged in the kernel and read from its
// ring (run); a log position is a frame count. A standby's guest takes the
// logged frames through a packet socket on its tap (guestFeeder), and a
// copy is rebuilt from the guest's JSON state, which it gives between two
// frames, so the serving guest never pauses.
type syntheticVM struct {
	d *daemon

	// logMu orders reading the log against a re-protection, which turns
	// shipping on between two frames.
	logMu    sync.Mutex
	lastRead atomic.Uint64 // the last log position run took from the ring
	// inputBase is the guest's input count that log position 0 of the log
	// this host follows corresponds to: the guest has reached position
	// State().Frames - inputBase. It moves when a standby goes live (its
	// own log goes on from its data path's head) or starts from a
	// snapshot.
	inputBase atomic.Uint64
	feeder    *guestFeeder
}

// run takes the log from the kernel ring: a protected primary ships it, any
// other host discards it (nothing else would make room in the ring for new
// input).
func (e *syntheticVM) run(ctx context.Context) error {
	d := e.d
	if d.cfg.PinLogReader {
		pinToCPU(d.cfg.SerializerCPU, d.log)
	}
	return d.dp.ReadLog(ctx, func(entry datapath.LogEntry) error {
		// Uncontended but for a re-protection, which starts shipping
		// between two frames.
		e.logMu.Lock()
		defer e.logMu.Unlock()
		e.lastRead.Store(entry.Position)
		if !d.shipping.Load() {
			return nil
		}
		d.shipDelay.observe(datapath.MonotonicNs() - entry.LoggedNs)
		// Before the append: its ack can be back before it returns.
		d.ackClock.append(entry.Position)
		if err := d.primary().QueueFrame(entry.Position, entry.Frame); err != nil {
			d.logCannotCarry(entry.Position, err)
		}
		return nil
	}, func() error {
		if d.shipping.Load() {
			d.primary().Flush()
		}
		return nil
	})
}

// pinToCPU keeps the calling goroutine, alone, on its thread and that
// thread on cpu, for the goroutine's life (the thread exits with it).
//
// For the log reader on the serializer's CPU: the serializer wakes the
// reader when it logs a frame, and a reader that may run elsewhere is
// usually woken on the other, idle, CPU, which costs an interrupt and the
// CPU's wakeup on the path of every held reply (tens of µs on a VM, where
// a halted vCPU wakes through the hypervisor). Kept on the serializer's
// CPU it runs as soon as the serializer is done with the frame
// (docs/ARCHITECTURE.md, "Timing", has the figures). It then shares that
// CPU with the serializer: a host whose input outgrows one CPU should set
// pin_log_reader: false.
func pinToCPU(cpu int, log *slog.Logger) {
	runtime.LockOSThread() // never unlocked: the thread ends with the goroutine
	var set unix.CPUSet
	set.Set(cpu)
	if err := unix.SchedSetaffinity(0, &set); err != nil {
		log.Warn("could not pin the log reader; it runs on any CPU", "cpu", cpu, "err", err)
	}
}

func (e *syntheticVM) boot(ctx context.Context, record bool) error { return e.start("") }

// start starts the guest, fresh or from a snapshot file, as the VM's copy.
func (e *syntheticVM) start(restore string) error {
	d := e.d
	g := newGuestProcess(d.vm, filepath.Join(d.cfg.StateDir, d.vm.Name+"-guest.sock"), restore)
	state, err := d.dp.StateFile()
	if err != nil {
		return fmt.Errorf("start vm %s: %w", d.vm.Name, err)
	}
	defer state.Close() // the guest holds its own copy
	g.state = state
	g.holdCapacity = d.cfg.HoldCapacity
	if err := g.Start(); err != nil {
		return fmt.Errorf("start vm %s: %w", d.vm.Name, err)
	}
	d.superviseCopy(g)
	return nil
}

func (e *syntheticVM) drop() { e.d.stopCopy() }

func (e *syntheticVM) guest() (*guestProcess, error) {
	g, ok := e.d.currentCopy().(*guestProcess)
	if !ok {
		return nil, errors.New("no synthetic guest runs here")
	}
	return g, nil
}

// consumed is the log position the guest has reached.
func (e *syntheticVM) consumed() (uint64, error) {
	st, err := e.guestState()
	return st.Frames - e.inputBase.Load(), err
}

func (e *syntheticVM) guestState() (guest.State, error) {
	g, err := e.guest()
	if err != nil {
		return guest.State{}, err
	}
	return g.State()
}

// setInputBase moves inputBase, and the data path's copy, by which it
// paces the guest (datapath.OwnerGuestPaced).
func (e *syntheticVM) setInputBase(base uint64) {
	e.inputBase.Store(base)
	e.d.dp.SetInputBase(base)
}

func (e *syntheticVM) follow(cfg *lockstep.SecondaryConfig) error {
	if e.feeder == nil {
		f, err := newGuestFeeder(e.d.tap)
		if err != nil {
			return err
		}
		e.feeder = f
	}
	cfg.OnFrame = func(pos uint64, frame []byte) error { return e.feeder.Feed(frame) }
	return nil
}

// install rebuilds this host's guest from the owner's snapshot.
func (e *syntheticVM) install(s *lockstep.Secondary, pos uint64, state []byte) error {
	d := e.d
	var st guest.State
	if err := json.Unmarshal(state, &st); err != nil {
		return fmt.Errorf("install snapshot: %w", err)
	}
	if st.Frames < pos {
		return fmt.Errorf("install snapshot: the guest took in %d frames, fewer than the snapshot's log position %d", st.Frames, pos)
	}
	from := d.state()
	if from != protect.Joining && from != protect.Standby || d.secondary() != s {
		return fmt.Errorf("install snapshot: this host is %s now", from)
	}
	path := filepath.Join(d.cfg.StateDir, d.vm.Name+"-snapshot.json")
	if err := os.WriteFile(path, state, 0o600); err != nil {
		return fmt.Errorf("install snapshot: %w", err)
	}
	d.stopCopy()
	// The snapshot's frame count is where this guest starts; log
	// positions after pos come on top of it.
	e.setInputBase(st.Frames - pos)
	if err := e.start(path); err != nil {
		return err
	}
	_, err := d.life.FireIf(from, protect.SnapshotInstalled)
	if err == nil && d.secondary() != s {
		err = errors.New("a newer log channel replaced this one")
	}
	if err != nil {
		// The lifecycle moved on while the guest started (fenced, or a
		// new channel): this copy is not the one to keep.
		d.stopCopy()
		return fmt.Errorf("install snapshot: %w", err)
	}
	d.log.Info("rebuilt the VM from the owner's snapshot", "position", pos, "puts", st.Puts)
	return nil
}

// tookIn: the guest answers between frames, so every reply to a frame it
// counts has been written to the tap.
func (e *syntheticVM) tookIn(pos uint64) (bool, error) {
	consumed, err := e.consumed()
	return consumed >= pos, err
}

// goLive: every record received is already in the guest (delivered before
// acked), so it is exactly where the primary's was when it last heard from
// it. This host's own log goes on from its data path's head (0 on a host
// that never served); the guest has taken in, or will before anything
// logged from now on (the tap keeps their order), every frame received.
// (Unsigned arithmetic wraps: only differences of these counts mean
// anything.)
func (e *syntheticVM) goLive(ctx context.Context, received uint64) (time.Duration, error) {
	e.setInputBase(e.inputBase.Load() + received - e.d.dp.Head())
	return 0, nil
}

// freeze: the guest takes no input once the VM's record drains, so it sits
// still by itself.
func (e *syntheticVM) freeze(bool) error { return nil }

func (e *syntheticVM) newChannel() uint64                           { return e.d.dp.Head() }
func (e *syntheticVM) ackedStamp(pos uint64) uint64                 { return pos }
func (e *syntheticVM) peerProgress(uint64)                          {}
func (e *syntheticVM) peerCaughtUp() (bool, uint64)                 { return true, 0 }
func (e *syntheticVM) status(*Status)                               {}
func (e *syntheticVM) collect(*collector, chan<- prometheus.Metric) {}

// snapshot is the survivor's half of a re-protection. The VM never pauses:
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
func (e *syntheticVM) snapshot(ctx context.Context, p *lockstep.Primary, rebase func(uint64) error) ([]byte, error) {
	d := e.d
	from := d.state()
	if from != protect.Unprotected && from != protect.Reprotecting {
		return nil, fmt.Errorf("reprotect: this host is %s, not serving", from)
	}
	start := time.Now()
	rec := d.owner.Current()

	e.logMu.Lock() // run takes no frame meanwhile: none falls between
	queuedFrom := e.lastRead.Load()
	err := rebase(queuedFrom)
	if err == nil {
		d.shipping.Store(true)
	}
	e.logMu.Unlock()
	if err != nil {
		return nil, err
	}
	// The log up to X needs no ack: this host served it alone.
	d.gate.Ack(queuedFrom)
	if err := d.gate.Enforce(rec); err != nil {
		return nil, err
	}
	// Not protected before the position is known.
	d.reprotectAt.Store(math.MaxUint64)
	if from == protect.Unprotected {
		d.fire(protect.PeerJoined)
	}

	var state guest.State
	err = waitUntil(ctx, 5*time.Second, "the guest to consume the log", func() (bool, error) {
		return e.tookIn(queuedFrom)
	})
	if err == nil {
		state, err = e.guestState()
	}
	var raw []byte
	if err == nil {
		raw, err = json.Marshal(state)
	}
	position := state.Frames - e.inputBase.Load()
	if err == nil {
		// The guest may have consumed frames the log reader has not
		// taken from the ring yet: they must be queued before the log
		// can restart after them.
		err = waitUntil(ctx, 5*time.Second, "the log reader to reach the snapshot", func() (bool, error) {
			return e.lastRead.Load() >= position, nil
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

func (e *syntheticVM) dataPathLogs() bool { return true }

func (e *syntheticVM) close() error {
	if e.feeder != nil {
		return e.feeder.Close()
	}
	return nil
}

// guestProcess runs `ftgw guest` as a child process that owns the tap the
// way QEMU would.
type guestProcess struct {
	vm      VMConfig
	control string
	restore string   // a snapshot to start from, or ""
	state   *os.File // the data path's log state, for pacing (--log-state-fd)
	// holdCapacity is the hold queue's, for the guest's backpressure.
	holdCapacity int

	cmd  *exec.Cmd
	done chan struct{}
	err  error
	stop sync.Once
}

func newGuestProcess(vm VMConfig, control, restore string) *guestProcess {
	return &guestProcess{vm: vm, control: control, restore: restore, done: make(chan struct{})}
}

func (g *guestProcess) Start() error {
	self, err := os.Executable()
	if err != nil {
		return err
	}
	args := []string{"guest", "--tap", g.vm.Tap, "--ip", g.vm.IP, "--mac", g.vm.MAC, "--control", g.control}
	if g.restore != "" {
		args = append(args, "--restore", g.restore)
	}
	if g.state != nil {
		args = append(args, "--log-state-fd", "3") // the first of ExtraFiles
		if g.holdCapacity > 0 {
			args = append(args, "--hold-capacity", fmt.Sprint(g.holdCapacity))
		}
	}
	// A dead guest's socket would pass for this one's.
	if err := os.Remove(g.control); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove stale guest socket: %w", err)
	}
	g.cmd = exec.Command(self, args...)
	g.cmd.Stdout, g.cmd.Stderr = os.Stderr, os.Stderr
	if g.state != nil {
		g.cmd.ExtraFiles = []*os.File{g.state}
	}
	// If the daemon dies, so does its VM, as a QEMU child would.
	g.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := g.cmd.Start(); err != nil {
		return fmt.Errorf("start guest: %w", err)
	}
	go func() {
		g.err = g.cmd.Wait()
		close(g.done)
	}()
	return g.waitReady()
}

// waitReady waits until the guest answers on its control socket. It opens
// its tap and restores its snapshot before it answers: until then, frames
// for it would be dropped (a tap with no reader drops) and the log and the
// guest would part ways.
func (g *guestProcess) waitReady() error {
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case <-g.done:
			return fmt.Errorf("guest exited at start: %w", g.err)
		default:
		}
		if _, err := guest.QueryState(g.control); err == nil {
			return nil
		}
		time.Sleep(5 * time.Millisecond)
	}
	return errors.New("guest not ready after 10s")
}

func (g *guestProcess) Wait() error {
	<-g.done
	return g.err
}

func (g *guestProcess) Stop() error {
	if g.cmd == nil || g.cmd.Process == nil {
		return nil
	}
	g.stop.Do(func() {
		g.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-g.done:
		case <-time.After(2 * time.Second):
			g.cmd.Process.Kill()
			<-g.done
		}
	})
	return nil
}

// State is the guest's state: its Frames are the input frames it has taken
// in and answered. It asks the guest between frames, so every reply to a
// frame it counts has been written to the tap.
func (g *guestProcess) State() (guest.State, error) { return guest.QueryState(g.control) }
