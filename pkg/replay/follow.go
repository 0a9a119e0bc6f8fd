package replay

import (
	"context"
	"fmt"
	"time"
)

// Follow replays the log as a Relay forwards it: it keeps the replayer's
// break just short of the last whole event the relay has written and lets
// it run up to there. A replayer that read past what has arrived would block
// inside QEMU with its QMP frozen, and one that read to the end of the FIFO
// would exit. onIcount, if set, gets the replayed icount after each step.
// Follow returns when ctx ends (nil) or on the first failure.
func (q *QEMU) Follow(ctx context.Context, relay *Relay, onIcount func(uint64)) error {
	var brk uint64
	for {
		if fwd := relay.Forwarded(); fwd.Icount > brk+1 {
			if err := q.RunTo(fwd.Icount - 1); err != nil {
				return err
			}
			brk = fwd.Icount - 1
		}
		if onIcount != nil {
			if n, err := q.Icount(); err == nil {
				onIcount(n)
			}
		}
		wctx, cancel := context.WithTimeout(ctx, 20*time.Millisecond)
		relay.WaitForwarded(wctx, brk+2)
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
		return err
	}
	st, err := q.Status()
	if err != nil {
		return err
	}
	if !st.Running {
		return q.Execute("cont", nil, nil)
	}
	return nil
}

// ReplayToEnd runs the replayer to the end of the whole events relay has
// been given and waits until it stops there, one instruction short of the
// last INSTRUCTION event (the events after it stay unread: see
// Relay.TailInput). Events still in the relay's backlog count: each step
// lets the replayer read what is in the FIFO, which makes room for more.
func (q *QEMU) ReplayToEnd(ctx context.Context, relay *Relay) error {
	for {
		end := relay.Forwarded().Icount - 1
		if err := q.RunTo(end); err != nil {
			return fmt.Errorf("run to the end of the log: %w", err)
		}
		if err := q.waitStoppedAt(ctx, end); err != nil {
			return err
		}
		if err := relay.Err(); err != nil {
			return err
		}
		if relay.Pending() == 0 && relay.Forwarded().Icount-1 == end {
			return nil
		}
		wctx, cancel := context.WithTimeout(ctx, 20*time.Millisecond)
		relay.WaitForwarded(wctx, end+2)
		cancel()
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
