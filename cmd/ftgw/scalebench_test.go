package main

import (
	"bytes"
	"fmt"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/ftgw/ftgw/internal/lab"
)

// commitText is a scrape of the commit-latency histograms: for each VM and
// path, the cumulative counts of the buckets le=0.0001, 0.001, +Inf.
func commitText(counts map[[2]string][3]uint64) string {
	var b strings.Builder
	b.WriteString("# TYPE ftgw_output_commit_latency_seconds histogram\n")
	for key, c := range counts {
		vm, path := key[0], key[1]
		for i, le := range []string{"0.0001", "0.001", "+Inf"} {
			fmt.Fprintf(&b, "ftgw_output_commit_latency_seconds_bucket{vm=%q,path=%q,le=%q} %d\n", vm, path, le, c[i])
		}
		fmt.Fprintf(&b, "ftgw_output_commit_latency_seconds_sum{vm=%q,path=%q} %g\n", vm, path, float64(c[2])*0.0002)
		fmt.Fprintf(&b, "ftgw_output_commit_latency_seconds_count{vm=%q,path=%q} %d\n", vm, path, c[2])
	}
	return b.String()
}

func parseScrape(t *testing.T, text string) map[string]*dto.MetricFamily {
	t.Helper()
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(strings.NewReader(text))
	if err != nil {
		t.Fatal(err)
	}
	return families
}

func bucketCounts(h *dto.Histogram) []uint64 {
	var out []uint64
	for _, b := range h.GetBucket() {
		out = append(out, b.GetCumulativeCount())
	}
	return out
}

// The delta of each VM sums its two paths and subtracts the first scrape;
// a VM that appeared in between counts whole.
func TestCommitDeltasSumPathsPerVM(t *testing.T) {
	before := parseScrape(t, commitText(map[[2]string][3]uint64{
		{"vm1", "fast"}: {1, 2, 2}, {"vm1", "held"}: {0, 5, 6},
		{"vm2", "fast"}: {0, 0, 0}, {"vm2", "held"}: {3, 3, 3},
	}))
	after := parseScrape(t, commitText(map[[2]string][3]uint64{
		{"vm1", "fast"}: {11, 12, 12}, {"vm1", "held"}: {0, 105, 106},
		{"vm2", "fast"}: {0, 0, 0}, {"vm2", "held"}: {3, 3, 3},
		{"vm3", "held"}: {1, 2, 4},
	}))
	d, err := commitDeltas(before, after)
	if err != nil {
		t.Fatal(err)
	}
	if len(d) != 3 {
		t.Fatalf("deltas for %d VMs, want 3", len(d))
	}
	vm1 := d["vm1"]
	if vm1.GetSampleCount() != 110 || fmt.Sprint(bucketCounts(vm1)) != "[10 110 110]" {
		t.Errorf("vm1: count %d buckets %v, want 110 and [10 110 110]", vm1.GetSampleCount(), bucketCounts(vm1))
	}
	if got := vm1.GetSampleSum(); got < 0.0219 || got > 0.0221 {
		t.Errorf("vm1: sum %g, want 110 × 0.2ms", got)
	}
	if d["vm2"].GetSampleCount() != 0 {
		t.Errorf("vm2 released nothing in between; delta %d", d["vm2"].GetSampleCount())
	}
	if d["vm3"].GetSampleCount() != 4 {
		t.Errorf("vm3, new in the second scrape: %d, want all of its 4", d["vm3"].GetSampleCount())
	}
	agg, err := sumHistograms(d)
	if err != nil {
		t.Fatal(err)
	}
	if agg.GetSampleCount() != 114 {
		t.Errorf("aggregate %d frames, want 114", agg.GetSampleCount())
	}
	// vm1's 10 fast frames under 0.1ms and 100 held ones under 1ms: its
	// p99 lies in the 1ms bucket, above the aggregate's p50.
	if p50, p99 := histogramQuantile(agg, 0.5), histogramQuantile(vm1, 0.99); p50 >= p99 || p99 > time.Millisecond {
		t.Errorf("aggregate p50 %s, vm1 p99 %s", p50, p99)
	}
	if vm, p99 := worstP99(d); vm != "vm3" || p99 != micros(time.Millisecond) {
		t.Errorf("worst VM %s at %s, want vm3 (half its frames above 1ms) at the last finite bound, 1ms", vm, p99)
	}
}

// A counter that went down means the daemon restarted: no delta.
func TestCommitDeltasRefuseARestart(t *testing.T) {
	before := parseScrape(t, commitText(map[[2]string][3]uint64{{"vm1", "held"}: {5, 9, 9}}))
	after := parseScrape(t, commitText(map[[2]string][3]uint64{{"vm1", "held"}: {1, 2, 3}}))
	if _, err := commitDeltas(before, after); err == nil || !strings.Contains(err.Error(), "restarted") {
		t.Errorf("error %v, want a restart named", err)
	}
}

