package main

import (
	"context"
	"fmt"
	"time"

	"github.com/ftgw/ftgw/pkg/vip"
)

// hostState is where this host stands for the VM.
type hostState int

const (
	// stateProtected: active, every output waits for the secondary's ack.
	stateProtected hostState = iota
	// stateUnprotected: active alone, outputs leave at once, after winning
	// the arbiter when the peer failed.
	stateUnprotected
	// stateStandby: the secondary, following the log.
	stateStandby
	// statePassive: lost the arbiter (or found a newer epoch): serves
	// nothing and releases nothing until re-protected.
	statePassive
)

func (s hostState) String() string {
	return [...]string{"protected", "unprotected", "standby", "passive"}[s]
}

// Failover causes, as metric labels.
const (
	causePrimaryLost   = "primary_lost"
	causeSecondaryLost = "secondary_lost"
)

// failoverPhases times the last failover this host took part in.
type failoverPhases struct {
	Cause       string        `json:"cause"`
	Won         bool          `json:"won"`
	Epoch       uint64        `json:"epoch"`
	Detection   time.Duration `json:"detection_ns"`   // peer's last word to declaring it failed
	Arbitration time.Duration `json:"arbitration_ns"` // the arbiter's test-and-set
	// Drain is a real VM's replay of the log it had received but not yet
	// replayed (part of GoLive).
	Drain  time.Duration `json:"drain_ns"`
	GoLive time.Duration `json:"go_live_ns"` // owner switch and first announcement
}

// channelStop ends the log channel's Run: the peer is gone or replaced.
func (d *daemon) channelStop() {
	d.mu.Lock()
	stop := d.stopChannel
	d.mu.Unlock()
	if stop != nil {
		stop()
	}
}

func (d *daemon) state() hostState {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.hostState
}

func (d *daemon) setState(s hostState) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if s == stateUnprotected && d.hostState != stateUnprotected {
		d.unprotectedSince = time.Now()
	}
	if s != stateUnprotected && d.hostState == stateUnprotected {
		d.unprotectedTotal += time.Since(d.unprotectedSince)
	}
	d.hostState = s
	// Only a primary with a secondary ships the log: a protected one, or
	// an unprotected one building a new secondary (startReprotect).
	switch s {
	case stateProtected:
		d.shipping.Store(true)
	case stateStandby, statePassive:
		d.shipping.Store(false)
	}
}

// unprotectedFor is the total time this host served the VM alone.
func (d *daemon) unprotectedFor() time.Duration {
	d.mu.Lock()
	defer d.mu.Unlock()
	total := d.unprotectedTotal
	if d.hostState == stateUnprotected {
		total += time.Since(d.unprotectedSince)
	}
	return total
}

// watch declares the peer failed once it has been silent for the failure
// timeout. It is armed only once the pair has been connected: before that
// there is nothing to take over. A silence shorter than the timeout only
// holds output.
func (d *daemon) watch(ctx context.Context) error {
	if d.arb == nil {
		d.log.Warn("no arbiter configured: this host never takes over or goes on alone; failures only hold output")
		return nil
	}
	tick := time.NewTicker(max(d.cfg.Heartbeat/2, time.Millisecond))
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
		switch d.state() {
		case stateProtected:
			if d.primary().Stats().Connects > 0 {
				if silent := d.primary().SinceHeard(); silent > d.cfg.FailureTimeout {
					d.secondaryLost(ctx, silent)
				}
			}
		case stateStandby:
			if d.secondary.Stats().Connects > 0 {
				if silent := d.secondary.SinceHeard(); silent > d.cfg.FailureTimeout {
					d.primaryLost(ctx, silent)
				}
			}
		}
	}
}

// claim runs the arbiter's test-and-set for the epoch this host knows.
func (d *daemon) claim(ctx context.Context, known uint64) (won bool, epoch uint64, took time.Duration) {
	start := time.Now()
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	c, err := d.arb.TryClaim(ctx, d.vm.Name, d.cfg.Name, known)
	took = time.Since(start)
	if err != nil {
		// Unreachable arbiter: not won. Going live without it could make
		// two hosts serve the VM.
		d.log.Error("arbiter unreachable: not taking over", "err", err)
		return false, known, took
	}
	if !c.Won {
		d.log.Warn("lost the arbiter", "known_epoch", known, "epoch", c.Epoch, "owner", c.Owner)
	}
	return c.Won, c.Epoch, took
}

// secondaryLost: the primary goes on alone only if it wins the arbiter (the
// secondary may have taken over, seeing us as dead); then what it held
// leaves and it runs unprotected. If it loses, it stops releasing at once.
func (d *daemon) secondaryLost(ctx context.Context, silent time.Duration) {
	known := d.owner.Current().Epoch
	d.log.Warn("secondary failed", "silent", silent, "epoch", known)
	d.channelStop()
	won, epoch, arbitration := d.claim(ctx, known)
	phases := failoverPhases{Cause: causeSecondaryLost, Won: won, Epoch: epoch, Detection: silent, Arbitration: arbitration}
	start := time.Now()
	if !won {
		// The standby role drops every output from now on; held frames
		// were never acknowledged and are never sent.
		d.fence(epoch)
	} else {
		if err := d.publishUnprotected(epoch); err != nil {
			d.log.Error("go on unprotected", "err", err)
		}
		// What was held can go: no one else serves the VM.
		d.shipping.Store(false)
		d.hold.SetPassthrough(true)
		d.setState(stateUnprotected)
	}
	phases.GoLive = time.Since(start)
	d.recordFailover(phases)
}

