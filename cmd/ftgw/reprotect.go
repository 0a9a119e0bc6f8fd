package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/ftgw/ftgw/internal/lab"
	"github.com/ftgw/ftgw/pkg/guest"
	"github.com/ftgw/ftgw/pkg/outputcommit"
	"github.com/ftgw/ftgw/pkg/vip"
)

// Re-protection gives a host that serves the VM alone a new secondary
// without stopping the VM: the survivor pauses input for a moment, takes its
// guest's state at log position P, opens a log channel that starts at P and
// resumes. The new secondary's VM starts from that state and follows the log
// from P+1; once it has acknowledged P the Output Rule holds again.

// snapshotReply is what the survivor hands the new secondary.
type snapshotReply struct {
	Position uint64      `json:"position"`
	Epoch    uint64      `json:"epoch"`
	State    guest.State `json:"state"`
}

// snapshotFrames reads the input count of a snapshot file.
func snapshotFrames(path string) (uint64, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return 0, fmt.Errorf("read snapshot: %w", err)
	}
	var st guest.State
	if err := json.Unmarshal(raw, &st); err != nil {
		return 0, fmt.Errorf("read snapshot %s: %w", path, err)
	}
	return st.Frames, nil
}

// consumedPosition is the log position the guest has reached.
func (d *daemon) consumedPosition() (uint64, error) {
	n, err := d.engine.InputsConsumed()
	return n - d.inputBase.Load(), err
}

// startReprotect is the survivor's half: it returns the snapshot the new
// secondary at peer starts from.
func (d *daemon) startReprotect(ctx context.Context, peer string) (snapshotReply, error) {
	var reply snapshotReply
	if st := d.state(); st != stateUnprotected {
		return reply, fmt.Errorf("reprotect: this host is %s, not serving alone", st)
	}
	rec := d.owner.Current()
	reply.Epoch = rec.Epoch
	// Input pauses (the VM's frames are dropped at the uplink, as on a
	// lossy link) so the guest's state sits still at one log position.
	paused := rec
	paused.Role = vip.RoleDraining
	if err := d.owner.Publish(paused); err != nil {
		return reply, err
	}
	resumed := false
	defer func() {
		if !resumed {
			if err := d.owner.Publish(rec); err != nil {
				d.log.Error("resume input", "err", err)
			}
		}
	}()
	var stable int
	err := waitUntil(ctx, 5*time.Second, "the guest to reach the log head", func() (bool, error) {
		head := d.dp.Head()
		consumed, err := d.consumedPosition()
		if err != nil {
			return false, err
		}
		if consumed != head || d.lastRead.Load() != head || d.dp.Head() != head {
			stable = 0
			return false, nil
		}
		reply.Position = head
		stable++
		return stable >= 3, nil
	})
	if err != nil {
		return reply, err
	}
	control := filepath.Join(d.cfg.StateDir, d.vm.Name+"-guest.sock")
	if reply.State, err = guest.QueryState(control); err != nil {
		return reply, err
	}
	if got := reply.State.Frames - d.inputBase.Load(); got != reply.Position {
		return reply, fmt.Errorf("reprotect: the guest moved to position %d during its snapshot at %d", got, reply.Position)
	}

	if d.hold == nil {
		// A secondary that went live has no hold queue yet.
		if d.hold, err = outputcommit.Open(d.dp, outputcommit.Config{
			Tap: d.tap, Uplink: d.uplink, Capacity: d.cfg.HoldCapacity, Logger: d.log,
		}); err != nil {
			return reply, err
		}
		d.hold.SetPassthrough(true)
		d.group.Go(func() error { return d.hold.Run(d.runCtx) })
	}
	if err := d.newPrimary(peer, reply.Position); err != nil {
		return reply, err
	}
	channelCtx, stop := context.WithCancel(d.runCtx)
	d.mu.Lock()
	d.stopChannel = stop
	d.mu.Unlock()
	// Everything logged from here on is queued for the new secondary; the
	// head sat still at Position, so nothing falls between.
	d.shipping.Store(true)
	// The Output Rule holds again from here, before the secondary is even
	// up: every output of input after the snapshot waits for its ack. Were
	// they released now, a new secondary that took over before it caught
	// up would lack inputs whose outputs clients already saw.
	d.dp.SetAcked(max(d.dp.Acked(), reply.Position))
	d.hold.SetPassthrough(false)
	rec.Role, rec.Passthrough = vip.RoleActive, false
	if err := d.owner.Publish(rec); err != nil {
		return reply, err
	}
	resumed = true
	channel := d.primary()
	d.group.Go(func() error { return channel.Run(channelCtx) })
	d.group.Go(func() error { return d.awaitProtection(channelCtx, reply.Position) })
	d.log.Info("re-protecting", "secondary", peer, "position", reply.Position, "epoch", reply.Epoch)
	return reply, nil
}

