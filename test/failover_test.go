package test

import (
	"encoding/json"
	"fmt"
	"net"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/ftgw/ftgw/internal/lab"
	"github.com/ftgw/ftgw/internal/netnsutil"
	"github.com/ftgw/ftgw/pkg/guest"
)

// ackedWrite is a PUT the client saw acknowledged.
type ackedWrite struct {
	key, value string
	count      uint64 // the OK <n> it got
	at         time.Time
}

// writer is the Jepsen-style load: unique keys, one PUT at a time from the
// client namespace, each with a short timeout and never retried (a PUT is not
// idempotent), recording every acknowledged one.
type writer struct {
	stop    atomic.Bool
	done    chan struct{}
	mu      sync.Mutex
	acked   []ackedWrite
	timeout int
}

func startWriter(t *testing.T, timeout time.Duration) *writer {
	t.Helper()
	var c *guest.Client
	inClient(t, func() (err error) {
		c, err = guest.Dial(net.JoinHostPort(lab.VMIP.String(), strconv.Itoa(lab.KVPort)), timeout)
		return err
	})
	w := &writer{done: make(chan struct{})}
	go func() {
		defer close(w.done)
		defer c.Close()
		const maxWrites = 200_000
		deadline := time.Now().Add(time.Minute)
		for i := 0; i < maxWrites && !w.stop.Load() && time.Now().Before(deadline); i++ {
			key, value := fmt.Sprintf("w%d", i), fmt.Sprintf("v%d", i)
			n, err := c.Put(key, value)
			if err != nil {
				w.mu.Lock()
				w.timeout++
				w.mu.Unlock()
				continue
			}
			w.mu.Lock()
			w.acked = append(w.acked, ackedWrite{key: key, value: value, count: n, at: time.Now()})
			w.mu.Unlock()
		}
	}()
	t.Cleanup(func() { w.stop.Store(true); <-w.done })
	return w
}

func (w *writer) ackedCount() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.acked)
}

func (w *writer) finish() []ackedWrite {
	w.stop.Store(true)
	<-w.done
	return w.acked
}

// check reads every acknowledged write back through the VIP and checks the
// PUT count never went backwards; it returns the longest time the client
// went without an acknowledgement after at.
func check(t *testing.T, acked []ackedWrite, at time.Time) (gap time.Duration) {
	t.Helper()
	c := kvClient(t)
	lost := 0
	for _, w := range acked {
		v, found, err := c.Get(w.key)
		if err != nil {
			t.Fatalf("GET %s after failover: %v", w.key, err)
		}
		if !found || v != w.value {
			lost++
			if lost <= 5 {
				t.Errorf("acknowledged write %s=%s (OK %d) lost: found %v, value %q", w.key, w.value, w.count, found, v)
			}
		}
	}
	for i := 1; i < len(acked); i++ {
		if acked[i].count <= acked[i-1].count {
			t.Errorf("PUT count went backwards: %s got OK %d after %s got OK %d", acked[i].key, acked[i].count, acked[i-1].key, acked[i-1].count)
		}
	}
	last := at
	for _, w := range acked {
		if w.at.After(at) {
			gap = max(gap, w.at.Sub(last))
			last = w.at
		} else {
			last = at
		}
	}
	t.Logf("checker: %d acknowledged writes, %d lost", len(acked), lost)
	return gap
}

