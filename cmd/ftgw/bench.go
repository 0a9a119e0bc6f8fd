package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"text/tabwriter"
	"time"

	"github.com/ftgw/ftgw/internal/lab"
	"github.com/ftgw/ftgw/internal/netnsutil"
	"github.com/ftgw/ftgw/pkg/guest"
)

func benchCommand(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	dir := fs.String("dir", defaultLabDir, "the lab's directory")
	requests := fs.Int("requests", 5000, "requests per output mode for the latency comparison (a --guest qemu lab: per case, default 1500); with --scale, PUTs per VM (default 200)")
	rounds := fs.Int("rounds", 5, "rounds alternating the output modes, against drift")
	frames := fs.Int("frames", 200000, "frames per trial of the zero-loss rate search (at least 10000: the loss allowed is 0.01%; the hold queue's capacity should be a small part of it, or it hides a slow release)")
	budget := fs.Duration("budget", 5*time.Minute, "upper bound on the whole run (with --scale: default 20m; a --guest qemu lab: 15m)")
	rates := fs.Bool("rates", true, "also search the zero-loss throughput (false: the latency comparison only)")
	echo := fs.String("serve-echo", "", "internal: serve the link RTT echo on this address")
	failovers := fs.Int("failover", 0, "instead: run this many random failovers under a write load, each on a fresh lab, and check no acknowledged write is lost")
	seed := fs.Uint64("seed", uint64(time.Now().UnixNano()), "with --failover: the random seed")
	failureTimeout := fs.Duration("failure-timeout", 50*time.Millisecond, "with --failover: the lab's failure timeout; with --chaos: the only one (default: half the schedules at 50ms, half at 1s; 1s with --guest qemu)")
	chaos := fs.Int("chaos", 0, "instead: run this many random fault schedules under a concurrent load, each history checked for linearizability and dual-active instants")
	guestEngine := fs.String("guest", engineSynthetic, "with --chaos: the lab's VM, synthetic or qemu")
	guestDir := fs.String("guest-dir", "build/guest", "with --chaos --guest qemu: where `make guest` put the image")
	out := fs.String("out", "/tmp/ftgw-chaos", "with --chaos: where the visualizations of failed histories go")
	faultKinds := fs.String("faults", "", "with --chaos: draw only these faults (comma-separated kinds, e.g. daemon-pause,link-flap)")
	scale := fs.String("scale", "", "instead: for each count of VMs (e.g. 1,8,64, each 1 to 64), a fresh lab of that many and one closed-loop client per VM: throughput, latency, CPU and memory; at the last count, a switchover of vm1 under load")
	verbose := fs.Bool("v", false, "with --scale: every VM's latency at the last count, not only the 3 best and 3 worst")
	bulkBytes := fs.Int64("bulk-bytes", 4<<20, "on a --guest qemu lab: bytes per bulk transfer from the VM")
	bulkPerRound := fs.Int("bulk", 1, "on a --guest qemu lab: bulk transfers per case and round (0: none)")
	bulkTimeout := fs.Duration("bulk-timeout", 30*time.Second, "on a --guest qemu lab: the most one bulk transfer may take; a slower one counts as failed")
	traceOut := fs.String("trace-out", "", "on a --guest qemu lab: also write each PUT's segments (the breakdown's, in µs) to this CSV file")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *echo != "" {
		return serveEcho(ctx, *echo)
	}
	if *scale != "" {
		counts, err := parseScaleCounts(*scale)
		if err != nil {
			return err
		}
		if !flagSet(fs, "requests") {
			*requests = 200
		}
		if *requests < 1 {
			return errors.New("--scale wants --requests of at least 1 PUT per VM")
		}
		if !flagSet(fs, "budget") {
			*budget = 20 * time.Minute
		}
		ctx, cancel := context.WithTimeout(ctx, *budget)
		defer cancel()
		return scaleBench(ctx, os.Stdout, os.Stderr, scaleOptions{dir: *dir, counts: counts, requests: *requests, verbose: *verbose})
	}
	if *chaos > 0 {
		kinds, err := lab.ParseFaultKinds(*faultKinds)
		if err != nil {
			return fmt.Errorf("--faults: %w", err)
		}
		opts := chaosOptions{kinds: kinds, dir: *dir, engine: *guestEngine, guestDir: *guestDir, schedules: *chaos, seed: *seed, out: *out,
			failureTimeouts: chaosTimeouts(*guestEngine, *failureTimeout, flagSet(fs, "failure-timeout"))}
		if !flagSet(fs, "budget") {
			*budget = time.Duration(*chaos)*timingFor(*guestEngine).schedule + 10*time.Minute
		}
		ctx, cancel := context.WithTimeout(ctx, *budget)
		defer cancel()
		return chaosBench(ctx, os.Stdout, opts)
	}
	if *failovers > 0 {
		ctx, cancel := context.WithTimeout(ctx, *budget)
		defer cancel()
		return failoverBench(ctx, os.Stdout, *dir, *failovers, *seed, *failureTimeout)
	}
	if vm, ok, err := labQEMUVM(*dir); err != nil {
		return fmt.Errorf("the lab's config: %w", err)
	} else if ok {
		// A request to a TCG VM takes milliseconds, not tens of µs.
		if !flagSet(fs, "requests") {
			*requests = 1500
		}
		if !flagSet(fs, "budget") {
			*budget = 15 * time.Minute
		}
		if *requests < *rounds || *rounds < 1 || *bulkPerRound < 0 || *bulkBytes < 1 || *bulkBytes > guest.MaxBulkBytes || *bulkTimeout <= 0 {
			return fmt.Errorf("want --rounds >= 1, --requests >= --rounds, --bulk >= 0, --bulk-bytes from 1 to %d and a positive --bulk-timeout", guest.MaxBulkBytes)
		}
		ctx, cancel := context.WithTimeout(ctx, *budget)
		defer cancel()
		return benchQEMU(ctx, os.Stdout, *dir, vm, baselineOptions{requests: *requests, rounds: *rounds,
			bulkBytes: *bulkBytes, bulkPerRound: *bulkPerRound, bulkTimeout: *bulkTimeout, traceOut: *traceOut})
	}
	if *requests < *rounds || *rounds < 1 || *frames < 10000 {
		return errors.New("want --rounds >= 1, --requests >= --rounds and --frames >= 10000")
	}
	ctx, cancel := context.WithTimeout(ctx, *budget)
	defer cancel()
	if !*rates {
		*frames = 0
	}
	return bench(ctx, os.Stdout, *dir, *requests, *rounds, *frames)
}

