package replay

import (
	"context"
	"fmt"
	"strings"
	"time"
)

// followStep is the least time between two moves of a following
// replayer's break. A move is three or four QMP commands, each of which
// wakes the replayer's main loop and takes QEMU's lock from its vCPU, and
// the relay's safe hold advances with almost every chunk of log, that is
// with almost every transmit of the primary's VM. On the lab under a PUT
// load (traced with strace, which slows the daemon) the secondary's daemon
// sent about 230 QMP commands a second, 52 of them replay-breaks: CPU the
// replayer and its daemon take from the recorder on a shared host. A
// replayer held at an older safe hold is as safe as at the latest; it only
// trails by up to this much more (against a max_lag of a second by
// default).
const followStep = 25 * time.Millisecond

// Follow replays the log as a Relay forwards it: it keeps the replayer's
// break at the relay's latest safe hold (Position.Hold) and lets it run up
// to there. A replayer that read past what has arrived would block inside
// QEMU with its QMP frozen, and one that read to the end of the FIFO would
// exit; one held anywhere else could diverge (hold.go). onIcount, if set,
// gets the replayed icount after each step. Follow returns when ctx ends
// (nil) or on the first failure.
func (q *QEMU) Follow(ctx context.Context, relay *Relay, onIcount func(uint64)) error {
	var brk uint64
	var moved time.Time
	for {
		if hold := relay.Forwarded().Hold; hold > brk {
			// Not more often than followStep.
			if wait := followStep - time.Since(moved); wait > 0 {
				select {
				case <-ctx.Done():
					return nil
				case <-time.After(wait):
				}
				hold = relay.Forwarded().Hold
			}
			if err := q.RunTo(hold); err != nil {
				return err
			}
			brk, moved = hold, time.Now()
		}
		if onIcount != nil {
			if n, err := q.Icount(); err == nil {
				onIcount(n)
			}
		}
		wctx, cancel := context.WithTimeout(ctx, 20*time.Millisecond)
		relay.WaitHold(wctx, brk+1)
		cancel()
		if ctx.Err() != nil {
			return nil
		}
		if err := relay.Err(); err != nil {
			return err
		}
	}
}

// RunTo moves the replayer's break to icount and lets it run. A replayer
// already there (stopped at its break) stays: a break at the current icount
// would never fire, and the replay would run on past the log it has.
func (q *QEMU) RunTo(icount uint64) error {
	n, err := q.Icount()
	if err != nil {
		return err
	}
	if n >= icount {
		return nil
	}
	if err := q.Execute("replay-break", map[string]uint64{"icount": icount}, nil); err != nil {
		return fmt.Errorf("break at icount %d, the replayer at %d: %w", icount, n, err)
	}
	st, err := q.Status()
	if err != nil || st.Running {
		return err
	}
	// Paused: at the old break, or already at this one, if it ran there
	// since the break was set. QEMU deletes a break once it has stopped
	// the VM at it, so a cont there would let the replay run free.
	if n, err = q.Icount(); err != nil || n >= icount {
		return err
	}
	return q.Execute("cont", nil, nil)
}

// ReplayToEnd runs the replayer to the end of the whole events relay has
// been given and waits until it stops there, one instruction short of the
// last INSTRUCTION event (the events after it stay unread: see
// Relay.TailInput). That stop may be anywhere, since the replay does not
// resume after it, but until the relay's backlog is all forwarded the steps
// stop at safe holds: each step lets the replayer read what is in the FIFO,
// which makes room for more.
func (q *QEMU) ReplayToEnd(ctx context.Context, relay *Relay) error {
	for {
		pos := relay.Forwarded()
		last := relay.Pending() == 0
		end := pos.Hold
		if last {
			end = pos.Icount - 1
		}
		if err := q.RunTo(end); err != nil {
			return fmt.Errorf("run to the end of the log: %w", err)
		}
		if err := q.waitStoppedAt(ctx, end); err != nil {
			return err
		}
		if err := relay.Err(); err != nil {
			return err
		}
		if last && relay.Pending() == 0 && relay.Forwarded().Icount == pos.Icount {
			return nil
		}
		if !last {
			wctx, cancel := context.WithTimeout(ctx, 20*time.Millisecond)
			relay.WaitHold(wctx, end+1)
			cancel()
		}
	}
}

// waitStoppedAt waits until the replayer has reached icount and stopped.
func (q *QEMU) waitStoppedAt(ctx context.Context, icount uint64) error {
	for {
		n, err := q.Icount()
		if err != nil {
			return err
		}
		st, err := q.Status()
		if err != nil {
			return err
		}
		if n >= icount && !st.Running {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("replay to icount %d: at %d: %w", icount, n, ctx.Err())
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// SaveVM saves the VM's state under tag in Dir's snapshot image.
func (q *QEMU) SaveVM(tag string) error {
	var out string
	if err := q.Execute("human-monitor-command", map[string]string{"command-line": "savevm " + tag}, &out); err != nil {
		return fmt.Errorf("savevm: %w", err)
	}
	if out != "" {
		return fmt.Errorf("savevm: %s", out)
	}
	return nil
}

// SaveRecorderVM saves a recorder's state under tag for a new replayer (see
// rebase.go): the VM pauses for the savevm. QEMU refuses while the
// recorder has events queued for the log ("try once more later"), so it
// is asked again, a little later each time.
func (q *QEMU) SaveRecorderVM(tag string) error {
	var err error
	for try := range 20 {
		if err = q.SaveVM(tag); err == nil || !strings.Contains(err.Error(), "once more later") {
			return err
		}
		time.Sleep(time.Duration(try+1) * 5 * time.Millisecond)
	}
	return err
}
