package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/ftgw/ftgw/internal/lab"
	"github.com/ftgw/ftgw/internal/netnsutil"
	"github.com/ftgw/ftgw/pkg/datapath"
	"github.com/ftgw/ftgw/pkg/guest"
	"github.com/ftgw/ftgw/pkg/replay"
)

// `ftgw bench` on a real-VM lab (--guest qemu) measures what protection
// costs against the same VM unprotected: the lab's image booted once more
// under plain QEMU, with the same accelerator (TCG), the same -icount and
// the same virtio-net options, but no record/replay and no ftgw, in a
// network namespace of the bench's own. Three cases, alternated in rounds
// against drift: unprotected, protected with output commit off
// (passthrough) and on. For each, request latency (PUTs of the key-value
// protocol) and the rate of a bulk TCP stream from the VM (cmd/ftgw-init's
// bulk protocol), with the CPU the machine and each VM and daemon used.
//
// The lab's two QEMUs and daemons run throughout, and the unprotected VM
// too: pausing a lab VM would disturb the pair it belongs to (its throttle,
// its failure detection). So every case runs with the same processes up,
// each case's CPU is printed beside it, and so is the CPU of all of them
// idle.

// requestTimeout bounds each PUT; a PUT that fails counts as this long in
// the percentiles, so a case that loses requests never looks faster.
const requestTimeout = time.Second

// quietFor is how long the throttle must have left the primary's VM
// running before a case starts: a replayer still catching up on the last
// case's traffic would take CPU from this one, and a frozen VM answers
// nothing. (The replay lag itself is no test: an idle pair's sits at
// 0.3-0.7 s, since the replayer is held at safe points short of the log's
// end.)
const quietFor = 300 * time.Millisecond

// The three cases, in the table's order.
const (
	caseUnprotected = iota
	casePassthrough
	caseCommit
	numCases
)

var caseNames = [numCases]string{
	"unprotected (plain QEMU)",
	"protected, output commit off",
	"protected, output commit on",
}

// caseModes is the primary's output mode in each protected case.
var caseModes = [numCases]string{"", "passthrough", "commit"}

type baselineOptions struct {
	requests, rounds int
	bulkBytes        int64
	bulkPerRound     int
	bulkTimeout      time.Duration
	traceOut         string // a CSV of every PUT's segments, if set
}

// benchTarget is one way of reaching a VM: its key-value client and how to
// open a bulk connection to it.
type benchTarget struct {
	kv   *guest.Client
	bulk func(ctx context.Context) (net.Conn, error)
}

// labQEMUVM is the lab's VM if it is a real one (--guest qemu), from the
// primary's config; ok is false for a synthetic guest or no lab.
func labQEMUVM(dir string) (vm VMConfig, ok bool, err error) {
	path := filepath.Join(hostDir(dir, lab.NSPrimary), "ftgw.yaml")
	if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
		return vm, false, nil
	}
	cfg, err := loadConfig(path)
	if err != nil {
		return vm, false, err
	}
	if len(cfg.VMs) == 0 || cfg.VMs[0].Engine != engineQEMU {
		return vm, false, nil
	}
	return cfg.VMs[0], true, nil
}

// benchQEMU is `ftgw bench` on a real-VM lab: the three cases, then where
// a held reply's time goes.
func benchQEMU(ctx context.Context, w io.Writer, dir string, vm VMConfig, o baselineOptions) (err error) {
	for _, host := range lab.Hosts[:2] {
		if _, err := daemonStatus(dir, host.NS); err != nil {
			return fmt.Errorf("the lab is not up (`ftgw lab up --guest qemu`): %s: %w", host.NS, err)
		}
	}
	// Whatever happens, leave the primary enforcing the Output Rule.
	defer func() { err = errors.Join(err, setOutputMode(dir, lab.NSPrimary, "commit")) }()
	if err := qemuBaseline(ctx, w, dir, vm, o); err != nil {
		return err
	}
	if err := printBreakdown(w); err != nil {
		return err
	}
	fmt.Fprintln(w, "\nzero-loss throughput: not measured; a QEMU guest cannot offer frames on command (the bulk rate above is its throughput)")
	return nil
}