func TestAddHistogram(t *testing.T) {
	a := parseScrape(t, commitText(map[[2]string][3]uint64{{"vm1", "held"}: {1, 2, 3}}))
	h := a["ftgw_output_commit_latency_seconds"].GetMetric()[0].GetHistogram()
	sum, err := addHistogram(nil, h)
	if err != nil || sum.GetSampleCount() != 3 || fmt.Sprint(bucketCounts(sum)) != fmt.Sprint(bucketCounts(h)) {
		t.Fatalf("nil + h = %v (%v), want h", sum, err)
	}
	sum, err = addHistogram(sum, h)
	if err != nil || sum.GetSampleCount() != 6 || bucketCounts(sum)[1] != 4 {
		t.Errorf("h + h = %v (%v)", sum, err)
	}
	if h.GetSampleCount() != 3 {
		t.Error("addHistogram changed its argument")
	}
	bound := 0.5
	var one uint64 = 1
	other := &dto.Histogram{SampleCount: &one, Bucket: []*dto.Bucket{{UpperBound: &bound, CumulativeCount: &one}}}
	if _, err := addHistogram(h, other); err == nil {
		t.Error("histograms with other buckets added up")
	}
}

func TestParseVmRSS(t *testing.T) {
	status := "Name:\tftgw\nVmPeak:\t  900000 kB\nVmRSS:\t   51200 kB\nThreads:\t12\n"
	if got, err := parseVmRSS(status); err != nil || got != 50<<20 {
		t.Errorf("rss %d (%v), want 50 MiB", got, err)
	}
	if _, err := parseVmRSS("Name:\tkthreadd\n"); err == nil {
		t.Error("no VmRSS line, no error")
	}
}

func TestParseScaleCounts(t *testing.T) {
	if got, err := parseScaleCounts("1, 8,64"); err != nil || fmt.Sprint(got) != "[1 8 64]" {
		t.Errorf("1, 8,64: %v %v", got, err)
	}
	for _, bad := range []string{"", "0", "65", "1,,8", "eight"} {
		if _, err := parseScaleCounts(bad); err == nil {
			t.Errorf("--scale %q accepted", bad)
		}
	}
}

// Beyond 8 VMs the per-VM list shows the 3 best and 3 worst by commit p99
// unless verbose; a VM that released nothing sorts first.
func TestPerVMLinesBestAndWorst(t *testing.T) {
	var perVM []vmPuts
	counts := map[[2]string][3]uint64{}
	// In reverse, so that only sorting puts them in order.
	for i := 10; i >= 1; i-- {
		vm := lab.VM(i)
		perVM = append(perVM, vmPuts{vm: vm, puts: []put{{ok: true, rtt: time.Millisecond}, {ok: false}}})
		if i == 4 {
			continue // released nothing
		}
		// Higher i: more of its frames between 0.1 and 1ms, a higher p99
		// (0.1ms + 0.9ms × (0.99 - 0.1/i)).
		counts[[2]string{vm.Name, "held"}] = [3]uint64{10, 10 + uint64(i), 10 + uint64(i)}
	}
	after := parseScrape(t, commitText(counts))
	commit, err := commitDeltas(nil, after)
	if err != nil {
		t.Fatal(err)
	}
	lines, cut := perVMLines(perVM, commit, false)
	var names []string
	for _, l := range lines {
		names = append(names, l.vm)
	}
	if !cut || strings.Join(names, " ") != "vm4 vm1 vm2 vm8 vm9 vm10" {
		t.Errorf("lines %v (cut %v), want vm4 vm1 vm2 ... vm8 vm9 vm10", names, cut)
	}
	if lines[1].ok != 1 || lines[1].offered != 2 || lines[0].commit[1] != "-" {
		t.Errorf("line %+v, %+v", lines[0], lines[1])
	}
	if all, cut := perVMLines(perVM, commit, true); cut || len(all) != 10 {
		t.Errorf("verbose: %d lines, cut %v", len(all), cut)
	}
}

func TestPutsInAWindow(t *testing.T) {
	t0 := time.Now()
	loads := []vmPuts{
		{vm: lab.VM(1), puts: []put{{at: t0.Add(time.Second), ok: false}}},
		{vm: lab.VM(2), puts: []put{{at: t0, ok: true}, {at: t0.Add(time.Second), ok: false}, {at: t0.Add(2 * time.Second), ok: false}}},
	}
	if sent, failed := putsIn(loads, t0, t0.Add(2*time.Second), lab.VMName); sent != 2 || failed != 1 {
		t.Errorf("sent %d failed %d, want 2 and 1 (vm1 left out, the window half-open)", sent, failed)
	}
}

// The table prints what was offered, answered and never sent, and its
// rate counts answered PUTs only.
func TestScaleTableShowsLoss(t *testing.T) {
	after := parseScrape(t, commitText(map[[2]string][3]uint64{{"vm1", "held"}: {5, 9, 9}}))
	commit, err := commitDeltas(nil, after)
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	printScaleTable(&out, []scaleRun{{n: 1, planned: 200, offered: 150, ok: 100, wall: 10 * time.Second,
		rtt: []time.Duration{time.Millisecond}, commit: commit, daemonCPU: time.Second, machineCPU: 2 * time.Second,
		rssPrimary: 64 << 20, rssSecondary: 32 << 20}})
	fields := strings.Fields(strings.Split(out.String(), "\n")[2])
	if len(fields) < 5 || fields[1] != "100/150" || fields[2] != "50" || fields[3] != "50" || fields[4] != "10" {
		t.Errorf("row %q: want 100/150 ok, 50 failed, 50 unsent, 10 answered/s", fields)
	}
}