// bench compares latency with output commit on and off, then, unless frames
// is 0, the zero-loss throughput of the two output paths.
func bench(ctx context.Context, w io.Writer, dir string, requests, rounds, frames int) (err error) {
	for _, host := range lab.Hosts[:2] {
		if _, err := daemonStatus(dir, host.NS); err != nil {
			return fmt.Errorf("the lab is not up (`ftgw lab up`): %s: %w", host.NS, err)
		}
	}
	// Whatever happens, leave the primary enforcing the Output Rule.
	defer func() { err = errors.Join(err, setOutputMode(dir, lab.NSPrimary, "commit")) }()

	c, err := kvClient(time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	if _, failed := kvRun(ctx, c, 200, "warmup-", 30*time.Second); failed > 0 {
		return fmt.Errorf("warm-up: %d of 200 requests failed", failed)
	}

	var pids [2]int
	for i, host := range lab.Hosts[:2] {
		if pids[i], err = readPid(filepath.Join(hostDir(dir, host.NS), "ftgw.pid")); err != nil {
			return fmt.Errorf("%s's daemon pid: %w", host.NS, err)
		}
	}

	fmt.Fprintf(w, "ftgw bench: %d requests per mode in %d alternating rounds, %d frames per rate trial\n\n", requests, rounds, frames)
	pinger, err := newLinkPinger(ctx)
	if err != nil {
		return err
	}
	defer pinger.Close()
	var hotRTT []time.Duration
	for range requests {
		d, err := pinger.ping()
		if err != nil {
			return err
		}
		hotRTT = append(hotRTT, d)
	}

	// Each request is followed by one ping on the replication link, so the
	// link's RTT is measured under the same pacing (and idle wakeups) as
	// the requests whose added latency it is compared with.
	var on, off, rtt []time.Duration
	var failedOn, failedOff int
	var cpu [2]modeCPU // commit, passthrough
	for r := 0; r < rounds && ctx.Err() == nil; r++ {
		for m, mode := range []string{"commit", "passthrough"} {
			if err := setOutputMode(dir, lab.NSPrimary, mode); err != nil {
				return err
			}
			// Passthrough replies do not wait for the log, so a round of
			// them can leave log shipping behind; let it catch up first.
			if err := waitLogDrained(ctx, dir); err != nil {
				return err
			}
			before, err := sampleModeCPU(pids)
			if err != nil {
				return err
			}
			for i := 0; i < requests/rounds && ctx.Err() == nil; i++ {
				lat, failed := kvRun(ctx, c, 1, fmt.Sprintf("bench-%s-%d-", mode, i%64), time.Second)
				if mode == "commit" {
					on, failedOn = append(on, lat...), failedOn+failed
				} else {
					off, failedOff = append(off, lat...), failedOff+failed
				}
				d, err := pinger.ping()
				if err != nil {
					return err
				}
				rtt = append(rtt, d)
			}
			after, err := sampleModeCPU(pids)
			if err != nil {
				return err
			}
			cpu[m].add(before, after, requests/rounds)
		}
	}
	ps := []float64{50, 99, 99.9}
	pOn, pOff, pRTT, pHot := percentiles(on, ps...), percentiles(off, ps...), percentiles(rtt, ps...), percentiles(hotRTT, ps...)

	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "request/response through the VIP\tsamples\tfailed\tp50\tp99\tp99.9\t")
	fmt.Fprintf(tw, "output commit on\t%d\t%d\t%s\t%s\t%s\t\n", len(on), failedOn, micros(pOn[0]), micros(pOn[1]), micros(pOn[2]))
	fmt.Fprintf(tw, "output commit off (passthrough)\t%d\t%d\t%s\t%s\t%s\t\n", len(off), failedOff, micros(pOff[0]), micros(pOff[1]), micros(pOff[2]))
	fmt.Fprintf(tw, "added by output commit\t\t\t%s\t%s\t%s\t\n", micros(pOn[0]-pOff[0]), micros(pOn[1]-pOff[1]), micros(pOn[2]-pOff[2]))
	fmt.Fprintf(tw, "replication link RTT, paced like the requests\t%d\t\t%s\t%s\t%s\t\n", len(rtt), micros(pRTT[0]), micros(pRTT[1]), micros(pRTT[2]))
	fmt.Fprintf(tw, "replication link RTT, back to back\t%d\t\t%s\t%s\t%s\t\n", len(hotRTT), micros(pHot[0]), micros(pHot[1]), micros(pHot[2]))
	fmt.Fprintf(tw, "target: 1.5 x paced RTT + 20µs\t\t\t%s\t%s\t%s\t\n",
		micros(pRTT[0]*3/2+20*time.Microsecond), micros(pRTT[1]*3/2+20*time.Microsecond), micros(pRTT[2]*3/2+20*time.Microsecond))
	tw.Flush()
	fmt.Fprintln(w, "\nCPU during the rounds above, per request (each request is followed by one link ping):")
	for m, name := range []string{"output commit on", "output commit off (passthrough)"} {
		fmt.Fprintf(w, "  %-32s %s\n", name, cpu[m])
	}
	if err := printBreakdown(w); err != nil {
		return err
	}
	if frames == 0 {
		return nil
	}
	return zeroLossRates(ctx, w, dir, frames)
}

