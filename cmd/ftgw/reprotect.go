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
	"github.com/ftgw/ftgw/pkg/lockstep"
	"github.com/ftgw/ftgw/pkg/outputcommit"
	"github.com/ftgw/ftgw/pkg/replay"
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
	State    guest.State `json:"state,omitzero"`
	// A real VM: the new secondary replays the survivor's recording, which
	// starts at boot or, if FromSnapshot, from the go-live snapshot taken
	// at guest instruction count SnapshotIcount (served at
	// /reprotect/image). It must hold the log up to TakeoverAfter before
	// it may take over.
	FromSnapshot   bool   `json:"from_snapshot,omitempty"`
	SnapshotIcount uint64 `json:"snapshot_icount,omitempty"`
	TakeoverAfter  uint64 `json:"takeover_after,omitempty"`
	RecordingBytes int64  `json:"recording_bytes,omitempty"`
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
	n, err := d.synthetic.InputsConsumed()
	return n - d.inputBase.Load(), err
}

// startReprotect is the survivor's half: it returns the snapshot the new
// secondary at peer starts from.
func (d *daemon) startReprotect(ctx context.Context, peer string) (snapshotReply, error) {
	if st := d.state(); st != stateUnprotected {
		return snapshotReply{}, fmt.Errorf("reprotect: this host is %s, not serving alone", st)
	}
	if d.qemu != nil {
		return d.reprotectRecording(peer)
	}
	var reply snapshotReply
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
	channelCtx, err := d.protectAgain(peer, reply.Position, reply.Position, rec, true)
	if err != nil {
		return reply, err
	}
	resumed = true
	d.group.Go(func() error { return d.awaitProtection(channelCtx, reply.Position, nil) })
	d.log.Info("re-protecting", "secondary", peer, "position", reply.Position, "epoch", reply.Epoch)
	return reply, nil
}

// protectAgain opens the log channel to a new secondary that holds the log
// up to position startHead, ships the log to it from there if shipLive,
// and turns the Output Rule back on: outputs stamped after acked wait for
// the new secondary's ack. It returns the channel's context.
func (d *daemon) protectAgain(peer string, startHead, acked uint64, rec vip.Record, shipLive bool) (context.Context, error) {
	if d.hold == nil {
		// A secondary that went live has no hold queue yet.
		hold, err := outputcommit.Open(d.dp, outputcommit.Config{
			Tap: d.tap, Uplink: d.uplink, Capacity: d.cfg.HoldCapacity, Logger: d.log,
		})
		if err != nil {
			return nil, err
		}
		d.hold = hold
		d.hold.SetPassthrough(true)
		d.group.Go(func() error { return d.hold.Run(d.runCtx) })
	}
	if err := d.newPrimary(peer, startHead); err != nil {
		return nil, err
	}
	channelCtx, stop := context.WithCancel(d.runCtx)
	d.mu.Lock()
	d.stopChannel = stop
	d.mu.Unlock()
	if shipLive {
		// Everything logged from here on is queued for the new
		// secondary; the head sits still at startHead, so nothing falls
		// between.
		d.shipping.Store(true)
	}
	// The Output Rule holds again from here, before the secondary is even
	// up: every output of input after acked waits for its ack. Were they
	// released now, a new secondary that took over before it caught up
	// would lack inputs whose outputs clients already saw.
	d.dp.SetAcked(max(d.dp.Acked(), acked))
	d.hold.SetPassthrough(false)
	rec.Role, rec.Passthrough = vip.RoleActive, false
	if err := d.owner.Publish(rec); err != nil {
		stop()
		d.shipping.Store(false)
		return nil, err
	}
	channel := d.primary()
	d.group.Go(func() error { return channel.Run(channelCtx) })
	return channelCtx, nil
}

// reprotectRecording re-protects a real VM. Its state cannot be taken at
// one log position and handed over (see recording.go), so the new
// secondary starts where this host's recorder started, from boot or the
// go-live snapshot, and replays the whole recording, then the live log.
//
// Outputs of the log recorded so far have left unprotected: the new
// secondary must have all of it before it may take over (TakeoverAfter),
// and until it has, this host's failure loses the VM as it would have
// anyway. Outputs of anything logged from now on wait for the new
// secondary's ack, as always.
func (d *daemon) reprotectRecording(peer string) (snapshotReply, error) {
	rec := d.owner.Current()
	reply := snapshotReply{Epoch: rec.Epoch}
	if ran, limit := d.lagClock.recorderRan(), d.vm.QEMU.MaxCatchUp; ran > limit {
		return reply, fmt.Errorf("reprotect: the VM's recorder has run %s, and a new secondary would replay all of it while the VM waits: more than qemu.max_catch_up (%s); raise it, or restart the pair when the VM may pause",
			ran.Round(time.Second), limit)
	}
	d.logMu.Lock()
	defer d.logMu.Unlock()
	r := d.recording
	f, err := r.reader()
	if err != nil {
		return reply, fmt.Errorf("reprotect: %w", err)
	}
	// Chunk positions go on from the last channel's, so the commit
	// latency clock never goes back.
	if p := d.primary(); p != nil {
		reply.Position = p.Head()
	}
	backlog := r.size
	reply.TakeoverAfter = reply.Position + uint64((backlog+lockstep.MaxPayload-1)/lockstep.MaxPayload)
	reply.FromSnapshot, reply.SnapshotIcount, reply.RecordingBytes = r.from.loadvm != "", r.from.icount, backlog
	released := d.lastRead.Load()
	d.chunks.restart(reply.Position, released)
	channelCtx, err := d.protectAgain(peer, reply.Position, released, rec, false)
	if err != nil {
		f.Close()
		return reply, err
	}
	c := &catchUp{done: make(chan struct{})}
	d.group.Go(func() error {
		c.err = d.shipRecording(channelCtx, f, r.from.base, backlog)
		close(c.done)
		return nil
	})
	d.group.Go(func() error { return d.awaitProtection(channelCtx, reply.TakeoverAfter, c) })
	d.log.Info("re-protecting from the recording", "secondary", peer, "position", reply.Position,
		"takeover_after", reply.TakeoverAfter, "recording_bytes", backlog, "from_snapshot", reply.FromSnapshot, "epoch", reply.Epoch)
	return reply, nil
}

