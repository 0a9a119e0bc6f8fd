package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"time"

	"github.com/ftgw/ftgw/internal/lab"
	"github.com/ftgw/ftgw/pkg/protect"
	"github.com/ftgw/ftgw/pkg/vip"
)

// A planned switchover moves the VM from the protected primary to its
// secondary with no output lost: the primary stops taking input, lets every
// output of the input it took leave under the Output Rule, and fences itself;
// the secondary, once its guest has consumed the same log, wins the next
// epoch and goes live. The old primary then joins it, and is rebuilt as its
// new secondary, as any host that lost the VM is.

// waitUntil polls cond every millisecond until it holds, for at most d.
func waitUntil(ctx context.Context, d time.Duration, what string, cond func() (bool, error)) error {
	start := time.Now()
	deadline := start.Add(d)
	for {
		ok, err := cond()
		if err != nil {
			return err
		}
		if ok {
			return nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("timed out waiting for %s", what)
		}
		// Fine-grained for the short waits it times, coarser for long
		// ones (a real VM's re-protection) so polling costs little.
		time.Sleep(min(max(time.Since(start)/50, time.Millisecond), 50*time.Millisecond))
	}
}

// handOver is the primary's half. It returns the epoch it served and the
// log position (on the log channel) the secondary must reach.
func (d *daemon) handOver(ctx context.Context) (epoch, head uint64, err error) {
	d.lifeMu.Lock()
	defer d.lifeMu.Unlock()
	if d.arb == nil {
		return 0, 0, errors.New("switchover: no arbiter configured: the standby could not claim the VM")
	}
	p := d.primary()
	if p == nil || !p.Synced() {
		return 0, 0, errors.New("switchover: the secondary is not connected")
	}
	if _, err := d.life.FireIf(protect.Protected, protect.HandOver); err != nil {
		return 0, 0, fmt.Errorf("switchover: this host is not a protected primary: %w", err)
	}
	rec := d.owner.Current()
	epoch = rec.Epoch
	draining := rec
	draining.Role = vip.RoleDraining
	if err := d.owner.Publish(draining); err != nil {
		d.fire(protect.HandOverAborted)
		return 0, 0, err
	}
	// The VM must hold still, so that its log ends.
	if err := d.eng.freeze(true); err != nil {
		d.fire(protect.HandOverAborted)
		return 0, 0, errors.Join(err, d.owner.Publish(rec))
	}
	// A frame that passed the old record may still be taking its position:
	// the log must hold still, every answer to it have left, and the
	// secondary hold all of it.
	var stable int
	err = waitUntil(ctx, 5*time.Second, "the guest's last outputs to leave", func() (bool, error) {
		logged := d.dp.Head()
		tookIn, err := d.eng.tookIn(logged)
		if err != nil {
			return false, err
		}
		drained := tookIn && d.dp.Acked() >= logged && d.hold.Stats().Held == 0 && d.dp.Pending() == 0
		if !drained || d.dp.Head() != logged {
			stable = 0
			return false, nil
		}
		stable++
		return stable >= 3, nil
	})
	if err != nil {
		// Back to serving: nothing was handed over.
		d.eng.freeze(false)
		d.fire(protect.HandOverAborted)
		return 0, 0, errors.Join(err, d.owner.Publish(rec))
	}
	head = p.Head()
	if err := d.publish(vip.RoleStandby, epoch); err != nil {
		return 0, 0, err
	}
	d.shipping.Store(false)
	d.fire(protect.HandedOver)
	// The standby takes over once it has consumed the log up to head; this
	// host joins it afterwards. Were the word lost, the standby would find
	// this host silent and ask the arbiter all the same.
	if err := p.HandOver(head); err != nil {
		d.log.Warn("tell the standby to take over", "err", err)
	}
	d.log.Info("handed over", "epoch", epoch, "head", head)
	d.channelStop()
	d.group.Go(func() error { d.awaitClaim(d.runCtx, epoch); return nil })
	return epoch, head, nil
}

// awaitClaim is the old primary's last part in a switchover (Yielded). Once
// the arbiter shows the standby claimed the VM, this host's copy is stale:
// it joins the new primary and is rebuilt from its snapshot. A standby that
// has not claimed it by the time its takeover would have given up (it died,
// or never got the word) has left nothing serving: this host asks the
// arbiter for the VM at the epoch it handed over, with the drained copy it
// kept, which is where the standby would have gone live from. Either may
// win that test-and-set; the loser joins the winner.
func (d *daemon) awaitClaim(ctx context.Context, epoch uint64) {
	giveUp := time.Now().Add(takeOverCatchUp + d.cfg.FailureTimeout + time.Second)
	for ctx.Err() == nil && d.state() == protect.Yielded {
		cctx, cancel := context.WithTimeout(ctx, time.Second)
		c, err := d.arb.Current(cctx, d.vm.Name)
		cancel()
		switch {
		case err == nil && c.Epoch > epoch:
			d.lifeMu.Lock()
			if d.state() == protect.Yielded {
				d.log.Info("the standby claimed the VM: joining it", "epoch", c.Epoch, "owner", c.Owner)
				d.rejoin()
			}
			d.lifeMu.Unlock()
			return
		case time.Now().After(giveUp):
			d.log.Warn("the standby never claimed the VM it was handed: claiming it back", "epoch", epoch)
			d.arbitrate(ctx, protect.Yielded, protect.PeerLost, causeSwitchover, time.Since(giveUp))
			return
		case err != nil:
			d.log.Warn("read the arbiter after a hand-over", "err", err)
		}
		time.Sleep(max(d.cfg.Heartbeat, 20*time.Millisecond))
	}
}