// qemuBaseline runs the three cases on the lab's real VM and prints them.
func qemuBaseline(ctx context.Context, w io.Writer, dir string, vm VMConfig, o baselineOptions) error {
	progress := func(format string, args ...any) { fmt.Fprintf(os.Stderr, "bench: "+format+"\n", args...) }
	procs, err := baselineProcs(dir)
	if err != nil {
		return err
	}
	progress("booting the unprotected VM")
	plainTrace, err := newRRTrace()
	if err != nil {
		return err
	}
	defer plainTrace.Close()
	// Its disk is a fresh copy of the image, as each protected copy's
	// was at boot. The preloaded library only takes timestamps there:
	// there is no replay log to flush.
	plain, err := lab.StartPlainVM(ctx, lab.PlainVMConfig{Machine: vmMachine(vm), Disk: vm.QEMU.Disk,
		Preload: vm.QEMU.Preload, Trace: plainTrace.File()})
	if err != nil {
		return fmt.Errorf("the unprotected VM: %w", err)
	}
	defer plain.Close()
	procs = append(procs, watchedProc{"plain VM", plain.Pid()})
	plainKV, err := plain.DialKV(requestTimeout)
	if err != nil {
		return fmt.Errorf("the unprotected VM: %w", err)
	}
	defer plainKV.Close()

	var targets [numCases]benchTarget
	targets[caseUnprotected] = benchTarget{kv: plainKV, bulk: plain.DialBulk}
	protected, err := kvClient(requestTimeout)
	if err != nil {
		return err
	}
	defer protected.Close()
	protectedBulk := func(ctx context.Context) (net.Conn, error) {
		var c net.Conn
		err := netnsutil.Do(lab.NSClient, func() (err error) {
			var d net.Dialer
			c, err = d.DialContext(ctx, "tcp", net.JoinHostPort(lab.VMIP.String(), strconv.Itoa(guest.BulkPort)))
			return err
		})
		return c, err
	}
	targets[casePassthrough] = benchTarget{kv: protected, bulk: protectedBulk}
	targets[caseCommit] = targets[casePassthrough]

	// Warm-up, and a check that both VMs run an image with the bulk
	// service (one built before it refuses the connection).
	for c, t := range []benchTarget{targets[caseUnprotected], targets[caseCommit]} {
		if _, failed := kvRun(ctx, t.kv, 200, "warmup-", 60*time.Second); failed > 0 {
			return fmt.Errorf("warm-up of the %s VM: %d of 200 requests failed", []string{"unprotected", "protected"}[c], failed)
		}
		if o.bulkPerRound > 0 {
			tctx, cancel := context.WithTimeout(ctx, o.bulkTimeout)
			res := bulkOnce(tctx, t, 64<<10)
			cancel()
			if !res.OK() {
				return fmt.Errorf("bulk warm-up from the %s VM: %w (an image built before its bulk service refuses the connection: run make guest, then lab up again)",
					[]string{"unprotected", "protected"}[c], res.Err)
			}
		}
	}

	fmt.Fprintf(w, "ftgw bench, real VM: %d requests per case in %d rounds; %d bulk transfers of %d bytes per case and round\n\n",
		o.requests, o.rounds, o.bulkPerRound, o.bulkBytes)
	printPlainDifferences(w, vm)

	if err := waitPairQuiet(ctx, dir); err != nil {
		progress("%v", err)
	}
	idle, err := measureIdle(ctx, procs, 2*time.Second)
	if err != nil {
		return err
	}

	var (
		lat      [numCases][]time.Duration
		failed   [numCases]int
		bulk     [numCases][]guest.BulkResult
		latCPU   [numCases]cpuUse
		bulkCPU  [numCases]cpuUse
		behind   int
		perRound = o.requests / o.rounds
		parts    [numCases]*breakdown
	)
	for c := range parts {
		parts[c] = &breakdown{}
	}
	for r := 0; r < o.rounds && ctx.Err() == nil; r++ {
		for _, c := range roundOrder(r) {
			progress("round %d of %d: %s", r+1, o.rounds, caseNames[c])
			if caseModes[c] != "" {
				if err := setOutputMode(dir, lab.NSPrimary, caseModes[c]); err != nil {
					return err
				}
			}
			if err := waitPairQuiet(ctx, dir); err != nil {
				progress("%v", err)
				behind++
			}
			before, err := sampleProcs(procs)
			if err != nil {
				return err
			}
			sinceNs := datapath.MonotonicNs()
			l, f, reqs := kvRunTimed(ctx, targets[c].kv, perRound, "base-", 5*time.Minute)
			var trace requestTrace
			if c == caseUnprotected {
				trace.TapWrites = plainTrace.Writes(sinceNs)
			} else if trace, err = fetchTrace(dir, sinceNs); err != nil {
				return err
			}
			parts[c].add(reqs, trace)
			lat[c] = append(lat[c], l...)
			for range f {
				lat[c] = append(lat[c], requestTimeout)
			}
			failed[c] += f
			after, err := sampleProcs(procs)
			if err != nil {
				return err
			}
			latCPU[c].add(before, after)
			if o.bulkPerRound == 0 {
				continue
			}
			if err := waitPairQuiet(ctx, dir); err != nil {
				progress("%v", err)
				behind++
			}
			if before, err = sampleProcs(procs); err != nil {
				return err
			}
			for range o.bulkPerRound {
				tctx, cancel := context.WithTimeout(ctx, o.bulkTimeout)
				res := bulkOnce(tctx, targets[c], o.bulkBytes)
				cancel()
				if !res.OK() {
					progress("bulk from %s: %v", caseNames[c], res.Err)
				}
				bulk[c] = append(bulk[c], res)
			}
			if after, err = sampleProcs(procs); err != nil {
				return err
			}
			bulkCPU[c].add(before, after)
		}
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("the bench ran out of time (--budget): %w", err)
	}

	var pct [numCases][]time.Duration
	var sums [numCases]bulkSummary
	for c := range numCases {
		pct[c] = percentiles(lat[c], 50, 99, 99.9)
		sums[c] = summarizeBulk(bulk[c])
	}
	names := procNames(procs)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(tw, "request/response (PUT over UDP)\tsamples\tfailed\tp50\tp99\tp99.9\tVM ftgw-a frozen\tmachine busy\tothers\t%s\t\n", strings.Join(names, "\t"))
	fmt.Fprintf(tw, "idle (every VM up, no load)\t\t\t\t\t\t%s\t\n", idle.columns(len(procs)))
	for c := range numCases {
		fmt.Fprintf(tw, "%s\t%d\t%d\t%s\t%s\t%s\t%s\t\n", caseNames[c], len(lat[c]), failed[c],
			micros(pct[c][0]), micros(pct[c][1]), micros(pct[c][2]), latCPU[c].columns(len(procs)))
	}
	tw.Flush()
	fmt.Fprintf(w, "(a failed request counts as its %s timeout; frozen: by the lag throttle, while the secondary's replay caught up; CPU in %% of all %d CPUs for the machine, of one CPU for each process and for the others: what the machine ran besides them)\n\n", requestTimeout, runtime.NumCPU())

	if o.bulkPerRound > 0 {
		tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', tabwriter.AlignRight)
		fmt.Fprintf(tw, "bulk TCP from the VM\ttransfers\tfailed\trequested\treceived intact\trate Mbit/s\tfastest\tslowest\tVM ftgw-a frozen\tmachine busy\tothers\t%s\t\n", strings.Join(names, "\t"))
		for c := range numCases {
			s := sums[c]
			fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%d\t%s\t%s\t%s\t%s\t\n", caseNames[c], s.transfers, s.failed, s.requested, s.intact,
				mbit(s.rate()), mbit(s.fastest), mbit(s.slowest), bulkCPU[c].columns(len(procs)))
		}
		tw.Flush()
		fmt.Fprintln(w, "(rate: the bytes of intact, complete transfers over the time of all of them, failed ones included; fastest and slowest: of the intact ones)")
		for c := range numCases {
			if sums[c].firstErr != nil {
				fmt.Fprintf(w, "  %s: %d failed, the first: %v\n", caseNames[c], sums[c].failed, sums[c].firstErr)
			}
		}
		fmt.Fprintln(w)
	}
	tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(tw, "waited runnable for a CPU, ms per PUT\t%s\t\n", strings.Join(names, "\t"))
	for c := range numCases {
		fmt.Fprintf(tw, "%s\t%s\t\n", caseNames[c], latCPU[c].waitColumns(len(lat[c])))
	}
	tw.Flush()
	fmt.Fprintln(w, "(the sum over each process's threads: one PUT can wait on several at once; schedstat)")
	fmt.Fprintln(w)
	printBreakdownTable(w, parts)
	fmt.Fprintln(w)
	if o.traceOut != "" {
		if err := writeBreakdownCSV(o.traceOut, parts); err != nil {
			return err
		}
	}
	if behind > 0 {
		fmt.Fprintf(w, "note: %d times a case started while the throttle still paused the primary's VM (after a minute's wait)\n\n", behind)
	}

	tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(tw, "targets (issue 14), against unprotected\tlimit\t%s\t%s\t\n", caseNames[casePassthrough], caseNames[caseCommit])
	for _, t := range baselineTargets(pct, sums, o.bulkPerRound > 0) {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t\n", t.name, t.limit, t.verdicts[0], t.verdicts[1])
	}
	tw.Flush()
	return nil
}