// catchUp is a new secondary's catching up on the recording: done once
// the live log goes to it directly, or err says why it never will.
type catchUp struct {
	done chan struct{}
	err  error
}

// catchUpWindow bounds the chunks of recording in flight to a new
// secondary, well inside the channel's unacknowledged backlog, which the
// live log shares.
const catchUpWindow = 256

// shipRecording sends the recording, which starts at log position base,
// to the new secondary from its start, cut at backlog (the end of what
// TakeoverAfter covers), and hands over to live shipping (shipChunk) once
// it has caught up with the file.
func (d *daemon) shipRecording(ctx context.Context, f *os.File, base uint64, backlog int64) error {
	defer f.Close()
	p := d.primary()
	buf := make([]byte, lockstep.MaxPayload)
	var off int64
	for {
		d.logMu.Lock()
		end, err := d.recording.size, d.recording.err
		if err == nil && off == end && ctx.Err() == nil {
			d.shipping.Store(true)
			d.logMu.Unlock()
			p.Flush()
			d.log.Info("caught up on the recording: the live log goes to the new secondary", "bytes", off)
			return nil
		}
		d.logMu.Unlock()
		if err != nil {
			return err
		}
		if off < backlog {
			end = backlog
		}
		for p.Head()-p.Acked() >= catchUpWindow {
			p.Flush()
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(time.Millisecond):
			}
		}
		chunk, err := readChunk(f, buf, off, end)
		if err != nil {
			return err
		}
		off += int64(len(chunk))
		pos := d.queueChunk(base + uint64(off))
		if err := p.QueueLog(pos, chunk); err != nil {
			return fmt.Errorf("ship the recording: %w", err)
		}
		p.Flush()
	}
}

// snapshotIcountHeader carries the guest instruction count of the go-live
// snapshot served at /reprotect/image.
const snapshotIcountHeader = "Ftgw-Snapshot-Icount"

// reprotectTimeout bounds how long output may wait for a new secondary
// that does not come, or stops making progress.
const reprotectTimeout = 10 * time.Second

