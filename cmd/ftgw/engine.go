package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/ftgw/ftgw/pkg/guest"
	"github.com/ftgw/ftgw/pkg/lockstep"
	"github.com/ftgw/ftgw/pkg/protect"
	"github.com/ftgw/ftgw/pkg/replay"
)

// Engine runs the protected VM on its tap: the synthetic guest
// (syntheticEngine) or a real VM under QEMU record/replay (qemuEngine).
// Each is started its own way, after the data path is attached, so none of
// the VM's frames escape the Output Rule.
type Engine interface {
	// Wait returns when the VM has stopped.
	Wait() error
	Stop() error
}

// syntheticEngine runs `ftgw guest` as a child process that owns the tap the
// way QEMU would.
type syntheticEngine struct {
	vm      VMConfig
	control string
	restore string // a snapshot to start from, or ""
	log     *slog.Logger

	cmd  *exec.Cmd
	done chan struct{}
	err  error
	stop sync.Once
}

func newSyntheticEngine(vm VMConfig, control, restore string, log *slog.Logger) *syntheticEngine {
	return &syntheticEngine{vm: vm, control: control, restore: restore, log: log, done: make(chan struct{})}
}

func (e *syntheticEngine) Start() error {
	self, err := os.Executable()
	if err != nil {
		return err
	}
	args := []string{"guest", "--tap", e.vm.Tap, "--ip", e.vm.IP, "--mac", e.vm.MAC, "--control", e.control}
	if e.restore != "" {
		args = append(args, "--restore", e.restore)
	}
	// A dead guest's socket would pass for this one's.
	if err := os.Remove(e.control); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove stale guest socket: %w", err)
	}
	e.cmd = exec.Command(self, args...)
	e.cmd.Stdout, e.cmd.Stderr = os.Stderr, os.Stderr
	// If the daemon dies, so does its VM, as a QEMU child would.
	e.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := e.cmd.Start(); err != nil {
		return fmt.Errorf("start guest: %w", err)
	}
	go func() {
		e.err = e.cmd.Wait()
		close(e.done)
	}()
	return e.waitReady()
}

// waitReady waits until the guest answers on its control socket. It opens
// its tap and restores its snapshot before it answers: until then, frames
// for it would be dropped (a tap with no reader drops) and the log and the
// guest would part ways.
func (e *syntheticEngine) waitReady() error {
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case <-e.done:
			return fmt.Errorf("guest exited at start: %w", e.err)
		default:
		}
		if _, err := guest.QueryState(e.control); err == nil {
			return nil
		}
		time.Sleep(5 * time.Millisecond)
	}
	return errors.New("guest not ready after 10s")
}

func (e *syntheticEngine) Wait() error {
	<-e.done
	return e.err
}

func (e *syntheticEngine) Stop() error {
	if e.cmd == nil || e.cmd.Process == nil {
		return nil
	}
	e.stop.Do(func() {
		e.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-e.done:
		case <-time.After(2 * time.Second):
			e.cmd.Process.Kill()
			<-e.done
		}
	})
	return nil
}

// State is the guest's state: its Frames are the input frames it has taken
// in and answered. It asks the guest between frames, so every reply to a
// frame it counts has been written to the tap.
func (e *syntheticEngine) State() (guest.State, error) { return guest.QueryState(e.control) }

// currentEngine is the engine running the VM now, or nil.
func (d *daemon) currentEngine() Engine {
	d.engineMu.Lock()
	defer d.engineMu.Unlock()
	return d.engine
}

// superviseEngine makes e the VM's engine and watches it: an engine that
// ends on its own ends the daemon's job; one stopped or replaced by the
// lifecycle does not.
func (d *daemon) superviseEngine(e Engine) {
	d.engineMu.Lock()
	d.engine = e
	d.engineMu.Unlock()
	d.group.Go(func() error {
		err := e.Wait()
		d.engineMu.Lock()
		current := d.engine == e
		d.engineMu.Unlock()
		if !current || d.runCtx.Err() != nil {
			return nil
		}
		if err == nil {
			err = errors.New("exited")
		}
		return fmt.Errorf("vm engine: %w", err)
	})
}

