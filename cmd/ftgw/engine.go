package main

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/ftgw/ftgw/pkg/lockstep"
)

// vmEngine runs this host's copy of the VM and owns its input log. The
// lifecycle (lifecycle.go, reprotect.go, switchover.go) knows only this
// interface; what a log position means, how input reaches a copy and how a
// copy is rebuilt are the engine's:
//
//   - syntheticVM (synthetic.go): the data path logs every frame for the VM;
//     a log position is a frame count, and a copy's state is the guest's
//     JSON snapshot.
//   - recordedVM (recorded.go): QEMU record/replay. The recorder's replay log
//     is the input log, shipped in chunks numbered from 1; the data path's
//     stamps are byte offsets in it, and a copy is rebuilt from a snapshot
//     of the running recorder.
//
// The engine lives as long as the daemon; the copies it runs (vmCopy) come
// and go with the lifecycle: a stale copy is dropped, and the next one is
// rebuilt from the owner's snapshot.
type vmEngine interface {
	// run reads the VM's input log for the daemon's life: shipped while a
	// secondary follows (daemon.shipping), dropped otherwise, so that the
	// VM never blocks on it.
	run(ctx context.Context) error
	// boot starts this host's copy from the VM's first instruction: the
	// copy that serves (record) or one that follows the primary's log.
	boot(ctx context.Context, record bool) error
	// drop stops this host's copy: it is stale or about to be replaced.
	drop()

	// follow points the log channel's deliveries at this host's copy.
	follow(cfg *lockstep.SecondaryConfig) error
	// install rebuilds this host's copy from the owner's snapshot, taken at
	// log position pos, for the log channel s; the log from pos+1 follows.
	install(s *lockstep.Secondary, pos uint64, snapshot []byte) error
	// tookIn reports whether this host's copy has taken in the log up to
	// pos, or will before it goes live: what a switchover waits for.
	tookIn(pos uint64) (bool, error)
	// goLive makes the standby's copy, which has received the log up to
	// received, the one that serves; drain is how long it took to take in
	// what it had received.
	goLive(ctx context.Context, received uint64) (drain time.Duration, err error)
	// freeze stops (true) or restarts the VM's execution while a
	// switchover drains its outputs. A VM that sits still on its own
	// needs neither.
	freeze(frozen bool) error

	// newChannel is the log position a new log channel to a secondary
	// starts at; the last secondary's progress is forgotten.
	newChannel() (startHead uint64)
	// ackedStamp maps an ack on the log channel to the data path's stamp
	// it releases outputs up to.
	ackedStamp(pos uint64) uint64
	// peerProgress takes the secondary's report of how far it has
	// replayed (lockstep's progress records).
	peerProgress(replayed uint64)
	// snapshot is the serving host's half of a re-protection: the state a
	// new secondary on channel p starts from. It restarts the channel's
	// log where the state stands (rebase) and turns the Output Rule back
	// on (reprotect.go).
	snapshot(ctx context.Context, p *lockstep.Primary, rebase func(uint64) error) ([]byte, error)
	// peerCaughtUp reports whether the new secondary, which holds the log
	// it was rebuilt at, could go live without a long catch-up, and a
	// figure that moves while it progresses.
	peerCaughtUp() (ok bool, progress uint64)

	// status and collect add the engine's part to /status and /metrics.
	status(s *Status)
	collect(c *collector, ch chan<- prometheus.Metric)
	// dataPathLogs reports whether the data path logs the VM's input
	// (vip.Record.EngineLogs says the opposite): the synthetic guest's
	// frames are logged in the kernel, a recorder logs its own input. The
	// data path then also paces the guest (vip.Record.GuestPaced): a
	// frame logged that the guest's tap dropped would be one the
	// secondary's copy takes and this one never does.
	dataPathLogs() bool
	// close releases what the engine holds beyond its copy.
	close() error
}

// newVMEngine makes the engine the VM's configuration asks for.
func newVMEngine(d *daemon) vmEngine {
	if d.vm.Engine == engineQEMU {
		return newRecordedVM(d)
	}
	return &syntheticVM{d: d}
}

// vmCopy is one running copy of the VM on this host: a synthetic guest
// process, or a QEMU (which go-live replaces in place).
type vmCopy interface {
	// Wait returns when the copy has stopped.
	Wait() error
	Stop() error
}

// currentCopy is the copy of the VM running now, or nil.
func (d *daemon) currentCopy() vmCopy {
	d.copyMu.Lock()
	defer d.copyMu.Unlock()
	return d.copy
}

// superviseCopy makes c the VM's running copy and watches it: a copy that
// ends on its own ends the daemon's job; one stopped or replaced by the
// lifecycle does not.
func (d *daemon) superviseCopy(c vmCopy) {
	d.copyMu.Lock()
	d.copy = c
	d.copyMu.Unlock()
	d.group.Go(func() error {
		err := c.Wait()
		d.copyMu.Lock()
		current := d.copy == c
		d.copyMu.Unlock()
		if !current || d.runCtx.Err() != nil {
			return nil
		}
		if err == nil {
			err = errors.New("exited")
		}
		return fmt.Errorf("vm %s: %w", d.vm.Name, err)
	})
}

// stopCopy stops the VM's copy on this host: it is stale or about to be
// replaced.
func (d *daemon) stopCopy() {
	d.copyMu.Lock()
	c := d.copy
	d.copy = nil
	d.copyMu.Unlock()
	if c != nil {
		c.Stop()
	}
}
