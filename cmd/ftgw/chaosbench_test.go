package main

import (
	"strings"
	"testing"
	"time"

	"github.com/anishathalye/porcupine"

	"github.com/ftgw/ftgw/internal/lab"
)

func TestChaosTable(t *testing.T) {
	clean := scheduleResult{
		schedule: lab.Schedule{Index: 0, FailureTimeout: 50 * time.Millisecond, Faults: []lab.Fault{
			{Kind: lab.FaultHostCrash, Target: lab.RolePrimary},
			{Kind: lab.FaultDaemonPause, Target: lab.RoleSecondary, Long: true},
		}},
		check:   lab.HistoryResult{Ops: 1000, Acked: 990, Indeterminate: 10, Verdict: porcupine.Ok, LongestGap: 120 * time.Millisecond},
		checked: true,
	}
	var out strings.Builder
	if err := printChaosTable(&out, []scheduleResult{clean}); err != nil {
		t.Fatalf("a clean campaign fails: %v\n%s", err, out.String())
	}
	for _, want := range []string{
		"faults", "ops", "acked", "indet", "linearizable", "longest gap", "dual-active", "recovery",
		"host-crash/p daemon-pause/s/long", "1000", "990", "120ms",
	} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("table lacks %q:\n%s", want, out.String())
		}
	}

	dual := clean
	dual.schedule.Index = 1
	dual.dual = []lab.DualActiveInstant{{}, {}}
	illegal := clean
	illegal.schedule.Index = 2
	illegal.check.Verdict = porcupine.Illegal
	counter := clean
	counter.schedule.Index = 3
	counter.check.CounterViolations = 1
	slow := clean
	slow.schedule.Index = 4
	slow.recovery = "restarted ftgw-b"
	out.Reset()
	err := printChaosTable(&out, []scheduleResult{clean, dual, illegal, counter, slow})
	if err == nil || !strings.Contains(err.Error(), "3 schedules violated safety") || !strings.Contains(err.Error(), "1 recovery failures") {
		t.Errorf("error %v, want 3 violations and 1 recovery failure", err)
	}
	table := out.String()
	for _, want := range []string{"ILLEGAL", "restarted ftgw-b", "5000", "3 violating", "host-crash", "duplicate-name"} {
		if !strings.Contains(table, want) {
			t.Errorf("table lacks %q:\n%s", want, table)
		}
	}
	// Faults by kind: every kind listed, with its count over the campaign.
	_, byKind, _ := strings.Cut(table, "faults by kind:")
	counts := map[string]string{}
	for _, line := range strings.Split(byKind, "\n") {
		if f := strings.Fields(line); len(f) == 2 {
			counts[f[0]] = f[1]
		}
	}
	for _, k := range lab.FaultKinds() {
		want := "0"
		switch k {
		case lab.FaultHostCrash, lab.FaultDaemonPause:
			want = "5"
		}
		if counts[k.String()] != want {
			t.Errorf("faults by kind: %s %q, want %s", k, counts[k.String()], want)
		}
	}
}

func TestChaosTimeouts(t *testing.T) {
	if got := chaosTimeouts(engineSynthetic, 0, false); len(got) != 2 || got[0] != 50*time.Millisecond || got[1] < time.Second {
		t.Errorf("synthetic default %v, want 50ms and at least 1s", got)
	}
	if got := chaosTimeouts(engineQEMU, 0, false); len(got) != 1 || got[0] < time.Second {
		t.Errorf("qemu default %v, want at least 1s", got)
	}
	if got := chaosTimeouts(engineSynthetic, 3*time.Second, true); len(got) != 1 || got[0] != 3*time.Second {
		t.Errorf("--failure-timeout 3s: %v", got)
	}
}
