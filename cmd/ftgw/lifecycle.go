package main

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"time"

	"github.com/ftgw/ftgw/pkg/lockstep"
	"github.com/ftgw/ftgw/pkg/protect"
	"github.com/ftgw/ftgw/pkg/vip"
)

// The daemon carries out the VM's lifecycle (pkg/protect): the machine says
// where this host stands; the functions here move it, rewiring the owner
// record, the log channel and the engine on the way.

// Failover causes, as metric labels.
const (
	causePrimaryLost   = "primary_lost"
	causeSecondaryLost = "secondary_lost"
	causeSwitchover    = "switchover"
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

func (d *daemon) state() protect.State { return d.life.State() }

// fire moves the lifecycle; a refused transition (a late callback) is
// logged and changes nothing.
func (d *daemon) fire(ev protect.Event) (protect.State, bool) {
	st, err := d.life.Fire(ev)
	if err != nil {
		d.log.Debug("lifecycle", "err", err)
		return st, false
	}
	return st, true
}

// newIncarnation names a log this host starts afresh (lockstep's Hello).
func newIncarnation() uint64 {
	var b [8]byte
	for {
		rand.Read(b[:])
		if n := binary.BigEndian.Uint64(b[:]); n != 0 {
			return n
		}
	}
}

// watch declares the peer failed once it has been silent for the failure
// timeout, or, on a serving host, once output has waited that long for an
// ack the connected peer does not send. It is armed only once the pair has
// been connected: before that there is nothing to take over. A silence
// shorter than the timeout only holds output.
func (d *daemon) watch(ctx context.Context) error {
	if d.arb == nil {
		d.log.Warn("no arbiter configured: this host never takes over or goes on alone; failures only hold output")
		return nil
	}
	tick := time.NewTicker(max(d.cfg.Heartbeat/2, time.Millisecond))
	defer tick.Stop()
	warnedIneligible := false
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
		switch st := d.state(); st {
		case protect.Protected, protect.Reprotecting:
			p := d.primary()
			if p == nil || p.Stats().Connects == 0 {
				continue
			}
			if silent := p.SinceHeard(); silent > d.cfg.FailureTimeout {
				d.peerLost(ctx, st, causeSecondaryLost, silent)
			} else if stuck := min(d.ackClock.oldestPending(p.Acked()), p.SinceAck()); stuck > d.cfg.FailureTimeout && d.outputWaits() && p.Synced() {
				// (A new secondary starting its VM from the snapshot
				// acks nothing meanwhile: awaitProtection bounds that.)
				d.log.Warn("the secondary is connected but acknowledges nothing", "oldest_unacked", stuck)
				d.peerLost(ctx, st, causeSecondaryLost, stuck)
			}
		case protect.Standby:
			s := d.secondary()
			if s == nil || s.Stats().Connects == 0 {
				continue
			}
			silent := s.SinceHeard()
			if silent <= d.cfg.FailureTimeout {
				continue
			}
			if !d.mayTakeOver(s) {
				// A new secondary still receiving what the primary ran
				// alone: its copy lacks state clients have seen, so it
				// must not serve. The VM is lost, as it was while the
				// primary ran alone.
				if !warnedIneligible {
					d.log.Error("primary lost, not taking over: this secondary never received the log the primary ran alone",
						"received", s.Received(), "takeover_after", d.takeoverAfter.Load())
					warnedIneligible = true
				}
				continue
			}
			d.peerLost(ctx, st, causePrimaryLost, silent)
		}
	}
}

// mayTakeOver reports whether this standby's copy, following s, may ask
// for the VM (protect.MayTakeOver).
func (d *daemon) mayTakeOver(s *lockstep.Secondary) bool {
	return protect.MayTakeOver(s.HoldsLog(), s.Received(), d.takeoverAfter.Load())
}

// outputWaits reports whether some of the VM's output waits for an ack.
func (d *daemon) outputWaits() bool {
	return d.hold != nil && d.hold.Stats().Held > 0
}

// peerLost runs a failover from state from: the arbiter decides whether this
// host serves the VM, alone, at the next epoch. A serving host that wins
// lets out what it held; a standby that wins goes live. The loser stops
// releasing at once and joins the winner.
func (d *daemon) peerLost(ctx context.Context, from protect.State, cause string, silent time.Duration) {
	d.arbitrate(ctx, from, protect.PeerLost, cause, silent)
}

