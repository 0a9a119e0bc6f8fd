package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"text/tabwriter"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/ftgw/ftgw/internal/lab"
	"github.com/ftgw/ftgw/internal/netnsutil"
	"github.com/ftgw/ftgw/pkg/guest"
)

func benchCommand(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	dir := fs.String("dir", defaultLabDir, "the lab's directory")
	requests := fs.Int("requests", 5000, "requests per output mode for the latency comparison")
	rounds := fs.Int("rounds", 5, "rounds alternating the output modes, against drift")
	frames := fs.Int("frames", 200000, "frames per output path for the rate comparison")
	budget := fs.Duration("budget", 5*time.Minute, "upper bound on the whole run")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *requests < *rounds || *rounds < 1 || *frames < 1 {
		return errors.New("want --rounds >= 1, --requests >= --rounds and --frames >= 1")
	}
	ctx, cancel := context.WithTimeout(ctx, *budget)
	defer cancel()
	return bench(ctx, os.Stdout, *dir, *requests, *rounds, *frames)
}

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

	fmt.Fprintf(w, "ftgw bench: %d requests per mode in %d alternating rounds, %d frames per path\n\n", requests, rounds, frames)
	rtt, err := replicationRTT(ctx, requests)
	if err != nil {
		return err
	}

	var on, off []time.Duration
	var failedOn, failedOff int
	for r := 0; r < rounds && ctx.Err() == nil; r++ {
		for _, mode := range []string{"commit", "passthrough"} {
			if err := setOutputMode(dir, lab.NSPrimary, mode); err != nil {
				return err
			}
			lat, failed := kvRun(ctx, c, requests/rounds, fmt.Sprintf("bench-%s-", mode), time.Minute)
			if mode == "commit" {
				on, failedOn = append(on, lat...), failedOn+failed
			} else {
				off, failedOff = append(off, lat...), failedOff+failed
			}
		}
	}
	ps := []float64{50, 99, 99.9}
	pOn, pOff, pRTT := percentiles(on, ps...), percentiles(off, ps...), percentiles(rtt, ps...)

	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "request/response through the VIP\tsamples\tfailed\tp50\tp99\tp99.9\t")
	fmt.Fprintf(tw, "output commit on\t%d\t%d\t%s\t%s\t%s\t\n", len(on), failedOn, micros(pOn[0]), micros(pOn[1]), micros(pOn[2]))
	fmt.Fprintf(tw, "output commit off (passthrough)\t%d\t%d\t%s\t%s\t%s\t\n", len(off), failedOff, micros(pOff[0]), micros(pOff[1]), micros(pOff[2]))
	fmt.Fprintf(tw, "added by output commit\t\t\t%s\t%s\t%s\t\n", micros(pOn[0]-pOff[0]), micros(pOn[1]-pOff[1]), micros(pOn[2]-pOff[2]))
	fmt.Fprintf(tw, "replication link RTT (UDP ping-pong)\t%d\t\t%s\t%s\t%s\t\n", len(rtt), micros(pRTT[0]), micros(pRTT[1]), micros(pRTT[2]))
	fmt.Fprintf(tw, "target: 1.5 x RTT + 20µs\t\t\t%s\t%s\t%s\t\n",
		micros(pRTT[0]*3/2+20*time.Microsecond), micros(pRTT[1]*3/2+20*time.Microsecond), micros(pRTT[2]*3/2+20*time.Microsecond))
	tw.Flush()
	fmt.Fprintln(w)

	fast, err := frameRate(ctx, dir, "passthrough", frames)
	if err != nil {
		return err
	}
	held, err := frameRate(ctx, dir, "hold-all", frames)
	if err != nil {
		return err
	}
	tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "guest output path\tsent\tdelivered\tseconds\tdelivered/s\t")
	for _, r := range []rateResult{fast, held} {
		fmt.Fprintf(tw, "%s\t%d\t%d\t%.3f\t%.0f\t\n", r.name, r.sent, r.delivered, r.elapsed.Seconds(), r.rate())
	}
	tw.Flush()
	fmt.Fprintf(w, "hold-and-release / plain XDP forwarding: %.0f%% (target >= 90%%)\n", 100*held.rate()/fast.rate())
	return ctx.Err()
}

// replicationRTT measures the replication link itself: UDP ping-pong
// between a socket in the primary's namespace and one in the secondary's.
func replicationRTT(ctx context.Context, n int) ([]time.Duration, error) {
	var server, client *net.UDPConn
	serverAddr := &net.UDPAddr{IP: lab.ReplSecond.Addr().AsSlice(), Port: lab.LogPort + 1}
	if err := netnsutil.Do(lab.NSSecondary, func() (err error) {
		server, err = net.ListenUDP("udp", serverAddr)
		return err
	}); err != nil {
		return nil, fmt.Errorf("rtt echo server: %w", err)
	}
	defer server.Close()
	if err := netnsutil.Do(lab.NSPrimary, func() (err error) {
		client, err = net.DialUDP("udp", nil, serverAddr)
		return err
	}); err != nil {
		return nil, fmt.Errorf("rtt client: %w", err)
	}
	defer client.Close()
	go func() {
		buf := make([]byte, 64)
		for {
			n, from, err := server.ReadFromUDP(buf)
			if err != nil {
				return
			}
			server.WriteToUDP(buf[:n], from)
		}
	}()
	buf := make([]byte, 64)
	var rtt []time.Duration
	for i := 0; i < n && ctx.Err() == nil; i++ {
		start := time.Now()
		client.SetDeadline(start.Add(time.Second))
		if _, err := client.Write([]byte("ping")); err != nil {
			return nil, err
		}
		if _, err := client.Read(buf); err != nil {
			return nil, fmt.Errorf("rtt echo: %w", err)
		}
		rtt = append(rtt, time.Since(start))
	}
	return rtt, nil
}

type rateResult struct {
	name            string
	sent, delivered uint64
	elapsed         time.Duration
}

func (r rateResult) rate() float64 {
	if r.elapsed <= 0 {
		return 0
	}
	return float64(r.delivered) / r.elapsed.Seconds()
}

// frameRate has the guest blast frames at the client and counts what the
// client's uplink receives, from the first write until the last arrival.
func frameRate(ctx context.Context, dir, mode string, frames int) (rateResult, error) {
	name := map[string]string{"passthrough": "plain XDP forwarding", "hold-all": "hold-and-release (AF_XDP)"}[mode]
	res := rateResult{name: name}
	if err := setOutputMode(dir, lab.NSPrimary, mode); err != nil {
		return res, err
	}
	var clientMAC net.HardwareAddr
	received := func() (uint64, error) {
		var n uint64
		err := netnsutil.Do(lab.NSClient, func() error {
			link, err := netlink.LinkByName(lab.Uplink)
			if err != nil {
				return err
			}
			clientMAC = link.Attrs().HardwareAddr
			n = link.Attrs().Statistics.RxPackets
			return nil
		})
		return n, err
	}
	before, err := received()
	if err != nil {
		return res, err
	}
	start := time.Now()
	_, failed, err := guest.Blast(guestControl(dir, lab.NSPrimary), frames, clientMAC, 64, time.Minute)
	if err != nil {
		return res, err
	}
	res.sent = uint64(frames - failed)
	// Wait for the last frame: until the count stops moving.
	last, lastChange := before, time.Now()
	for time.Since(lastChange) < 100*time.Millisecond && ctx.Err() == nil {
		n, err := received()
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
	return res, nil
}
