package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net/http"
	"net/url"
	"strconv"
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
// log position the secondary must reach.
func (d *daemon) handOver(ctx context.Context) (epoch, head uint64, err error) {
	d.lifeMu.Lock()
	defer d.lifeMu.Unlock()
	if d.qemu != nil {
		return 0, 0, errors.New("switchover: a real VM cannot be switched over yet (its replay would have to reach the primary's last instruction); crash-free moves need `ftgw lab reprotect` after a failover")
	}
	if _, err := d.life.FireIf(protect.Protected, protect.HandOver); err != nil {
		return 0, 0, fmt.Errorf("switchover: this host is not a protected primary: %w", err)
	}
	rec := d.owner.Current()
	epoch = rec.Epoch
	rec.Role = vip.RoleDraining
	if err := d.owner.Publish(rec); err != nil {
		d.fire(protect.HandOverAborted)
		return 0, 0, err
	}
	// A frame that passed the old record may still be taking its position:
	// the head must hold still, the guest have answered everything up to it
	// and every answer have left.
	var stable int
	err = waitUntil(ctx, 5*time.Second, "the guest's last outputs to leave", func() (bool, error) {
		head = d.dp.Head()
		consumed, err := d.consumedPosition()
		if err != nil {
			return false, err
		}
		drained := consumed == head && d.dp.Acked() >= head && d.hold.Stats().Held == 0 && d.dp.Pending() == 0 && d.dp.Head() == head
		if !drained {
			stable = 0
			return false, nil
		}
		stable++
		return stable >= 3, nil
	})
	if err != nil {
		// Back to serving: nothing was handed over.
		rec.Role = vip.RoleActive
		d.fire(protect.HandOverAborted)
		return 0, 0, errors.Join(err, d.owner.Publish(rec))
	}
	if err := d.publish(vip.RoleStandby, epoch); err != nil {
		return 0, 0, err
	}
	d.shipping.Store(false)
	d.fire(protect.HandedOver)
	d.log.Info("handed over", "epoch", epoch, "head", head)
	// The standby takes over only once our channel is gone: it follows
	// its primary's epoch until then. This host joins it afterwards.
	d.channelStop()
	d.group.Go(func() error {
		d.lifeMu.Lock()
		defer d.lifeMu.Unlock()
		if d.state() == protect.Passive {
			d.rejoin()
		}
		return nil
	})
	return epoch, head, nil
}

// takeOver is the secondary's half.
func (d *daemon) takeOver(ctx context.Context, epoch, head uint64) (failoverPhases, error) {
	phases := failoverPhases{Cause: causeSwitchover}
	if st := d.state(); st != protect.Standby {
		return phases, fmt.Errorf("switchover: this host is %s, not a standby", st)
	}
	start := time.Now()
	err := waitUntil(ctx, 5*time.Second, "the guest to consume the log", func() (bool, error) {
		consumed, err := d.consumedPosition()
		return d.secondary().Received() >= head && consumed >= head, err
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

func (d *daemon) serveSwitchover(mux *http.ServeMux) {
	mux.HandleFunc("POST /switchover/hand-over", func(w http.ResponseWriter, r *http.Request) {
		epoch, head, err := d.handOver(r.Context())
		if err != nil {
			http.Error(w, err.Error(), http.StatusConflict)
			return
		}
		fmt.Fprintf(w, "%d %d\n", epoch, head)
	})
	mux.HandleFunc("POST /switchover/take-over", func(w http.ResponseWriter, r *http.Request) {
		epoch, err1 := strconv.ParseUint(r.FormValue("epoch"), 10, 64)
		head, err2 := strconv.ParseUint(r.FormValue("head"), 10, 64)
		if err := errors.Join(err1, err2); err != nil {
			http.Error(w, "take-over wants epoch and head: "+err.Error(), http.StatusBadRequest)
			return
		}
		if _, err := d.takeOver(r.Context(), epoch, head); err != nil {
			http.Error(w, err.Error(), http.StatusConflict)
		}
	})
}

// switchoverCommand moves the lab's VM from its protected primary to the
// standby, whichever hosts those are now.
func switchoverCommand(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("switchover", flag.ContinueOnError)
	dir := fs.String("dir", defaultLabDir, "the lab's directory")
	if err := fs.Parse(args); err != nil {
		return err
	}
	var from, to string
	for _, host := range lab.Hosts[:2] {
		s, err := daemonStatus(*dir, host.NS)
		if err != nil {
			return fmt.Errorf("%s: %w", host.NS, err)
		}
		switch s.State {
		case protect.Protected.String():
			from = host.NS
		case protect.Standby.String():
			to = host.NS
		}
	}
	if from == "" || to == "" {
		return errors.New("switchover needs a protected primary and a standby (see `ftgw lab status`)")
	}
	start := time.Now()
	reply, err := controlPost(*dir, from, "/switchover/hand-over", nil)
	if err != nil {
		return err
	}
	var epoch, head uint64
	if _, err := fmt.Sscanf(reply, "%d %d", &epoch, &head); err != nil {
		return fmt.Errorf("hand-over reply %q: %w", reply, err)
	}
	drained := time.Since(start)
	if _, err := controlPost(*dir, to, "/switchover/take-over", url.Values{
		"epoch": {strconv.FormatUint(epoch, 10)}, "head": {strconv.FormatUint(head, 10)},
	}); err != nil {
		return err
	}
	fmt.Printf("switchover: %s handed over epoch %d at log position %d in %s; %s took over in %s (%s in all)\n",
		from, epoch, head, drained.Round(10*time.Microsecond), to, (time.Since(start) - drained).Round(10*time.Microsecond),
		time.Since(start).Round(10*time.Microsecond))
	return nil
}
