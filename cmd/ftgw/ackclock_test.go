package main

import "testing"

// An ack covers the positions after the last ack, up to itself, that the
// ring still holds: the replication latency and the request trace both
// stamp exactly those.
func TestNewlyAcked(t *testing.T) {
	for _, tc := range []struct {
		lastAcked, head, pos, window uint64
		from, to                     uint64
	}{
		{0, 5, 3, 8, 1, 3},     // the first ack
		{3, 5, 10, 8, 4, 5},    // an ack past the head covers up to the head
		{2, 20, 20, 8, 13, 20}, // older positions left the ring
		{5, 5, 4, 8, 6, 4},     // an old ack covers nothing
		{0, 0, 7, 8, 1, 0},     // nothing appended yet
	} {
		from, to := newlyAcked(tc.lastAcked, tc.head, tc.pos, tc.window)
		if from != tc.from || to != tc.to {
			t.Errorf("newlyAcked(last %d, head %d, pos %d, window %d) = %d..%d, want %d..%d",
				tc.lastAcked, tc.head, tc.pos, tc.window, from, to, tc.from, tc.to)
		}
	}
	var c ackClock
	for p := uint64(1); p <= 4; p++ {
		c.append(p)
	}
	c.ack(2)
	c.ack(2) // again: nothing new
	c.ack(9) // past the head: up to 4
	h := c.histogram()
	var n uint64
	for _, b := range h.Buckets {
		n += b
	}
	if n != 4 {
		t.Errorf("ack latencies observed for %d positions, want 4", n)
	}
}
