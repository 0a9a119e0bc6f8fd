package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/anishathalye/porcupine"

	"github.com/ftgw/ftgw/internal/lab"
	"github.com/ftgw/ftgw/pkg/protect"
)

// The nemesis campaign (`ftgw bench --chaos N`): N randomized fault
// schedules, each on a protected pair under a mixed load of several
// clients overwriting a few keys, each history judged whole.

type chaosOptions struct {
	dir, engine, guestDir string
	schedules             int
	seed                  uint64
	// failureTimeouts: schedules are split into as many groups, one lab
	// each, in order.
	failureTimeouts []time.Duration
	// out is where visualizations of failed histories go.
	out string
	// kinds limits the faults drawn (none: every kind).
	kinds []lab.FaultKind
}

// chaosTiming bounds one engine's schedules.
type chaosTiming struct {
	requestTimeout time.Duration // a client's, before its operation counts as indeterminate
	warmupAcks     int           // acknowledged before the first fault
	afterAcks      int           // acknowledged once protected again, to read what the faults left
	protectWait    time.Duration // after the heal, for the pair to be protected again
	schedule       time.Duration // one schedule's budget
	checkTimeout   time.Duration // porcupine's search
}

func timingFor(engine string) chaosTiming {
	if engine == engineQEMU {
		return chaosTiming{requestTimeout: time.Second, warmupAcks: 30, afterAcks: 60,
			protectWait: 4 * time.Minute, schedule: 12 * time.Minute, checkTimeout: 2 * time.Minute}
	}
	return chaosTiming{requestTimeout: 100 * time.Millisecond, warmupAcks: 300, afterAcks: 1000,
		protectWait: 20 * time.Second, schedule: 2 * time.Minute, checkTimeout: time.Minute}
}

// vmLost is the recovery of a schedule after which no host had the VM
// (none served, and restarting those with no copy did not help): the lab
// is rebuilt, and the VM's acknowledged state is gone. Within a single
// failure at a time, which is all a schedule asks of the pair, that is a
// safety violation, even if no read of the history could show it.
const vmLost = "VM lost, lab rebuilt"

// vmLostUnprotected is a VM lost to a second failure: a fault took down
// the host that had claimed the VM during the schedule (it won a failover
// or a switchover) before the other was rebuilt as its standby, so it held
// the only copy (nemesis.checkOnlyCopy). A pair of two hosts survives one
// failure at a time, as VMware FT does. It is reported, and counted apart
// from the single-failure violations.
const vmLostUnprotected = "VM lost: its only copy was hit, lab rebuilt"

// budgetSpent: the schedule's time ran out while it waited for the pair;
// the next one starts from a fresh lab.
const budgetSpent = "budget spent"

// scheduleResult is what one schedule did and what the checks found.
type scheduleResult struct {
	schedule lab.Schedule
	check    lab.HistoryResult
	checked  bool // a history was judged
	dual     []lab.DualActiveInstant
	capture  lab.CaptureStats
	// recovery is "" when the pair protected itself after the heal, else
	// what it took (a recovery failure).
	recovery string
	took     time.Duration
	notes    []string
	findings []string
	err      error // the schedule could not run to its end
}

// violation reports whether the schedule broke a safety property.
func (r scheduleResult) violation() bool {
	return (r.checked && (r.check.Verdict == porcupine.Illegal || r.check.CounterViolations > 0)) ||
		len(r.dual) > 0 || len(r.findings) > 0 || r.recovery == vmLost
}

// lostVM reports whether the schedule ended with no host holding the VM.
func (r scheduleResult) lostVM() bool {
	return r.recovery == vmLost || r.recovery == vmLostUnprotected
}

func (r scheduleResult) verdict() string {
	switch {
	case !r.checked:
		return "-"
	case r.check.Verdict == porcupine.Illegal:
		return "ILLEGAL"
	case r.check.Verdict == porcupine.Unknown:
		return "unknown"
	}
	return "ok"
}