// modeCPU adds up the CPU the two daemons and the machine used during the
// rounds of one output mode.
type modeCPU struct {
	primary, secondary, machine, wall time.Duration
	requests                          int
}

type modeSample struct {
	daemons [2]time.Duration
	machine time.Duration
	at      time.Time
}

func sampleModeCPU(pids [2]int) (modeSample, error) {
	s := modeSample{at: time.Now()}
	for i, pid := range pids {
		var err error
		if s.daemons[i], err = processCPU(pid); err != nil {
			return s, err
		}
	}
	var err error
	s.machine, err = machineBusy()
	return s, err
}

func (c *modeCPU) add(before, after modeSample, requests int) {
	c.primary += after.daemons[0] - before.daemons[0]
	c.secondary += after.daemons[1] - before.daemons[1]
	c.machine += after.machine - before.machine
	c.wall += after.at.Sub(before.at)
	c.requests += requests
}

func (c modeCPU) String() string {
	if c.requests == 0 || c.wall <= 0 {
		return "not measured"
	}
	per := func(d time.Duration) string { return micros(d / time.Duration(c.requests)) }
	return fmt.Sprintf("primary daemon %s, secondary daemon %s (%.0f%% and %.0f%% of a CPU); machine busy %.0f%% of %d CPUs",
		per(c.primary), per(c.secondary), 100*c.primary.Seconds()/c.wall.Seconds(), 100*c.secondary.Seconds()/c.wall.Seconds(),
		100*c.machine.Seconds()/c.wall.Seconds()/float64(runtime.NumCPU()), runtime.NumCPU())
}