// roundOrder is the order of the cases in round r: rotated each round, so
// that no case always runs first, after the same other, or last.
func roundOrder(r int) []int {
	order := make([]int, numCases)
	for i := range order {
		order[i] = (i + r) % numCases
	}
	return order
}

// bulkOnce runs one bulk transfer of n bytes from t's VM within ctx.
func bulkOnce(ctx context.Context, t benchTarget, n int64) guest.BulkResult {
	dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	start := time.Now()
	conn, err := t.bulk(dctx)
	cancel()
	if err != nil {
		return guest.BulkResult{Requested: n, Elapsed: time.Since(start), Err: fmt.Errorf("connect: %w", err)}
	}
	return guest.ReceiveBulk(ctx, conn, n)
}

// bulkSummary is one case's bulk transfers.
type bulkSummary struct {
	transfers, failed int
	requested, intact int64 // bytes: asked for; received in transfers that were complete and intact
	elapsed           time.Duration
	// fastest and slowest of the intact transfers, in bits per second.
	fastest, slowest float64
	firstErr         error
}

// summarizeBulk adds up transfers. A failed transfer (short, corrupt,
// refused, timed out) adds its time and none of its bytes: it can only make
// the rate lower.
func summarizeBulk(results []guest.BulkResult) bulkSummary {
	var s bulkSummary
	for _, r := range results {
		s.transfers++
		s.requested += r.Requested
		s.elapsed += r.Elapsed
		if !r.OK() {
			s.failed++
			if s.firstErr == nil {
				s.firstErr = r.Err
				if s.firstErr == nil {
					s.firstErr = fmt.Errorf("%d of %d bytes", r.Received, r.Requested)
				}
			}
			continue
		}
		s.intact += r.Received
		if r.Elapsed > 0 {
			rate := float64(r.Received) * 8 / r.Elapsed.Seconds()
			if s.fastest == 0 || rate > s.fastest {
				s.fastest = rate
			}
			if s.slowest == 0 || rate < s.slowest {
				s.slowest = rate
			}
		}
	}
	return s
}

