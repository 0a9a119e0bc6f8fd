package main

import (
	"sort"
	"sync"
	"time"
)

// lagClock measures how far a secondary's replay trails the primary's VM in
// the time the VM has run (frozen by the throttle not counted): from when
// the VM's log reached the instruction count the replay has reached, to
// now. That is what a go-live must replay, and it is not the instruction
// count's difference: QEMU replays an idle guest's time in real time, and
// an idle guest runs few instructions. A replay 10 M instructions behind
// an idle guest trails it by about 15 s.
//
// The time the log reached an instruction count is taken when the daemon
// read it, chunk by chunk, and interpolated between chunks. Counting from
// the chunk before would err large by up to a chunk's span, and stall the
// pair: a replayer is held short of the log's end (pkg/replay/hold.go), so
// while the throttle froze the VM it could never pass the last chunk, and
// the lag never fell below its resume threshold.
type lagClock struct {
	mu       sync.Mutex
	start    time.Time
	frozen   time.Duration // in all, the current freeze not counted
	frozenAt time.Time     // when the current freeze began, or zero
	marks    []lagMark     // icounts non-decreasing
}

// lagMark: the log had reached icount when the VM had run for ran.
type lagMark struct {
	icount uint64
	ran    time.Duration
}

func newLagClock() *lagClock { return &lagClock{start: time.Now()} }

// ranLocked is how long the VM has run since the clock started.
func (c *lagClock) ranLocked(now time.Time) time.Duration {
	ran := now.Sub(c.start) - c.frozen
	if !c.frozenAt.IsZero() {
		ran -= now.Sub(c.frozenAt)
	}
	return ran
}

// restart forgets the marks: a new recorder's log starts at icount.
func (c *lagClock) restart(icount uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.marks = append(c.marks[:0], lagMark{icount, c.ranLocked(time.Now())})
}

// logged notes that the log has reached icount.
func (c *lagClock) logged(icount uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if n := len(c.marks); n > 0 && c.marks[n-1].icount == icount {
		return // the earlier time is the one that counts
	}
	c.marks = append(c.marks, lagMark{icount, c.ranLocked(time.Now())})
}

// freeze and thaw bracket a throttle pause.
func (c *lagClock) freeze() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.frozenAt.IsZero() {
		c.frozenAt = time.Now()
	}
}

func (c *lagClock) thaw() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.frozenAt.IsZero() {
		c.frozen += time.Since(c.frozenAt)
		c.frozenAt = time.Time{}
	}
}

// frozenFor is how long the throttle has kept the VM frozen, in all.
func (c *lagClock) frozenFor() time.Duration {
	c.mu.Lock()
	defer c.mu.Unlock()
	now := time.Now()
	return now.Sub(c.start) - c.ranLocked(now)
}

// behind is the lag of a replay that has reached icount, and forgets the
// marks it no longer needs (replays only go forward).
func (c *lagClock) behind(icount uint64) time.Duration {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.marks) == 0 {
		return 0
	}
	now := c.ranLocked(time.Now())
	i := sort.Search(len(c.marks), func(i int) bool { return c.marks[i].icount >= icount })
	if i == 0 || i == len(c.marks) {
		// Before the first mark, or past the last one read.
		m := c.marks[max(i-1, 0)]
		c.marks = c.marks[:copy(c.marks, c.marks[max(i-1, 0):])]
		return max(now-m.ran, 0)
	}
	before, after := c.marks[i-1], c.marks[i]
	c.marks = c.marks[:copy(c.marks, c.marks[i-1:])]
	frac := float64(icount-before.icount) / float64(after.icount-before.icount)
	reached := before.ran + time.Duration(frac*float64(after.ran-before.ran))
	return max(now-reached, 0)
}