// linkPinger measures the replication link itself: TCP ping-pong between
// the bench, in the primary's namespace, and an echo process of its own in
// the secondary's, like the log channel between the two daemons (the same
// transport and the same kind of peer: a process that idles between
// messages and has to be woken), with no ftgw code in the path.
type linkPinger struct {
	echo   *exec.Cmd
	client net.Conn
	buf    []byte
}

func newLinkPinger(ctx context.Context) (_ *linkPinger, err error) {
	// Above every VM's log channel: VM i (from 0) has LogPort+i.
	addr := net.JoinHostPort(lab.ReplSecond.Addr().String(), fmt.Sprint(lab.LogPort+lab.MaxVMs))
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	p := &linkPinger{buf: make([]byte, 64)}
	p.echo = exec.CommandContext(ctx, "ip", "netns", "exec", lab.NSSecondary, self, "bench", "--serve-echo", addr)
	p.echo.Stderr = os.Stderr
	if err := p.echo.Start(); err != nil {
		return nil, fmt.Errorf("start link echo: %w", err)
	}
	defer func() {
		if err != nil {
			p.Close()
		}
	}()
	for range 100 {
		err = netnsutil.Do(lab.NSPrimary, func() (err error) {
			p.client, err = net.DialTimeout("tcp", addr, time.Second)
			return err
		})
		if err == nil {
			return p, nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	return nil, fmt.Errorf("link echo client: %w", err)
}

func serveEcho(ctx context.Context, addr string) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	context.AfterFunc(ctx, func() { ln.Close() })
	c, err := ln.Accept()
	ln.Close()
	if err != nil {
		return err
	}
	defer c.Close()
	_, err = io.Copy(c, c)
	return err
}

func (p *linkPinger) ping() (time.Duration, error) {
	start := time.Now()
	p.client.SetDeadline(start.Add(time.Second))
	if _, err := p.client.Write([]byte("ping")); err != nil {
		return 0, err
	}
	if _, err := io.ReadFull(p.client, p.buf[:4]); err != nil {
		return 0, fmt.Errorf("link echo: %w", err)
	}
	return time.Since(start), nil
}

func (p *linkPinger) Close() {
	if p.client != nil {
		p.client.Close() // the echo process exits on EOF
	}
	p.echo.Process.Kill()
	p.echo.Wait()
}

// printBreakdown shows where held replies spend their time, from the
// primary's histograms (since the lab came up).
func printBreakdown(w io.Writer) error {
	families, err := lab.Scrape(lab.NSPrimary)
	if err != nil {
		return err
	}
	fmt.Fprintln(w, "\nwhere the time goes (primary's histograms since lab up, p50 / p99):")
	for _, m := range []struct{ name, what string }{
		{"ftgw_log_ship_delay_seconds", "kernel log ring to log channel (ring wakeup)"},
		{"ftgw_log_ack_latency_seconds", "log channel append to the secondary's ack"},
	} {
		metric, ok := lab.Metric(families, m.name, map[string]string{"vm": lab.VMName})
		if !ok {
			return fmt.Errorf("no %s in the primary's metrics", m.name)
		}
		h := metric.GetHistogram()
		fmt.Fprintf(w, "  %-46s %s / %s\n", m.what, micros(histogramQuantile(h, 0.5)), micros(histogramQuantile(h, 0.99)))
	}
	if h := commitLatency(families, "held"); h != nil {
		fmt.Fprintf(w, "  %-46s %s / %s\n", "held reply: tap to wire (commit latency)", micros(histogramQuantile(h, 0.5)), micros(histogramQuantile(h, 0.99)))
	}
	return nil
}

// waitLogDrained waits until the secondary has acknowledged everything the
// primary logged.
func waitLogDrained(ctx context.Context, dir string) error {
	var s Status
	err := waitUntil(ctx, 30*time.Second, "the log to drain", func() (bool, error) {
		var err error
		s, err = daemonStatus(dir, lab.NSPrimary)
		return s.Acked == s.Head, err
	})
	if err != nil {
		return fmt.Errorf("%w: head %d, acked %d", err, s.Head, s.Acked)
	}
	return nil
}
