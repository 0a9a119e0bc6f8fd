// Package prometheus holds ftgw's Prometheus alerting rules
// (ftgw-rules.yaml) and their unit tests (ftgw-rules_test.yaml); its Go
// test runs them through Prometheus's own promtool.
package prometheus

import (
	"os/exec"
	"testing"

	"github.com/ftgw/ftgw/internal/testutil"
)

// TestRulesPassPromtool checks the rules' syntax and templates, then runs
// their unit tests: each alert fires on the series it is for and stays quiet
// on its neighbours.
func TestRulesPassPromtool(t *testing.T) {
	_, promtool := testutil.RequirePrometheus(t)
	for _, args := range [][]string{
		{"check", "rules", "ftgw-rules.yaml"},
		{"test", "rules", "ftgw-rules_test.yaml"},
	} {
		out, err := exec.Command(promtool, args...).CombinedOutput()
		if err != nil {
			t.Errorf("promtool %v: %v\n%s", args, err, out)
		} else {
			t.Logf("promtool %v:\n%s", args, out)
		}
	}
}
