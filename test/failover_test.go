package test

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ftgw/ftgw/internal/lab"
)

func startWriter(t *testing.T, timeout time.Duration) *lab.Writer {
	t.Helper()
	w, err := lab.StartWriter("w", timeout, 200_000, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { w.Stop() })
	return w
}

// check runs the checker and fails t on any lost write.
func check(t *testing.T, acked []lab.AckedWrite, fault time.Time) time.Duration {
	t.Helper()
	res, err := lab.Check(acked, fault)
	if err != nil {
		t.Fatal(err)
	}
	for i, w := range res.Lost {
		if i < 5 {
			t.Errorf("acknowledged write %s=%s (OK %d) lost", w.Key, w.Value, w.Count)
		}
	}
	if res.Backwards > 0 {
		t.Errorf("the PUT count went backwards %d times", res.Backwards)
	}
	t.Logf("checker: %s", res)
	return res.Gap
}

// crashHost crashes a lab host and returns when.
func crashHost(t *testing.T, ns string) time.Time {
	t.Helper()
	at := time.Now()
	if err := lab.Crash(ns); err != nil {
		t.Fatal(err)
	}
	return at
}

// hostStatus reads a daemon's status, with the last failover's phases.
func hostStatus(t *testing.T, ns string) map[string]any {
	t.Helper()
	s, err := tryHostStatus(ns)
	if err != nil {
		t.Fatalf("status of %s: %v", ns, err)
	}
	return s
}

func tryHostStatus(ns string) (map[string]any, error) {
	return statusAt(filepath.Join(labDir, ns, "control.sock"))
}

// statusAt reads the status of the daemon whose control socket is sock.
func statusAt(sock string) (map[string]any, error) {
	var s map[string]any
	return s, controlGet(sock, "/status", &s)
}

// controlGet decodes the JSON reply to a GET of path on the control socket
// sock.
func controlGet(sock, path string, reply any) error {
	client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		},
	}}
	resp, err := client.Get("http://ftgw" + path)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s %s: %s", sock, path, resp.Status)
	}
	return json.NewDecoder(resp.Body).Decode(reply)
}

func waitWrites(t *testing.T, w *lab.Writer, n int) {
	t.Helper()
	if err := w.WaitAcked(n, 20*time.Second); err != nil {
		t.Fatal(err)
	}
}

func TestFailoverOnPrimaryCrashLosesNoAcknowledgedWrite(t *testing.T) {
	labUp(t)
	w := startWriter(t, 30*time.Millisecond)
	waitWrites(t, w, 300)

	killed := crashHost(t, lab.NSPrimary)
	waitWrites(t, w, w.Acked()+300)
	acked := w.Stop()

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
// nothing from the cut on and joins the winner, which rebuilds it once the
// link is back.
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

	waitWrites(t, w, w.Acked()+300)
	acked := w.Stop()

	a, b := hostStatus(t, lab.NSPrimary), hostStatus(t, lab.NSSecondary)
	var winner, loser string
	switch {
	case a["state"] == "unprotected" && b["state"] == "joining":
		winner, loser = lab.NSPrimary, lab.NSSecondary
	case b["state"] == "unprotected" && a["state"] == "joining":
		winner, loser = lab.NSSecondary, lab.NSPrimary
	default:
		t.Fatalf("want one unprotected host and one joining it: %s %v, %s %v", lab.NSPrimary, a["state"], lab.NSSecondary, b["state"])
	}
	if a["epoch"] != b["epoch"] {
		t.Errorf("epochs differ: %s %v, %s %v", lab.NSPrimary, a["epoch"], lab.NSSecondary, b["epoch"])
	}
	loserBefore := map[string]float64{lab.NSPrimary: releasedA, lab.NSSecondary: releasedB}[loser]
	if now := released(t, loser); now != loserBefore {
		t.Errorf("%s lost the arbiter but released %v outputs after the cut", loser, now-loserBefore)
	}
	gap := check(t, acked, cut)
	t.Logf("link cut: %s won, %s joining; client gap %.1fms", winner, loser, float64(gap)/float64(time.Millisecond))

	setReplLink(t, true)
	healed := time.Now()
	waitPair(t, winner, loser, 10*time.Second)
	t.Logf("link back: %s rebuilt %s as its secondary in %s", winner, loser, time.Since(healed).Round(time.Millisecond))
}