// chaosTimeouts is the failure timeouts a campaign's schedules run with,
// one lab each: one given on the command line, or both a short one (the
// synthetic lab's) and one of a second, so that crash-restarts and pauses
// meet a peer that waits.
func chaosTimeouts(engine string, flagged time.Duration, set bool) []time.Duration {
	switch {
	case set:
		return []time.Duration{flagged}
	case engine == engineQEMU:
		// Two TCG VMs keep both CPUs busy: 50ms would fail over on
		// scheduling noise (see lab up).
		return []time.Duration{time.Second}
	}
	return []time.Duration{50 * time.Millisecond, time.Second}
}

func chaosBench(ctx context.Context, w io.Writer, o chaosOptions) error {
	if o.schedules < 1 {
		return errors.New("--chaos wants at least 1 schedule")
	}
	timing := timingFor(o.engine)
	vm, err := labVM(o.engine, o.guestDir)
	if err != nil {
		return err
	}
	if vm.Engine == engineQEMU {
		vm.QEMU.MaxLag = time.Second
	}
	if err := os.MkdirAll(o.out, 0o755); err != nil {
		return err
	}
	schedules := make([]lab.Schedule, o.schedules)
	for i := range schedules {
		ft := o.failureTimeouts[i*len(o.failureTimeouts)/o.schedules]
		schedules[i] = lab.NewScheduleOf(lab.ScheduleRand(o.seed, i), i, ft, o.kinds)
	}
	deadline, _ := ctx.Deadline()
	fmt.Fprintf(w, "ftgw bench --chaos %d --seed %d (guest %s, failure timeouts %v, budget until %s): "+
		"faults on a protected pair under %d clients overwriting 5 keys, every history checked for linearizability, "+
		"the PUT counter and dual-active instants (%s windows)\n",
		o.schedules, o.seed, o.engine, o.failureTimeouts, deadline.Format("15:04:05"), 4, lab.DualActiveWindow)

	start := time.Now()
	var results []scheduleResult
	var labFT time.Duration // the running lab's failure timeout; 0: no lab
	defer func() {
		if labFT != 0 {
			labDown(o.dir)
		}
	}()
	for i, s := range schedules {
		if ctx.Err() != nil {
			fmt.Fprintf(w, "budget spent: %d of %d schedules run\n", i, len(schedules))
			break
		}
		progress := func(format string, args ...any) {
			fmt.Fprintf(w, "    %7.1fs  %s\n", time.Since(start).Seconds(), fmt.Sprintf(format, args...))
		}
		fmt.Fprintf(w, "[%d/%d] failure timeout %s: %s\n", i+1, len(schedules), s.FailureTimeout, s)
		if labFT != s.FailureTimeout {
			progress("lab up with failure timeout %s", s.FailureTimeout)
			labDown(o.dir)
			labFT = 0
			settings := labDefaults(1)
			settings.failureTimeout = s.FailureTimeout
			if err := labUp(ctx, o.dir, []VMConfig{vm}, settings); err != nil {
				return fmt.Errorf("lab up: %w", err)
			}
			labFT = s.FailureTimeout
		}
		sctx, cancel := context.WithTimeout(ctx, timing.schedule)
		r := runSchedule(sctx, o, timing, s, progress)
		cancel()
		results = append(results, r)
		fmt.Fprintln(w, scheduleLine(r))
		if r.violation() || r.err != nil {
			reportViolation(w, o, r)
		}
		if r.lostVM() || r.recovery == budgetSpent || r.err != nil {
			// The next schedule starts from a fresh lab.
			labDown(o.dir)
			labFT = 0
		}
	}
	return printChaosTable(w, results)
}