// rate is the case's rate in bits per second: intact bytes over the time
// of every transfer.
func (s bulkSummary) rate() float64 {
	if s.elapsed <= 0 {
		return 0
	}
	return float64(s.intact) * 8 / s.elapsed.Seconds()
}

func mbit(bps float64) string {
	if bps == 0 {
		return "-"
	}
	return fmt.Sprintf("%.1f", bps/1e6)
}

// targetRow is one of issue 14's targets, judged for the two protected
// cases.
type targetRow struct {
	name, limit string
	verdicts    [2]string // output commit off, on
}

// baselineTargets judges the protected cases against the unprotected one:
// p50 within 1.5 times, p99 within 2 times, and (with bulk) at least half
// the bulk rate. pct holds each case's p50, p99, p99.9.
func baselineTargets(pct [numCases][]time.Duration, bulk [numCases]bulkSummary, withBulk bool) []targetRow {
	judge := func(ok bool) string {
		if ok {
			return "met"
		}
		return "not met"
	}
	var rows []targetRow
	for _, t := range []struct {
		name   string
		i      int
		factor float64
	}{{"request p50 <= 1.5 x", 0, 1.5}, {"request p99 <= 2 x", 1, 2}} {
		base := pct[caseUnprotected][t.i]
		limit := time.Duration(float64(base) * t.factor)
		row := targetRow{name: t.name, limit: micros(limit)}
		for k, c := range []int{casePassthrough, caseCommit} {
			v := pct[c][t.i]
			switch {
			case base == 0 || v == 0:
				row.verdicts[k] = "no samples"
			default:
				row.verdicts[k] = fmt.Sprintf("%s (%.2f x): %s", micros(v), float64(v)/float64(base), judge(v <= limit))
			}
		}
		rows = append(rows, row)
	}
	if !withBulk {
		return rows
	}
	base := bulk[caseUnprotected]
	row := targetRow{name: "bulk rate >= 50% of", limit: mbit(base.rate()/2) + " Mbit/s"}
	for k, c := range []int{casePassthrough, caseCommit} {
		v := bulk[c].rate()
		switch {
		case base.rate() == 0:
			row.verdicts[k] = "no unprotected rate"
			row.limit = "-"
		default:
			row.verdicts[k] = fmt.Sprintf("%s Mbit/s (%.0f%%): %s", mbit(v), 100*v/base.rate(), judge(v >= base.rate()/2))
		}
	}
	if base.failed > 0 {
		// The baseline's own failures lower it, which would flatter the
		// protected cases.
		for k := range row.verdicts {
			row.verdicts[k] += fmt.Sprintf(" (%d unprotected transfers failed)", base.failed)
		}
	}
	return append(rows, row)
}

