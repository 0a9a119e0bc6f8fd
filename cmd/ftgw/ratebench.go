package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/ftgw/ftgw/internal/lab"
	"github.com/ftgw/ftgw/internal/netnsutil"
	"github.com/ftgw/ftgw/pkg/datapath"
	"github.com/ftgw/ftgw/pkg/guest"
)

// The zero-loss throughput of each guest output path, the way RFC 2544
// measures a device: the highest offered rate at which the path loses at
// most maxLoss of the frames, found by a binary search over the rate, for
// small and full-size frames. The guest offers the frames (BLAST, paced);
// count_blast counts, on the client's uplink, those that arrive.

const (
	maxLoss = 0.0001 // 0.01 %
	// The search stops when the bounds are this close, or after
	// maxTrials trials.
	searchResolution = 0.02
	maxTrials        = 9
)

// Frame sizes without the FCS: 64 and 1518 bytes on the wire, a 1500-byte
// IP MTU.
var rateFrameSizes = []int{60, 1514}

var outputPaths = []struct{ mode, name string }{
	{"passthrough", "plain XDP forwarding"},
	{"hold-all", "hold-and-release"},
}

// trialResult is one trial: what was offered, delivered and lost.
type trialResult struct {
	offeredRate     float64 // what the guest achieved: frames sent / write time
	sent, delivered uint64
	daemonCPU, busy time.Duration // the primary daemon's CPU; the whole machine's busy time
	elapsed         time.Duration
	// guestWaited is how long the guest waited for the hold queue to
	// drain (backpressure) instead of overflowing it; part of the time
	// offeredRate divides by.
	guestWaited time.Duration
}

func (t trialResult) lost() uint64 {
	if t.delivered >= t.sent {
		return 0
	}
	return t.sent - t.delivered
}

func (t trialResult) lossRatio() float64 {
	if t.sent == 0 {
		return 1
	}
	return float64(t.lost()) / float64(t.sent)
}

type rateTrials struct {
	dir       string
	counter   *datapath.BlastCounter
	clientMAC net.HardwareAddr
	daemonPid int
	frames    int
}