// runSchedule runs one schedule on the lab, which it expects protected.
func runSchedule(ctx context.Context, o chaosOptions, t chaosTiming, s lab.Schedule, progress func(string, ...any)) (r scheduleResult) {
	r.schedule = s
	began := time.Now()
	defer func() { r.took = time.Since(began) }()

	if err := waitPair(ctx, o.dir, t.protectWait); err != nil {
		r.err = fmt.Errorf("the lab is not protected before the faults: %w", err)
		return r
	}
	primary, secondary, err := roles(o.dir)
	if err != nil {
		r.err = err
		return r
	}
	capture, err := lab.StartCapture()
	if err != nil {
		r.err = err
		return r
	}
	load, err := lab.StartLoad(lab.LoadConfig{
		Clients: 4, Keys: 5, KeyPrefix: fmt.Sprintf("s%d-", s.Index),
		Timeout: t.requestTimeout, MaxOps: 1_000_000, MaxTime: t.schedule,
	})
	if err != nil {
		capture.Stop()
		r.err = err
		return r
	}
	var faultAt time.Time
	finish := func() {
		h := load.Stop()
		releases, stats, cerr := capture.Stop()
		r.capture = stats
		if cerr != nil {
			r.notes = append(r.notes, "capture: "+cerr.Error())
		}
		r.dual = lab.DualActiveInstants(releases, lab.DualActiveWindow)
		byHost := map[string]int{}
		for _, rel := range releases {
			byHost[rel.Host]++
		}
		progress("judging %d operations; frames of the VM on the LAN by the host that released them: %s %d, %s %d (%d dropped by the capture)",
			h.Len(), lab.NSPrimary, byHost[lab.NSPrimary], lab.NSSecondary, byHost[lab.NSSecondary], stats.Dropped)
		r.check = lab.CheckHistory(h, faultAt, t.checkTimeout)
		r.checked = true
		// The history's own verdict is what the table shows; a
		// visualization only when it failed.
		if r.violation() {
			writeVisualization(o, &r, h)
		}
	}
	if err := load.WaitAcked(t.warmupAcks, 30*time.Second); err != nil {
		r.err = fmt.Errorf("warm-up: %w", err)
		finish()
		return r
	}
	progress("%d acknowledged before the faults; primary %s, standby %s", load.Acked(), primary, secondary)

	n := newNemesis(o.dir, o.engine, s.FailureTimeout, primary, secondary, progress)
	faultAt = time.Now()
	for _, f := range s.Faults {
		if !sleepCtx(ctx, f.After) {
			break
		}
		progress("inject %s", f)
		if err := n.inject(ctx, f); err != nil {
			n.note("inject %s: %v", f, err)
		}
	}
	sleepCtx(ctx, s.Settle)
	progress("heal (%d acknowledged so far)", load.Acked())
	if err := n.heal(ctx); err != nil {
		n.note("heal: %v", err)
	}
	r.recovery = recoverPair(ctx, o.dir, o.engine, t, n, progress)
	if r.recovery == vmLost && n.hitTheOnlyCopy() {
		r.recovery = vmLostUnprotected
	}
	if !r.lostVM() && r.recovery != budgetSpent {
		if err := load.WaitAcked(load.Acked()+t.afterAcks, 30*time.Second); err != nil {
			n.note("after recovery: %v", err)
		}
	}
	n.mu.Lock()
	r.notes = append(r.notes, n.notes...)
	r.findings = append(r.findings, n.findings...)
	n.mu.Unlock()
	finish()
	return r
}

// recoverPair waits for the pair to protect itself again; if it does not,
// it does what the hosts' supervisors and operator would, step by step,
// and says what it took ("" when nothing did).
func recoverPair(ctx context.Context, dir, engine string, t chaosTiming, n *nemesis, progress func(string, ...any)) string {
	waited := time.Now()
	if waitPair(ctx, dir, t.protectWait) == nil {
		progress("protected again %s after the heal", time.Since(waited).Round(time.Millisecond))
		return ""
	}
	if ctx.Err() != nil {
		n.note("the schedule's budget ran out before the pair was protected again: %s", pairStates(dir, n))
		return budgetSpent
	}
	states := pairStates(dir, n)
	n.note("RECOVERY FAILURE: not protected %s after the heal: %s", t.protectWait, states)
	serving := ""
	for _, ns := range []string{n.primary, n.secondary} {
		if s, err := daemonStatus(dir, ns); err == nil && s.Role == "active" {
			serving = ns
		}
	}
	if serving != "" {
		other := n.other(serving)
		progress("%s serves: restart %s's daemon", serving, other)
		if err := n.restart(ctx, other); err != nil {
			n.note("restart %s: %v", other, err)
		}
		if waitPair(ctx, dir, t.protectWait) == nil {
			return "restarted " + other
		}
	} else {
		// Nobody serves. A standby's copy (or an arbitrating one) may
		// be all that is left of the VM: only the daemons that hold
		// none start again, as their operator would restart them.
		var restarted []string
		for _, ns := range []string{n.primary, n.secondary} {
			s, err := daemonStatus(dir, ns)
			if err == nil && (s.State == protect.Standby.String() || s.State == protect.Arbitrating.String()) {
				continue
			}
			progress("nobody serves: restart %s's daemon", ns)
			if err := n.restart(ctx, ns); err != nil {
				n.note("restart %s: %v", ns, err)
			}
			restarted = append(restarted, ns)
		}
		if len(restarted) > 0 && waitPair(ctx, dir, t.protectWait) == nil {
			return "restarted " + strings.Join(restarted, " and ")
		}
	}
	n.note("VM LOST: still not protected (%s): the lab is rebuilt", pairStates(dir, n))
	return vmLost
}

