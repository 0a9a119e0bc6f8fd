package test

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/ftgw/ftgw/internal/lab"
	"github.com/ftgw/ftgw/internal/netnsutil"
	"github.com/ftgw/ftgw/internal/testutil"
	"github.com/ftgw/ftgw/pkg/guest"
)

// The real VM (make guest) under QEMU record/replay: ftgw lab up --guest qemu.

func qemuLabUp(t *testing.T, extra ...string) {
	t.Helper()
	testutil.RequireQEMU(t)
	kernel, _ := testutil.GuestImage(t)
	labUp(t, append([]string{"--guest", "qemu", "--guest-dir", filepath.Dir(kernel)}, extra...)...)
}

// waitLive waits until the secondary in ns has gone live after its
// primary's crash and recorded the failover's phases.
func waitLive(t *testing.T, ns string) {
	t.Helper()
	var last map[string]any
	deadline := time.Now().Add(time.Minute)
	for {
		s, err := tryHostStatus(ns)
		// The phases are recorded just after the state changes. A host
		// whose peer rejoins at once may be protected again already.
		if err == nil && s["role"] == "active" && s["last_failover"] != nil {
			return
		}
		if err == nil {
			last = s
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s did not go live within a minute; its last status: state %v, replay %v", ns, last["state"], last["replay"])
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// qemuPairUp brings the real-VM lab up and waits until the secondary has
// replayed the guest's boot and the throttle lets the primary's VM run: the
// boot replays slower than it ran, and a VM frozen until the replay
// catches up answers nothing within a client's timeout.
func qemuPairUp(t *testing.T, extra ...string) {
	t.Helper()
	qemuLabUp(t, extra...)
	waitFor(t, time.Minute, "the secondary to replay the guest's boot", func() bool {
		return strings.Contains(console(t, lab.NSSecondary), "ftgw-init ready")
	})
	waitFor(t, time.Minute, "the throttle to let the primary's VM run", func() bool {
		before := throttledSeconds(t, lab.NSPrimary)
		time.Sleep(300 * time.Millisecond)
		return throttledSeconds(t, lab.NSPrimary)-before < 0.01
	})
}

// throttledSeconds is how long the throttle has kept the VM on host ns
// frozen, in all.
func throttledSeconds(t *testing.T, ns string) float64 {
	t.Helper()
	return value(t, scrape(t, ns), "ftgw_throttled_seconds_total", map[string]string{"vm": lab.VMName})
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
	qemuPairUp(t, "--failure-timeout", "10s")
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
	checkReleased(t, conn, n, base, 10*time.Second)
	m, ok := lab.Metric(scrape(t, lab.NSPrimary), "ftgw_output_commit_latency_seconds", map[string]string{"vm": lab.VMName, "path": "held"})
	if held := m.GetHistogram().GetSampleCount(); !ok || held < n {
		t.Errorf("commit latency of held frames counts %v frames, want at least %d", held, n)
	}
}

// Kill the primary host during a key-value write load: the secondary
// replays what it received, goes live from there as a recording VM, and
// every write a client saw acknowledged is in it.
func TestRealVMFailoverOnPrimaryCrashLosesNoAcknowledgedWrite(t *testing.T) {
	// The secondary first replays the boot; a failover from there would
	// mostly measure that.
	qemuPairUp(t)
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

// A CPU-bound guest makes the replay, which runs slower than the recording,
// fall behind; the primary pauses its VM whenever the secondary's lag passes
// max_lag, so the lag stays near the bound, and so does the replay a
// failover must finish before the VM serves again.
func TestRealVMReplayLagBoundedUnderGuestCPULoad(t *testing.T) {
	const bound = 500 * time.Millisecond
	qemuPairUp(t, "--max-lag", bound.String())
	lagLabels := map[string]string{"vm": lab.VMName}
	// The boot replays slower than it records, so the throttle may
	// already have paused the VM: count only what the load adds.
	before := scrape(t, lab.NSPrimary)
	pausesBefore := value(t, before, "ftgw_throttle_pauses_total", lagLabels)
	throttledBefore := value(t, before, "ftgw_throttled_seconds_total", lagLabels)

	// The guest hashes its whole store after every request (the digest on
	// its console), so large values make each request cost guest CPU in
	// proportion to the store.
	var (
		mu      sync.Mutex
		maxLag  float64
		samples int
	)
	stopSampling := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		for {
			select {
			case <-stopSampling:
				return
			case <-time.After(50 * time.Millisecond):
			}
			families, err := lab.Scrape(lab.NSPrimary)
			if err != nil {
				continue
			}
			if m, ok := lab.Metric(families, "ftgw_replay_lag_seconds", lagLabels); ok {
				mu.Lock()
				maxLag, samples = max(maxLag, m.GetGauge().GetValue()), samples+1
				mu.Unlock()
			}
		}
	}()
	c := kvClient(t)
	payload := strings.Repeat("x", 1200)
	var acked []lab.AckedWrite
	start := time.Now()
	for i := 0; i < 2000 && time.Since(start) < 45*time.Second; i++ {
		key := fmt.Sprintf("cpu%d", i)
		v := fmt.Sprintf("%d-%s", i, payload)
		if n, err := c.Put(key, v); err == nil {
			acked = append(acked, lab.AckedWrite{Key: key, Value: v, Count: n, At: time.Now()})
		}
		if i%50 == 49 && value(t, scrape(t, lab.NSPrimary), "ftgw_throttle_pauses_total", lagLabels)-pausesBefore >= 10 {
			break
		}
	}
	close(stopSampling)
	<-sampled
	families := scrape(t, lab.NSPrimary)
	pauses := value(t, families, "ftgw_throttle_pauses_total", lagLabels) - pausesBefore
	throttled := value(t, families, "ftgw_throttled_seconds_total", lagLabels) - throttledBefore
	t.Logf("%d writes of %d bytes in %s: replay lag max %.3fs over %d samples (bound %s); %v throttle pauses, VM paused %.1fs of that",
		len(acked), len(payload), time.Since(start).Round(time.Millisecond), maxLag, samples, bound, pauses, throttled)
	if pauses == 0 {
		t.Fatalf("the load never took the replay lag past %s (max %.3fs): nothing was shown", bound, maxLag)
	}
	// The throttle acts on ticks of half a heartbeat, on a report up to a
	// heartbeat old, and the VM runs until the freeze lands: the sampled
	// maximum may pass the bound by a little (0.502-0.550s in 5 runs).
	if limit := 1.25 * bound.Seconds(); maxLag > limit {
		t.Errorf("replay lag reached %.3fs, want at most %.3fs (bound %s)", maxLag, limit, bound)
	}

	killed := crashHost(t, lab.NSPrimary)
	waitLive(t, lab.NSSecondary)
	phases, _ := hostStatus(t, lab.NSSecondary)["last_failover"].(map[string]any)
	drain := time.Duration(phases["drain_ns"].(float64))
	t.Logf("failover after the load: drain (replay of the lag) %s, go-live %s", drain.Round(time.Millisecond),
		time.Duration(phases["go_live_ns"].(float64)).Round(time.Millisecond))
	// Replaying runs up to ~3x slower than the guest time it replays.
	if limit := 3 * bound; drain > limit {
		t.Errorf("drain took %s, want at most %s for a lag bounded by %s", drain, limit, bound)
	}
	check(t, acked, killed)
}

// The Output Rule for a real VM: every reply a client saw was covered by log
// the secondary had acknowledged. Kill the primary host the moment a reply
// arrives, with a fresh pair each round and the kill at a different point
// of the log, and the VM that goes live must hold every acknowledged write,
// and nothing more: the next PUT counts on from the last reply.
func TestRealVMOutputRuleKillRightAfterAReply(t *testing.T) {
	rounds := 2
	if n, err := strconv.Atoi(os.Getenv("FTGW_OUTPUT_RULE_ROUNDS")); err == nil && n > 0 {
		rounds = n // more kills than CI runs: FTGW_OUTPUT_RULE_ROUNDS=20
	}
	for r := range rounds {
		t.Run(fmt.Sprintf("round%d", r), func(t *testing.T) {
			qemuPairUp(t)
			c := kvClient(t)
			var acked []lab.AckedWrite
			for i := range 15 + 11*r {
				key, v := fmt.Sprintf("r%dk%d", r, i), fmt.Sprintf("v%d", i)
				n, err := c.Put(key, v)
				if err != nil {
					t.Fatal(err)
				}
				acked = append(acked, lab.AckedWrite{Key: key, Value: v, Count: n, At: time.Now()})
			}
			killed := crashHost(t, lab.NSPrimary)
			waitLive(t, lab.NSSecondary)
			waitFor(t, 30*time.Second, "the VM to answer from ftgw-b", func() bool {
				_, _, err := c.Get(acked[0].Key)
				return err == nil
			})
			back := time.Since(killed)
			check(t, acked, killed)
			last := acked[len(acked)-1].Count
			if n, err := c.Put(fmt.Sprintf("r%dafter", r), "x"); err != nil || n != last+1 {
				t.Errorf("the first PUT after go-live counts %d (%v), want %d: the VM is not where the last reply left it", n, err, last+1)
			}
			phases, _ := hostStatus(t, lab.NSSecondary)["last_failover"].(map[string]any)
			t.Logf("primary killed right after reply %d: drain %.0fms, go-live %.0fms, the VM answered again %s after the kill", len(acked),
				phases["drain_ns"].(float64)/1e6, phases["go_live_ns"].(float64)/1e6, back.Round(time.Millisecond))
		})
	}
}

// After the primary's crash the promoted VM runs alone, for 3 minutes,
// lightly loaded; re-protection gives it a new secondary without restarting
// it: the promoted VM saves its state (a pause, printed), and the new
// secondary loads it and follows the log from there, however long the VM
// ran alone. The new pair then survives a second failover with every
// acknowledged write, the one where the new secondary goes live.
func TestRealVMReprotectionThenASecondFailoverLosesNothing(t *testing.T) {
	qemuPairUp(t)
	w := startWriter(t, 500*time.Millisecond)
	waitWrites(t, w, 50)

	first := crashHost(t, lab.NSPrimary)
	waitLive(t, lab.NSSecondary)
	waitWrites(t, w, w.Acked()+50)
	// The writer's every write is read back at the end, one at a time:
	// 3 minutes of it would take longer to check than to write.
	beforeAlone := w.Stop()
	const alone = 3 * time.Minute
	c := kvClient(t)
	puts := 0
	for ; time.Since(first) < alone; puts++ {
		if _, err := c.Put(fmt.Sprintf("alone%d", puts), "v"); err != nil {
			t.Fatalf("PUT while alone: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Logf("%s served the VM alone for %s, with a PUT every 100ms (%d)", lab.NSSecondary, time.Since(first).Round(time.Second), puts)

	w = startWriter(t, 500*time.Millisecond)
	waitWrites(t, w, 20)
	reprotectStart := time.Now()
	reprotectQEMU(t, lab.NSSecondary)
	reprotectEnd := time.Now()
	a, b := hostStatus(t, lab.NSPrimary), hostStatus(t, lab.NSSecondary)
	if b["state"] != "protected" || a["state"] != "standby" {
		t.Fatalf("after re-protection: %s %v, %s %v", lab.NSPrimary, a["state"], lab.NSSecondary, b["state"])
	}
	// The promoted VM's PUT count when the pair was protected again.
	reprotected, _ := strconv.Atoi(field(lastState(console(t, lab.NSSecondary)), "puts"))
	waitWrites(t, w, w.Acked()+50)

	// The new secondary runs the promoted VM's execution: its console
	// starts at the snapshot, and is a part of the promoted VM's; it has
	// replayed writes made since re-protection.
	var replayed string
	waitFor(t, time.Minute, "the new secondary to replay the writes since re-protection", func() bool {
		replayed = lastState(console(t, lab.NSPrimary))
		puts, _ := strconv.Atoi(field(replayed, "puts"))
		return puts > reprotected
	})
	if replica := console(t, lab.NSPrimary); !strings.Contains(console(t, lab.NSSecondary), replica) {
		t.Fatalf("the new secondary's console is not the promoted VM's:\nnew secondary:\n%s\npromoted:\n%s",
			tailLines(replica, 5), tailLines(console(t, lab.NSSecondary), 5))
	}
	t.Logf("the new secondary replayed up to %q", replayed)

	second := crashHost(t, lab.NSSecondary)
	waitLive(t, lab.NSPrimary)
	waitWrites(t, w, w.Acked()+50)
	acked := w.Stop()
	a = hostStatus(t, lab.NSPrimary)
	if a["state"] != "unprotected" || a["epoch"].(float64) != 3 {
		t.Fatalf("after the second failover %s is %v at epoch %v, want unprotected at 3", lab.NSPrimary, a["state"], a["epoch"])
	}
	// Read back after both failovers: the first writer's writes survived
	// both, the second's the second.
	check(t, beforeAlone, first)
	gap := check(t, acked, second)
	t.Logf("re-protection: the client's longest gap from its start to 5s after it was %s",
		longestGap(acked, reprotectStart, reprotectEnd.Add(5*time.Second)).Round(time.Millisecond))
	phases, _ := a["last_failover"].(map[string]any)
	ms := func(k string) float64 { v, _ := phases[k].(float64); return v / 1e6 }
	t.Logf("second failover: drain %.0fms, go-live %.0fms, client gap %.0fms",
		ms("drain_ns"), ms("go_live_ns"), float64(gap)/float64(time.Millisecond))
}

// field is the value of key=value in a console state line.
func field(line, key string) string {
	for _, f := range strings.Fields(line) {
		if v, ok := strings.CutPrefix(f, key+"="); ok {
			return v
		}
	}
	return ""
}

// When the secondary's host dies, the primary goes on alone with the
// recorder it booted with; its new secondary starts from a snapshot of that
// recorder (one that never loaded a snapshot itself, unlike a promoted
// VM's). The pair then fails over to it with every acknowledged write.
func TestRealVMReprotectionFromBootAfterTheSecondaryIsLost(t *testing.T) {
	qemuPairUp(t)
	w := startWriter(t, 500*time.Millisecond)
	waitWrites(t, w, 30)
	loseTheSecondaryThenReprotect(t, func() { waitWrites(t, w, w.Acked()+30) })
	waitWrites(t, w, w.Acked()+30)
	puts, _ := strconv.Atoi(field(lastState(console(t, lab.NSPrimary)), "puts"))
	waitFor(t, time.Minute, fmt.Sprintf("the new secondary to replay %d PUTs", puts), func() bool {
		replayed, _ := strconv.Atoi(field(lastState(console(t, lab.NSSecondary)), "puts"))
		return replayed >= puts
	})
	if b := console(t, lab.NSSecondary); !strings.Contains(console(t, lab.NSPrimary), b) {
		a := console(t, lab.NSPrimary)
		t.Fatalf("the new secondary's console is not the primary's:\nnew secondary:\n%s\nprimary:\n%s", tailLines(b, 5), tailLines(a, 5))
	}

	killed := crashHost(t, lab.NSPrimary)
	waitLive(t, lab.NSSecondary)
	waitWrites(t, w, w.Acked()+30)
	check(t, w.Stop(), killed)
}

// loseTheSecondaryThenReprotect crashes the secondary's host, waits until
// the primary serves alone, lets meanwhile (a load going on) run, then
// re-protects the VM and checks that the pair is protected again. It
// returns when the secondary's host crashed.
func loseTheSecondaryThenReprotect(t *testing.T, meanwhile func()) time.Time {
	t.Helper()
	crashed := crashHost(t, lab.NSSecondary)
	waitFor(t, time.Minute, "the primary to go on alone", func() bool {
		s, err := tryHostStatus(lab.NSPrimary)
		return err == nil && s["state"] == "unprotected"
	})
	meanwhile()
	reprotectQEMU(t, lab.NSPrimary)
	if a, b := hostStatus(t, lab.NSPrimary), hostStatus(t, lab.NSSecondary); a["state"] != "protected" || b["state"] != "standby" {
		t.Fatalf("after re-protection: %s %v, %s %v", lab.NSPrimary, a["state"], lab.NSSecondary, b["state"])
	}
	return crashed
}

// reprotectQEMU runs `ftgw lab reprotect` for the real VM served alone in
// survivor, which prints how long the VM paused for its snapshot, and logs
// how long the throttle paused it meanwhile: the new secondary replays no
// faster than the VM runs (QEMU replays idle time in real time), so the VM
// waits for it to load the snapshot and catch up.
func reprotectQEMU(t *testing.T, survivor string) {
	t.Helper()
	before := throttledSeconds(t, survivor)
	t.Log(strings.TrimSpace(ftgw(t, "lab", "reprotect", "--dir", labDir)))
	t.Logf("the throttle paused the VM for %.3fs while the new secondary caught up", throttledSeconds(t, survivor)-before)
}

// Must-show 4 for a real VM: a planned switchover under a write load. The
// primary stops taking input, freezes its VM once its outputs are out, and
// hands over; the standby replays to the end of the log and goes live. No
// acknowledged write is lost, judged on the whole history of several
// clients overwriting a few keys.
func TestRealVMSwitchoverUnderLoadLosesNothing(t *testing.T) {
	qemuPairUp(t)
	l, err := lab.StartLoad(lab.LoadConfig{Clients: 3, Keys: 4, WriteFraction: 0.6,
		Timeout: time.Second, MaxOps: 20_000, MaxTime: 3 * time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Stop() })
	if err := l.WaitAcked(60, time.Minute); err != nil {
		t.Fatal(err)
	}
	at := time.Now()
	t.Log(strings.TrimSpace(ftgw(t, "lab", "switchover", "--dir", labDir)))
	waitLive(t, lab.NSSecondary)
	if err := l.WaitAcked(l.Acked()+60, time.Minute); err != nil {
		t.Fatal(err)
	}
	res := checkHistory(t, l.Stop(), at)
	b := hostStatus(t, lab.NSSecondary)
	phases, _ := b["last_failover"].(map[string]any)
	if phases["cause"] != "switchover" || b["epoch"].(float64) != 2 {
		t.Errorf("%s after the switchover: epoch %v, last failover %v", lab.NSSecondary, b["epoch"], phases)
	}
	ms := func(k string) float64 { v, _ := phases[k].(float64); return v / 1e6 }
	t.Logf("real VM switchover: drain (replay of the received log) %.0fms, go-live %.0fms; client gap %s; %d ops, %d acked, %d indeterminate",
		ms("drain_ns"), ms("go_live_ns"), res.LongestGap.Round(time.Millisecond), res.Ops, res.Acked, res.Indeterminate)
	// The old primary joins the new one on its own, and is rebuilt as its
	// standby from a snapshot of the running VM.
	start := time.Now()
	waitPair(t, lab.NSSecondary, lab.NSPrimary, 2*time.Minute)
	t.Logf("protected again, %s the standby, %s after the switchover's go-live", lab.NSPrimary, time.Since(start).Round(100*time.Millisecond))
}

// longestGap is the longest the client went without an acknowledgement
// between from and to.
func longestGap(acked []lab.AckedWrite, from, to time.Time) time.Duration {
	var gap time.Duration
	last := from
	for _, w := range acked {
		if w.At.Before(from) {
			continue
		}
		if w.At.After(to) {
			break
		}
		gap = max(gap, w.At.Sub(last))
		last = w.At
	}
	return max(gap, to.Sub(last))
}

// The Output Rule for a TCP stream: with the secondary's acks withheld, not
// even the handshake's answer leaves the primary; once they resume, a bulk
// transfer from the real VM arrives whole and intact through the protected
// pair (every byte is the pattern's at its offset), and the secondary's
// replay of the VM served the same transfer. Then `ftgw bench` runs its
// three cases, briefly, and reports no failure in any.
func TestRealVMBulkStreamThroughThePair(t *testing.T) {
	qemuPairUp(t, "--failure-timeout", "10s")
	const size = 1 << 20
	dial := func() net.Conn {
		var conn net.Conn
		inClient(t, func() (err error) {
			conn, err = net.DialTimeout("tcp", net.JoinHostPort(lab.VMIP.String(), strconv.Itoa(guest.BulkPort)), 5*time.Second)
			return err
		})
		return conn
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	res := guest.ReceiveBulk(ctx, dial(), size)
	if !res.OK() {
		t.Fatalf("bulk transfer of %d bytes: %+v", size, res)
	}
	t.Logf("bulk: %d bytes intact in %s (%.1f Mbit/s, output commit on)", res.Received, res.Elapsed.Round(time.Millisecond),
		float64(res.Received)*8/res.Elapsed.Seconds()/1e6)
	line := fmt.Sprintf("ftgw-bulk conn=1 bytes=%d", size)
	waitFor(t, time.Minute, "the secondary to replay the transfer", func() bool {
		return strings.Contains(console(t, lab.NSSecondary), line)
	})

	// Withheld acks: the SYN reaches the VM (it is logged), its SYN-ACK
	// waits for an ack that does not come, so the connection cannot open.
	signalSecondary(t, syscall.SIGSTOP)
	resumed := false
	t.Cleanup(func() {
		if !resumed {
			signalSecondary(t, syscall.SIGCONT)
		}
	})
	type dialed struct {
		conn net.Conn
		err  error
		at   time.Time
	}
	opened := make(chan dialed, 1)
	go func() {
		var d dialed
		d.err = netnsutil.Do(lab.NSClient, func() (err error) {
			d.conn, err = net.DialTimeout("tcp", net.JoinHostPort(lab.VMIP.String(), strconv.Itoa(guest.BulkPort)), 20*time.Second)
			return err
		})
		d.at = time.Now()
		opened <- d
	}()
	select {
	case d := <-opened:
		t.Fatalf("the connection opened (%v) while the secondary acknowledged nothing", d.err)
	case <-time.After(time.Second):
	}
	released := time.Now()
	signalSecondary(t, syscall.SIGCONT)
	resumed = true
	d := <-opened
	if d.err != nil {
		t.Fatalf("connect after the acks resumed: %v", d.err)
	}
	t.Logf("the handshake completed %s after the acks resumed", d.at.Sub(released).Round(time.Millisecond))
	if res := guest.ReceiveBulk(ctx, d.conn, size); !res.OK() {
		t.Fatalf("bulk transfer after held acks: %+v", res)
	}

	out := ftgw(t, "bench", "--dir", labDir, "--requests", "30", "--rounds", "3", "--bulk-bytes", "262144", "--budget", "3m")
	t.Logf("ftgw bench:\n%s", out)
	for _, row := range []string{"unprotected (plain QEMU)", "protected, output commit off", "protected, output commit on"} {
		// Every row: 30 samples, 0 failed; every bulk row: 3 transfers,
		// 0 failed, 3 x 262144 bytes asked and intact.
		lat := regexp.MustCompile(regexp.QuoteMeta(row) + `\s+30\s+0\s`)
		bulk := regexp.MustCompile(regexp.QuoteMeta(row) + `\s+3\s+0\s+786432\s+786432\s`)
		if !lat.MatchString(out) || !bulk.MatchString(out) {
			t.Errorf("ftgw bench: %q's rows are missing or show failures", row)
		}
	}
	if !strings.Contains(out, "targets (issue 14)") {
		t.Errorf("ftgw bench printed no targets")
	}
}
