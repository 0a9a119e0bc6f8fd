package main

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	dto "github.com/prometheus/client_model/go"

	"github.com/ftgw/ftgw/internal/lab"
	"github.com/ftgw/ftgw/pkg/guest"
	"github.com/ftgw/ftgw/pkg/protect"
)

// `ftgw bench --scale 1,8,64`: how the pair's latency, CPU and memory grow
// with the VMs one daemon protects. Each count gets a fresh lab, one
// closed-loop client per VM, and the primary's commit-latency histograms
// read as the difference between a scrape before and one after the load,
// so nothing from the lab's start-up or warm-up counts.

type scaleOptions struct {
	dir      string
	counts   []int
	requests int // PUTs per VM
	verbose  bool
}

// scaleClientTimeout bounds one PUT; an unanswered one counts as failed.
const scaleClientTimeout = time.Second

// scaleWindow is the time the switchover's neighbours are measured for
// before it.
const scaleWindow = 3 * time.Second

// parseScaleCounts reads --scale: counts of VMs, each 1 to lab.MaxVMs.
func parseScaleCounts(s string) ([]int, error) {
	var counts []int
	for f := range strings.SplitSeq(s, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 1 || n > lab.MaxVMs {
			return nil, fmt.Errorf("--scale %q: %q is not a count of VMs from 1 to %d", s, f, lab.MaxVMs)
		}
		counts = append(counts, n)
	}
	return counts, nil
}

// put is one PUT of a closed-loop client.
type put struct {
	at  time.Time // sent
	rtt time.Duration
	ok  bool
}

// vmPuts is what one VM's client did.
type vmPuts struct {
	vm   lab.LabVM
	puts []put
}

func (v vmPuts) answered() (ok int, rtts []time.Duration) {
	for _, p := range v.puts {
		if p.ok {
			ok++
			rtts = append(rtts, p.rtt)
		}
	}
	return ok, rtts
}

// runPuts sends PUTs one after another until n are sent (n > 0), stop is
// closed or ctx ends.
func runPuts(ctx context.Context, c *guest.Client, prefix string, n int, stop <-chan struct{}) []put {
	var out []put
	for i := 0; (n == 0 || i < n) && ctx.Err() == nil; i++ {
		select {
		case <-stop:
			return out
		default:
		}
		start := time.Now()
		_, err := c.Put(fmt.Sprintf("%s%d", prefix, i%256), fmt.Sprintf("v%d", i))
		out = append(out, put{at: start, rtt: time.Since(start), ok: err == nil})
	}
	return out
}

// loadVMs runs one client per VM at once, each with runPuts.
func loadVMs(ctx context.Context, clients []*guest.Client, vms []lab.LabVM, prefix string, n int, stop <-chan struct{}) []vmPuts {
	out := make([]vmPuts, len(vms))
	var wg sync.WaitGroup
	for i, vm := range vms {
		out[i].vm = vm
		wg.Go(func() { out[i].puts = runPuts(ctx, clients[i], prefix+vm.Name+"-", n, stop) })
	}
	wg.Wait()
	return out
}

// scaleRun is one count's measurements.
type scaleRun struct {
	n                        int
	offered, ok              int
	planned                  int
	wall                     time.Duration
	rtt                      []time.Duration // answered PUTs
	commit                   map[string]*dto.Histogram
	perVM                    []vmPuts
	daemonCPU                time.Duration // the primary daemon's
	machineCPU               time.Duration
	rssPrimary, rssSecondary int64 // bytes
}

func scaleBench(ctx context.Context, w, progress io.Writer, o scaleOptions) error {
	fmt.Fprintf(w, "ftgw bench --scale %s: for each count, a fresh lab of that many VMs and one closed-loop client per VM, %d PUTs each (timeout %s)\n",
		joinInts(o.counts), o.requests, scaleClientTimeout)
	defer labDown(o.dir)
	var runs []scaleRun
	for i, n := range o.counts {
		last := i == len(o.counts)-1
		r, err := scaleCount(ctx, progress, o, n, last, w)
		if err != nil {
			if len(runs) > 0 {
				printScaleTable(w, runs)
			}
			return fmt.Errorf("%d VMs: %w", n, err)
		}
		runs = append(runs, r)
	}
	printScaleTable(w, runs)
	return nil
}