// zeroLossRates searches each path's zero-loss rate at each frame size and
// prints them side by side, with the loss at full blast and the daemon's
// CPU per million frames at the zero-loss rate.
func zeroLossRates(ctx context.Context, w io.Writer, dir string, frames int) error {
	rt := &rateTrials{dir: dir, frames: frames}
	if _, err := os.Stat(guestControl(dir, lab.NSPrimary)); errors.Is(err, os.ErrNotExist) {
		// A real VM (--guest qemu) has no command to send frames at a
		// given rate: its guest serves the key-value protocol only.
		fmt.Fprintln(w, "\nzero-loss throughput: not measured; this lab's VM is a QEMU guest, which cannot offer frames on command (only the synthetic guest can)")
		return ctx.Err()
	}
	var err error
	if rt.daemonPid, err = readPid(filepath.Join(hostDir(dir, lab.NSPrimary), "ftgw.pid")); err != nil {
		return fmt.Errorf("the primary daemon's pid: %w", err)
	}
	err = netnsutil.Do(lab.NSClient, func() error {
		l, err := netlink.LinkByName(lab.Uplink)
		if err != nil {
			return err
		}
		rt.clientMAC = l.Attrs().HardwareAddr
		rt.counter, err = datapath.AttachBlastCounter(l.Attrs().Index)
		return err
	})
	if err != nil {
		return fmt.Errorf("count frames on the client: %w", err)
	}
	defer rt.counter.Close()

	fmt.Fprintf(w, "\nzero-loss throughput (RFC 2544: the highest offered rate losing <= %.2f%%, %d frames per trial, binary search)\n", 100*maxLoss, frames)
	// The generator alone, at each size, first: a path near its rate is
	// bound by the generator, not by itself.
	generator := map[int]float64{}
	for _, size := range rateFrameSizes {
		g, cpu, err := generatorAlone(frames, size)
		if err != nil {
			return fmt.Errorf("the generator alone: %w", err)
		}
		generator[size] = float64(frames-g.Failed) / g.Writes.Seconds()
		fmt.Fprintf(w, "  %-22s %4d B: %.0f frames/s (%d written, %d failed: the guest's write loop on a tap whose XDP drops; writer CPU %.0f%% of one)\n",
			"generator alone", size+4, generator[size], frames-g.Failed, g.Failed, 100*cpu.Seconds()/g.Writes.Seconds())
	}
	type row struct {
		path     string
		size     int // on the wire, with the FCS
		zeroLoss trialResult
		found    bool
		full     trialResult
	}
	var rows []row
	best := map[string]float64{}
	for _, size := range rateFrameSizes {
		for _, p := range outputPaths {
			if err := setOutputMode(dir, lab.NSPrimary, p.mode); err != nil {
				return err
			}
			full, zero, found, trials, err := searchZeroLoss(ctx, func(rate float64) (trialResult, error) {
				t, err := rt.trial(ctx, size, rate)
				if err == nil {
					fmt.Fprintf(w, "    %s\n", trialString(t, rate))
				}
				return t, err
			})
			if err != nil {
				return fmt.Errorf("%s, %d-byte frames: %w", p.name, size+4, err)
			}
			fmt.Fprintf(w, "  %-22s %4d B: %2d trials, zero-loss %s\n", p.name, size+4, trials, rateString(zero, found, size))
			rows = append(rows, row{p.name, size + 4, zero, found, full})
			if found {
				best[fmt.Sprint(p.mode, size)] = zero.offeredRate
			}
		}
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "\nguest output path\tframe\tzero-loss rate\tMbit/s\tdaemon CPU s per M frames\tmachine busy\tfull blast: offered/s\tsent\tdelivered\tlost\tguest waited\t")
	for _, r := range rows {
		zl, mbit, cpu, busy := "none found", "-", "-", "-"
		if r.found {
			z := r.zeroLoss
			zl = fmt.Sprintf("%.0f/s", z.offeredRate)
			mbit = fmt.Sprintf("%.0f", z.offeredRate*float64(r.size)*8/1e6)
			cpu = fmt.Sprintf("%.2f", z.daemonCPU.Seconds()/(float64(z.delivered)/1e6))
			busy = fmt.Sprintf("%.0f%% of 2 CPUs", 100*z.busy.Seconds()/(2*z.elapsed.Seconds()))
		}
		f := r.full
		fmt.Fprintf(tw, "%s\t%d B\t%s\t%s\t%s\t%s\t%.0f\t%d\t%d\t%d (%.2f%%)\t%s\t\n", r.path, r.size, zl, mbit, cpu, busy,
			f.offeredRate, f.sent, f.delivered, f.lost(), 100*f.lossRatio(), f.guestWaited.Round(time.Millisecond))
	}
	tw.Flush()
	generatorBound := map[int]bool{}
	for _, r := range rows {
		if r.path == outputPaths[0].name && r.found && r.zeroLoss == r.full && r.zeroLoss.offeredRate >= 0.9*generator[r.size-4] {
			generatorBound[r.size] = true
		}
	}
	for _, size := range rateFrameSizes {
		plain, held := best[fmt.Sprint("passthrough", size)], best[fmt.Sprint("hold-all", size)]
		if plain > 0 {
			fmt.Fprintf(w, "hold-and-release / plain XDP forwarding, zero-loss, %d B: %.0f%% (target >= 90%%)\n", size+4, 100*held/plain)
			if generatorBound[size+4] {
				fmt.Fprintf(w, "  (plain forwarding lost nothing at the generator's own speed: its rate is the generator's, a lower bound on the path's)\n")
			} else if plain < 0.9*generator[size] {
				fmt.Fprintf(w, "  (plain forwarding: %.0f%% of the generator alone; tun forwards inside the guest's write, so its rate is the path's on the writer's CPU)\n", 100*plain/generator[size])
			}
		} else {
			fmt.Fprintf(w, "hold-and-release / plain XDP forwarding, zero-loss, %d B: no zero-loss rate for plain forwarding\n", size+4)
		}
	}
	return ctx.Err()
}

// searchZeroLoss finds the highest rate at which trial loses at most
// maxLoss: first a trial at full blast (rate 0), whose achieved rate bounds
// the search; then a binary search below it. zero is the best trial that
// passed.
func searchZeroLoss(ctx context.Context, trial func(rate float64) (trialResult, error)) (full, zero trialResult, found bool, trials int, err error) {
	full, err = trial(0)
	trials++
	if err != nil {
		return
	}
	if full.lossRatio() <= maxLoss {
		return full, full, true, trials, nil
	}
	lo, hi := 0.0, full.offeredRate
	for trials < maxTrials && ctx.Err() == nil && (lo == 0 || (hi-lo)/hi > searchResolution) {
		mid := (lo + hi) / 2
		var t trialResult
		t, err = trial(mid)
		trials++
		if err != nil {
			return
		}
		if t.lossRatio() <= maxLoss {
			lo, zero, found = mid, t, true
		} else {
			hi = mid
		}
	}
	return full, zero, found, trials, ctx.Err()
}