// takeOverCatchUp bounds how long a standby told to take over waits for
// its copy to take in the log the primary drained.
const takeOverCatchUp = 5 * time.Second

// takeOver is the secondary's half.
func (d *daemon) takeOver(ctx context.Context, epoch, head uint64) (failoverPhases, error) {
	phases := failoverPhases{Cause: causeSwitchover}
	if st := d.state(); st != protect.Standby {
		return phases, fmt.Errorf("switchover: this host is %s, not a standby", st)
	}
	start := time.Now()
	err := waitUntil(ctx, takeOverCatchUp, "the guest to consume the log", func() (bool, error) {
		if d.secondary().Received() < head {
			return false, nil
		}
		return d.eng.tookIn(head)
	})
	if err != nil {
		return phases, err
	}
	phases.Detection = time.Since(start) // here: catching up with the log
	d.lifeMu.Lock()
	defer d.lifeMu.Unlock()
	if _, err := d.life.FireIf(protect.Standby, protect.TakeOver); err != nil {
		return phases, fmt.Errorf("switchover: %w", err)
	}
	d.channelStop()
	if d.arb == nil {
		d.fire(protect.Lost)
		d.fence(epoch)
		return phases, errors.New("switchover: no arbiter configured: this host cannot claim the VM")
	}
	won, newEpoch, arbitration := d.claim(ctx, epoch)
	phases.Won, phases.Epoch, phases.Arbitration = won, newEpoch, arbitration
	d.settle(ctx, protect.Standby, phases)
	if !won {
		return phases, fmt.Errorf("switchover: lost the arbiter at epoch %d", newEpoch)
	}
	return phases, nil
}

// switchoverReply is what POST /switchover answers.
type switchoverReply struct {
	Epoch   uint64        `json:"epoch"`
	Head    uint64        `json:"head"`
	Drained time.Duration `json:"drained_ns"`
}

// serveSwitchover is POST /switchover: hand the VM over to its standby.
func (d *daemon) serveSwitchover(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	epoch, head, err := d.handOver(r.Context())
	if err != nil {
		http.Error(w, err.Error(), http.StatusConflict)
		return
	}
	json.NewEncoder(w).Encode(switchoverReply{Epoch: epoch, Head: head, Drained: time.Since(start)})
}

// onHandOver is the primary's word, over the log channel, to take over.
func (d *daemon) onHandOver(epoch, head uint64) {
	go func() {
		if _, err := d.takeOver(d.runCtx, epoch, head); err != nil {
			d.log.Error("switchover", "err", err)
		}
	}()
}

// switchoverCommand moves a protected VM from the daemon at --socket, its
// primary, to its standby, and waits until the old primary is the new
// standby.
func switchoverCommand(ctx context.Context, args []string) error {
	fs := newFlagSet("switchover", "[--socket PATH] [--vm NAME]", "Planned move of the VM from this host, its protected primary, to its standby, with no output lost.\nIt returns once this host is the new standby.")
	socket, vm := socketFlag(fs)
	timeout := fs.Duration("timeout", 30*time.Second, "how long to wait for the pair to be protected again")
	if err := fs.Parse(args); err != nil {
		return err
	}
	return switchover(ctx, os.Stdout, *socket, *vm, *timeout)
}

// switchover hands the VM called vm ("": the host's first) over from the
// host at socket to its standby.
func switchover(ctx context.Context, w io.Writer, socket, vm string, timeout time.Duration) error {
	start := time.Now()
	raw, err := controlPostSocket(socket, "/switchover", url.Values{"vm": {vm}})
	if err != nil {
		return err
	}
	var reply switchoverReply
	if err := json.Unmarshal([]byte(raw), &reply); err != nil {
		return fmt.Errorf("switchover reply: %w", err)
	}
	fmt.Fprintf(w, "switchover: handed over epoch %d at log position %d after %s of drain\n", reply.Epoch, reply.Head, reply.Drained.Round(10*time.Microsecond))
	var s Status
	err = waitUntil(ctx, timeout, "this host to be the new standby", func() (bool, error) {
		s, err = statusAt(socket, vm)
		return err == nil && s.State == protect.Standby.String() && s.Epoch > reply.Epoch, nil
	})
	if err != nil {
		return fmt.Errorf("%w (this host is %s)", err, s.State)
	}
	fmt.Fprintf(w, "switchover: the peer serves at epoch %d, protected again with this host as its standby, %s after the switchover began\n",
		s.Epoch, time.Since(start).Round(time.Millisecond))
	return nil
}

// labSwitchover switches the lab's VM over from whichever host is its
// protected primary now.
func labSwitchover(ctx context.Context, dir string) error {
	var from string
	for _, host := range lab.Hosts[:2] {
		if s, err := daemonStatus(dir, host.NS); err == nil && s.State == protect.Protected.String() {
			from = host.NS
		}
	}
	if from == "" {
		return errors.New("switchover needs a protected primary (see `ftgw lab status`)")
	}
	fmt.Printf("switchover from %s\n", from)
	start := time.Now()
	if err := switchover(ctx, os.Stdout, controlPath(hostDir(dir, from)), "", 30*time.Second); err != nil {
		return err
	}
	to := lab.Hosts[0].NS
	if to == from {
		to = lab.Hosts[1].NS
	}
	// A real VM's standby replays to the end of the log first.
	return waitUntil(ctx, 2*time.Minute, to+" to serve the VM", func() (bool, error) {
		s, err := daemonStatus(dir, to)
		if err == nil && s.Role == "active" {
			fmt.Printf("switchover: %s serves at epoch %d, %s after the switchover began\n", to, s.Epoch, time.Since(start).Round(time.Millisecond))
			return true, nil
		}
		return false, nil
	})
}