// scaleCount measures one count of VMs on a fresh lab; at the last count it
// also prints the per-VM latencies and runs the switchover of vm1.
func scaleCount(ctx context.Context, progress io.Writer, o scaleOptions, n int, last bool, w io.Writer) (scaleRun, error) {
	r := scaleRun{n: n, planned: n * o.requests}
	say := func(format string, args ...any) {
		fmt.Fprintf(progress, "scale %2d VMs: %s\n", n, fmt.Sprintf(format, args...))
	}
	settings := labDefaults(n)
	say("lab up (heartbeat %s, failure timeout %s, hold capacity %d)", settings.heartbeat, settings.failureTimeout, settings.holdCapacity)
	labDown(o.dir)
	cfgs, err := labVMs(n, engineSynthetic, "")
	if err != nil {
		return r, err
	}
	start := time.Now()
	if err := labUp(ctx, o.dir, cfgs, settings); err != nil {
		return r, err
	}
	if err := waitAllProtected(ctx, o.dir, n, time.Minute); err != nil {
		return r, err
	}
	say("every VM protected %s after lab up began", time.Since(start).Round(time.Millisecond))

	vms := lab.VMs(n)
	clients := make([]*guest.Client, n)
	defer func() {
		for _, c := range clients {
			if c != nil {
				c.Close()
			}
		}
	}()
	for i, vm := range vms {
		if clients[i], err = lab.DialVM(vm.IP, scaleClientTimeout); err != nil {
			return r, fmt.Errorf("dial %s: %w", vm.Name, err)
		}
	}
	// The first requests resolve the VMs' addresses and warm the caches.
	for _, v := range loadVMs(ctx, clients, vms, "warmup-", 10, nil) {
		if ok, _ := v.answered(); ok == 0 {
			return r, fmt.Errorf("%s answered none of 10 warm-up PUTs", v.vm.Name)
		}
	}

	pids, err := labPids(o.dir)
	if err != nil {
		return r, err
	}
	before, err := lab.Scrape(lab.NSPrimary)
	if err != nil {
		return r, err
	}
	cpuBefore, err := processCPU(pids[0])
	if err != nil {
		return r, err
	}
	busyBefore, err := machineBusy()
	if err != nil {
		return r, err
	}
	say("load: %d clients, %d PUTs each", n, o.requests)
	at := time.Now()
	r.perVM = loadVMs(ctx, clients, vms, "scale-", o.requests, nil)
	r.wall = time.Since(at)
	cpuAfter, err := processCPU(pids[0])
	if err != nil {
		return r, err
	}
	busyAfter, err := machineBusy()
	if err != nil {
		return r, err
	}
	after, err := lab.Scrape(lab.NSPrimary)
	if err != nil {
		return r, err
	}
	r.daemonCPU, r.machineCPU = cpuAfter-cpuBefore, busyAfter-busyBefore
	if r.commit, err = commitDeltas(before, after); err != nil {
		return r, err
	}
	for _, v := range r.perVM {
		ok, rtts := v.answered()
		r.offered += len(v.puts)
		r.ok += ok
		r.rtt = append(r.rtt, rtts...)
	}
	for i, rss := range []*int64{&r.rssPrimary, &r.rssSecondary} {
		if *rss, err = procRSS(pids[i]); err != nil {
			return r, err
		}
	}
	say("load done in %s: %d of %d PUTs answered", r.wall.Round(time.Millisecond), r.ok, r.offered)
	if !last {
		return r, nil
	}
	printPerVM(w, r, o.verbose)
	if n == 1 {
		fmt.Fprintln(w, "\nswitchover under load: skipped, no other VM to watch with one")
		return r, nil
	}
	return r, scaleSwitchover(ctx, w, say, o.dir, clients, vms)
}