// crashHost kills every process of a lab host at once, as a host crash.
func crashHost(t *testing.T, ns string) time.Time {
	t.Helper()
	out, err := exec.Command("ip", "netns", "pids", ns).Output()
	if err != nil {
		t.Fatal(err)
	}
	at := time.Now()
	for _, f := range strings.Fields(string(out)) {
		if pid, err := strconv.Atoi(f); err == nil {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	}
	return at
}

// hostStatus reads a daemon's status, with the last failover's phases.
func hostStatus(t *testing.T, ns string) map[string]any {
	t.Helper()
	var s map[string]any
	sock := labDir + "/" + ns + "/control.sock"
	err := netnsutil.Do(ns, func() error {
		out, err := exec.Command("curl", "-s", "--unix-socket", sock, "http://ftgw/status").Output()
		if err != nil {
			return err
		}
		return json.Unmarshal(out, &s)
	})
	if err != nil {
		t.Fatalf("status of %s: %v", ns, err)
	}
	return s
}

func waitWrites(t *testing.T, w *writer, n int) {
	t.Helper()
	waitFor(t, 20*time.Second, fmt.Sprintf("%d acknowledged writes", n), func() bool { return w.ackedCount() >= n })
}

func TestFailoverOnPrimaryCrashLosesNoAcknowledgedWrite(t *testing.T) {
	labUp(t)
	w := startWriter(t, 30*time.Millisecond)
	waitWrites(t, w, 300)

	killed := crashHost(t, lab.NSPrimary)
	before := w.ackedCount()
	waitFor(t, 10*time.Second, "writes acknowledged by the new primary", func() bool { return w.ackedCount() >= before+300 })
	acked := w.finish()

	status := hostStatus(t, lab.NSSecondary)
	if status["state"] != "unprotected" || status["role"] != "active" || status["epoch"].(float64) != 2 {
		t.Fatalf("ftgw-b after the crash: %v", status)
	}
	phases, _ := status["last_failover"].(map[string]any)
	gap := check(t, acked, killed)
	ms := func(k string) float64 { v, _ := phases[k].(float64); return v / 1e6 }
	t.Logf("failover: detection %.1fms, arbitration %.2fms, go-live %.2fms; client gap %.1fms",
		ms("detection_ns"), ms("arbitration_ns"), ms("go_live_ns"), float64(gap)/float64(time.Millisecond))
}

// released counts the guest outputs a host has let out: fast path and
// released from the hold queue.
func released(t *testing.T, ns string) float64 {
	t.Helper()
	families := scrape(t, ns)
	var n float64
	for _, path := range []string{"fast", "held"} {
		if m, ok := lab.Metric(families, "ftgw_output_commit_latency_seconds", map[string]string{"path": path}); ok {
			n += float64(m.GetHistogram().GetSampleCount())
		}
	}
	return n
}

// Cut the replication link with both hosts alive: each sees the other fail,
// both ask the arbiter, exactly one wins and serves; the other releases
// nothing from the cut on.
func TestReplicationLinkCutLetsExactlyOneHostServe(t *testing.T) {
	labUp(t)
	w := startWriter(t, 30*time.Millisecond)
	waitWrites(t, w, 300)

	setReplLink(t, false)
	cut := time.Now()
	// No ack crosses a cut link: from here on neither host may release
	// anything until one has won the arbiter.
	time.Sleep(5 * time.Millisecond)
	releasedA, releasedB := released(t, lab.NSPrimary), released(t, lab.NSSecondary)

	before := w.ackedCount()
	waitFor(t, 10*time.Second, "writes acknowledged after the cut", func() bool { return w.ackedCount() >= before+300 })
	acked := w.finish()

	a, b := hostStatus(t, lab.NSPrimary), hostStatus(t, lab.NSSecondary)
	var winner, loser string
	switch {
	case a["state"] == "unprotected" && b["state"] == "passive":
		winner, loser = lab.NSPrimary, lab.NSSecondary
	case b["state"] == "unprotected" && a["state"] == "passive":
		winner, loser = lab.NSSecondary, lab.NSPrimary
	default:
		t.Fatalf("want one unprotected host and one passive: %s %v, %s %v", lab.NSPrimary, a["state"], lab.NSSecondary, b["state"])
	}
	if a["epoch"] != b["epoch"] {
		t.Errorf("epochs differ: %s %v, %s %v", lab.NSPrimary, a["epoch"], lab.NSSecondary, b["epoch"])
	}
	loserBefore := map[string]float64{lab.NSPrimary: releasedA, lab.NSSecondary: releasedB}[loser]
	if now := released(t, loser); now != loserBefore {
		t.Errorf("%s lost the arbiter but released %v outputs after the cut", loser, now-loserBefore)
	}
	gap := check(t, acked, cut)
	t.Logf("link cut: %s won, %s passive; client gap %.1fms", winner, loser, float64(gap)/float64(time.Millisecond))
}