func pairStates(dir string, n *nemesis) string {
	var parts []string
	for _, ns := range []string{n.primary, n.secondary} {
		s, err := daemonStatus(dir, ns)
		if err != nil {
			parts = append(parts, fmt.Sprintf("%s: no status (%v)", ns, err))
			continue
		}
		parts = append(parts, fmt.Sprintf("%s %s epoch %d", ns, s.State, s.Epoch))
	}
	owner, epoch := arbiterOwner(dir)
	return strings.Join(parts, ", ") + fmt.Sprintf("; arbiter: %s at epoch %d", owner, epoch)
}

// waitPair waits until one lab host is protected and the other its
// standby.
func waitPair(ctx context.Context, dir string, timeout time.Duration) error {
	return waitUntil(ctx, timeout, "a protected pair", func() (bool, error) {
		_, _, err := roles(dir)
		return err == nil, nil
	})
}

func sleepCtx(ctx context.Context, d time.Duration) bool {
	select {
	case <-time.After(d):
		return true
	case <-ctx.Done():
		return false
	}
}

func writeVisualization(o chaosOptions, r *scheduleResult, h *lab.History) {
	path := filepath.Join(o.out, fmt.Sprintf("chaos-seed%d-schedule%d.html", o.seed, r.schedule.Index))
	if err := r.check.Visualize(path); err != nil {
		r.notes = append(r.notes, "visualization: "+err.Error())
		return
	}
	r.notes = append(r.notes, "visualization: "+path)
	for _, a := range lab.Anomalies(h.Ops(), 5) {
		r.notes = append(r.notes, "counter-example: "+a)
	}
}

// faultSummary names a schedule's faults compactly, for the table.
func faultSummary(s lab.Schedule) string {
	names := make([]string, len(s.Faults))
	for i, f := range s.Faults {
		names[i] = f.Kind.String()
		if f.Kind.Targeted() {
			names[i] += "/" + f.Target.String()[:1]
		}
		if (f.Kind == lab.FaultDaemonPause || f.Kind == lab.FaultGuestPause) && f.Long {
			names[i] += "/long"
		}
	}
	return strings.Join(names, " ")
}

func scheduleLine(r scheduleResult) string {
	recovery := "protected again"
	if r.recovery != "" {
		recovery = "RECOVERY FAILURE: " + r.recovery
	}
	status := "ok"
	switch {
	case r.violation():
		status = "VIOLATION"
	case r.err != nil:
		status = "error: " + r.err.Error()
	}
	return fmt.Sprintf("  => schedule %d (%s): ops %d acked %d indeterminate %d, linearizable %s, counter violations %d, longest gap %s, dual-active instants %d; %s; %s in %s",
		r.schedule.Index+1, faultSummary(r.schedule), r.check.Ops, r.check.Acked, r.check.Indeterminate, r.verdict(),
		r.check.CounterViolations, r.check.LongestGap.Round(time.Millisecond), len(r.dual), recovery, status, r.took.Round(100*time.Millisecond))
}

