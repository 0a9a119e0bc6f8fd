package main

import (
	"math"
	"os"
	"regexp"
	"strconv"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"go.yaml.in/yaml/v3"

	"github.com/ftgw/ftgw/pkg/datapath"
)

// latencyBudgetRule matches an alert on a histogram's p99 over a fixed
// budget: histogram_quantile(0.99, ... ftgw_..._bucket ...) > budget.
var latencyBudgetRule = regexp.MustCompile(`(?s)^\s*histogram_quantile\(\s*0\.99\s*,.*\b(ftgw_\w+_seconds)_bucket\b.*\)\s*>\s*([0-9.eE+-]+)\s*$`)

// The latency alerts of deploy/prometheus compare a p99 with a budget. That
// comparison is exact only if a bucket ends at the budget: otherwise
// histogram_quantile interpolates inside the bucket that straddles it and
// the alert fires at a latency nobody chose. Every budget must be an upper
// bound that constHistogram exports, and its cumulative count must be the
// observations below it, not an estimate.
func TestLatencyBudgetsAreBucketBoundaries(t *testing.T) {
	raw, err := os.ReadFile("../../deploy/prometheus/ftgw-rules.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var rules struct {
		Groups []struct {
			Rules []struct {
				Alert string `yaml:"alert"`
				Expr  string `yaml:"expr"`
			} `yaml:"rules"`
		} `yaml:"groups"`
	}
	if err := yaml.Unmarshal(raw, &rules); err != nil {
		t.Fatal(err)
	}
	// The histograms that constHistogram exports from power-of-two buckets.
	converted := map[string]bool{
		"ftgw_output_commit_latency_seconds": true,
		"ftgw_log_ack_latency_seconds":       true,
		"ftgw_log_ship_delay_seconds":        true,
	}
	budgets := 0
	for _, g := range rules.Groups {
		for _, r := range g.Rules {
			m := latencyBudgetRule.FindStringSubmatch(r.Expr)
			if m == nil {
				continue
			}
			budgets++
			name := m[1]
			budget, err := strconv.ParseFloat(m[2], 64)
			if err != nil {
				t.Fatalf("%s: budget %q: %v", r.Alert, m[2], err)
			}
			if !converted[name] {
				t.Errorf("%s: %s is not a histogram ftgw exports through constHistogram", r.Alert, name)
				continue
			}
			checkBoundary(t, r.Alert, budget)
		}
	}
	if budgets < 2 {
		t.Fatalf("found %d latency budgets in the rules, want the log ack and output commit ones", budgets)
	}
}

// checkBoundary observes latencies just below, at and just above budget and
// checks the exported bucket that ends at budget counts exactly those below.
func checkBoundary(t *testing.T, alert string, budget float64) {
	t.Helper()
	ns := uint64(math.Round(budget * 1e9))
	var h datapath.LatencyHistogram
	below := []uint64{1, ns / 3, ns - 1}
	for _, v := range below {
		h.Observe(v)
	}
	// A latency exactly at the budget lands above it: the source buckets
	// count latencies strictly below 2^i ns. That errs towards alerting.
	for _, v := range []uint64{ns, ns + 1, 3 * ns} {
		h.Observe(v)
	}
	desc := prometheus.NewDesc("ftgw_test_latency_seconds", "test", []string{"vm"}, nil)
	var m dto.Metric
	if err := constHistogram(desc, h, "vm1").Write(&m); err != nil {
		t.Fatal(err)
	}
	for _, b := range m.GetHistogram().GetBucket() {
		if b.GetUpperBound() != budget {
			continue
		}
		if got := b.GetCumulativeCount(); got != uint64(len(below)) {
			t.Errorf("%s: the bucket ending at the budget %g s counts %d observations, want the %d below it", alert, budget, got, len(below))
		}
		return
	}
	var bounds []float64
	for _, b := range m.GetHistogram().GetBucket() {
		bounds = append(bounds, b.GetUpperBound())
	}
	t.Errorf("%s: no bucket ends at its budget %g s; the exported bounds are %v", alert, budget, bounds)
}