// syntheticGuest is the synthetic guest running the VM now.
func (d *daemon) syntheticGuest() (*syntheticEngine, error) {
	e, ok := d.currentEngine().(*syntheticEngine)
	if !ok {
		return nil, errors.New("no synthetic guest runs here")
	}
	return e, nil
}

// stopEngine stops the VM's copy on this host: it is stale or about to be
// replaced.
func (d *daemon) stopEngine() {
	d.engineMu.Lock()
	e := d.engine
	d.engine = nil
	d.engineMu.Unlock()
	if e != nil {
		e.Stop()
	}
}

// startSynthetic starts the synthetic guest, fresh or from a snapshot
// file, as the VM's engine.
func (d *daemon) startSynthetic(restore string) error {
	e := newSyntheticEngine(d.vm, filepath.Join(d.cfg.StateDir, d.vm.Name+"-guest.sock"), restore, d.log)
	if err := e.Start(); err != nil {
		return fmt.Errorf("start vm %s: %w", d.vm.Name, err)
	}
	d.superviseEngine(e)
	return nil
}

// installSnapshot rebuilds this host's synthetic guest from the owner's
// snapshot, taken at log position pos, for the log channel s: from here on
// the guest follows the owner's log from pos+1.
func (d *daemon) installSnapshot(s *lockstep.Secondary, pos uint64, state []byte) error {
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
	d.stopEngine()
	// The snapshot's frame count is where this guest starts; log
	// positions after pos come on top of it.
	d.inputBase.Store(st.Frames - pos)
	if err := d.startSynthetic(path); err != nil {
		return err
	}
	_, err := d.life.FireIf(from, protect.SnapshotInstalled)
	if err == nil && d.secondary() != s {
		err = errors.New("a newer log channel replaced this one")
	}
	if err != nil {
		// The lifecycle moved on while the guest started (fenced, or a
		// new channel): this copy is not the one to keep.
		d.stopEngine()
		return fmt.Errorf("install snapshot: %w", err)
	}
	d.log.Info("rebuilt the VM from the owner's snapshot", "position", pos, "puts", st.Puts)
	return nil
}

// installRecording rebuilds this host's real VM from the owner's snapshot
// of its running VM (rebaseHeader), for the log channel s: a replayer that
// loads it and follows the owner's log from there, which arrives from
// pos+1. Only a daemon whose VM has not started yet joins so (rejoin).
func (d *daemon) installRecording(s *lockstep.Secondary, pos uint64, state []byte) error {
	h, image, err := decodeRebaseSnapshot(state)
	if err != nil {
		return fmt.Errorf("install snapshot: %w", err)
	}
	if from := d.state(); from != protect.Joining || d.secondary() != s || d.currentEngine() != nil {
		return fmt.Errorf("install snapshot: this host is %s, with a VM engine running: %v", from, d.currentEngine() != nil)
	}
	path := filepath.Join(d.cfg.StateDir, d.vm.Name+"-restore.qcow2")
	if err := os.WriteFile(path, image, 0o600); err != nil {
		return fmt.Errorf("install snapshot: %w", err)
	}
	defer os.Remove(path)
	d.takeoverAfter.Store(h.TakeoverAfter)
	from := &recorderSnapshot{image: path, startup: h.Startup,
		at: replay.RecorderSnapshot{Icount: h.Icount}}
	if err := d.qemu.StartReplay(d.runCtx, from); err != nil {
		return fmt.Errorf("install snapshot: start vm %s: %w", d.vm.Name, err)
	}
	d.superviseEngine(d.qemu)
	if _, err := d.life.FireIf(protect.Joining, protect.SnapshotInstalled); err != nil {
		return fmt.Errorf("install snapshot: %w", err)
	}
	d.log.Info("rebuilding the real VM from a snapshot of the owner's", "position", pos, "snapshot_icount", h.Icount,
		"image_bytes", len(image), "takeover_after", h.TakeoverAfter)
	return nil
}
