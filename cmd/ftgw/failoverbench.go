package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"path/filepath"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/ftgw/ftgw/internal/lab"
	"github.com/ftgw/ftgw/pkg/protect"
)

// A fault the failover benchmark injects, on the pair as it stands.
type fault struct {
	name string
	// inject hits the pair whose protected primary and standby are in the
	// given namespaces, and returns the host that must end up serving
	// ("" if either may).
	inject func(dir, primary, secondary string) (winner string, err error)
}

var faults = []fault{
	{"primary host crash", func(dir, primary, secondary string) (string, error) {
		return secondary, lab.Crash(primary)
	}},
	{"primary daemon kill", func(dir, primary, secondary string) (string, error) {
		return secondary, killDaemon(dir, primary)
	}},
	{"secondary host crash", func(dir, primary, secondary string) (string, error) {
		return primary, lab.Crash(secondary)
	}},
	{"replication link cut", func(dir, primary, secondary string) (string, error) {
		return "", lab.SetReplLink(false)
	}},
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
	fault       string
	winner      string
	phases      failoverPhases
	check       lab.CheckResult
	reprotect   time.Duration // building the new secondary
	unprotected time.Duration // from the fault until protected again
	err         error
}

// failoverBench runs n failovers on one lab under a write load: a random
// fault on the pair as it stands, the checker, then re-protection, so each
// run starts from a protected pair whose roles the previous runs decided.
// A run that fails to complete leaves the lab rebuilt for the next.
func failoverBench(ctx context.Context, w io.Writer, dir string, n int, seed uint64, failureTimeout time.Duration) error {
	if n < 1 {
		return errors.New("--failover wants at least 1 run")
	}
	rng := rand.New(rand.NewPCG(seed, seed))
	fmt.Fprintf(w, "ftgw bench --failover %d (seed %d, failure timeout %s): one lab, a write load, a random fault, the checker, re-protection\n", n, seed, failureTimeout)
	rebuild := func() error {
		labDown(dir)
		vm, _ := labVM(engineSynthetic, "")
		settings := labDefaults(1)
		settings.failureTimeout = failureTimeout
		return labUp(ctx, dir, []VMConfig{vm}, settings)
	}
	if err := rebuild(); err != nil {
		return err
	}
	defer labDown(dir)
	var runs []failoverRun
	for i := 0; i < n && ctx.Err() == nil; i++ {
		f := faults[rng.IntN(len(faults))]
		r := runFailover(ctx, dir, f, i)
		runs = append(runs, r)
		status := "ok"
		switch {
		case r.err != nil:
			status = "error: " + r.err.Error()
		case !r.check.OK():
			status = "CHECKER FAILED"
		}
		fmt.Fprintf(w, "%3d %-22s -> %-7s detection %5.1fms arbitration %5.2fms go-live %5.2fms | %s | re-protected in %4.0fms, unprotected %4.0fms: %s\n",
			i+1, f.name, r.winner, ms(r.phases.Detection), ms(r.phases.Arbitration), ms(r.phases.GoLive), r.check,
			ms(r.reprotect), ms(r.unprotected), status)
		if r.err != nil || !r.check.OK() {
			// Keep what the daemons said before the lab goes.
			for _, host := range lab.Hosts[:2] {
				fmt.Fprintf(w, "    %s log:\n%s\n", host.NS, indent(lab.Tail(filepath.Join(hostDir(dir, host.NS), "ftgw.log"), 25)))
			}
			for _, lost := range r.check.Lost {
				fmt.Fprintf(w, "    lost: %s=%s (OK %d at %s)\n", lost.Key, lost.Value, lost.Count, lost.At.Format("15:04:05.000000"))
			}
		}
		if r.err != nil {
			if err := rebuild(); err != nil {
				return err
			}
		}
	}
	return printFailoverTable(w, runs)
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// roles finds the protected primary and the standby.
func roles(dir string) (primary, secondary string, err error) {
	for _, host := range lab.Hosts[:2] {
		s, err := daemonStatus(dir, host.NS)
		if err != nil {
			return "", "", fmt.Errorf("%s: %w", host.NS, err)
		}
		switch s.State {
		case protect.Protected.String():
			primary = host.NS
		case protect.Standby.String():
			secondary = host.NS
		}
	}
	if primary == "" || secondary == "" {
		return "", "", errors.New("the lab has no protected pair")
	}
	return primary, secondary, nil
}

func runFailover(ctx context.Context, dir string, f fault, run int) (r failoverRun) {
	r.fault = f.name
	primary, secondary, err := roles(dir)
	if err != nil {
		r.err = err
		return r
	}
	wr, err := lab.StartWriter(fmt.Sprintf("r%d-", run), 30*time.Millisecond, 100_000, 30*time.Second)
	if err != nil {
		r.err = err
		return r
	}
	defer wr.Stop()
	if r.err = wr.WaitAcked(200, 10*time.Second); r.err != nil {
		return r
	}
	at := time.Now()
	want, err := f.inject(dir, primary, secondary)
	if err != nil {
		r.err = err
		return r
	}
	if r.err = wr.WaitAcked(wr.Acked()+200, 10*time.Second); r.err != nil {
		return r
	}
	acked := wr.Stop()
	// Who serves now, and how its failover went: alone, or already with
	// its peer rebuilt (a host that lost the arbiter joins the winner).
	for _, ns := range []string{primary, secondary} {
		s, err := daemonStatus(dir, ns)
		if err != nil || s.Role != "active" {
			continue
		}
		r.winner = ns
		if s.LastFailover != nil {
			r.phases = *s.LastFailover
		}
	}
	if r.winner == "" || (want != "" && r.winner != want) {
		r.err = fmt.Errorf("serving host %q, want %q", r.winner, want)
		return r
	}
	if r.check, r.err = lab.Check(acked, at); r.err != nil {
		return r
	}
	start := time.Now()
	if f.name == "replication link cut" {
		// Both hosts live: once the link is back, the winner rebuilds
		// the loser on its own.
		if r.err = lab.SetReplLink(true); r.err != nil {
			return r
		}
		r.err = waitProtected(ctx, dir, r.winner, 10*time.Second)
		r.reprotect, r.unprotected = time.Since(start), time.Since(at)
		return r
	}
	// A crashed host comes back: its daemon starts and joins.
	rp, err := reprotect(ctx, dir)
	r.reprotect, r.unprotected, r.err = rp.took, time.Since(at), err
	return r
}

// waitProtected waits until the daemon in ns serves the VM protected.
func waitProtected(ctx context.Context, dir, ns string, timeout time.Duration) error {
	return waitUntil(ctx, timeout, ns+" to be protected", func() (bool, error) {
		s, err := daemonStatus(dir, ns)
		return err == nil && s.State == protect.Protected.String(), nil
	})
}

func printFailoverTable(w io.Writer, runs []failoverRun) error {
	var failures, errs int
	byFault := map[string]int{}
	var det, arb, live, gap, rep, unp []time.Duration
	for _, r := range runs {
		byFault[r.fault]++
		// A loss counts even when a later step (re-protection) failed.
		if !r.check.OK() {
			failures++
		}
		if r.err != nil {
			errs++
			continue
		}
		det, arb = append(det, r.phases.Detection), append(arb, r.phases.Arbitration)
		live, gap = append(live, r.phases.GoLive), append(gap, r.check.Gap)
		rep, unp = append(rep, r.reprotect), append(unp, r.unprotected)
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
	}{{"detection", det}, {"arbitration", arb}, {"go-live", live}, {"client gap", gap}, {"re-protection", rep}, {"unprotected window", unp}} {
		q := percentiles(p.d, 50, 99, 100)
		fmt.Fprintf(tw, "%s\t%.2fms\t%.2fms\t%.2fms\t\n", p.name, ms(q[0]), ms(q[1]), ms(q[2]))
	}
	tw.Flush()
	if failures > 0 || errs > 0 {
		return fmt.Errorf("%d checker failures, %d incomplete runs", failures, errs)
	}
	return nil
}

func indent(s string) string { return "      " + strings.ReplaceAll(s, "\n", "\n      ") }