// arbitrate moves this host from state from to Arbitrating by ev and lets
// the arbiter settle who serves.
func (d *daemon) arbitrate(ctx context.Context, from protect.State, ev protect.Event, cause string, silent time.Duration) {
	d.lifeMu.Lock()
	defer d.lifeMu.Unlock()
	if _, err := d.life.FireIf(from, ev); err != nil {
		return // someone else moved this host meanwhile
	}
	known := d.owner.Current().Epoch
	if from == protect.Standby {
		// The epoch of the log this copy holds, not a newer one it saw
		// without following it: that owner may have released more.
		known = d.secondary().LogEpoch()
	}
	d.log.Warn("peer failed", "cause", cause, "silent", silent, "epoch", known, "was", from)
	d.channelStop()
	won, epoch, arbitration := d.claim(ctx, known)
	d.settle(ctx, from, failoverPhases{Cause: cause, Won: won, Epoch: epoch, Detection: silent, Arbitration: arbitration})
}

// settle ends an arbitration: the winner serves alone (a standby goes live
// first), the loser stops serving and joins the winner.
func (d *daemon) settle(ctx context.Context, from protect.State, phases failoverPhases) {
	start := time.Now()
	defer func() {
		phases.GoLive = time.Since(start)
		d.recordFailover(phases)
	}()
	if !phases.Won {
		d.fire(protect.Lost)
		d.fence(phases.Epoch)
		return
	}
	switch {
	case from == protect.Yielded:
		// A switchover's old primary claiming back the copy it drained
		// and kept: it runs on from where it stopped.
		if err := d.eng.freeze(false); err != nil {
			d.log.Error("claim back", "err", err)
			d.fence(phases.Epoch)
			return
		}
	case !from.Serves():
		drain, err := d.goLive(ctx)
		phases.Drain = drain
		if err != nil {
			d.log.Error("go live", "err", err)
			d.fence(phases.Epoch)
			return
		}
	}
	// The log is a new one from here: a copy that followed the old one
	// holds what this epoch's log no longer vouches for, so a standby that
	// missed the failover is rebuilt from a snapshot, never resumed.
	d.incarnation.Store(newIncarnation())
	d.fromBoot.Store(false)
	// The commit point: one map update and this host serves the VM alone;
	// what was held can go: no one else serves the VM.
	d.shipping.Store(false)
	err := d.ensureHoldQueue()
	if err == nil {
		err = d.gate.Open(d.ownerRecord(vip.RoleActive, phases.Epoch))
	}
	if err != nil {
		d.log.Error("go on unprotected", "err", err)
		d.fence(phases.Epoch)
		return
	}
	d.fire(protect.Won)
	if !from.Serves() {
		d.announce(ctx)
	}
	d.seekSecondary()
}

// goLive makes this standby's copy of the VM the one that serves: every
// record it received is already in its VM (delivered before acked), so the
// VM is exactly where the primary's was when it last heard from it; outputs
// the primary held but never released are reproduced by this VM.
func (d *daemon) goLive(ctx context.Context) (drain time.Duration, err error) {
	return d.eng.goLive(ctx, d.secondary().Received())
}