// trial has the guest offer rt.frames frames at rate (0: full blast) and
// counts what reached the client.
func (rt *rateTrials) trial(ctx context.Context, size int, rate float64) (trialResult, error) {
	var res trialResult
	// Let what the previous trial left in flight arrive, or be lost, first.
	if err := waitLogDrained(ctx, rt.dir); err != nil {
		return res, err
	}
	before, err := rt.counter.Received()
	if err != nil {
		return res, err
	}
	cpuBefore, err := sampleCPU(rt.daemonPid)
	if err != nil {
		return res, err
	}
	start := time.Now()
	b, err := guest.Blast(guestControl(rt.dir, lab.NSPrimary), rt.frames, rt.clientMAC, size, rate, time.Minute)
	if err != nil {
		return res, err
	}
	res.sent, res.guestWaited = uint64(rt.frames-b.Failed), b.Waited
	if b.Writes > 0 {
		res.offeredRate = float64(res.sent) / b.Writes.Seconds()
	}
	// The last frame has arrived when the count stops moving.
	last, lastChange := before, time.Now()
	for time.Since(lastChange) < 100*time.Millisecond && ctx.Err() == nil {
		n, err := rt.counter.Received()
		if err != nil {
			return res, err
		}
		if n != last {
			last, lastChange = n, time.Now()
		}
		time.Sleep(5 * time.Millisecond)
	}
	res.delivered = last - before
	res.elapsed = lastChange.Sub(start)
	cpuAfter, err := sampleCPU(rt.daemonPid)
	if err != nil {
		return res, err
	}
	res.daemonCPU, res.busy = cpuAfter.daemon-cpuBefore.daemon, cpuAfter.machine-cpuBefore.machine
	return res, nil
}

// cpuSample is the CPU time used so far by the daemon and by the machine.
type cpuSample struct{ daemon, machine time.Duration }

func sampleCPU(pid int) (cpuSample, error) {
	daemon, err := processCPU(pid)
	if err != nil {
		return cpuSample{}, err
	}
	machine, err := machineBusy()
	return cpuSample{daemon, machine}, err
}

func trialString(t trialResult, rate float64) string {
	offered := fmt.Sprintf("at %.0f/s", rate)
	if rate == 0 {
		offered = "full blast"
	}
	s := fmt.Sprintf("trial %s: offered %.0f/s, sent %d, delivered %d, lost %d (%.3f%%)", offered, t.offeredRate, t.sent, t.delivered, t.lost(), 100*t.lossRatio())
	if t.guestWaited > 0 {
		s += fmt.Sprintf(", guest waited %s for the hold queue", t.guestWaited.Round(time.Millisecond))
	}
	return s
}

func rateString(t trialResult, found bool, size int) string {
	if !found {
		return "none found"
	}
	return fmt.Sprintf("%.0f frames/s (%.0f Mbit/s), %d sent, %d delivered, %d lost", t.offeredRate, t.offeredRate*float64(size+4)*8/1e6, t.sent, t.delivered, t.lost())
}

// clockTick is USER_HZ, the unit of /proc/stat's CPU times (100 on Linux).
const clockTick = 10 * time.Millisecond

// processCPU is the time pid's threads have run, from the scheduler's own
// nanosecond accounting (/proc's user and system times count 10 ms ticks,
// too coarse for a trial of a fraction of a second). Threads that exited
// meanwhile are not counted.
func processCPU(pid int) (time.Duration, error) {
	run, _, err := processSchedstat(pid)
	return run, err
}

// processSchedstat is the CPU time a process's live threads have used so
// far, and how long they have waited runnable for a CPU
// (/proc/<pid>/task/*/schedstat).
func processSchedstat(pid int) (run, wait time.Duration, err error) {
	tasks, err := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/schedstat", pid))
	if err != nil || len(tasks) == 0 {
		return 0, 0, fmt.Errorf("threads of pid %d: none found (%v)", pid, err)
	}
	for _, path := range tasks {
		raw, err := os.ReadFile(path)
		if err != nil {
			continue // the thread exited
		}
		f := strings.Fields(string(raw))
		if len(f) < 2 {
			return 0, 0, fmt.Errorf("%s: %d fields, want 3", path, len(f))
		}
		ns, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil {
			return 0, 0, fmt.Errorf("%s: %w", path, err)
		}
		waited, err := strconv.ParseInt(f[1], 10, 64)
		if err != nil {
			return 0, 0, fmt.Errorf("%s: %w", path, err)
		}
		run += time.Duration(ns)
		wait += time.Duration(waited)
	}
	return run, wait, nil
}

// machineBusy is the time all CPUs have spent not idle (nor waiting on I/O).
func machineBusy() (time.Duration, error) {
	raw, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, err
	}
	line, _, _ := strings.Cut(string(raw), "\n")
	f := strings.Fields(line)
	if len(f) < 8 || f[0] != "cpu" {
		return 0, fmt.Errorf("/proc/stat: unexpected first line %q", line)
	}
	var busy uint64
	for i, v := range f[1:] {
		if i == 3 || i == 4 { // idle, iowait
			continue
		}
		n, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("/proc/stat: %w", err)
		}
		busy += n
	}
	return time.Duration(busy) * clockTick, nil
}
