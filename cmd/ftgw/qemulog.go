package main

import (
	"context"
	"errors"
	"io"
	"os"
	"sync"
	"time"

	"github.com/ftgw/ftgw/pkg/lockstep"
)

// readQEMULog ships each recorder's replay log as it comes out of QEMU, in
// chunks of whatever the pipe holds: a protected primary ships them, any
// other host only drains the pipe so that QEMU never blocks on it.
func (d *daemon) readQEMULog(ctx context.Context) error {
	buf := make([]byte, lockstep.MaxPayload)
	for {
		var stream recorderLog
		select {
		case <-ctx.Done():
			return nil
		case stream = <-d.qemu.logs:
		}
		d.logMu.Lock()
		d.lastRead.Store(stream.base)
		d.recent.restart(stream.base)
		d.shipFrom = 0
		d.logMu.Unlock()
		// How far the VM has run, and when, for the throttle: the log is
		// flushed before every transmit and every 4 KiB, so it trails
		// the VM by little.
		d.lagClock.restart(stream.icount)
		for {
			n, err := stream.r.Read(buf)
			if n > 0 {
				d.lagClock.logged(stream.icount + d.shipChunk(buf[:n]))
			}
			if err != nil {
				// EOF or a closed pipe: that QEMU is gone; the engine
				// reports why, and a go-live sends the next stream.
				if !errors.Is(err, io.EOF) && !errors.Is(err, os.ErrClosed) {
					d.log.Warn("read replay log", "err", err)
				}
				break
			}
		}
	}
}

// shipChunk ships the next chunk of the VM's log if there is a secondary,
// and keeps it in the recent log. It returns the icount the log has
// reached since its recorder started.
func (d *daemon) shipChunk(chunk []byte) (icount uint64) {
	d.logMu.Lock()
	defer d.logMu.Unlock()
	end := d.lastRead.Add(uint64(len(chunk)))
	send := chunk
	if cut := d.shipFrom; end-uint64(len(chunk)) < cut {
		// Log from before a new secondary's snapshot, which QEMU had
		// not flushed when it saved it.
		send = chunk[min(uint64(len(chunk)), cut-(end-uint64(len(chunk)))):]
	}
	if d.shipping.Load() && len(send) > 0 {
		pos := d.queueChunk(end)
		if err := d.primary().QueueLog(pos, send); err != nil {
			d.logCannotCarry(pos, err)
		} else {
			d.primary().Flush()
		}
	}
	// After the send: a reply held for this chunk does not wait for the
	// scan.
	d.recent.append(chunk)
	return d.recent.icount()
}

// queueChunk numbers the next chunk of log, which ends at byte offset end.
func (d *daemon) queueChunk(end uint64) (pos uint64) {
	pos = d.chunks.add(end)
	d.ackClock.append(pos)
	return pos
}

// chunkIndex maps the log channel's positions (one per chunk of replay log)
// to the byte offsets the chunks end at, which is what the data path's
// stamps are, for the chunks not yet acknowledged.
type chunkIndex struct {
	mu   sync.Mutex
	next uint64   // position of ends[0]
	ends []uint64 // byte offset after each unacknowledged chunk
	last uint64   // byte offset after the last acknowledged chunk
}

// restart numbers chunks from position head+1 on, for a new secondary, with
// the log up to byte offset acked taken as acknowledged.
func (c *chunkIndex) restart(head, acked uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.next, c.ends, c.last = head+1, nil, acked
}

// add records a chunk ending at byte offset end and returns its position.
func (c *chunkIndex) add(end uint64) uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.next == 0 {
		c.next = 1
	}
	c.ends = append(c.ends, end)
	return c.next + uint64(len(c.ends)) - 1
}

// acked forgets the chunks up to position pos and returns the byte offset
// the log is acknowledged to.
func (c *chunkIndex) acked(pos uint64) uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	if pos >= c.next && c.next != 0 {
		n := min(pos-c.next+1, uint64(len(c.ends)))
		if n > 0 {
			c.last = c.ends[n-1]
			c.ends = c.ends[:copy(c.ends, c.ends[n:])]
			c.next += n
		}
	}
	return c.last
}

// reportReplayProgress tells the primary, with every heartbeat, how far
// this secondary's replay has got, and keeps the secondary's own lag metric
// (the log received that is not replayed yet).
func (d *daemon) reportReplayProgress(ctx context.Context) error {
	tick := time.NewTicker(d.cfg.Heartbeat)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
		if lag, replayed, ok := d.qemu.ReplayLag(); ok && d.secondary() != nil {
			d.replayLag.Store(int64(lag))
			d.secondary().SetProgress(replayed)
		}
	}
}

// throttle pauses the primary's VM while its secondary's replay trails by
// more than max_lag, and lets it run again once the lag is half that: a
// secondary that falls behind without bound would take as long to go live.
//
// The lag is how long the VM has run since its log reached the instruction
// count the secondary last reported replaying (lagClock). That covers all
// the log not yet replayed, wherever it is (the network, the relay, the
// FIFO), and a late report can only make the lag look larger: the throttle
// errs towards pausing early, never late. The count is read from the log,
// not over QMP: each QMP command wakes the recorder's main loop, which logs
// a clock checkpoint that the replayer must then take too.
func (d *daemon) throttle(ctx context.Context) error {
	maxLag := d.vm.QEMU.MaxLag
	tick := time.NewTicker(max(d.cfg.Heartbeat/2, time.Millisecond))
	defer tick.Stop()
	paused := false
	// A replay that stops moving while the VM is frozen has replayed all
	// it may: it is held short of the log's end (pkg/replay/hold.go), at
	// a point that can be a while before it in the VM's running time.
	// Frozen, the VM would never log what lets the replay on: thaw.
	stallAfter := 25 * d.cfg.Heartbeat
	var replayed uint64
	var moved time.Time
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
		if d.handingOver.Load() {
			// The switchover froze the VM, and thaws it if it gives up.
			if paused {
				d.lagClock.thaw()
				paused = false
			}
			continue
		}
		if n := d.peerReplayed.Load(); n != replayed {
			replayed, moved = n, time.Now()
		}
		// No report (yet) from the secondary of this channel: a new one,
		// or none at all, is no reason to keep the VM frozen.
		lag, ok := d.peerLag()
		if ok {
			d.replayLag.Store(int64(lag))
		}
		// A new secondary caught up on the recording is throttled too
		// (snapshotRecording): without it, it would trail by all the time
		// the VM ran alone, for good.
		switch {
		case !paused && ok && d.shipping.Load() && lag > maxLag:
			if err := d.qemu.Pause(true); err != nil {
				d.log.Warn("throttle: pause the vm", "err", err)
				continue
			}
			d.lagClock.freeze()
			paused = true
			d.throttles.Add(1)
		case paused && (!ok || lag < maxLag/2 || !d.shipping.Load() || time.Since(moved) >= stallAfter):
			if err := d.qemu.Pause(false); err != nil {
				d.log.Warn("throttle: resume the vm", "err", err)
				continue
			}
			d.lagClock.thaw()
			paused = false
		}
	}
}

// peerLag is how far the secondary's replay trails this primary's VM, in
// the VM's running time (lagClock), from the secondary's last progress
// report; ok is false until there is one.
func (d *daemon) peerLag() (lag time.Duration, ok bool) {
	if !d.hasPeerProgress.Load() {
		return 0, false
	}
	return d.lagClock.behind(d.peerReplayed.Load()), true
}