// primaryLost: the secondary takes over if it wins the arbiter. Every record
// it received is already in its guest (delivered before acked), so the guest
// is exactly where the primary's was when it last heard from it; outputs the
// primary held but never released are reproduced by this guest.
func (d *daemon) primaryLost(ctx context.Context, silent time.Duration) {
	known := d.secondary.PeerEpoch()
	d.log.Warn("primary failed", "silent", silent, "epoch", known, "received", d.secondary.Received())
	d.channelStop()
	if received := d.secondary.Received(); received < d.cfg.TakeoverAfter {
		// A new secondary still catching up on what the primary ran
		// alone: its copy lacks state clients have seen, so it must not
		// serve. The VM is lost, as it was while the primary ran alone.
		d.log.Error("not taking over: this new secondary never received the log the primary ran alone",
			"received", received, "takeover_after", d.cfg.TakeoverAfter)
		d.fence(known)
		return
	}
	won, epoch, arbitration := d.claim(ctx, known)
	phases := failoverPhases{Cause: causePrimaryLost, Won: won, Epoch: epoch, Detection: silent, Arbitration: arbitration}
	start := time.Now()
	if !won {
		// The primary went on alone: this copy is behind it now.
		d.fence(epoch)
		phases.GoLive = time.Since(start)
		d.recordFailover(phases)
		return
	}
	if d.qemu != nil {
		// The replayer must first reach the end of the log and become a
		// running VM: until then nothing serves the VM's clients.
		drain, err := d.qemu.GoLive(ctx)
		phases.Drain = drain
		if err != nil {
			d.log.Error("go live", "err", err)
			d.fence(epoch)
			return
		}
	} else {
		// This host's own log starts at 0; the guest has taken in every
		// frame received (delivered before acknowledged; the tap keeps
		// their order ahead of anything logged from now on).
		d.inputBase.Add(d.secondary.Received())
	}
	// The commit point: one map update and this host serves the VM.
	if err := d.publishUnprotected(epoch); err != nil {
		d.log.Error("go live", "err", err)
		d.setState(statePassive)
		return
	}
	d.setState(stateUnprotected)
	d.announce(ctx)
	phases.GoLive = time.Since(start)
	d.recordFailover(phases)
}

// announce tells the LAN the VM's MAC is behind this host now: the first
// gratuitous ARP at once, the rest of the burst in the background for a LAN
// still converging.
func (d *daemon) announce(ctx context.Context) {
	if err := vip.Announce(ctx, d.uplink, d.vm.addr(), d.vm.hwAddr(), 1, 0); err != nil {
		d.log.Error("announce", "err", err)
	}
	if d.cfg.AnnounceCount > 1 {
		go func() {
			time.Sleep(d.cfg.AnnounceInterval)
			if err := vip.Announce(ctx, d.uplink, d.vm.addr(), d.vm.hwAddr(), d.cfg.AnnounceCount-1, d.cfg.AnnounceInterval); err != nil && ctx.Err() == nil {
				d.log.Error("announce", "err", err)
			}
		}()
	}
}

// fence stops this host serving at once because another host holds a newer
// epoch: it won the arbiter, or a secondary follows it.
func (d *daemon) fence(epoch uint64) {
	if err := d.publish(vip.RoleStandby, epoch); err != nil {
		d.log.Error("fence", "err", err)
	}
	d.setState(statePassive)
	d.channelStop()
}

func (d *daemon) publishUnprotected(epoch uint64) error {
	rec := d.ownerRecord(vip.RoleActive, epoch)
	rec.Passthrough = true
	return d.owner.Publish(rec)
}

func (d *daemon) recordFailover(p failoverPhases) {
	d.mu.Lock()
	d.lastFailover = &p
	d.failovers[p.Cause]++
	d.mu.Unlock()
	d.log.Warn("failover", "cause", p.Cause, "won", p.Won, "epoch", p.Epoch,
		"detection", p.Detection, "arbitration", p.Arbitration, "drain", p.Drain, "go_live", p.GoLive, "state", d.state().String())
}

// startEpoch decides, at start, the epoch the primary serves with: a VM the
// arbiter never saw is claimed at epoch 1; a VM another host owns now means
// this host lost a failover while it was away and must stay passive.
func (d *daemon) startEpoch(ctx context.Context) (epoch uint64, passive bool, err error) {
	if d.arb == nil {
		return 1, false, nil
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	c, err := d.arb.Current(ctx, d.vm.Name)
	if err != nil {
		return 0, false, fmt.Errorf("read arbiter: %w", err)
	}
	switch {
	case c.Epoch == 0:
		c, err = d.arb.TryClaim(ctx, d.vm.Name, d.cfg.Name, 0)
		if err != nil {
			return 0, false, fmt.Errorf("claim %s: %w", d.vm.Name, err)
		}
		return c.Epoch, !c.Won, nil
	case c.Owner == d.cfg.Name:
		return c.Epoch, false, nil
	}
	d.log.Warn("another host owns the VM: staying passive", "epoch", c.Epoch, "owner", c.Owner)
	return c.Epoch, true, nil
}