// printPlainDifferences says how the unprotected VM's QEMU differs from the
// lab's recorder: the options of each that the other lacks (their
// directories aside), and what is not on a command line.
func printPlainDifferences(w io.Writer, vm VMConfig) {
	const dir = "DIR"
	rec := replay.Config{Machine: vmMachine(vm), Mode: replay.Record, Dir: dir}.Args()
	plain := replay.Config{Machine: lab.PlainMachine(vmMachine(vm)), Mode: replay.Plain, Dir: dir}.Args()
	onlyRec, onlyPlain := optionDiff(optionPairs(rec), optionPairs(plain))
	fmt.Fprintf(w, "unprotected VM: the lab's image and machine under plain QEMU (%s), at %s on a tap in a namespace of the bench's own whose host side is the client: no bridge, no XDP\n",
		strings.Join(sharedSettings(plain), ", "), lab.PlainVMAddr.Addr())
	fmt.Fprintf(w, "  the recorder's options it has not: %s\n", strings.Join(onlyRec, "; "))
	fmt.Fprintf(w, "  its options the recorder has not:  %s\n", strings.Join(onlyPlain, "; "))
	fmt.Fprintf(w, "  and the recorder runs with LD_PRELOAD=%s (it flushes the replay log before each transmit); the unprotected VM runs it for its tap timestamps only\n\n", preloadName)
}

// sharedSettings picks from a QEMU command line the settings a reader
// checks first: accelerator, icount, vCPUs, memory and the NIC.
func sharedSettings(args []string) []string {
	out := []string{"TCG (no -accel, and -icount allows no other)"}
	for _, o := range optionPairs(args) {
		for _, flag := range []string{"-icount ", "-smp ", "-m ", "-device virtio-net"} {
			if strings.HasPrefix(o, flag) {
				out = append(out, o)
			}
		}
	}
	return out
}

// optionPairs groups a QEMU command line into options: a flag with its
// value ("-m 256"), or a flag alone ("-nodefaults"). Values with spaces are
// quoted.
func optionPairs(args []string) []string {
	var out []string
	for i := 0; i < len(args); i++ {
		a := args[i]
		if strings.HasPrefix(a, "-") && i+1 < len(args) && !strings.HasPrefix(args[i+1], "-") {
			v := args[i+1]
			if strings.ContainsAny(v, " \t") {
				v = strconv.Quote(v)
			}
			out = append(out, a+" "+v)
			i++
			continue
		}
		out = append(out, a)
	}
	return out
}

