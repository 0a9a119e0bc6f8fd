package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/ftgw/ftgw/internal/lab"
)

// A fault the failover benchmark injects.
type fault struct {
	name   string
	winner string // the host that must end up serving
	inject func(dir string) error
}

var faults = []fault{
	{"primary host crash", lab.NSSecondary, func(string) error { return killAll(lab.NSPrimary) }},
	{"primary daemon kill", lab.NSSecondary, func(dir string) error { return killDaemon(dir, lab.NSPrimary) }},
	{"secondary host crash", lab.NSPrimary, func(string) error { return killAll(lab.NSSecondary) }},
	{"replication link cut", "", func(string) error {
		return exec.Command("ip", "-n", lab.NSSecondary, "link", "set", lab.ReplLink, "down").Run()
	}},
}

func killAll(ns string) error {
	out, err := exec.Command("ip", "netns", "pids", ns).Output()
	if err != nil {
		return err
	}
	for _, f := range strings.Fields(string(out)) {
		if pid, err := strconv.Atoi(f); err == nil {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	}
	return nil
}

// killDaemon kills only the daemon; its VM dies with it, as a QEMU child would.
func killDaemon(dir, ns string) error {
	pid, err := readPid(filepath.Join(hostDir(dir, ns), "ftgw.pid"))
	if err != nil {
		return err
	}
	return syscall.Kill(pid, syscall.SIGKILL)
}

type failoverRun struct {
	fault  string
	winner string
	phases failoverPhases
	check  lab.CheckResult
	err    error
}

// failoverBench runs n failovers, each on a freshly built lab under a write
// load: a random fault, then the checker. The lab is rebuilt each time
// because a pair that failed over runs unprotected until re-protection.
func failoverBench(ctx context.Context, w io.Writer, dir string, n int, seed uint64, failureTimeout time.Duration) error {
	if n < 1 {
		return errors.New("--failover wants at least 1 run")
	}
	rng := rand.New(rand.NewPCG(seed, seed))
	fmt.Fprintf(w, "ftgw bench --failover %d (seed %d, failure timeout %s): a fresh lab per run, a write load, a random fault, the checker\n", n, seed, failureTimeout)
	var runs []failoverRun
	for i := 0; i < n && ctx.Err() == nil; i++ {
		f := faults[rng.IntN(len(faults))]
		r := runFailover(ctx, dir, f, failureTimeout)
		runs = append(runs, r)
		status := "ok"
		switch {
		case r.err != nil:
			status = "error: " + r.err.Error()
		case !r.check.OK():
			status = "CHECKER FAILED"
		}
		fmt.Fprintf(w, "%3d %-22s -> %-7s detection %6.1fms arbitration %5.2fms go-live %5.2fms  %s: %s\n", i+1, f.name, r.winner,
			ms(r.phases.Detection), ms(r.phases.Arbitration), ms(r.phases.GoLive), r.check, status)
	}
	return printFailoverTable(w, runs)
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

func runFailover(ctx context.Context, dir string, f fault, failureTimeout time.Duration) (r failoverRun) {
	r.fault = f.name
	labDown(dir)
	if r.err = labUp(ctx, dir, 10*time.Millisecond, failureTimeout, 4096); r.err != nil {
		return r
	}
	defer labDown(dir)
	wr, err := lab.StartWriter("w", 30*time.Millisecond, 100_000, 30*time.Second)
	if err != nil {
		r.err = err
		return r
	}
	defer wr.Stop()
	if r.err = wr.WaitAcked(200, 10*time.Second); r.err != nil {
		return r
	}
	at := time.Now()
	if r.err = f.inject(dir); r.err != nil {
		return r
	}
	if r.err = wr.WaitAcked(wr.Acked()+200, 10*time.Second); r.err != nil {
		return r
	}
	acked := wr.Stop()
	// Who serves now, and how its failover went.
	for _, ns := range []string{lab.NSPrimary, lab.NSSecondary} {
		s, err := daemonStatus(dir, ns)
		if err != nil || s.State != stateUnprotected.String() {
			continue
		}
		r.winner = ns
		if s.LastFailover != nil {
			r.phases = *s.LastFailover
		}
	}
	if r.winner == "" || (f.winner != "" && r.winner != f.winner) {
		r.err = fmt.Errorf("serving host %q, want %q", r.winner, f.winner)
		return r
	}
	r.check, r.err = lab.Check(acked, at)
	return r
}

func printFailoverTable(w io.Writer, runs []failoverRun) error {
	var failures, errs int
	byFault := map[string]int{}
	var det, arb, live, gap []time.Duration
	for _, r := range runs {
		byFault[r.fault]++
		if r.err != nil {
			errs++
			continue
		}
		if !r.check.OK() {
			failures++
		}
		det, arb = append(det, r.phases.Detection), append(arb, r.phases.Arbitration)
		live, gap = append(live, r.phases.GoLive), append(gap, r.check.Gap)
	}
	fmt.Fprintln(w)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(tw, "failovers\t%d\t\n", len(runs))
	for _, f := range faults {
		fmt.Fprintf(tw, "  %s\t%d\t\n", f.name, byFault[f.name])
	}
	fmt.Fprintf(tw, "checker failures (lost or reordered acknowledged writes)\t%d\t\n", failures)
	fmt.Fprintf(tw, "runs that did not complete\t%d\t\n", errs)
	tw.Flush()
	tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "\nphase\tp50\tp99\tmax\t")
	for _, p := range []struct {
		name string
		d    []time.Duration
	}{{"detection", det}, {"arbitration", arb}, {"go-live", live}, {"client gap", gap}} {
		q := percentiles(p.d, 50, 99, 100)
		fmt.Fprintf(tw, "%s\t%.2fms\t%.2fms\t%.2fms\t\n", p.name, ms(q[0]), ms(q[1]), ms(q[2]))
	}
	tw.Flush()
	if failures > 0 || errs > 0 {
		return fmt.Errorf("%d checker failures, %d incomplete runs", failures, errs)
	}
	return nil
}