// waitAllProtected waits until the primary serves all n VMs protected and
// the secondary follows each.
func waitAllProtected(ctx context.Context, dir string, n int, timeout time.Duration) error {
	var state string
	err := waitUntil(ctx, timeout, fmt.Sprintf("all %d VMs to be protected", n), func() (bool, error) {
		a, errA := daemonVMs(dir, lab.NSPrimary)
		b, errB := daemonVMs(dir, lab.NSSecondary)
		if errA != nil || errB != nil || len(a) != n || len(b) != n {
			state = fmt.Sprintf("%s: %d VMs (%v), %s: %d VMs (%v)", lab.NSPrimary, len(a), errA, lab.NSSecondary, len(b), errB)
			return false, nil
		}
		for i := range a {
			if a[i].State != protect.Protected.String() || b[i].State != protect.Standby.String() {
				state = fmt.Sprintf("%s is %s on %s, %s on %s", a[i].VM, a[i].State, lab.NSPrimary, b[i].State, lab.NSSecondary)
				return false, nil
			}
		}
		return true, nil
	})
	if err != nil {
		return fmt.Errorf("%w: %s", err, state)
	}
	return nil
}

// labPids are the lab daemons' pids, the primary's first.
func labPids(dir string) ([2]int, error) {
	var pids [2]int
	for i, host := range lab.Hosts[:2] {
		var err error
		if pids[i], err = readPid(filepath.Join(hostDir(dir, host.NS), "ftgw.pid")); err != nil {
			return pids, fmt.Errorf("%s's daemon pid: %w", host.NS, err)
		}
	}
	return pids, nil
}

// scaleSwitchover moves vm1 to its standby while every VM stays under load,
// and compares the other VMs' commit latency on ftgw-a in the 3 s before
// with the switchover itself.
func scaleSwitchover(ctx context.Context, w io.Writer, say func(string, ...any), dir string, clients []*guest.Client, vms []lab.LabVM) error {
	stop := make(chan struct{})
	var loads []vmPuts
	loaded := make(chan struct{})
	go func() {
		defer close(loaded)
		loads = loadVMs(ctx, clients, vms, "switchover-", 0, stop)
	}()
	stopLoad := sync.OnceFunc(func() { close(stop); <-loaded })
	defer stopLoad()

	say("switchover of %s under load: %s of the others before it", lab.VMName, scaleWindow)
	s0, err := lab.Scrape(lab.NSPrimary)
	if err != nil {
		return err
	}
	t0 := time.Now()
	time.Sleep(scaleWindow)
	s1, err := lab.Scrape(lab.NSPrimary)
	if err != nil {
		return err
	}
	t1 := time.Now()
	socket := controlPath(hostDir(dir, lab.NSPrimary))
	raw, err := controlPostSocket(socket, vmQuery("/switchover", lab.VMName), nil)
	if err != nil {
		return fmt.Errorf("switchover of %s: %w", lab.VMName, err)
	}
	var reply switchoverReply
	if err := json.Unmarshal([]byte(raw), &reply); err != nil {
		return fmt.Errorf("switchover reply: %w", err)
	}
	// Over once ftgw-b serves vm1 with ftgw-a its standby again.
	err = waitUntil(ctx, 30*time.Second, lab.VMName+" protected on "+lab.NSSecondary, func() (bool, error) {
		a, errA := vmStatusAt(socket, lab.VMName)
		b, errB := vmStatusAt(controlPath(hostDir(dir, lab.NSSecondary)), lab.VMName)
		return errA == nil && errB == nil && a.State == protect.Standby.String() && b.State == protect.Protected.String() && b.Epoch > reply.Epoch, nil
	})
	if err != nil {
		return err
	}
	t2 := time.Now()
	s2, err := lab.Scrape(lab.NSPrimary)
	if err != nil {
		return err
	}
	stopLoad()
	say("switchover done in %s", t2.Sub(t1).Round(time.Millisecond))

	beforeH, err := commitDeltas(s0, s1)
	if err != nil {
		return err
	}
	duringH, err := commitDeltas(s1, s2)
	if err != nil {
		return err
	}
	others := func(m map[string]*dto.Histogram) map[string]*dto.Histogram {
		out := maps.Clone(m)
		delete(out, lab.VMName)
		return out
	}
	fmt.Fprintf(w, "\nswitchover of %s under load (drained %s, handed over epoch %d; %s until protected again on %s); the other %d VMs on %s:\n",
		lab.VMName, reply.Drained.Round(10*time.Microsecond), reply.Epoch, t2.Sub(t1).Round(time.Millisecond), lab.NSSecondary, len(vms)-1, lab.NSPrimary)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "window\tlength\tframes\tcommit p50\tcommit p99\tworst VM p99\tPUTs sent\tfailed\t")
	for _, win := range []struct {
		name     string
		from, to time.Time
		h        map[string]*dto.Histogram
	}{{"before", t0, t1, others(beforeH)}, {"during", t1, t2, others(duringH)}} {
		agg, err := sumHistograms(win.h)
		if err != nil {
			return err
		}
		worstVM, worst := worstP99(win.h)
		sent, failed := putsIn(loads, win.from, win.to, lab.VMName)
		fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\t%s %s\t%d\t%d\t\n", win.name, win.to.Sub(win.from).Round(time.Millisecond), agg.GetSampleCount(),
			quantile(agg, 0.5), quantile(agg, 0.99), worstVM, worst, sent, failed)
	}
	tw.Flush()
	var otherFailed, vm1Failed, vm1Sent int
	for _, l := range loads {
		for _, p := range l.puts {
			switch {
			case l.vm.Name == lab.VMName:
				vm1Sent++
				if !p.ok {
					vm1Failed++
				}
			case !p.ok:
				otherFailed++
			}
		}
	}
	fmt.Fprintf(w, "PUTs to the other VMs that failed while under load: %d; to %s: %d of %d\n", otherFailed, lab.VMName, vm1Failed, vm1Sent)
	return nil
}

