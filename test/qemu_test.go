package test

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ftgw/ftgw/internal/lab"
	"github.com/ftgw/ftgw/internal/testutil"
)

// The real VM (make guest) under QEMU record/replay: ftgw lab up --guest qemu.

func qemuLabUp(t *testing.T, extra ...string) {
	t.Helper()
	testutil.RequireQEMU(t)
	kernel, _ := testutil.GuestImage(t)
	labUp(t, append([]string{"--guest", "qemu", "--guest-dir", filepath.Dir(kernel)}, extra...)...)
}

// console is a host's copy of the VM's serial console: cmd/ftgw-init prints
// a state line after every request.
func console(t *testing.T, ns string) string {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join(labDir, ns, lab.VMName+"-qemu", "serial.log"))
	if err != nil {
		t.Fatal(err)
	}
	return string(raw)
}

// lastState is the console's last key-value state line.
func lastState(console string) string {
	last := ""
	for _, line := range strings.Split(console, "\n") {
		if strings.HasPrefix(line, "ftgw-kv ") {
			last = line
		}
	}
	return last
}

// The pair runs one execution: the secondary replays the primary's log as
// it streams, and its console (every state line the guest printed) is the
// primary's. With the secondary's acks withheld, the VM's replies are held;
// when acks resume they all arrive, in order, and the commit latency of
// held frames is measured.
func TestRealVMPairReplaysAndHoldsOutput(t *testing.T) {
	qemuLabUp(t, "--failure-timeout", "10s")
	c := kvClient(t)
	var base uint64
	for i := range 50 {
		n, err := c.Put(fmt.Sprintf("k%d", i%9), fmt.Sprint(i))
		if err != nil {
			t.Fatal(err)
		}
		base = n
	}
	want := lastState(console(t, lab.NSPrimary))
	if !strings.Contains(want, fmt.Sprintf("puts=%d ", base)) {
		t.Fatalf("primary's console ends %q, want puts=%d", want, base)
	}
	waitFor(t, 2*time.Minute, "the secondary to replay the last request", func() bool {
		return lastState(console(t, lab.NSSecondary)) == want
	})
	primary, secondary := console(t, lab.NSPrimary), console(t, lab.NSSecondary)
	if !strings.HasPrefix(primary, secondary) {
		t.Errorf("the consoles differ:\nprimary:\n%s\nsecondary:\n%s", tailLines(primary, 5), tailLines(secondary, 5))
	}
	t.Logf("both executions at %q (%d console bytes)", want, len(secondary))

	signalSecondary(t, syscall.SIGSTOP)
	const n = 10
	conn := sendPuts(t, "held", n)
	early := readReplies(conn, time.Second)
	signalSecondary(t, syscall.SIGCONT)
	if len(early) != 0 {
		t.Fatalf("%d replies left the primary without acks: %q", len(early), early)
	}
	replies := readReplies(conn, 10*time.Second)
	if len(replies) != n {
		t.Fatalf("%d replies after acks resumed, want %d: %q", len(replies), n, replies)
	}
	for i, r := range replies {
		if want := fmt.Sprintf("OK %d held%d", base+uint64(i)+1, i); r != want {
			t.Errorf("reply %d: %q, want %q", i, r, want)
		}
	}
	m, ok := lab.Metric(scrape(t, lab.NSPrimary), "ftgw_output_commit_latency_seconds", map[string]string{"vm": lab.VMName, "path": "held"})
	if held := m.GetHistogram().GetSampleCount(); !ok || held < n {
		t.Errorf("commit latency of held frames counts %v frames, want at least %d", held, n)
	}
}

// Kill the primary host during a key-value write load: the secondary
// replays what it received, goes live from there as a recording VM, and
// every write a client saw acknowledged is in it.
func TestRealVMFailoverOnPrimaryCrashLosesNoAcknowledgedWrite(t *testing.T) {
	qemuLabUp(t)
	// The secondary first replays the boot; a failover from there would
	// mostly measure that.
	waitFor(t, 2*time.Minute, "the secondary to replay the boot", func() bool {
		return strings.Contains(console(t, lab.NSSecondary), "ftgw-init ready")
	})
	w := startWriter(t, 500*time.Millisecond)
	waitWrites(t, w, 100)
	// The write load makes the replay fall behind (it runs slower than the
	// recording); the throttle bounds how far, and so the drain.
	families := scrape(t, lab.NSPrimary)
	lagAtCrash := value(t, families, "ftgw_replay_lag_seconds", map[string]string{"vm": lab.VMName})
	pauses := value(t, families, "ftgw_throttle_pauses_total", map[string]string{"vm": lab.VMName})
	t.Logf("before the crash: replay lag %.3fs (bound 1s), throttle pauses %v", lagAtCrash, pauses)

	killed := crashHost(t, lab.NSPrimary)
	if err := w.WaitAcked(w.Acked()+50, time.Minute); err != nil {
		t.Fatal(err)
	}
	acked := w.Stop()

	status := hostStatus(t, lab.NSSecondary)
	if status["state"] != "unprotected" || status["role"] != "active" {
		t.Fatalf("ftgw-b after the crash: %v", status)
	}
	phases, _ := status["last_failover"].(map[string]any)
	gap := check(t, acked, killed)
	ms := func(k string) float64 { v, _ := phases[k].(float64); return v / 1e6 }
	lag := value(t, scrape(t, lab.NSSecondary), "ftgw_replay_lag_seconds", map[string]string{"vm": lab.VMName})
	t.Logf("replay lag on the promoted host %.3fs", lag)
	t.Logf("real VM failover: detection %.0fms, arbitration %.1fms, drain (replay of the received log) %.0fms, go-live %.0fms; client gap %.0fms",
		ms("detection_ns"), ms("arbitration_ns"), ms("drain_ns"), ms("go_live_ns"), float64(gap)/float64(time.Millisecond))
}
