package test

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/ftgw/ftgw/internal/lab"
	"github.com/ftgw/ftgw/pkg/guest"
)

// vmsOf reads GET /vms of a lab daemon: one status per VM, in its config's
// order.
func vmsOf(ns string) ([]map[string]any, error) {
	var vms []map[string]any
	return vms, controlGet(filepath.Join(labDir, ns, "control.sock"), "/vms", &vms)
}

// waitVMs waits until the daemon in ns reports n VMs, each in state with
// role ("" for any), and returns their statuses.
func waitVMs(t *testing.T, ns string, n int, state, role string, timeout time.Duration) []map[string]any {
	t.Helper()
	var vms []map[string]any
	var last string
	deadline := time.Now().Add(timeout)
	for {
		var err error
		vms, err = vmsOf(ns)
		ready := err == nil && len(vms) == n
		for _, s := range vms {
			if s["state"] != state || (role != "" && s["role"] != role) {
				ready = false
				last = fmt.Sprintf("%v is %v (%v)", s["vm"], s["state"], s["role"])
				break
			}
		}
		if ready {
			return vms
		}
		if err != nil {
			last = err.Error()
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %d VMs %s on %s: %d reported, %s", timeout, n, state, ns, len(vms), last)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// waitFailoversRecorded waits until the daemon in ns reports a last
// failover for each of its n VMs, and returns their statuses.
func waitFailoversRecorded(t *testing.T, ns string, n int, timeout time.Duration) []map[string]any {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		vms, err := vmsOf(ns)
		missing := n - len(vms)
		for _, s := range vms {
			if s["last_failover"] == nil {
				missing++
			}
		}
		if err == nil && missing == 0 {
			return vms
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %s, %d of %d VMs on %s report no failover (%v)", timeout, missing, n, ns, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// dialVM dials a lab VM's key-value service from the client namespace.
func dialVM(t *testing.T, vm lab.LabVM, timeout time.Duration) *guest.Client {
	t.Helper()
	c, err := lab.DialVM(vm.IP, timeout)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func quantiles(ds []time.Duration, qs ...float64) []time.Duration {
	ds = slices.Clone(ds)
	slices.Sort(ds)
	out := make([]time.Duration, len(qs))
	for i, q := range qs {
		if len(ds) > 0 {
			out[i] = ds[min(int(q*float64(len(ds))), len(ds)-1)]
		}
	}
	return out
}

// clientGap is the time one VM's clients went without an acknowledgement
// across the fault: from the last one before it to the first one after.
func clientGap(ops []lab.Op, fault time.Time) (time.Duration, bool) {
	var before, after time.Time
	for _, op := range ops {
		if op.Outcome != lab.OutcomeOK {
			continue
		}
		if op.Return.Before(fault) {
			if op.Return.After(before) {
				before = op.Return
			}
		} else if after.IsZero() || op.Return.Before(after) {
			after = op.Return
		}
	}
	if before.IsZero() || after.IsZero() {
		return 0, false
	}
	return after.Sub(before), true
}

// One daemon per host protects 64 VMs: each answers for itself alone, the
// primary's metrics show all of them, and when the primary host crashes
// the secondary takes every one over, with each VM's history linearizable
// and no acknowledged write lost.
func TestSixtyFourVMsServeApartAndFailOverTogether(t *testing.T) {
	const n = lab.MaxVMs
	// The whole test within 3 minutes: each wait gets what is left of it.
	start := time.Now()
	deadline := start.Add(3 * time.Minute)
	left := func(want time.Duration) time.Duration {
		t.Helper()
		d := min(want, time.Until(deadline))
		if d <= 0 {
			t.Fatal("over the test's 3-minute budget")
		}
		return d
	}
	labUp(t, "--vms", strconv.Itoa(n))
	waitVMs(t, lab.NSPrimary, n, "protected", "active", left(time.Minute))
	waitVMs(t, lab.NSSecondary, n, "standby", "", left(30*time.Second))
	t.Logf("%d VMs protected %s after lab up began", n, time.Since(start).Round(time.Millisecond))
	vms := lab.VMs(n)

	// The same key on every VM, a value of its own each: a VM that
	// answered for another, or a store shared between them, would read
	// back another's value.
	for _, vm := range vms {
		c := dialVM(t, vm, time.Second)
		want := "value-of-" + vm.Name
		count, err := c.Put("shared", want)
		if err != nil {
			c.Close()
			t.Fatalf("PUT to %s at %s: %v", vm.Name, vm.IP, err)
		}
		got, found, err := c.Get("shared")
		c.Close()
		if err != nil || !found || got != want {
			t.Fatalf("GET from %s: %q %v %v, want %q", vm.Name, got, found, err, want)
		}
		if count != 1 {
			t.Errorf("%s counted %d PUTs after its first, want 1: its store is not its own", vm.Name, count)
		}
	}

	// One metrics endpoint, every VM in it.
	labelled := map[string]bool{}
	for _, m := range scrape(t, lab.NSPrimary)["ftgw_output_commit_latency_seconds"].GetMetric() {
		for _, l := range m.GetLabel() {
			if l.GetName() == "vm" {
				labelled[l.GetValue()] = true
			}
		}
	}
	for _, vm := range vms {
		if !labelled[vm.Name] {
			t.Errorf("no ftgw_output_commit_latency_seconds{vm=%q} on %s", vm.Name, lab.NSPrimary)
		}
	}
	if len(labelled) != n {
		t.Errorf("ftgw_output_commit_latency_seconds carries %d vm labels, want %d", len(labelled), n)
	}

	// Two clients over three keys on every VM at once.
	loads := make([]*lab.Load, n)
	for i, vm := range vms {
		l, err := lab.StartLoad(lab.LoadConfig{
			VM: vm.IP, Clients: 2, Keys: 3, KeyPrefix: vm.Name + "-", WriteFraction: 0.5,
			Timeout: 200 * time.Millisecond, MaxOps: 100_000, MaxTime: left(2 * time.Minute),
		})
		if err != nil {
			t.Fatalf("load on %s: %v", vm.Name, err)
		}
		loads[i] = l
		t.Cleanup(func() { l.Stop() })
	}
	for i, l := range loads {
		if err := l.WaitAcked(20, left(30*time.Second)); err != nil {
			t.Fatalf("load on %s before the crash: %v", vms[i].Name, err)
		}
	}

	crashed := crashHost(t, lab.NSPrimary)
	survivor := waitVMs(t, lab.NSSecondary, n, "unprotected", "active", left(30*time.Second))
	t.Logf("%s serves all %d VMs alone %s after the crash", lab.NSSecondary, n, time.Since(crashed).Round(time.Millisecond))
	for i, l := range loads {
		// An answer after the failover on every VM: its clients' gap
		// has an end.
		if err := l.WaitAcked(l.Acked()+20, left(30*time.Second)); err != nil {
			t.Fatalf("load on %s after the failover: %v", vms[i].Name, err)
		}
	}
	histories := make([]*lab.History, n)
	for i, l := range loads {
		histories[i] = l.Stop()
	}
	// A VM serves (and reports unprotected) before its failover's phases
	// are recorded: its go-live ends after the announcements. Read them
	// once every VM has them.
	survivor = waitFailoversRecorded(t, lab.NSSecondary, n, left(30*time.Second))

	// Judge every VM's history, with a final read of each key (a third
	// client, after every operation returned): an acknowledged write that
	// was lost would make that read, or the history, illegal.
	var gaps []time.Duration
	var lost int
	for i, vm := range vms {
		ops := histories[i].Ops()
		if gap, ok := clientGap(ops, crashed); ok {
			gaps = append(gaps, gap)
		} else {
			t.Errorf("%s: no acknowledged operation on one side of the crash", vm.Name)
		}
		written := map[string]bool{}
		for _, op := range ops {
			if op.Kind == lab.OpPut && op.Outcome == lab.OutcomeOK {
				written[op.Key] = true
			}
		}
		c := dialVM(t, vm, time.Second)
		for k := range 3 {
			key := fmt.Sprintf("%s-k%d", vm.Name, k)
			op := lab.Op{Client: 2, Kind: lab.OpGet, Key: key, Invoke: time.Now()}
			var err error
			op.Value, op.Found, err = c.Get(key)
			op.Return = time.Now()
			if err != nil {
				c.Close()
				t.Fatalf("final read of %s on %s: %v", key, vm.Name, err)
			}
			if written[key] && !op.Found {
				lost++
				t.Errorf("%s: %s was written and acknowledged, now not found", vm.Name, key)
			}
			histories[i].Add(op)
		}
		c.Close()
	}
	// The searches are independent: check them side by side.
	var wg sync.WaitGroup
	results := make([]lab.HistoryResult, n)
	for i := range vms {
		wg.Go(func() { results[i] = lab.CheckHistory(histories[i], crashed, 20*time.Second) })
	}
	wg.Wait()
	var illegal int
	var ops, acked int
	for i, res := range results {
		ops, acked = ops+res.Ops, acked+res.Acked
		if !res.OK() {
			path := filepath.Join(os.TempDir(), fmt.Sprintf("ftgw-%s-%s.html", filepath.Base(t.Name()), vms[i].Name))
			if err := res.Visualize(path); err == nil {
				t.Logf("porcupine's view of %s's history: %s", vms[i].Name, path)
			}
			t.Errorf("%s: not linearizable or its PUT counter repeated or went back: %s", vms[i].Name, res)
			illegal++
		}
	}
	if lost > 0 || illegal > 0 {
		t.Errorf("%d acknowledged writes read back as not found; %d of %d VM histories illegal (a lost acknowledged write makes its final read illegal)", lost, illegal, n)
	}
	t.Logf("%d VMs: %d operations, %d acknowledged, every history linearizable with its final reads", n, ops, acked)

	var detection, arbitration, goLive []time.Duration
	for _, s := range survivor {
		f, _ := s["last_failover"].(map[string]any)
		if f == nil {
			t.Errorf("%v on %s: no last failover", s["vm"], lab.NSSecondary)
			continue
		}
		ns := func(k string) time.Duration { v, _ := f[k].(float64); return time.Duration(v) }
		detection, arbitration, goLive = append(detection, ns("detection_ns")), append(arbitration, ns("arbitration_ns")), append(goLive, ns("go_live_ns"))
	}
	for _, p := range []struct {
		name string
		d    []time.Duration
	}{{"client gap", gaps}, {"detection", detection}, {"arbitration", arbitration}, {"go-live", goLive}} {
		q := quantiles(p.d, 0.5, 0.99, 1)
		t.Logf("failover across %d VMs, %-11s p50 %7.1fms  p99 %7.1fms  max %7.1fms", len(p.d), p.name+":",
			float64(q[0])/1e6, float64(q[1])/1e6, float64(q[2])/1e6)
	}
}