// putsIn counts the PUTs sent in [from, to) to every VM but except, and
// those of them that failed.
func putsIn(loads []vmPuts, from, to time.Time, except string) (sent, failed int) {
	for _, l := range loads {
		if l.vm.Name == except {
			continue
		}
		for _, p := range l.puts {
			if !p.at.Before(from) && p.at.Before(to) {
				sent++
				if !p.ok {
					failed++
				}
			}
		}
	}
	return sent, failed
}

// commitDeltas is the commit-latency histogram of each VM (both paths,
// fast and held, summed) between two scrapes of one daemon: what the VM
// released in between.
func commitDeltas(before, after map[string]*dto.MetricFamily) (map[string]*dto.Histogram, error) {
	b, err := commitByVM(before)
	if err != nil {
		return nil, err
	}
	a, err := commitByVM(after)
	if err != nil {
		return nil, err
	}
	out := make(map[string]*dto.Histogram, len(a))
	for vm, h := range a {
		d, err := histogramDelta(h, b[vm])
		if err != nil {
			return nil, fmt.Errorf("%s: %w", vm, err)
		}
		out[vm] = d
	}
	return out, nil
}

// commitByVM sums each VM's commit-latency paths in one scrape.
func commitByVM(families map[string]*dto.MetricFamily) (map[string]*dto.Histogram, error) {
	out := map[string]*dto.Histogram{}
	for _, m := range families["ftgw_output_commit_latency_seconds"].GetMetric() {
		vm := ""
		for _, l := range m.GetLabel() {
			if l.GetName() == "vm" {
				vm = l.GetValue()
			}
		}
		sum, err := addHistogram(out[vm], m.GetHistogram())
		if err != nil {
			return nil, fmt.Errorf("commit latency of %s: %w", vm, err)
		}
		out[vm] = sum
	}
	return out, nil
}

// addHistogram returns a+b, a new histogram; a nil one counts as empty.
// Both must have the same buckets, as one daemon's histograms do.
func addHistogram(a, b *dto.Histogram) (*dto.Histogram, error) {
	return combineHistograms(a, b, 1)
}

// histogramDelta is after-before: what a cumulative histogram counted in
// between. A count that went down means the daemon restarted between the
// two scrapes, and the difference means nothing.
func histogramDelta(after, before *dto.Histogram) (*dto.Histogram, error) {
	d, err := combineHistograms(after, before, -1)
	if err != nil {
		return nil, err
	}
	if int64(d.GetSampleCount()) < 0 {
		return nil, errors.New("histogram count went down between scrapes: the daemon restarted")
	}
	for _, bk := range d.GetBucket() {
		if int64(bk.GetCumulativeCount()) < 0 {
			return nil, errors.New("histogram bucket went down between scrapes: the daemon restarted")
		}
	}
	return d, nil
}