// reprotectTimeout bounds how long output may wait for a new secondary
// that does not come.
const reprotectTimeout = 10 * time.Second

// awaitProtection declares the pair protected once the new secondary holds
// the log up to the snapshot: from then on its copy of the VM can take over,
// and losing it is a failure to handle. A secondary that never joins is given
// up on: what waited for it is released and the survivor serves alone again.
func (d *daemon) awaitProtection(ctx context.Context, position uint64) error {
	deadline := time.Now().Add(reprotectTimeout)
	for ctx.Err() == nil {
		p := d.primary()
		if p.Connected() && p.Acked() >= position {
			unprotected := d.unprotectedFor()
			d.setState(stateProtected)
			d.log.Info("re-protected", "position", position, "unprotected_total", unprotected)
			return nil
		}
		if time.Now().After(deadline) {
			d.log.Error("re-protection abandoned: the new secondary did not join", "after", reprotectTimeout)
			d.channelStop()
			d.shipping.Store(false)
			d.hold.SetPassthrough(true)
			if err := d.publishUnprotected(d.owner.Current().Epoch); err != nil {
				return err
			}
			return nil
		}
		time.Sleep(time.Millisecond)
	}
	return nil
}

func (d *daemon) serveReprotect(mux *http.ServeMux) {
	mux.HandleFunc("POST /reprotect", func(w http.ResponseWriter, r *http.Request) {
		peer := r.FormValue("peer")
		if _, _, err := net.SplitHostPort(peer); err != nil {
			http.Error(w, "reprotect wants peer=host:port: "+err.Error(), http.StatusBadRequest)
			return
		}
		reply, err := d.startReprotect(r.Context(), peer)
		if err != nil {
			http.Error(w, err.Error(), http.StatusConflict)
			return
		}
		json.NewEncoder(w).Encode(reply)
	})
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
	return nil
}

type reprotection struct {
	survivor, secondary string
	position, epoch     uint64
	took                time.Duration
	unprotected         float64 // seconds the survivor has served alone, in all
}

func reprotect(ctx context.Context, dir string) (r reprotection, err error) {
	var survivor, other lab.Host
	for i, host := range lab.Hosts[:2] {
		if s, err := daemonStatus(dir, host.NS); err == nil && s.State == stateUnprotected.String() {
			survivor, other = host, lab.Hosts[1-i]
		}
	}
	if survivor.NS == "" {
		return r, errors.New("no lab host serves the VM alone: nothing to re-protect")
	}
	r.survivor, r.secondary = survivor.NS, other.NS
	// Whatever is left of the other host's daemon and VM goes.
	if err := lab.Crash(other.NS); err != nil {
		return r, err
	}
	time.Sleep(100 * time.Millisecond)

	start := time.Now()
	peer := net.JoinHostPort(other.Repl.Addr().String(), strconv.Itoa(lab.LogPort))
	raw, err := controlPost(dir, survivor.NS, "/reprotect", url.Values{"peer": {peer}})
	if err != nil {
		return r, err
	}
	var snap snapshotReply
	if err := json.Unmarshal([]byte(raw), &snap); err != nil {
		return r, fmt.Errorf("reprotect reply: %w", err)
	}
	r.position, r.epoch = snap.Position, snap.Epoch
	cfg, err := loadConfig(filepath.Join(hostDir(dir, other.NS), "ftgw.yaml"))
	if err != nil {
		return r, err
	}
	state, err := json.Marshal(snap.State)
	if err != nil {
		return r, err
	}
	cfg.Restore = filepath.Join(hostDir(dir, other.NS), "snapshot.json")
	if err := os.WriteFile(cfg.Restore, state, 0o600); err != nil {
		return r, err
	}
	cfg.Role, cfg.StartPosition = roleSecondary, snap.Position
	cfg.Peer.Listen, cfg.Peer.Address = peer, ""
	if err := startDaemon(ctx, dir, other.NS, cfg); err != nil {
		return r, err
	}
	var s Status
	err = waitUntil(ctx, 10*time.Second, "the pair to be protected", func() (bool, error) {
		s, err = daemonStatus(dir, survivor.NS)
		return s.State == stateProtected.String(), err
	})
	r.took, r.unprotected = time.Since(start), s.UnprotectedSeconds
	return r, err
}
