package main

import (
	"sync"
	"time"

	"github.com/ftgw/ftgw/pkg/datapath"
)

// ackClock measures replication latency: from a log position's append to
// the ack that covers it. It remembers the append times of the last
// len(appended) positions; older ones are not measured.
type ackClock struct {
	mu        sync.Mutex
	appended  [8192]uint64
	head      uint64
	lastAcked uint64
	latency   datapath.LatencyHistogram
}

func (c *ackClock) append(pos uint64) {
	now := datapath.MonotonicNs()
	c.mu.Lock()
	c.appended[pos%uint64(len(c.appended))] = now
	c.head = pos
	c.mu.Unlock()
}

func (c *ackClock) ack(pos uint64) {
	now := datapath.MonotonicNs()
	c.mu.Lock()
	defer c.mu.Unlock()
	window := uint64(len(c.appended))
	from, to := newlyAcked(c.lastAcked, c.head, pos, window)
	for p := from; p <= to; p++ {
		c.latency.Observe(now - c.appended[p%window])
	}
	c.lastAcked = max(c.lastAcked, pos)
}

// newlyAcked is the range of positions, from to to, that an ack of pos
// newly covers in a ring of the last window positions up to head, where
// the previous ack covered lastAcked: those after it, still in the ring,
// up to pos. from > to when there are none.
func newlyAcked(lastAcked, head, pos, window uint64) (from, to uint64) {
	return max(lastAcked+1, head-min(head, window-1)), min(pos, head)
}

func (c *ackClock) histogram() datapath.LatencyHistogram {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.latency
}

// lockedHistogram is a latency histogram written by one goroutine and read
// at scrape time.
type lockedHistogram struct {
	mu sync.Mutex
	h  datapath.LatencyHistogram
}

func (l *lockedHistogram) observe(ns uint64) {
	l.mu.Lock()
	l.h.Observe(ns)
	l.mu.Unlock()
}

func (l *lockedHistogram) snapshot() datapath.LatencyHistogram {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.h
}

// oldestPending is how long the oldest log position not yet acknowledged
// (acked+1) has waited, 0 if every position appended is acknowledged.
func (c *ackClock) oldestPending(acked uint64) time.Duration {
	c.mu.Lock()
	defer c.mu.Unlock()
	if acked >= c.head {
		return 0
	}
	window := uint64(len(c.appended))
	if c.head-acked > window {
		acked = c.head - window // older than the clock remembers: as old as it can tell
	}
	return time.Duration(datapath.MonotonicNs() - c.appended[(acked+1)%window])
}
