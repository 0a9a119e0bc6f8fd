package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	dto "github.com/prometheus/client_model/go"
	"go.yaml.in/yaml/v3"

	"github.com/ftgw/ftgw/internal/lab"
	"github.com/ftgw/ftgw/pkg/guest"
	"github.com/ftgw/ftgw/pkg/replay"
)

// What the lab commands and the benchmark use to reach the lab's daemons,
// guests and client.

func marshalConfig(cfg Config) ([]byte, error) {
	raw, err := yaml.Marshal(cfg)
	if err != nil {
		return nil, fmt.Errorf("marshal config: %w", err)
	}
	return append([]byte("# Written by `ftgw lab up`.\n"), raw...), nil
}

func controlClient(sock string) *http.Client {
	return &http.Client{
		Timeout: 5 * time.Second,
		Transport: &http.Transport{
			DisableKeepAlives: true,
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, "unix", sock)
			},
		},
	}
}

func daemonStatus(dir, ns string) (Status, error) {
	return statusAt(controlPath(hostDir(dir, ns)), "")
}

// statusAt reads the status of the VM called vm ("": the host's first)
// from the host whose control socket is socket.
func statusAt(socket, vm string) (Status, error) {
	var s Status
	resp, err := controlClient(socket).Get("http://ftgw/status?" + url.Values{"vm": {vm}}.Encode())
	if err != nil {
		return s, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(resp.Body)
		return s, errors.New(strings.TrimSpace(string(body)))
	}
	return s, json.NewDecoder(resp.Body).Decode(&s)
}

// daemonVMs reads the status of every VM of a lab daemon, in its config's
// order.
func daemonVMs(dir, ns string) ([]Status, error) {
	return vmsAt(controlPath(hostDir(dir, ns)))
}

// vmStatusAt reads the status of the VM called vm of the daemon whose
// control socket is socket.
func vmStatusAt(socket, vm string) (Status, error) {
	var s Status
	resp, err := controlClient(socket).Get("http://ftgw" + vmQuery("/status", vm))
	if err != nil {
		return s, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(resp.Body)
		return s, fmt.Errorf("/status of %s: %s: %s", vm, resp.Status, strings.TrimSpace(string(body)))
	}
	return s, json.NewDecoder(resp.Body).Decode(&s)
}

// vmsAt reads GET /vms of the daemon whose control socket is socket.
func vmsAt(socket string) ([]Status, error) {
	resp, err := controlClient(socket).Get("http://ftgw/vms")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(resp.Body)
		return nil, fmt.Errorf("/vms: %s: %s", resp.Status, strings.TrimSpace(string(body)))
	}
	var vms []Status
	if err := json.NewDecoder(resp.Body).Decode(&vms); err != nil {
		return nil, fmt.Errorf("/vms: %w", err)
	}
	return vms, nil
}

// vmQuery addresses one VM of a daemon's control endpoint; the daemon
// takes its first VM without it.
func vmQuery(path, vm string) string {
	return path + "?" + url.Values{"vm": {vm}}.Encode()
}

func setOutputMode(dir, ns, mode string) error {
	_, err := controlPost(dir, ns, "/output-mode", url.Values{"mode": {mode}})
	return err
}

// controlPost posts form to a lab daemon's control endpoint and returns
// the reply body.
func controlPost(dir, ns, path string, form url.Values) (string, error) {
	reply, err := controlPostSocket(controlPath(hostDir(dir, ns)), path, form)
	if err != nil {
		return "", fmt.Errorf("%s: %w", ns, err)
	}
	return reply, nil
}