func combineHistograms(a, b *dto.Histogram, sign int64) (*dto.Histogram, error) {
	if a == nil {
		a = &dto.Histogram{}
	}
	if b == nil {
		b = &dto.Histogram{}
	}
	switch {
	case len(a.GetBucket()) == 0 && sign > 0:
		a, b = b, a
	case len(b.GetBucket()) == 0:
	case len(a.GetBucket()) != len(b.GetBucket()):
		return nil, fmt.Errorf("histograms with %d and %d buckets", len(a.GetBucket()), len(b.GetBucket()))
	}
	count := uint64(int64(a.GetSampleCount()) + sign*int64(b.GetSampleCount()))
	sum := a.GetSampleSum() + float64(sign)*b.GetSampleSum()
	out := &dto.Histogram{SampleCount: &count, SampleSum: &sum}
	for i, ab := range a.GetBucket() {
		c, bound := ab.GetCumulativeCount(), ab.GetUpperBound()
		if len(b.GetBucket()) > 0 {
			bb := b.GetBucket()[i]
			if bb.GetUpperBound() != bound {
				return nil, fmt.Errorf("bucket %d: bounds %g and %g differ", i, bound, bb.GetUpperBound())
			}
			c = uint64(int64(c) + sign*int64(bb.GetCumulativeCount()))
		}
		out.Bucket = append(out.Bucket, &dto.Bucket{CumulativeCount: &c, UpperBound: &bound})
	}
	return out, nil
}

// sumHistograms adds up every VM's histogram.
func sumHistograms(byVM map[string]*dto.Histogram) (*dto.Histogram, error) {
	var sum *dto.Histogram
	for _, vm := range slices.Sorted(maps.Keys(byVM)) {
		var err error
		if sum, err = addHistogram(sum, byVM[vm]); err != nil {
			return nil, fmt.Errorf("%s: %w", vm, err)
		}
	}
	if sum == nil {
		sum = &dto.Histogram{}
	}
	return sum, nil
}

// worstP99 is the VM whose histogram has the highest p99, and that p99.
func worstP99(byVM map[string]*dto.Histogram) (string, string) {
	worstVM, worst := "-", time.Duration(-1)
	for _, vm := range slices.Sorted(maps.Keys(byVM)) {
		h := byVM[vm]
		if h.GetSampleCount() == 0 {
			continue
		}
		if q := histogramQuantile(h, 0.99); q > worst {
			worstVM, worst = vm, q
		}
	}
	if worst < 0 {
		return worstVM, "-"
	}
	return worstVM, micros(worst)
}

// quantile prints a histogram's quantile, or "-" for an empty one.
func quantile(h *dto.Histogram, q float64) string {
	if h.GetSampleCount() == 0 {
		return "-"
	}
	return micros(histogramQuantile(h, q))
}

// procRSS is pid's resident set in bytes, from /proc/<pid>/status.
func procRSS(pid int) (int64, error) {
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	return parseVmRSS(string(raw))
}

// parseVmRSS reads the VmRSS line ("VmRSS:    1234 kB") of a
// /proc/<pid>/status.
func parseVmRSS(status string) (int64, error) {
	for line := range strings.SplitSeq(status, "\n") {
		rest, ok := strings.CutPrefix(line, "VmRSS:")
		if !ok {
			continue
		}
		f := strings.Fields(rest)
		if len(f) != 2 || f[1] != "kB" {
			return 0, fmt.Errorf("/proc/pid/status: VmRSS %q", rest)
		}
		kb, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil {
			return 0, fmt.Errorf("/proc/pid/status: VmRSS: %w", err)
		}
		return kb << 10, nil
	}
	return 0, errors.New("/proc/pid/status: no VmRSS (a kernel thread, or the process exited)")
}

func mb(bytes int64) float64 { return float64(bytes) / (1 << 20) }

func joinInts(ns []int) string {
	s := make([]string, len(ns))
	for i, n := range ns {
		s[i] = strconv.Itoa(n)
	}
	return strings.Join(s, ",")
}

