package main

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"sync"
	"syscall"
	"time"

	"github.com/ftgw/ftgw/pkg/guest"
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

// InputsConsumed is how many input frames the guest has taken in and
// answered: the log position it has reached. It asks the guest between
// frames, so every reply to a frame it counts has been written to the tap.
func (e *syntheticEngine) InputsConsumed() (uint64, error) {
	st, err := guest.QueryState(e.control)
	if err != nil {
		return 0, err
	}
	return st.Frames, nil
}
