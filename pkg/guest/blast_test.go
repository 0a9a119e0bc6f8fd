package guest

import "testing"

func TestParseBlast(t *testing.T) {
	for _, tc := range []struct {
		line string
		rate float64
		ok   bool
	}{
		{"BLAST 10 02:00:00:00:00:01 60", 0, true},
		{"BLAST 10 02:00:00:00:00:01 1514 250000", 250000, true},
		{"BLAST 10 02:00:00:00:00:01 60 0", 0, false},
		{"BLAST 10 02:00:00:00:00:01 60 -5", 0, false},
		{"BLAST 10 02:00:00:00:00:01 60 NaN", 0, false},
		{"BLAST 10 02:00:00:00:00:01 60 fast", 0, false},
		{"BLAST 10 02:00:00:00:00:01 59", 0, false},
		{"BLAST 10 02:00:00:00:00:01 60 1 2", 0, false},
	} {
		req, err := parseBlast(tc.line)
		if (err == nil) != tc.ok {
			t.Errorf("%q: err %v, want ok %v", tc.line, err, tc.ok)
			continue
		}
		if tc.ok && req.rate != tc.rate {
			t.Errorf("%q: rate %v, want %v", tc.line, req.rate, tc.rate)
		}
	}
}

// The guest stops writing only near the hold queue's capacity, and then
// until it has drained to half; a queue that never drains holds it for
// blastMaxWait at most.
func TestBackpressureWait(t *testing.T) {
	var nilBP *Backpressure
	if d := nilBP.wait(); d != 0 {
		t.Errorf("no backpressure: waited %v", d)
	}
	backlog := uint64(100)
	bp := &Backpressure{Backlog: func() uint64 { return backlog }, Capacity: 1024}
	if d := bp.wait(); d != 0 {
		t.Errorf("backlog 100 of 1024: waited %v", d)
	}
	backlog = 1000 // within a sixteenth of the capacity
	drains := bp.Backlog
	bp.Backlog = func() uint64 {
		b := drains()
		backlog = max(backlog, 100) - 100 // the gateway releases meanwhile
		return b
	}
	if d := bp.wait(); d == 0 {
		t.Error("backlog 1000 of 1024: did not wait")
	}
	if backlog > 512 {
		t.Errorf("resumed at backlog %d, want at most half the capacity", backlog)
	}
	stuck := &Backpressure{Backlog: func() uint64 { return 1024 }, Capacity: 1024}
	if d := stuck.wait(); d < blastMaxWait || d > 2*blastMaxWait {
		t.Errorf("a queue that never drains: waited %v, want about %v", d, blastMaxWait)
	}
}