// printScaleTable prints one row per count. PUT/s counts answered PUTs
// only, over the whole load: a failed PUT never raises it.
func printScaleTable(w io.Writer, runs []scaleRun) {
	cpus := runtime.NumCPU()
	fmt.Fprintln(w)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(tw, "VMs\tPUTs ok/offered\tfailed\tunsent\tanswered/s\tRTT p50\tRTT p99\tcommit p50\tcommit p99\tworst VM p99\tdaemon CPU\tper VM\tmachine CPU of %d\tRSS primary\tper VM\tRSS secondary\tper VM\t\n", cpus)
	for _, r := range runs {
		agg, err := sumHistograms(r.commit)
		if err != nil {
			fmt.Fprintf(tw, "%d\t%s\t\n", r.n, err)
			continue
		}
		worstVM, worst := worstP99(r.commit)
		rtt := percentiles(r.rtt, 50, 99)
		secs := r.wall.Seconds()
		cpu := 100 * r.daemonCPU.Seconds() / secs
		fmt.Fprintf(tw, "%d\t%d/%d\t%d\t%d\t%.0f\t%s\t%s\t%s\t%s\t%s %s\t%.1f%%\t%.2f%%\t%.0f%%\t%.1f MB\t%.2f MB\t%.1f MB\t%.2f MB\t\n",
			r.n, r.ok, r.offered, r.offered-r.ok, r.planned-r.offered, float64(r.ok)/secs,
			micros(rtt[0]), micros(rtt[1]), quantile(agg, 0.5), quantile(agg, 0.99), worstVM, worst,
			cpu, cpu/float64(r.n), 100*r.machineCPU.Seconds()/secs/float64(cpus),
			mb(r.rssPrimary), mb(r.rssPrimary)/float64(r.n), mb(r.rssSecondary), mb(r.rssSecondary)/float64(r.n))
	}
	tw.Flush()
	fmt.Fprintln(w, "commit latency: ftgw-a's histograms (fast and held paths) over the load only; CPU: the run time of ftgw-a's daemon's threads in % of one CPU (its guests run apart), the machine's busy time in % of all CPUs; RSS: each daemon's VmRSS after the load")
}

// perVMLine is one VM's figures at the last count.
type perVMLine struct {
	vm           string
	ok, offered  int
	rtt50, rtt99 time.Duration
	frames       uint64
	commit       [2]string // p50, p99
	p99          time.Duration
}

// perVMLines lists each VM's figures, best commit p99 first; with more
// than 8 VMs and not verbose, only the 3 best and the 3 worst.
func perVMLines(perVM []vmPuts, commit map[string]*dto.Histogram, verbose bool) (lines []perVMLine, cut bool) {
	for _, v := range perVM {
		ok, rtts := v.answered()
		p := percentiles(rtts, 50, 99)
		h := commit[v.vm.Name]
		l := perVMLine{vm: v.vm.Name, ok: ok, offered: len(v.puts), rtt50: p[0], rtt99: p[1], frames: h.GetSampleCount()}
		l.p99 = -1
		if h.GetSampleCount() > 0 {
			l.p99 = histogramQuantile(h, 0.99)
		}
		l.commit = [2]string{quantile(h, 0.5), quantile(h, 0.99)}
		lines = append(lines, l)
	}
	// A VM with no frames (p99 -1) sorts first: it is the one to look at
	// beside the worst.
	slices.SortStableFunc(lines, func(a, b perVMLine) int { return cmp.Compare(a.p99, b.p99) })
	if verbose || len(lines) <= 8 {
		return lines, false
	}
	return append(lines[:3:3], lines[len(lines)-3:]...), true
}

func printPerVM(w io.Writer, r scaleRun, verbose bool) {
	lines, cut := perVMLines(r.perVM, r.commit, verbose)
	what := "each VM"
	if cut {
		what = "the 3 best and the 3 worst VMs by commit p99 (-v: all)"
	}
	fmt.Fprintf(w, "\n%d VMs, %s:\n", r.n, what)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "VM\tPUTs ok/offered\tRTT p50\tRTT p99\tframes\tcommit p50\tcommit p99\t")
	for i, l := range lines {
		if cut && i == 3 {
			fmt.Fprintln(tw, "...\t\t\t\t\t\t\t")
		}
		fmt.Fprintf(tw, "%s\t%d/%d\t%s\t%s\t%d\t%s\t%s\t\n", l.vm, l.ok, l.offered, micros(l.rtt50), micros(l.rtt99), l.frames, l.commit[0], l.commit[1])
	}
	tw.Flush()
}