// optionDiff returns the options of a not in b and those of b not in a,
// each in its own order; a repeated option counts as many times as given.
func optionDiff(a, b []string) (onlyA, onlyB []string) {
	left := func(x, y []string) []string {
		rest := slices.Clone(y)
		var out []string
		for _, o := range x {
			if i := slices.Index(rest, o); i >= 0 {
				rest = slices.Delete(rest, i, i+1)
				continue
			}
			out = append(out, o)
		}
		return out
	}
	return left(a, b), left(b, a)
}

// waitPairQuiet waits until the secondary has acknowledged all the log and
// the throttle has not frozen the primary's VM for quietFor, for up to a
// minute.
func waitPairQuiet(ctx context.Context, dir string) error {
	if err := waitLogDrained(ctx, dir); err != nil {
		return err
	}
	return waitUntil(ctx, time.Minute, "the throttle to let the primary's VM run", func() (bool, error) {
		before, err := throttledSeconds()
		if err != nil {
			return false, err
		}
		time.Sleep(quietFor)
		after, err := throttledSeconds()
		return after == before, err
	})
}

// throttledSeconds is how long the throttle has frozen the primary's VM
// in all.
func throttledSeconds() (float64, error) {
	families, err := lab.Scrape(lab.NSPrimary)
	if err != nil {
		return 0, err
	}
	m, ok := lab.Metric(families, "ftgw_throttled_seconds_total", map[string]string{"vm": lab.VMName})
	if !ok {
		return 0, errors.New("no ftgw_throttled_seconds_total in the primary's metrics")
	}
	return m.GetCounter().GetValue(), nil
}

// watchedProc is a process whose CPU the bench prints.
type watchedProc struct {
	name string
	pid  int
}

func procNames(procs []watchedProc) []string {
	names := make([]string, len(procs))
	for i, p := range procs {
		names[i] = p.name
	}
	return names
}

// baselineProcs are the bench itself (the client) and the lab's daemons and
// their QEMUs.
func baselineProcs(dir string) ([]watchedProc, error) {
	procs := []watchedProc{{"client", os.Getpid()}}
	var vms []watchedProc
	for _, host := range lab.Hosts[:2] {
		pid, err := readPid(filepath.Join(hostDir(dir, host.NS), "ftgw.pid"))
		if err != nil {
			return nil, fmt.Errorf("%s's daemon pid: %w", host.NS, err)
		}
		procs = append(procs, watchedProc{"daemon " + host.NS, pid})
		q, err := childQEMU(pid)
		if err != nil {
			return nil, fmt.Errorf("%s's QEMU: %w", host.NS, err)
		}
		vms = append(vms, watchedProc{"VM " + host.NS, q})
	}
	return append(procs, vms...), nil
}

// childQEMU finds the QEMU process whose parent is pid.
func childQEMU(ppid int) (int, error) {
	stats, err := filepath.Glob("/proc/[0-9]*/stat")
	if err != nil {
		return 0, err
	}
	for _, path := range stats {
		raw, err := os.ReadFile(path)
		if err != nil {
			continue // gone meanwhile
		}
		comm, parent, err := parseProcStatParent(string(raw))
		if err == nil && parent == ppid && strings.HasPrefix(comm, "qemu-system") {
			return strconv.Atoi(filepath.Base(filepath.Dir(path)))
		}
	}
	return 0, fmt.Errorf("no qemu-system process is a child of pid %d", ppid)
}

// parseProcStatParent reads the command name and the parent's pid from a
// /proc/<pid>/stat line; the name, in parentheses, may hold either.
func parseProcStatParent(line string) (comm string, ppid int, err error) {
	open, end := strings.IndexByte(line, '('), strings.LastIndexByte(line, ')')
	if open < 0 || end < open {
		return "", 0, fmt.Errorf("/proc/pid/stat: no command name in %q", line)
	}
	f := strings.Fields(line[end+1:])
	if len(f) < 2 {
		return "", 0, fmt.Errorf("/proc/pid/stat: %d fields after the name, want at least 2", len(f))
	}
	ppid, err = strconv.Atoi(f[1])
	if err != nil {
		return "", 0, fmt.Errorf("/proc/pid/stat: parent: %w", err)
	}
	return line[open+1 : end], ppid, nil
}

