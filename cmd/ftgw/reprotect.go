package main

import (
	"cmp"
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/ftgw/ftgw/internal/lab"
	"github.com/ftgw/ftgw/pkg/lockstep"
	"github.com/ftgw/ftgw/pkg/protect"
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

// seekSecondary lets this host, serving the VM alone, take the first
// secondary that joins: its log channel dials the peer until a daemon there
// answers, and rebuilds that daemon's VM from a snapshot.
func (d *daemon) seekSecondary() {
	if err := d.ensureHoldQueue(); err != nil {
		d.log.Error("seek a new secondary", "err", err)
		return
	}
	var p *lockstep.Primary
	snapshot := func(ctx context.Context, rebase func(uint64) error) ([]byte, error) {
		if err := d.lockLife(ctx); err != nil {
			return nil, err
		}
		defer d.lifeMu.Unlock()
		return d.eng.snapshot(ctx, p, rebase)
	}
	p, err := d.newPrimary(d.cfg.Peer.Address, d.eng.newChannel(), snapshot)
	if err != nil {
		d.log.Error("seek a new secondary", "err", err)
		return
	}
	ctx := d.goChannel(p.Run)
	d.group.Go(func() error { return d.awaitProtection(ctx, p) })
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

// reprotectTimeout bounds how long output may wait for a new secondary
// that does not come, or stops making progress.
const reprotectTimeout = 10 * time.Second

// awaitProtection declares the pair protected once the new secondary on
// channel p holds the log up to the position it was rebuilt at
// (reprotectAt) and has caught up (vmEngine.peerCaughtUp): from then on its
// copy of the VM can take over, and losing it is a failure to handle. A
// new secondary that stops making progress
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
			deadline = time.Now().Add(reprotectTimeout)
			time.Sleep(5 * time.Millisecond)
			continue
		case protect.Reprotecting:
		default:
			return nil
		}
		position := d.reprotectAt.Load()
		acked := p.Acked()
		caughtUp, replayed := d.eng.peerCaughtUp()
		if acked != lastAcked || replayed != lastReplayed || position != lastPosition {
			lastAcked, lastReplayed, lastPosition = acked, replayed, position
			deadline = time.Now().Add(reprotectTimeout)
		}
		if p.Synced() && acked >= position && caughtUp {
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
			d.shipping.Store(false)
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
