package main

import (
	"errors"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/ftgw/ftgw/internal/lab"
	"github.com/ftgw/ftgw/pkg/guest"
)

// A failed transfer adds its time and none of its bytes, so a case that
// fails fast never rates faster; fastest and slowest count intact ones only.
func TestSummarizeBulk(t *testing.T) {
	const mb = 1 << 20
	ok := func(d time.Duration) guest.BulkResult {
		return guest.BulkResult{Requested: 4 * mb, Received: 4 * mb, Elapsed: d}
	}
	s := summarizeBulk([]guest.BulkResult{
		ok(time.Second),
		ok(2 * time.Second),
		{Requested: 4 * mb, Received: 4*mb - 1, Elapsed: time.Millisecond},                              // short, quick
		{Requested: 4 * mb, Received: 4 * mb, Elapsed: 2 * time.Millisecond, Err: errors.New("byte 9")}, // corrupt
		{Requested: 4 * mb, Elapsed: 997 * time.Millisecond, Err: errors.New("connect: refused")},
	})
	if s.transfers != 5 || s.failed != 3 || s.requested != 20*mb || s.intact != 8*mb {
		t.Fatalf("%+v", s)
	}
	if want := float64(8*mb) * 8 / 4; s.rate() != want {
		t.Errorf("rate %.0f, want %.0f (8 MiB over the 4 s of all five)", s.rate(), want)
	}
	if s.fastest != float64(4*mb)*8 || s.slowest != float64(4*mb)*8/2 {
		t.Errorf("fastest %.0f, slowest %.0f", s.fastest, s.slowest)
	}
	if s.firstErr == nil || !strings.Contains(s.firstErr.Error(), "4194303 of 4194304") {
		t.Errorf("first error %v, want the short transfer's", s.firstErr)
	}
	if r := summarizeBulk([]guest.BulkResult{{Requested: 10, Elapsed: time.Second, Err: errors.New("x")}}).rate(); r != 0 {
		t.Errorf("all failed: rate %f, want 0", r)
	}
	if r := summarizeBulk(nil).rate(); r != 0 {
		t.Errorf("none: rate %f", r)
	}
}

func TestBaselineTargets(t *testing.T) {
	ms := func(n float64) time.Duration { return time.Duration(n * float64(time.Millisecond)) }
	var pct [numCases][]time.Duration
	pct[caseUnprotected] = []time.Duration{ms(2), ms(4), ms(8)}
	pct[casePassthrough] = []time.Duration{ms(3), ms(8), ms(9)} // exactly at both limits
	pct[caseCommit] = []time.Duration{ms(3.1), ms(8.1), ms(30)} // just over
	var bulk [numCases]bulkSummary
	bulk[caseUnprotected] = bulkSummary{transfers: 1, intact: 100e6 / 8, elapsed: time.Second} // 100 Mbit/s
	bulk[casePassthrough] = bulkSummary{transfers: 1, intact: 50e6 / 8, elapsed: time.Second}
	bulk[caseCommit] = bulkSummary{transfers: 1, intact: 49e6 / 8, elapsed: time.Second}
	rows := baselineTargets(pct, bulk, true)
	if len(rows) != 3 {
		t.Fatalf("%d rows", len(rows))
	}
	for i, want := range []struct{ limit, off, on string }{
		{"3000.0µs", ": met", ": not met"},
		{"8000.0µs", ": met", ": not met"},
		{"50.0 Mbit/s", "(50%): met", "(49%): not met"},
	} {
		r := rows[i]
		if r.limit != want.limit || !strings.HasSuffix(r.verdicts[0], want.off) || !strings.HasSuffix(r.verdicts[1], want.on) {
			t.Errorf("row %d: %+v, want limit %s, verdicts ending %q and %q", i, r, want.limit, want.off, want.on)
		}
	}
	if rows := baselineTargets(pct, bulk, false); len(rows) != 2 {
		t.Errorf("without bulk: %d rows, want 2", len(rows))
	}

	// No unprotected figures: nothing is judged met.
	var none [numCases][]time.Duration
	for c := range none {
		none[c] = make([]time.Duration, 3)
	}
	none[caseCommit] = []time.Duration{ms(1), ms(1), ms(1)}
	for _, r := range baselineTargets(none, [numCases]bulkSummary{}, true) {
		for _, v := range r.verdicts {
			if strings.HasSuffix(v, ": met") {
				t.Errorf("%s: %q with no baseline", r.name, v)
			}
		}
	}
	// A baseline with failed transfers is named beside the verdict.
	bulk[caseUnprotected].failed = 1
	if v := baselineTargets(pct, bulk, true)[2].verdicts[0]; !strings.Contains(v, "1 unprotected transfers failed") {
		t.Errorf("verdict %q does not name the baseline's failures", v)
	}
}