// procSample is the CPU time used so far by the machine and by each watched
// process (ok false: it could not be read, e.g. it exited).
type procSample struct {
	at      time.Time
	machine time.Duration
	procs   []time.Duration
	waits   []time.Duration // runnable, waiting for a CPU
	ok      []bool
	// throttled is how long the throttle has frozen the protected VM.
	throttled time.Duration
}

func sampleProcs(procs []watchedProc) (procSample, error) {
	s := procSample{at: time.Now(), procs: make([]time.Duration, len(procs)), waits: make([]time.Duration, len(procs)), ok: make([]bool, len(procs))}
	for i, p := range procs {
		run, wait, err := processSchedstat(p.pid)
		s.procs[i], s.waits[i], s.ok[i] = run, wait, err == nil
	}
	t, err := throttledSeconds()
	if err != nil {
		return s, err
	}
	s.throttled = time.Duration(t * float64(time.Second))
	s.machine, err = machineBusy()
	return s, err
}

// cpuUse adds up the CPU used over the intervals of one case.
type cpuUse struct {
	wall, machine time.Duration
	// throttled is how long the throttle froze the protected VM meanwhile.
	throttled time.Duration
	procs     []time.Duration
	waits     []time.Duration // runnable, waiting for a CPU
	missing   []bool          // a process that could not be read in some interval
}

func (c *cpuUse) add(before, after procSample) {
	if c.procs == nil {
		c.procs, c.waits, c.missing = make([]time.Duration, len(before.procs)), make([]time.Duration, len(before.procs)), make([]bool, len(before.procs))
	}
	c.wall += after.at.Sub(before.at)
	c.machine += after.machine - before.machine
	c.throttled += after.throttled - before.throttled
	for i := range c.procs {
		if !before.ok[i] || !after.ok[i] || after.procs[i] < before.procs[i] {
			c.missing[i] = true
			continue
		}
		c.procs[i] += after.procs[i] - before.procs[i]
		c.waits[i] += after.waits[i] - before.waits[i]
	}
}

// columns is the time the protected VM was frozen, the machine's busy
// share of all CPUs and each process's share of one, tab-separated.
func (c cpuUse) columns(n int) string {
	if c.wall <= 0 {
		return strings.Repeat("-\t", n+2) + "-"
	}
	// Others: what the machine ran besides the watched processes (another
	// user's jobs disturb every figure here), in % of one CPU.
	others := c.machine
	for _, p := range c.procs {
		others -= p
	}
	cols := []string{c.throttled.Round(time.Millisecond).String(), fmt.Sprintf("%.0f%%", 100*c.machine.Seconds()/c.wall.Seconds()/float64(runtime.NumCPU())),
		fmt.Sprintf("%.0f%%", 100*max(others, 0).Seconds()/c.wall.Seconds())}
	for i := range n {
		if c.missing[i] {
			cols = append(cols, "-")
			continue
		}
		cols = append(cols, fmt.Sprintf("%.0f%%", 100*c.procs[i].Seconds()/c.wall.Seconds()))
	}
	return strings.Join(cols, "\t")
}

// waitColumns is each process's time runnable but waiting for a CPU,
// per request of n, tab-separated.
func (c cpuUse) waitColumns(n int) string {
	var cols []string
	for i := range c.waits {
		if c.missing[i] || n == 0 {
			cols = append(cols, "-")
			continue
		}
		cols = append(cols, fmt.Sprintf("%.2f", c.waits[i].Seconds()*1e3/float64(n)))
	}
	return strings.Join(cols, "\t")
}

// measureIdle is the CPU used over d with nothing sent.
func measureIdle(ctx context.Context, procs []watchedProc, d time.Duration) (cpuUse, error) {
	var c cpuUse
	before, err := sampleProcs(procs)
	if err != nil {
		return c, err
	}
	select {
	case <-ctx.Done():
		return c, ctx.Err()
	case <-time.After(d):
	}
	after, err := sampleProcs(procs)
	if err != nil {
		return c, err
	}
	c.add(before, after)
	return c, nil
}