// waitPair waits until primary serves the VM protected, with secondary its
// standby at the same epoch: a pair that re-protected itself.
func waitPair(t *testing.T, primary, secondary string, timeout time.Duration) {
	t.Helper()
	var p, s map[string]any
	waitFor(t, timeout, primary+" protected with "+secondary+" its standby", func() bool {
		var err1, err2 error
		p, err1 = tryHostStatus(primary)
		s, err2 = tryHostStatus(secondary)
		return err1 == nil && err2 == nil && p["state"] == "protected" && s["state"] == "standby" && p["epoch"] == s["epoch"]
	})
}

// Fifty random failovers (host crash, daemon kill, secondary crash, link
// cut), each under a write load and checked: none may lose an acknowledged
// write. `ftgw bench --failover` prints the table; its exit status says
// whether every run passed the checker.
func TestFiftyRandomFailoversLoseNothing(t *testing.T) {
	// A lab left by another test has the same names.
	ftgw(nil, "lab", "down", "--dir", labDir)
	out, err := exec.Command(ftgwBin, "bench", "--failover", "50", "--seed", "42", "--dir", labDir, "--budget", "10m").CombinedOutput()
	t.Logf("%s", out)
	if err != nil {
		t.Fatalf("failover loop: %v", err)
	}
	if !strings.Contains(string(out), "checker failures (lost or reordered acknowledged writes)   0") {
		t.Error("the table does not report 0 checker failures")
	}
}

// A planned switchover under a write load: the VM moves to the standby with
// no acknowledged write lost; the old primary joins it and becomes its
// secondary.
func TestSwitchoverUnderLoadLosesNothing(t *testing.T) {
	labUp(t)
	w := startWriter(t, 30*time.Millisecond)
	waitWrites(t, w, 300)

	at := time.Now()
	out := ftgw(t, "lab", "switchover", "--dir", labDir)
	t.Log(strings.TrimSpace(out))
	waitWrites(t, w, w.Acked()+300)
	acked := w.Stop()

	waitPair(t, lab.NSSecondary, lab.NSPrimary, 10*time.Second)
	if b := hostStatus(t, lab.NSSecondary); b["epoch"].(float64) != 2 {
		t.Fatalf("after switchover %s serves at epoch %v, want 2", lab.NSSecondary, b["epoch"])
	}
	gap := check(t, acked, at)
	t.Logf("switchover client gap %.1fms; %s protected again %s after the switchover began",
		float64(gap)/float64(time.Millisecond), lab.NSSecondary, time.Since(at).Round(time.Millisecond))
}

// After a failover the survivor runs alone; re-protection builds a new
// secondary from its VM's state at a log position, without stopping the
// VM. The new pair must then survive a second failover with every
// acknowledged write.
func TestReprotectionThenASecondFailoverLosesNothing(t *testing.T) {
	labUp(t)
	w := startWriter(t, 30*time.Millisecond)
	waitWrites(t, w, 300)

	first := crashHost(t, lab.NSPrimary)
	waitWrites(t, w, w.Acked()+200)
	out := ftgw(t, "lab", "reprotect", "--dir", labDir)
	t.Log(strings.TrimSpace(out))
	a, b := hostStatus(t, lab.NSPrimary), hostStatus(t, lab.NSSecondary)
	if b["state"] != "protected" || a["state"] != "standby" {
		t.Fatalf("after re-protection: %s %v, %s %v", lab.NSPrimary, a["state"], lab.NSSecondary, b["state"])
	}
	if b["unprotected_seconds"].(float64) <= 0 {
		t.Errorf("the unprotected window was not measured: %v", b["unprotected_seconds"])
	}
	waitWrites(t, w, w.Acked()+300)

	second := crashHost(t, lab.NSSecondary)
	waitWrites(t, w, w.Acked()+300)
	gap, _ := checkTwoFailovers(t, w, first, second)
	t.Logf("second failover client gap %.1fms", float64(gap)/float64(time.Millisecond))
}

