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
	"github.com/ftgw/ftgw/pkg/protect"
	"github.com/ftgw/ftgw/pkg/replay"
	"github.com/ftgw/ftgw/pkg/vip"
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

// snapshotReply is what `ftgw lab reprotect` gets for a real VM's new
// secondary.
type snapshotReply struct {
	Position    uint64 `json:"position"`
	Epoch       uint64 `json:"epoch"`
	Incarnation uint64 `json:"incarnation"`
	// The new secondary replays the survivor's recording, which starts at
	// boot or, if FromSnapshot, from the go-live snapshot taken at guest
	// instruction count SnapshotIcount (served at /reprotect/image). It
	// must hold the log up to TakeoverAfter before it may take over.
	FromSnapshot   bool   `json:"from_snapshot,omitempty"`
	SnapshotIcount uint64 `json:"snapshot_icount,omitempty"`
	TakeoverAfter  uint64 `json:"takeover_after,omitempty"`
	RecordingBytes int64  `json:"recording_bytes,omitempty"`
}

// consumedPosition is the log position the synthetic guest has reached.
func (d *daemon) consumedPosition() (uint64, error) {
	d.engineMu.Lock()
	e := d.synthetic
	d.engineMu.Unlock()
	if e == nil {
		return 0, errors.New("no synthetic guest runs here")
	}
	n, err := e.InputsConsumed()
	return n - d.inputBase.Load(), err
}

// seekSecondary lets this host, serving the VM alone, take the first
// secondary that joins: its log channel dials the peer until a daemon there
// answers, and rebuilds that daemon's VM from a snapshot.
func (d *daemon) seekSecondary() {
	if d.qemu != nil {
		return // a real VM's new secondary comes from `ftgw lab reprotect`
	}
	if err := d.ensureHoldQueue(); err != nil {
		d.log.Error("seek a new secondary", "err", err)
		return
	}
	p, err := d.newPrimary(d.cfg.Peer.Address, d.dp.Head(), d.snapshotForNewSecondary)
	if err != nil {
		d.log.Error("seek a new secondary", "err", err)
		return
	}
	ctx := d.goChannel(p.Run)
	d.group.Go(func() error { return d.awaitProtection(ctx, p, nil) })
	d.log.Info("serving alone: waiting for a secondary to join", "peer", d.cfg.Peer.Address)
}

// snapshotForNewSecondary is the survivor's half of a re-protection, run
// by the log channel when a secondary that holds none of the log connects.
// The VM never pauses:
//
//  1. From the last log position read, X, every frame is queued for the new
//     secondary and every output of input after X waits for its ack: the
//     Output Rule is on again.
//  2. Once the guest has consumed X, its state is taken at whatever
//     position P >= X it has reached (the guest answers between frames).
//  3. The log restarts at P (rebase): the frames queued after P follow the
//     state. Outputs stamped up to P may leave: the state holds their
//     input, and no copy that lacks it can take over (this host was alone
//     until now, and the new one is not caught up).
func (d *daemon) snapshotForNewSecondary(ctx context.Context, rebase func(uint64) error) ([]byte, error) {
	// The lifecycle's lock, but never against the channel being stopped
	// by whoever holds it.
	for !d.lifeMu.TryLock() {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		time.Sleep(time.Millisecond)
	}
	defer d.lifeMu.Unlock()
	from := d.state()
	if from != protect.Unprotected && from != protect.Reprotecting {
		return nil, fmt.Errorf("reprotect: this host is %s, not serving", from)
	}
	start := time.Now()
	rec := d.owner.Current()

	d.logMu.Lock() // readLog takes no frame meanwhile: none falls between
	queuedFrom := d.lastRead.Load()
	err := rebase(queuedFrom)
	if err == nil {
		d.shipping.Store(true)
	}
	d.logMu.Unlock()
	if err != nil {
		return nil, err
	}
	// The log up to X needs no ack: this host served it alone.
	d.gate.Ack(queuedFrom)
	if err := d.gate.Enforce(rec); err != nil {
		return nil, err
	}
	if from == protect.Unprotected {
		d.fire(protect.PeerJoined)
	}

	var state guest.State
	err = waitUntil(ctx, 5*time.Second, "the guest to consume the log", func() (bool, error) {
		consumed, err := d.consumedPosition()
		return consumed >= queuedFrom, err
	})
	if err == nil {
		d.engineMu.Lock()
		e := d.synthetic
		d.engineMu.Unlock()
		state, err = guest.QueryState(e.control)
	}
	var raw []byte
	if err == nil {
		raw, err = json.Marshal(state)
	}
	position := state.Frames - d.inputBase.Load()
	if err == nil {
		err = rebase(position)
	}
	if err != nil {
		// The Output Rule stays on: the channel tries again, or the
		// re-protection is abandoned through the arbiter.
		return nil, err
	}
	d.reprotectAt.Store(position)
	d.gate.Ack(position)
	d.mu.Lock()
	d.reprotecting = &reprotectStatus{TakeoverAfter: position}
	d.mu.Unlock()
	d.log.Info("re-protecting: snapshot taken, the VM never paused", "queued_from", queuedFrom, "position", position,
		"bytes", len(raw), "took", time.Since(start))
	return raw, nil
}