func TestRoundOrder(t *testing.T) {
	first := map[int]bool{}
	for r := range numCases {
		o := roundOrder(r)
		sorted := slices.Sorted(slices.Values(o))
		if !slices.Equal(sorted, []int{0, 1, 2}) {
			t.Fatalf("round %d: %v", r, o)
		}
		first[o[0]] = true
	}
	if len(first) != numCases {
		t.Errorf("over %d rounds, %d cases ran first; want each once", numCases, len(first))
	}
}

func TestOptionPairsAndDiff(t *testing.T) {
	args := []string{"-M", "q35", "-nodefaults", "-icount", "shift=5,sleep=on,rr=record", "-append", "console=ttyS0 ftgw.ip=192.0.2.10/24", "-S"}
	got := optionPairs(args)
	want := []string{"-M q35", "-nodefaults", "-icount shift=5,sleep=on,rr=record", `-append "console=ttyS0 ftgw.ip=192.0.2.10/24"`, "-S"}
	if !slices.Equal(got, want) {
		t.Fatalf("optionPairs = %q, want %q", got, want)
	}
	a, b := optionDiff([]string{"-M q35", "-x 1", "-x 1", "-y"}, []string{"-x 1", "-M q35", "-z"})
	if !slices.Equal(a, []string{"-x 1", "-y"}) || !slices.Equal(b, []string{"-z"}) {
		t.Errorf("optionDiff = %q, %q", a, b)
	}
}

// The unprotected VM's QEMU is the recorder's but for record/replay and the
// guest's address: what the bench prints as the difference.
func TestPlainMachineDiffersOnlyInAddressAndReplay(t *testing.T) {
	vm := VMConfig{Name: "vm1", IP: "192.0.2.10", MAC: "02:46:54:47:00:0a", Engine: engineQEMU,
		QEMU: QEMUConfig{Kernel: "/k", Initrd: "/i", Disk: "/d", Cmdline: "console=ttyS0 quiet ftgw.ip=192.0.2.10/24 panic=-1", MemoryMB: 256}}
	p, r := lab.PlainMachine(vmMachine(vm)), vmMachine(vm)
	if p.Cmdline != "console=ttyS0 quiet ftgw.ip=203.0.113.10/24 panic=-1" {
		t.Errorf("plain cmdline %q", p.Cmdline)
	}
	p.Cmdline = r.Cmdline
	if p.Kernel != r.Kernel || p.Initrd != r.Initrd || p.MemoryMB != r.MemoryMB || p.MAC.String() != r.MAC.String() || !p.Disk || !r.Disk {
		t.Errorf("plain %+v, recorder %+v", p, r)
	}
}

func TestParseProcStatParent(t *testing.T) {
	comm, ppid, err := parseProcStatParent("4242 (qemu-system-x86) S 4100 4242 4100 0 -1 4194560 12 0 0 0 5 3 0 0 20 0 4 0")
	if err != nil || comm != "qemu-system-x86" || ppid != 4100 {
		t.Errorf("= %q, %d, %v", comm, ppid, err)
	}
	comm, ppid, err = parseProcStatParent("7 (a) b (c)) R 1 7 7")
	if err != nil || comm != "a) b (c)" || ppid != 1 {
		t.Errorf("a name with parentheses: %q, %d, %v", comm, ppid, err)
	}
	for _, bad := range []string{"", "7 qemu S 1", "7 (x) S", "7 (x) S one"} {
		if _, _, err := parseProcStatParent(bad); err == nil {
			t.Errorf("parseProcStatParent(%q): no error", bad)
		}
	}
}
