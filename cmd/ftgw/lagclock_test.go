package main

import (
	"testing"
	"time"
)

// The lag counts the VM's running time from when its log reached the
// replay's instruction count (interpolated between marks), leaves frozen
// time out, and forgets marks the replay has passed.
func TestLagClock(t *testing.T) {
	c := newLagClock()
	c.marks = []lagMark{{100, 0}, {200, 1 * time.Second}, {200, 2 * time.Second}, {300, 3 * time.Second}}
	c.start = time.Now().Add(-10 * time.Second) // the VM has run 10s
	near := func(got, want time.Duration) {
		t.Helper()
		if got < want-50*time.Millisecond || got > want+50*time.Millisecond {
			t.Fatalf("lag %s, want %s", got, want)
		}
	}
	near(c.behind(50), 10*time.Second)                        // before the first mark: from it
	near(c.behind(150), 9500*time.Millisecond)                // halfway from 100 at 0s to 200 at 1s
	near(c.behind(275), 10*time.Second-2750*time.Millisecond) // from 200 at 2s (the later time), 3/4 to 300 at 3s
	if len(c.marks) != 2 {
		t.Fatalf("kept %d marks after the replay passed 200, want 2 (the last before it, and later)", len(c.marks))
	}
	near(c.behind(1000), 7*time.Second) // past the last mark: from it

	c.freeze()
	c.frozenAt = c.frozenAt.Add(-4 * time.Second) // frozen for 4s so far
	near(c.behind(1000), 3*time.Second)
	near(c.frozenFor(), 4*time.Second)
	c.thaw()
	near(c.frozenFor(), 4*time.Second)
	near(c.behind(1000), 3*time.Second)

	c.logged(400)
	c.logged(400)
	if n := len(c.marks); n != 2 || c.marks[1].icount != 400 {
		t.Fatalf("marks %v: want one mark for 400, after the one at 300", c.marks)
	}
	near(c.behind(401), 0)
	c.restart(5)
	if len(c.marks) != 1 || c.marks[0].icount != 5 {
		t.Fatalf("after restart: %v", c.marks)
	}
}

// A new secondary that replays faster than the VM by a quarter or more
// catches up; one that keeps pace, or falls behind, does not.
func TestCatchUpTrend(t *testing.T) {
	start := time.Unix(0, 0)
	for _, tc := range []struct {
		name string
		lags []int // ms, one sample every 100ms
		want bool
	}{
		{"first window: benefit of the doubt", []int{3000, 3000}, true},
		{"shrinks 2x faster than time passes", []int{3000, 2800, 2600, 2400, 2200, 2000}, true},
		{"keeps pace", []int{3000, 3000, 3000, 3000, 3000, 3000}, false},
		{"shrinks, but slower than 1.25x", []int{3000, 2990, 2980, 2970, 2960, 2950}, false},
		{"grows", []int{3000, 3100, 3200, 3300, 3400, 3500}, false},
	} {
		var c catchUpTrend
		var got bool
		for i, lag := range tc.lags {
			got = c.note(start.Add(time.Duration(100*i)*time.Millisecond), time.Duration(lag)*time.Millisecond)
		}
		if got != tc.want {
			t.Errorf("%s: catches up %v, want %v", tc.name, got, tc.want)
		}
	}
}