// protectAgain opens the log channel to a new secondary (a real VM's) that
// holds the log up to position startHead, ships the log to it from there if
// shipLive, and turns the Output Rule back on: outputs stamped after acked
// wait for the new secondary's ack. It returns the channel's context.
func (d *daemon) protectAgain(peer string, startHead, acked uint64, rec vip.Record, shipLive bool) (context.Context, *lockstep.Primary, error) {
	if err := d.ensureHoldQueue(); err != nil {
		return nil, nil, err
	}
	p, err := d.newPrimary(peer, startHead, nil)
	if err != nil {
		return nil, nil, err
	}
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
	d.gate.Ack(acked)
	rec.Role = vip.RoleActive
	if err := d.gate.Enforce(rec); err != nil {
		d.shipping.Store(false)
		return nil, nil, err
	}
	d.fire(protect.PeerJoined)
	return d.goChannel(p.Run), p, nil
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
	reply := snapshotReply{Epoch: rec.Epoch, Incarnation: d.incarnation.Load()}
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
	d.reprotectAt.Store(reply.TakeoverAfter)
	channelCtx, p, err := d.protectAgain(peer, reply.Position, released, rec, false)
	if err != nil {
		f.Close()
		return reply, err
	}
	c := &catchUp{done: make(chan struct{})}
	d.group.Go(func() error {
		c.err = d.shipRecording(channelCtx, p, f, r.from.base, backlog)
		close(c.done)
		return nil
	})
	d.mu.Lock()
	d.reprotecting = &reprotectStatus{TakeoverAfter: reply.TakeoverAfter}
	d.mu.Unlock()
	d.group.Go(func() error { return d.awaitProtection(channelCtx, p, c) })
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
func (d *daemon) shipRecording(ctx context.Context, p *lockstep.Primary, f *os.File, base uint64, backlog int64) error {
	defer f.Close()
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

// awaitProtection declares the pair protected once the new secondary on
// channel p holds the log up to the position it was rebuilt at
// (reprotectAt): from then on its copy of the VM can take over, and losing
// it is a failure to handle. A real VM's new secondary must also have
// caught up (c) and replayed to within max_lag, or a failover would first
// replay the whole recording. A new secondary that stops making progress
// is given up on through the arbiter (protect.ReprotectFailed): it may
// already count as the VM's copy, so serving alone again at the same epoch
// could make two hosts serve.
func (d *daemon) awaitProtection(ctx context.Context, p *lockstep.Primary, c *catchUp) error {
	deadline := time.Now().Add(reprotectTimeout)
	var lastAcked, lastReplayed, lastPosition uint64
	for ctx.Err() == nil {
		switch d.state() {
		case protect.Unprotected:
			// Waiting for a secondary to join: as long as it takes.
			time.Sleep(5 * time.Millisecond)
			continue
		case protect.Reprotecting:
		default:
			return nil
		}
		position := d.reprotectAt.Load()
		acked, replayed := p.Acked(), d.peerReplayed.Load()
		if acked != lastAcked || replayed != lastReplayed || position != lastPosition {
			lastAcked, lastReplayed, lastPosition = acked, replayed, position
			deadline = time.Now().Add(reprotectTimeout)
		}
		ready := p.Synced() && acked >= position
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
			if _, err := d.life.FireIf(protect.Reprotecting, protect.PeerCaughtUp); err != nil {
				continue
			}
			d.mu.Lock()
			d.reprotecting = nil
			d.mu.Unlock()
			d.log.Info("re-protected", "position", position, "unprotected_total", d.life.AloneFor())
			return nil
		}
		if failed != nil || time.Now().After(deadline) {
			if failed == nil {
				failed = fmt.Errorf("the new secondary made no progress for %s", reprotectTimeout)
			}
			d.log.Error("re-protection abandoned", "err", failed)
			d.mu.Lock()
			d.reprotecting = &reprotectStatus{TakeoverAfter: position, Error: failed.Error()}
			d.mu.Unlock()
			d.logMu.Lock()
			d.shipping.Store(false)
			d.logMu.Unlock()
			d.arbitrate(d.runCtx, protect.Reprotecting, protect.ReprotectFailed, causeSecondaryLost, 0)
			return nil
		}
		time.Sleep(time.Millisecond)
	}
	return nil
}

// startReprotect is a real VM survivor's half of `ftgw lab reprotect`: it
// returns where the new secondary at peer starts. A synthetic VM needs no
// command: its survivor takes the first secondary that joins.
func (d *daemon) startReprotect(peer string) (snapshotReply, error) {
	d.lifeMu.Lock()
	defer d.lifeMu.Unlock()
	if st := d.state(); st != protect.Unprotected {
		return snapshotReply{}, fmt.Errorf("reprotect: this host is %s, not serving alone", st)
	}
	if d.qemu == nil {
		return snapshotReply{}, errors.New("reprotect: this VM is re-protected on its own: start the daemon on its peer, which joins")
	}
	return d.reprotectRecording(peer)
}

func (d *daemon) serveReprotect(mux *http.ServeMux) {
	mux.HandleFunc("POST /reprotect", func(w http.ResponseWriter, r *http.Request) {
		peer := r.FormValue("peer")
		if _, _, err := net.SplitHostPort(peer); err != nil {
			http.Error(w, "reprotect wants peer=host:port: "+err.Error(), http.StatusBadRequest)
			return
		}
		reply, err := d.startReprotect(peer)
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
		if s, err := daemonStatus(dir, host.NS); err == nil && (s.State == protect.Unprotected.String() || s.State == protect.Reprotecting.String()) {
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
	realVM := cfg.VMs[0].Engine == engineQEMU
	if realVM {
		if err := restoreConfig(ctx, dir, survivor, other, &cfg, &r); err != nil {
			return r, err
		}
	} else {
		// A fresh daemon joins the survivor, which rebuilds it.
		cfg.Restore, cfg.StartPosition, cfg.RestoreIcount, cfg.TakeoverAfter, cfg.Incarnation = "", 0, 0, 0, 0
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
		if err == nil && s.Reprotect != nil {
			r.position = s.Reprotect.TakeoverAfter
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
			fmt.Fprintf(os.Stderr, "re-protecting: %s acked log position %d of %d, replay lag %.1fs%s\n",
				other.NS, rp.Acked, rp.TakeoverAfter, rp.ReplayLagSeconds, map[bool]string{true: " (last try: " + rp.Error + ")", false: ""}[rp.Error != ""])
		}
		return false, nil
	})
	r.took, r.unprotected, r.epoch = time.Since(start), s.UnprotectedSeconds, s.Epoch
	return r, err
}

// bootImage as a real VM's restore image: its new secondary boots the VM
// and replays the survivor's recording from boot.
const bootImage = "boot"

// restoreConfig asks a real VM's survivor to re-protect it and writes, into
// the new secondary's cfg, where it starts: the survivor's go-live snapshot
// image (fetched first) or boot, and the recording since.
func restoreConfig(ctx context.Context, dir string, survivor, other lab.Host, cfg *Config, r *reprotection) error {
	// The snapshot image is fetched before the survivor starts holding
	// output for the new secondary: it does not change meanwhile.
	image := filepath.Join(hostDir(dir, other.NS), "restore.qcow2")
	imageIcount, ok, err := fetchSnapshotImage(dir, survivor.NS, image)
	if err != nil {
		return err
	} else if !ok {
		image = ""
	}
	peer := cfg.Peer.Listen
	raw, err := controlPost(dir, survivor.NS, "/reprotect", url.Values{"peer": {peer}})
	if err != nil {
		return err
	}
	var snap snapshotReply
	if err := json.Unmarshal([]byte(raw), &snap); err != nil {
		return fmt.Errorf("reprotect reply: %w", err)
	}
	r.recordingBytes = snap.RecordingBytes
	if snap.FromSnapshot != (image != "") || snap.SnapshotIcount != imageIcount {
		return fmt.Errorf("reprotect: %s's recording starts from the snapshot at icount %d (%v), the image fetched is at %d",
			survivor.NS, snap.SnapshotIcount, snap.FromSnapshot, imageIcount)
	}
	cfg.StartPosition, cfg.Incarnation = snap.Position, snap.Incarnation
	cfg.Restore, cfg.RestoreIcount, cfg.TakeoverAfter = image, snap.SnapshotIcount, snap.TakeoverAfter
	if cfg.Restore == "" {
		// From boot: the survivor's recorder started at boot.
		cfg.Restore = bootImage
	}
	return nil
}