// awaitProtection declares the pair protected once the new secondary holds
// the log up to position: from then on its copy of the VM can take over,
// and losing it is a failure to handle. A real VM's new secondary must also
// have caught up (c) and replayed to within max_lag, or a failover would
// first replay the whole recording. A secondary that never joins, or stops
// making progress, is given up on: what waited for it is released and the
// survivor serves alone again.
func (d *daemon) awaitProtection(ctx context.Context, position uint64, c *catchUp) error {
	d.mu.Lock()
	d.reprotecting = &reprotectStatus{TakeoverAfter: position}
	d.mu.Unlock()
	deadline := time.Now().Add(reprotectTimeout)
	var lastAcked, lastReplayed uint64
	for ctx.Err() == nil {
		p := d.primary()
		acked, replayed := p.Acked(), d.peerReplayed.Load()
		if acked != lastAcked || replayed != lastReplayed {
			lastAcked, lastReplayed = acked, replayed
			deadline = time.Now().Add(reprotectTimeout)
		}
		ready := p.Connected() && acked >= position
		failed := error(nil)
		if c != nil {
			select {
			case <-c.done:
				failed = c.err
			default:
				ready = false
			}
			lag, ok := d.peerLag()
			ready = ready && ok && lag <= d.vm.QEMU.MaxLag
		}
		if ready && failed == nil {
			unprotected := d.unprotectedFor()
			d.mu.Lock()
			d.reprotecting = nil
			d.mu.Unlock()
			d.setState(stateProtected)
			d.log.Info("re-protected", "position", position, "unprotected_total", unprotected)
			return nil
		}
		if failed != nil || time.Now().After(deadline) {
			if failed == nil {
				failed = fmt.Errorf("the new secondary made no progress for %s", reprotectTimeout)
			}
			d.log.Error("re-protection abandoned", "err", failed)
			d.mu.Lock()
			d.reprotecting.Error = failed.Error()
			d.mu.Unlock()
			d.channelStop()
			d.logMu.Lock()
			d.shipping.Store(false)
			d.logMu.Unlock()
			d.hold.SetPassthrough(true)
			return d.publishUnprotected(d.owner.Current().Epoch)
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
	// A real VM's go-live snapshot, for a new secondary to start from.
	mux.HandleFunc("GET /reprotect/image", func(w http.ResponseWriter, r *http.Request) {
		if d.qemu == nil {
			http.Error(w, "this VM is not a real VM: its snapshot comes with POST /reprotect", http.StatusNotFound)
			return
		}
		d.logMu.Lock()
		from := d.recording.from
		d.logMu.Unlock()
		if from.loadvm == "" {
			http.Error(w, "the VM's recorder started at boot: a new secondary boots it too", http.StatusNotFound)
			return
		}
		// The image does not change while this recorder runs: only a
		// go-live saves into it.
		w.Header().Set(snapshotIcountHeader, strconv.FormatUint(from.icount, 10))
		http.ServeFile(w, r, replay.VMStatePath(d.qemu.dir))
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
	if r.recordingBytes > 0 {
		fmt.Printf("the new secondary replayed %d bytes of recording to catch up\n", r.recordingBytes)
	}
	return nil
}

type reprotection struct {
	survivor, secondary string
	position, epoch     uint64
	took                time.Duration
	unprotected         float64 // seconds the survivor has served alone, in all
	recordingBytes      int64   // a real VM: the recording the new secondary replayed
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
	cfg, err := loadConfig(filepath.Join(hostDir(dir, other.NS), "ftgw.yaml"))
	if err != nil {
		return r, err
	}

	start := time.Now()
	// A real VM's snapshot image is fetched before the survivor starts
	// holding output for the new secondary: it does not change meanwhile.
	realVM := cfg.VMs[0].Engine == engineQEMU
	var image string
	var imageIcount uint64
	if realVM {
		image = filepath.Join(hostDir(dir, other.NS), "restore.qcow2")
		var ok bool
		if imageIcount, ok, err = fetchSnapshotImage(dir, survivor.NS, image); err != nil {
			return r, err
		} else if !ok {
			image = ""
		}
	}
	peer := net.JoinHostPort(other.Repl.Addr().String(), strconv.Itoa(lab.LogPort))
	raw, err := controlPost(dir, survivor.NS, "/reprotect", url.Values{"peer": {peer}})
	if err != nil {
		return r, err
	}
	var snap snapshotReply
	if err := json.Unmarshal([]byte(raw), &snap); err != nil {
		return r, fmt.Errorf("reprotect reply: %w", err)
	}
	r.position, r.epoch, r.recordingBytes = snap.Position, snap.Epoch, snap.RecordingBytes
	cfg.Role, cfg.StartPosition = roleSecondary, snap.Position
	cfg.Peer.Listen, cfg.Peer.Address = peer, ""
	if realVM {
		if snap.FromSnapshot != (image != "") || snap.SnapshotIcount != imageIcount {
			return r, fmt.Errorf("reprotect: %s's recording starts from the snapshot at icount %d (%v), the image fetched is at %d",
				survivor.NS, snap.SnapshotIcount, snap.FromSnapshot, imageIcount)
		}
		cfg.Restore, cfg.RestoreIcount, cfg.TakeoverAfter = image, snap.SnapshotIcount, snap.TakeoverAfter
	} else {
		state, err := json.Marshal(snap.State)
		if err != nil {
			return r, err
		}
		cfg.Restore = filepath.Join(hostDir(dir, other.NS), "snapshot.json")
		if err := os.WriteFile(cfg.Restore, state, 0o600); err != nil {
			return r, err
		}
	}
	if err := startDaemon(ctx, dir, other.NS, cfg); err != nil {
		return r, err
	}
	// A real VM's new secondary replays the whole recording first.
	timeout := 10 * time.Second
	if realVM {
		timeout = 5 * time.Minute
	}
	var s Status
	lastReport := time.Now()
	err = waitUntil(ctx, timeout, "the pair to be protected", func() (bool, error) {
		s, err = daemonStatus(dir, survivor.NS)
		switch {
		case err != nil:
			return false, err
		case s.State == stateProtected.String():
			return true, nil
		case s.State != stateUnprotected.String():
			return false, fmt.Errorf("%s is %s", survivor.NS, s.State)
		case s.Reprotect != nil && s.Reprotect.Error != "":
			return false, fmt.Errorf("%s gave up: %s", survivor.NS, s.Reprotect.Error)
		}
		if rp := s.Reprotect; rp != nil && time.Since(lastReport) >= 5*time.Second {
			lastReport = time.Now()
			fmt.Fprintf(os.Stderr, "re-protecting: %s acked log position %d of %d, replay lag %.1fs\n",
				other.NS, rp.Acked, rp.TakeoverAfter, rp.ReplayLagSeconds)
		}
		return false, nil
	})
	r.took, r.unprotected = time.Since(start), s.UnprotectedSeconds
	return r, err
}
