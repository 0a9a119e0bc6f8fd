package outputcommit

import (
	"testing"
	"time"
)

// Issue 12, hole 11: an ack used to release the frames it covers itself,
// under the queue's lock, so the log channel's reader that delivers acks
// waited for any release in flight, and a release's flush can take a
// second under load. An ack must return while a release holds the lock.
func TestAckNeverWaitsForARelease(t *testing.T) {
	q := &HoldQueue{acks: make(chan struct{}, 1)}
	q.mu.Lock() // a release in flight, flushing
	defer q.mu.Unlock()
	returned := make(chan struct{})
	go func() {
		q.ReleaseUpTo(7)
		q.ReleaseUpTo(5) // an older ack, late: the position stays
		close(returned)
	}()
	select {
	case <-returned:
	case <-time.After(2 * time.Second):
		t.Fatal("ReleaseUpTo waited for the release in flight")
	}
	if got := q.acked.Load(); got != 7 {
		t.Errorf("acked %d, want 7", got)
	}
	select {
	case <-q.acks:
	default:
		t.Error("the releaser was not woken")
	}
}