// controlPostSocket posts form to the control endpoint of the daemon at
// socket and returns the reply body.
func controlPostSocket(socket, path string, form url.Values) (string, error) {
	client := controlClient(socket)
	client.Timeout = 30 * time.Second
	resp, err := client.PostForm("http://ftgw"+path, form)
	if err != nil {
		return "", fmt.Errorf("%s: %w", path, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("%s: %s", path, strings.TrimSpace(string(body)))
	}
	return strings.TrimSpace(string(body)), nil
}

// labGuestState is the state of a host's copy of the VM called vm: the
// synthetic guest answers on its control socket; a real VM prints it on its
// console after every request (cmd/ftgw-init), which a replaying copy
// reproduces.
func labGuestState(dir, ns, vm string) (guest.State, error) {
	serial := replay.SerialPath(filepath.Join(hostDir(dir, ns), vm+"-qemu"))
	if _, err := os.Stat(serial); err != nil {
		return guest.QueryState(guestControlVM(dir, ns, vm))
	}
	raw, err := os.ReadFile(serial)
	if err != nil {
		return guest.State{}, err
	}
	var st guest.State
	for _, line := range strings.Split(string(raw), "\n") {
		var req uint64
		var digest string
		if n, _ := fmt.Sscanf(line, "ftgw-kv req=%d puts=%d digest=%s", &req, &st.Puts, &digest); n == 3 {
			st.Digest = digest
		}
	}
	return st, nil
}

// guestControl is the control socket of a host's synthetic guest of vm1.
func guestControl(dir, ns string) string { return guestControlVM(dir, ns, lab.VMName) }

// guestControlVM is the control socket of a host's synthetic guest of vm.
func guestControlVM(dir, ns, vm string) string {
	return filepath.Join(hostDir(dir, ns), vm+"-guest.sock")
}

// kvClient dials vm1's key-value service from the lab's client namespace.
func kvClient(timeout time.Duration) (*guest.Client, error) { return lab.DialVM(lab.VMIP, timeout) }

// kvRun sends n PUTs one after another, within budget, and returns the
// latency of each answered one.
func kvRun(ctx context.Context, c *guest.Client, n int, prefix string, budget time.Duration) (lat []time.Duration, failed int) {
	deadline := time.Now().Add(budget)
	for i := 0; i < n && ctx.Err() == nil && time.Now().Before(deadline); i++ {
		start := time.Now()
		if _, err := c.Put(fmt.Sprintf("%s%d", prefix, i%256), fmt.Sprintf("v%d", i)); err != nil {
			failed++
			continue
		}
		lat = append(lat, time.Since(start))
	}
	return lat, failed
}

// percentiles of samples (sorted in place) at each of ps (0-100).
func percentiles(samples []time.Duration, ps ...float64) []time.Duration {
	slices.Sort(samples)
	out := make([]time.Duration, len(ps))
	if len(samples) == 0 {
		return out
	}
	for i, p := range ps {
		idx := int(p / 100 * float64(len(samples)))
		out[i] = samples[min(idx, len(samples)-1)]
	}
	return out
}

func micros(d time.Duration) string {
	return fmt.Sprintf("%.1fµs", float64(d)/float64(time.Microsecond))
}

// histogramQuantile estimates a quantile from a scraped histogram the way
// Prometheus does, by interpolating inside the bucket.
func histogramQuantile(h *dto.Histogram, q float64) time.Duration {
	total := float64(h.GetSampleCount())
	if total == 0 {
		return 0
	}
	rank := q * total
	lower, prevCount := 0.0, 0.0
	for _, b := range h.GetBucket() {
		count := float64(b.GetCumulativeCount())
		if count >= rank {
			if math.IsInf(b.GetUpperBound(), 1) {
				// Beyond the last finite bound nothing says where: like
				// Prometheus, answer that bound (interpolating towards
				// +Inf would overflow the Duration).
				return time.Duration(lower * 1e9)
			}
			frac := 0.0
			if count > prevCount {
				frac = (rank - prevCount) / (count - prevCount)
			}
			return time.Duration((lower + frac*(b.GetUpperBound()-lower)) * 1e9)
		}
		lower, prevCount = b.GetUpperBound(), count
	}
	return time.Duration(lower * 1e9)
}

// commitLatency returns vm1's commit-latency histogram of path ("fast" or
// "held") from scraped metrics: the lab's single VM, or the first of many.
func commitLatency(families map[string]*dto.MetricFamily, path string) *dto.Histogram {
	m, ok := lab.Metric(families, "ftgw_output_commit_latency_seconds", map[string]string{"vm": lab.VMName, "path": path})
	if !ok {
		return nil
	}
	return m.GetHistogram()
}

func labTraffic(ctx context.Context, w io.Writer, dir string, requests int) error {
	c, err := kvClient(time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	lat, failed := kvRun(ctx, c, requests, "traffic-", 60*time.Second)
	p := percentiles(lat, 50, 99, 99.9)
	fmt.Fprintf(w, "%d PUTs from %s to %s:%d answered, %d failed; round trip p50 %s p99 %s p99.9 %s\n",
		len(lat), lab.NSClient, lab.VMIP, lab.KVPort, failed, micros(p[0]), micros(p[1]), micros(p[2]))

	serving, err := servingHost(dir)
	if err != nil {
		return err
	}
	families, err := lab.Scrape(serving)
	if err != nil {
		return err
	}
	fmt.Fprintf(w, "output commit latency on %s (ftgw_output_commit_latency_seconds):\n", serving)
	for _, path := range []string{"held", "fast"} {
		h := commitLatency(families, path)
		if h == nil {
			return fmt.Errorf("no %s commit latency in %s's metrics", path, serving)
		}
		fmt.Fprintf(w, "  %-4s frames %6d  p50 %s  p99 %s\n", path, h.GetSampleCount(),
			micros(histogramQuantile(h, 0.5)), micros(histogramQuantile(h, 0.99)))
	}
	return nil
}

// servingHost is the lab host whose VM is active now.
func servingHost(dir string) (string, error) {
	for _, host := range lab.Hosts[:2] {
		if s, err := daemonStatus(dir, host.NS); err == nil && s.Role == "active" {
			return host.NS, nil
		}
	}
	return "", errors.New("no lab host serves the VM")
}