// claim runs the arbiter's test-and-set for the epoch this host knows. An
// arbiter that cannot answer is asked again (with backoff, until ctx ends):
// going live without it could make two hosts serve, and giving up would
// leave both hosts passive after a blip. Nothing is released meanwhile.
func (d *daemon) claim(ctx context.Context, known uint64) (won bool, epoch uint64, took time.Duration) {
	start := time.Now()
	backoff := 50 * time.Millisecond
	for {
		cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		c, err := d.arb.TryClaim(cctx, d.vm.Name, d.cfg.Name, known)
		cancel()
		if err == nil {
			if !c.Won {
				d.log.Warn("lost the arbiter", "known_epoch", known, "epoch", c.Epoch, "owner", c.Owner)
			}
			return c.Won, c.Epoch, time.Since(start)
		}
		d.log.Error("arbiter unreachable: asking again", "err", err, "retry_in", backoff)
		select {
		case <-ctx.Done():
			return false, known, time.Since(start)
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 2*time.Second)
	}
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
// epoch: it won the arbiter, or a secondary follows it. Its copy of the VM
// is stale from here on: it joins the owner to be rebuilt.
func (d *daemon) fence(epoch uint64) {
	if err := d.publish(vip.RoleStandby, epoch); err != nil {
		d.log.Error("fence", "err", err)
	}
	if d.gate != nil {
		d.gate.Discard()
	}
	d.shipping.Store(false)
	d.fire(protect.Fenced)
	d.channelStop()
	d.rejoin()
}

// onFenced is the log channel's word that another host serves at a newer
// epoch.
func (d *daemon) onFenced(epoch uint64) {
	go func() {
		d.lifeMu.Lock()
		defer d.lifeMu.Unlock()
		d.fence(epoch)
	}()
}

func (d *daemon) recordFailover(p failoverPhases) {
	d.mu.Lock()
	d.lastFailover = &p
	d.failovers[p.Cause]++
	d.mu.Unlock()
	d.log.Warn("failover", "cause", p.Cause, "won", p.Won, "epoch", p.Epoch,
		"detection", p.Detection, "arbitration", p.Arbitration, "drain", p.Drain, "go_live", p.GoLive, "state", d.state().String())
}

// start decides, from the arbiter, how this host starts for the VM
// (protect.StartEvent): on the VM's first boot the primary claims epoch 1
// and boots it, the secondary boots its copy and follows; once the VM has
// an owner, a starting host's copy is fresh and it joins.
func (d *daemon) start(ctx context.Context) (ev protect.Event, epoch uint64, owner string, err error) {
	if d.arb == nil {
		return protect.StartEvent(0, d.cfg.Role == rolePrimary), 1, "", nil
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	c, err := d.arb.Current(ctx, d.vm.Name)
	if err != nil {
		return 0, 0, "", fmt.Errorf("read arbiter: %w", err)
	}
	ev = protect.StartEvent(c.Epoch, d.cfg.Role == rolePrimary)
	switch ev {
	case protect.BootPrimary:
		c, err = d.arb.TryClaim(ctx, d.vm.Name, d.cfg.Name, 0)
		if err != nil {
			return 0, 0, "", fmt.Errorf("claim %s: %w", d.vm.Name, err)
		}
		if !c.Won {
			d.log.Warn("another host claimed the VM first: joining it", "epoch", c.Epoch, "owner", c.Owner)
			return protect.Rejoin, c.Epoch, c.Owner, nil
		}
	case protect.Rejoin:
		d.log.Info("the VM has an owner: joining it to be rebuilt from its snapshot", "epoch", c.Epoch, "owner", c.Owner)
	}
	return ev, c.Epoch, c.Owner, nil
}

// announceRestart tells the standby, when this host served the VM before
// its daemon restarted, that its copy is gone: the standby takes over at
// once rather than after the failure timeout. Tried for a few seconds; the
// failure timeout covers the rest.
func (d *daemon) announceRestart(ctx context.Context, epoch uint64) error {
	tlsCfg, err := lockstep.ClientTLS(d.cfg.Peer.Cert, d.cfg.Peer.Key, d.cfg.Peer.CA, d.cfg.logChannelID())
	if err != nil {
		return err
	}
	deadline := time.Now().Add(5 * time.Second)
	for ctx.Err() == nil && time.Now().Before(deadline) {
		err = lockstep.AnnounceRestart(ctx, d.cfg.Peer.Address, tlsCfg, d.vm.Name, epoch, time.Second)
		if err == nil {
			d.log.Info("told the standby this host restarted", "epoch", epoch)
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	d.log.Warn("could not tell the standby this host restarted; it takes over after the failure timeout", "err", err)
	return nil
}

// onPrimaryRestarted: the primary this standby follows restarted, and its
// copy of the VM with it. A failure, now.
func (d *daemon) onPrimaryRestarted(epoch uint64) {
	s := d.secondary()
	if d.arb == nil || d.state() != protect.Standby || s == nil || !d.mayTakeOver(s) {
		return
	}
	d.log.Warn("the primary's daemon restarted: its copy of the VM is gone", "epoch", epoch)
	go d.peerLost(d.runCtx, protect.Standby, causePrimaryLost, s.SinceHeard())
}
