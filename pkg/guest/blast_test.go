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