// reportViolation prints what a failed schedule leaves to look at.
func reportViolation(w io.Writer, o chaosOptions, r scheduleResult) {
	fmt.Fprintf(w, "  --- schedule %d (seed %d): %s\n", r.schedule.Index+1, o.seed, r.schedule)
	if r.err != nil {
		fmt.Fprintf(w, "  error: %v\n", r.err)
	}
	for _, f := range r.findings {
		fmt.Fprintf(w, "  finding: %s\n", f)
	}
	for _, e := range r.check.CounterExamples {
		fmt.Fprintf(w, "  counter: %s\n", e)
	}
	for i, d := range r.dual {
		if i == 5 {
			fmt.Fprintf(w, "  ... %d dual-active instants in all\n", len(r.dual))
			break
		}
		fmt.Fprintf(w, "  dual-active: %s\n", d)
	}
	for _, n := range r.notes {
		fmt.Fprintf(w, "  %s\n", n)
	}
	for _, host := range lab.Hosts[:2] {
		fmt.Fprintf(w, "    %s log:\n%s\n", host.NS, indent(lab.Tail(filepath.Join(hostDir(o.dir, host.NS), "ftgw.log"), 30)))
	}
}

// printChaosTable prints every schedule's row and the totals, and returns
// an error if any schedule broke safety or needed help to recover.
func printChaosTable(w io.Writer, results []scheduleResult) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w)
	fmt.Fprintln(tw, "#\tft\tfaults\tops\tacked\tindet\tlinearizable\tcounter\tlongest gap\tdual-active\trecovery\t")
	var ops, acked, indet, counter, dual, violations, recoveries, errs, unknown, secondFailures int
	var longest time.Duration
	byKind := map[lab.FaultKind]int{}
	for _, r := range results {
		for k, c := range r.schedule.Kinds() {
			byKind[k] += c
		}
		recovery := "ok"
		switch r.recovery {
		case "":
		case vmLostUnprotected:
			recovery, secondFailures = "VM lost (second failure)", secondFailures+1
		default:
			recovery, recoveries = r.recovery, recoveries+1
		}
		if r.err != nil {
			recovery, errs = "error", errs+1
		}
		if r.violation() {
			violations++
		}
		if r.checked && r.check.Verdict == porcupine.Unknown {
			unknown++
		}
		ops, acked, indet = ops+r.check.Ops, acked+r.check.Acked, indet+r.check.Indeterminate
		counter, dual = counter+r.check.CounterViolations, dual+len(r.dual)
		longest = max(longest, r.check.LongestGap)
		fmt.Fprintf(tw, "%d\t%s\t%s\t%d\t%d\t%d\t%s\t%d\t%s\t%d\t%s\t\n", r.schedule.Index+1, r.schedule.FailureTimeout,
			faultSummary(r.schedule), r.check.Ops, r.check.Acked, r.check.Indeterminate, r.verdict(),
			r.check.CounterViolations, r.check.LongestGap.Round(time.Millisecond), len(r.dual), recovery)
	}
	fmt.Fprintf(tw, "total\t\t%d faults\t%d\t%d\t%d\t%d violating\t%d\t%s (max)\t%d\t%d failures\t\n",
		sumKinds(byKind), ops, acked, indet, violations, counter, longest.Round(time.Millisecond), dual, recoveries)
	tw.Flush()

	fmt.Fprintln(w, "\nfaults by kind:")
	tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', tabwriter.AlignRight)
	for _, k := range lab.FaultKinds() {
		fmt.Fprintf(tw, "  %s\t%d\t\n", k, byKind[k])
	}
	tw.Flush()
	fmt.Fprintf(w, "\n%d schedules: %d violating safety, %d recovery failures, %d that could not run, %d histories the checker could not decide in time\n",
		len(results), violations, recoveries, errs, unknown)
	if secondFailures > 0 {
		fmt.Fprintf(w, "%d VMs lost to a second failure: the host hit had claimed the VM and had no standby yet, so it held the only copy (two hosts survive one failure at a time); reported, not counted above\n", secondFailures)
	}
	var problems []string
	if violations > 0 {
		problems = append(problems, fmt.Sprintf("%d schedules violated safety", violations))
	}
	if recoveries > 0 {
		problems = append(problems, fmt.Sprintf("%d recovery failures", recoveries))
	}
	if errs > 0 {
		problems = append(problems, fmt.Sprintf("%d schedules could not run", errs))
	}
	if len(problems) > 0 {
		return errors.New(strings.Join(problems, ", "))
	}
	return nil
}

func sumKinds(byKind map[lab.FaultKind]int) int {
	total := 0
	for _, c := range byKind {
		total += c
	}
	return total
}