// checkTwoFailovers stops the writer after a failover to ftgw-a, a
// re-protection and a failover back: ftgw-a must serve alone at epoch 3,
// with no acknowledged write lost at either fault. It returns the second
// failover's client gap and ftgw-a's status.
func checkTwoFailovers(t *testing.T, w *lab.Writer, first, second time.Time) (time.Duration, map[string]any) {
	t.Helper()
	acked := w.Stop()
	a := hostStatus(t, lab.NSPrimary)
	if a["state"] != "unprotected" || a["epoch"].(float64) != 3 {
		t.Fatalf("after the second failover %s is %v at epoch %v, want unprotected at 3", lab.NSPrimary, a["state"], a["epoch"])
	}
	check(t, acked, first)
	return check(t, acked, second), a
}

// The old primary, restarted after a failover with its old configuration,
// finds in the arbiter that the VM has an owner and joins it: no failback
// by surprise, and no command. The owner rebuilds it as its new secondary.
func TestRestartedOldPrimaryJoinsAsTheNewSecondary(t *testing.T) {
	labUp(t)
	w := startWriter(t, 30*time.Millisecond)
	waitWrites(t, w, 200)
	crashed := crashHost(t, lab.NSPrimary)
	waitWrites(t, w, w.Acked()+200)

	// The failover in the survivor's metrics.
	families := scrape(t, lab.NSSecondary)
	if n := value(t, families, "ftgw_failovers_total", map[string]string{"cause": "primary_lost"}); n != 1 {
		t.Errorf("ftgw_failovers_total{cause=primary_lost} = %v, want 1", n)
	}
	if v := value(t, families, "ftgw_state", map[string]string{"state": "unprotected"}); v != 1 {
		t.Errorf("ftgw_state{state=unprotected} = %v, want 1", v)
	}
	if v := value(t, families, "ftgw_epoch", nil); v != 2 {
		t.Errorf("ftgw_epoch = %v, want 2", v)
	}
	if v := value(t, families, "ftgw_unprotected_seconds_total", nil); v <= 0 {
		t.Errorf("ftgw_unprotected_seconds_total = %v, want > 0", v)
	}
	for _, phase := range []string{"detection", "arbitration", "go_live"} {
		if v := value(t, families, "ftgw_last_failover_seconds", map[string]string{"phase": phase}); v <= 0 {
			t.Errorf("ftgw_last_failover_seconds{phase=%s} = %v", phase, v)
		}
	}

	// Restart the old primary as it was.
	restarted := time.Now()
	restartDaemon(t, lab.NSPrimary)
	waitPair(t, lab.NSSecondary, lab.NSPrimary, 10*time.Second)
	t.Logf("the restarted old primary is the new secondary %s after its start", time.Since(restarted).Round(time.Millisecond))
	if a := hostStatus(t, lab.NSPrimary); a["role"] != "standby" || a["epoch"].(float64) != 2 {
		t.Fatalf("restarted old primary: role %v epoch %v, want standby at epoch 2", a["role"], a["epoch"])
	}
	waitWrites(t, w, w.Acked()+200) // ftgw-b still serves
	acked := w.Stop()
	primary, secondary := waitReplicated(t)
	if primary.Digest != secondary.Digest {
		t.Error("the new secondary's VM differs from the primary's")
	}
	check(t, acked, crashed)
}

// restartDaemon starts the daemon of a lab host again with its own
// configuration, as a host's init system would.
func restartDaemon(t *testing.T, ns string) {
	t.Helper()
	log, err := os.OpenFile(filepath.Join(labDir, ns, "ftgw.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer log.Close()
	restart := exec.Command("ip", "netns", "exec", ns, ftgwBin, "run", "--config", filepath.Join(labDir, ns, "ftgw.yaml"))
	restart.Stdout, restart.Stderr = log, log
	restart.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := restart.Start(); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(labDir, ns, "ftgw.pid"), []byte(strconv.Itoa(restart.Process.Pid)), 0o644)
	go restart.Wait()
}
