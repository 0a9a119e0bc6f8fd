package grafana

import (
	"bytes"
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"
)

const committed = "ftgw-dashboard.json"

func TestCommittedDashboardIsFresh(t *testing.T) {
	want, err := JSON()
	if err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(committed)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("%s is stale: run `go generate ./deploy/grafana` (or make generate) and commit it", committed)
	}
}

// Every panel follows the vm and instance variables, and nothing else is
// left for Grafana to fill in than its own interval and range.
func TestEveryQueryFollowsTheVariables(t *testing.T) {
	raw, err := os.ReadFile(committed)
	if err != nil {
		t.Fatal(err)
	}
	targets, vars, err := Parse(raw)
	if err != nil {
		t.Fatal(err)
	}
	if len(targets) < 10 {
		t.Fatalf("found %d queries in %s, want every panel's", len(targets), committed)
	}
	names := map[string]bool{"__rate_interval": true, "__range": true}
	for _, v := range vars {
		names[v.Name] = true
	}
	for _, want := range []string{"datasource", "vm", "instance"} {
		if !names[want] {
			t.Errorf("no variable %s", want)
		}
	}
	ref := regexp.MustCompile(`\$\{?(\w+)`)
	for _, tg := range targets {
		for _, want := range []string{`vm=~"$vm"`, `instance=~"$instance"`} {
			if !strings.Contains(tg.Expr, want) {
				t.Errorf("%s: %s does not select %s", tg.Panel, tg.Expr, want)
			}
		}
		for _, m := range ref.FindAllStringSubmatch(tg.Expr, -1) {
			if !names[m[1]] {
				t.Errorf("%s: %s uses $%s, which no variable defines", tg.Panel, tg.Expr, m[1])
			}
		}
	}
}

// The dashed budget lines are the alerts' budgets.
func TestBudgetsAreTheRules(t *testing.T) {
	raw, err := os.ReadFile("../prometheus/ftgw-rules.yaml")
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
	want := map[string]float64{
		"FtgwLogAckLatencyHigh":       LogAckBudgetSeconds,
		"FtgwOutputCommitLatencyHigh": OutputCommitBudgetSeconds,
	}
	threshold := regexp.MustCompile(`>\s*([0-9.eE+-]+)\s*$`)
	for _, g := range rules.Groups {
		for _, r := range g.Rules {
			budget, ok := want[r.Alert]
			if !ok {
				continue
			}
			delete(want, r.Alert)
			m := threshold.FindStringSubmatch(r.Expr)
			if m == nil {
				t.Errorf("%s: no threshold in %q", r.Alert, r.Expr)
				continue
			}
			if v, err := strconv.ParseFloat(m[1], 64); err != nil || v != budget {
				t.Errorf("%s: threshold %s, the dashboard draws %g", r.Alert, m[1], budget)
			}
		}
	}
	for alert := range want {
		t.Errorf("no rule %s in the rules", alert)
	}
}
