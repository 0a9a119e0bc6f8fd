package test

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/ftgw/ftgw/internal/lab"
)

// Restarts are ordinary events: a daemon killed under load and started again
// with its own configuration loses no acknowledged write, judged on the
// whole history of several clients overwriting a few keys, and the pair
// protects itself again with no command.

// startLoad starts four clients overwriting five keys through the VIP.
func startLoad(t *testing.T) *lab.Load {
	t.Helper()
	l, err := lab.StartLoad(lab.LoadConfig{
		Clients: 4, Keys: 5, WriteFraction: 0.6,
		Timeout: 250 * time.Millisecond, MaxOps: 200_000, MaxTime: 2 * time.Minute,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Stop() })
	return l
}

func waitAcked(t *testing.T, l *lab.Load, n int) {
	t.Helper()
	if err := l.WaitAcked(n, 30*time.Second); err != nil {
		t.Fatal(err)
	}
}

// checkHistory judges the history with porcupine and the PUT counter, and
// fails t on any violation (leaving porcupine's visualization behind).
func checkHistory(t *testing.T, h *lab.History, fault time.Time) lab.HistoryResult {
	t.Helper()
	res := lab.CheckHistory(h, fault, time.Minute)
	t.Logf("history: %s", res)
	if !res.OK() {
		path := filepath.Join(os.TempDir(), fmt.Sprintf("ftgw-%s.html", filepath.Base(t.Name())))
		if err := res.Visualize(path); err == nil {
			t.Logf("porcupine's view of the history: %s", path)
		}
		t.Errorf("the history is not linearizable or the PUT counter repeated or went back: %s", res)
	}
	return res
}

// protectedAgain waits until primary serves the VM protected with
// secondary its standby, then for 300 more acknowledged operations, and
// judges the history from the fault on; it fails t if both hosts were ever
// seen active meanwhile. It returns the result and how long after the fault
// the pair was protected again.
func protectedAgain(t *testing.T, l *lab.Load, primary, secondary string, fault time.Time, both <-chan int, stop chan struct{}) (lab.HistoryResult, time.Duration) {
	t.Helper()
	waitPair(t, primary, secondary, 20*time.Second)
	after := time.Since(fault)
	waitAcked(t, l, l.Acked()+300)
	close(stop)
	res := checkHistory(t, l.Stop(), fault)
	if n := <-both; n > 0 {
		t.Errorf("both hosts active in %d samples", n)
	}
	return res, after
}

// watchServing samples both hosts' roles until stop is closed and returns
// how many samples found both active: two hosts releasing for one VM.
func watchServing(stop <-chan struct{}) <-chan int {
	both := make(chan int, 1)
	go func() {
		n := 0
		defer func() { both <- n }()
		for {
			select {
			case <-stop:
				return
			case <-time.After(2 * time.Millisecond):
			}
			a, errA := tryHostStatus(lab.NSPrimary)
			b, errB := tryHostStatus(lab.NSSecondary)
			if errA == nil && errB == nil && a["role"] == "active" && b["role"] == "active" {
				n++
			}
		}
	}()
	return both
}

// Must-show 2: the secondary's daemon killed under a write load and started
// again: the primary rebuilds it from a snapshot; the restarted host, whose
// VM lacks the log, never wins the arbiter.
func TestSecondaryDaemonCrashRestartLosesNothing(t *testing.T) {
	for _, timeout := range []time.Duration{50 * time.Millisecond, time.Second, 2 * time.Second} {
		t.Run("failure-timeout="+timeout.String(), func(t *testing.T) {
			labUp(t, "--failure-timeout", timeout.String())
			l := startLoad(t)
			waitAcked(t, l, 300)

			killed := crashHost(t, lab.NSSecondary)
			restartDaemon(t, lab.NSSecondary)
			stop := make(chan struct{})
			res, protectedAfter := protectedAgain(t, l, lab.NSPrimary, lab.NSSecondary, killed, watchServing(stop), stop)
			if b := hostStatus(t, lab.NSSecondary); b["last_failover"] != nil {
				t.Errorf("the restarted secondary took part in a failover: %v", b["last_failover"])
			}
			primary, secondary := waitReplicated(t)
			if primary.Digest != secondary.Digest {
				t.Errorf("the rebuilt secondary's VM differs: %.12s, primary %.12s", secondary.Digest, primary.Digest)
			}
			t.Logf("failure timeout %s: client gap %s (target <= 2s), protected again %s after the kill; %d ops, %d acked, %d indeterminate",
				timeout, res.LongestGap.Round(time.Millisecond), protectedAfter.Round(time.Millisecond), res.Ops, res.Acked, res.Indeterminate)
		})
	}
}

// Must-show 3: the primary's daemon killed and started again with a 2s
// failure timeout: the restarted host, with a fresh VM, never serves; the
// secondary takes over and rebuilds it as its new secondary.
func TestPrimaryDaemonCrashRestartNeverServesTwice(t *testing.T) {
	labUp(t, "--failure-timeout", "2s")
	l := startLoad(t)
	waitAcked(t, l, 300)

	stop := make(chan struct{})
	both := watchServing(stop)
	killed := crashHost(t, lab.NSPrimary)
	restartDaemon(t, lab.NSPrimary)
	var sawRestarted map[string]any
	waitFor(t, 10*time.Second, "the restarted primary's daemon", func() bool {
		s, err := tryHostStatus(lab.NSPrimary)
		sawRestarted = s
		return err == nil
	})
	if sawRestarted["role"] == "active" {
		t.Errorf("the restarted primary serves with a fresh VM: %v", sawRestarted)
	}
	res, protectedAfter := protectedAgain(t, l, lab.NSSecondary, lab.NSPrimary, killed, both, stop)
	b := hostStatus(t, lab.NSSecondary)
	if b["epoch"].(float64) != 2 {
		t.Errorf("%s serves at epoch %v, want 2", lab.NSSecondary, b["epoch"])
	}
	t.Logf("primary restart: %s took over; client gap %s, protected again %s after the kill; %d ops, %d acked, %d indeterminate",
		lab.NSSecondary, res.LongestGap.Round(time.Millisecond), protectedAfter.Round(time.Millisecond), res.Ops, res.Acked, res.Indeterminate)
}
