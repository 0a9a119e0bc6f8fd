package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/ftgw/ftgw/internal/lab"
	"github.com/ftgw/ftgw/pkg/arbiter"
	"github.com/ftgw/ftgw/pkg/protect"
)

// nemesis injects one schedule's faults into the lab and heals them. Its
// hosts are fixed when the schedule starts: the protected primary and its
// standby, whatever the faults make of them.
type nemesis struct {
	dir    string
	engine string
	ft     time.Duration
	// primary and secondary are the namespaces of the pair's hosts as the
	// schedule found them.
	primary, secondary string
	progress           func(format string, args ...any)

	healNow  chan struct{} // closed when the schedule heals: timed faults end early
	timed    sync.WaitGroup
	mu       sync.Mutex
	heals    []func() error
	notes    []string
	findings []string // what must not happen, short of a checker's verdict
	restarts map[string]*sync.Mutex
	// killed: hosts whose daemon the nemesis itself took down (any other
	// exit is worth a note).
	killed map[string]bool
	// startEpoch is the arbiter's epoch when the schedule began;
	// hitOnlyCopy: a fault took down a host that had claimed the VM since
	// and had no standby yet (vmLostUnprotected).
	startEpoch  uint64
	hitOnlyCopy bool
}

// hitTheOnlyCopy reports whether a fault took down the VM's only copy.
func (n *nemesis) hitTheOnlyCopy() bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.hitOnlyCopy
}

// checkOnlyCopy, right after a fault took host hit down, asks whether hit
// was the VM's only copy: the arbiter names it at an epoch it claimed
// during the schedule (a failover or a switchover it won), and the other
// host is no standby of that epoch (it lost, was cut off, or handed over
// and waits to be rebuilt). A second failure then loses the VM, in any
// pair of two hosts; the schedule says so.
func (n *nemesis) checkOnlyCopy(hit string) {
	c, err := labArbiterClaim(n.dir)
	if err != nil || c.Owner != hit || c.Epoch <= n.startEpoch {
		return
	}
	other := n.other(hit)
	if s, err := daemonStatus(n.dir, other); err == nil && s.State == protect.Standby.String() && s.Epoch >= c.Epoch {
		return
	}
	n.note("%s was the VM's only copy when it was hit: it had claimed epoch %d and %s was no standby of it yet", hit, c.Epoch, other)
	n.mu.Lock()
	n.hitOnlyCopy = true
	n.mu.Unlock()
}

func newNemesis(dir, engine string, ft time.Duration, primary, secondary string, progress func(string, ...any)) *nemesis {
	n := &nemesis{
		dir: dir, engine: engine, ft: ft, primary: primary, secondary: secondary, progress: progress,
		healNow:  make(chan struct{}),
		restarts: map[string]*sync.Mutex{primary: {}, secondary: {}},
		killed:   map[string]bool{},
		// Unread, no host counts as the only copy (checkOnlyCopy).
		startEpoch: math.MaxUint64,
	}
	if c, err := labArbiterClaim(dir); err == nil {
		n.startEpoch = c.Epoch
	}
	return n
}

func (n *nemesis) host(r lab.Role) string {
	if r == lab.RolePrimary {
		return n.primary
	}
	return n.secondary
}

func (n *nemesis) other(ns string) string {
	if ns == n.primary {
		return n.secondary
	}
	return n.primary
}

func (n *nemesis) note(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	n.mu.Lock()
	n.notes = append(n.notes, msg)
	n.mu.Unlock()
	n.progress("%s", msg)
}

func (n *nemesis) finding(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	n.mu.Lock()
	n.findings = append(n.findings, msg)
	n.mu.Unlock()
	n.progress("FINDING: %s", msg)
}

func (n *nemesis) addHeal(heal func() error) {
	n.mu.Lock()
	n.heals = append(n.heals, heal)
	n.mu.Unlock()
}

// after runs heal once d has passed or the schedule heals, whichever comes
// first; heal must be safe to call twice (it is registered for the final
// heal too).
func (n *nemesis) after(d time.Duration, heal func() error) {
	n.addHeal(heal)
	n.timed.Go(func() {
		select {
		case <-time.After(d):
		case <-n.healNow:
		}
		if err := heal(); err != nil {
			n.note("heal: %v", err)
		}
	})
}

func (n *nemesis) daemonPid(ns string) (int, error) {
	return readPid(filepath.Join(hostDir(n.dir, ns), "ftgw.pid"))
}

func alive(pid int) bool { return syscall.Kill(pid, 0) == nil }

// waitGone waits (bounded) until pid has exited: the lab's daemons are
// children of this process, reaped by startDaemon's waiter.
func waitGone(pid int, timeout time.Duration) bool {
	deadline := time.Now().Add(timeout)
	for alive(pid) {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(5 * time.Millisecond)
	}
	return true
}

func (n *nemesis) markKilled(ns string) {
	n.mu.Lock()
	n.killed[ns] = true
	n.mu.Unlock()
}

// killDaemonNow SIGKILLs the daemon in ns and waits until it is gone.
func (n *nemesis) killDaemonNow(ns string) error {
	n.markKilled(ns)
	pid, err := n.daemonPid(ns)
	if err != nil {
		return err
	}
	syscall.Kill(pid, syscall.SIGCONT) // a paused one dies all the same; this only keeps it from lingering
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
		return err
	}
	if !waitGone(pid, 5*time.Second) {
		return fmt.Errorf("daemon %d in %s still there 5s after SIGKILL", pid, ns)
	}
	n.checkOnlyCopy(ns)
	return nil
}

func (n *nemesis) crashHost(ns string) error {
	n.markKilled(ns)
	pid, _ := n.daemonPid(ns)
	if err := lab.Crash(ns); err != nil {
		return err
	}
	if pid > 0 && !waitGone(pid, 5*time.Second) {
		return fmt.Errorf("daemon %d in %s still there 5s after the crash", pid, ns)
	}
	n.checkOnlyCopy(ns)
	return nil
}

// restartIfDead starts the daemon of ns again with its own config, as
// its supervisor would, unless it runs. Whatever is left of the host's
// processes goes first.
func (n *nemesis) restartIfDead(ctx context.Context, ns string) error {
	mu := n.restarts[ns]
	mu.Lock()
	defer mu.Unlock()
	if pid, err := n.daemonPid(ns); err == nil && alive(pid) {
		return nil
	}
	return n.restartLocked(ctx, ns)
}

// restart kills the daemon of ns, whatever it is doing, and starts it
// again with its own config.
func (n *nemesis) restart(ctx context.Context, ns string) error {
	mu := n.restarts[ns]
	mu.Lock()
	defer mu.Unlock()
	return n.restartLocked(ctx, ns)
}

func (n *nemesis) restartLocked(ctx context.Context, ns string) error {
	if err := n.crashHost(ns); err != nil {
		return err
	}
	cfg, err := loadConfig(filepath.Join(hostDir(n.dir, ns), "ftgw.yaml"))
	if err != nil {
		return err
	}
	start := time.Now()
	if err := startDaemon(ctx, n.dir, ns, cfg); err != nil {
		return fmt.Errorf("restart %s: %w", ns, err)
	}
	n.progress("%s: daemon restarted with its own config (%s)", ns, time.Since(start).Round(time.Millisecond))
	return nil
}

// guestPid finds the daemon's VM: its child running the synthetic guest
// or QEMU.
func (n *nemesis) guestPid(ns string) (int, error) {
	daemon, err := n.daemonPid(ns)
	if err != nil {
		return 0, err
	}
	tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/children", daemon))
	for _, t := range tasks {
		raw, _ := os.ReadFile(t)
		for _, f := range strings.Fields(string(raw)) {
			pid, err := strconv.Atoi(f)
			if err != nil {
				continue
			}
			cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
			args := strings.Split(string(cmdline), "\x00")
			if len(args) > 1 && (args[1] == "guest" || strings.Contains(args[0], "qemu-system")) {
				return pid, nil
			}
		}
	}
	return 0, fmt.Errorf("no guest process under %s's daemon %d", ns, daemon)
}

// pause SIGSTOPs pid for d.
func (n *nemesis) pause(what string, pid int, d time.Duration) error {
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		return fmt.Errorf("stop %s: %w", what, err)
	}
	n.after(d, once(func() error {
		if err := syscall.Kill(pid, syscall.SIGCONT); err != nil && !errors.Is(err, syscall.ESRCH) {
			return fmt.Errorf("continue %s: %w", what, err)
		}
		return nil
	}))
	return nil
}

func once(f func() error) func() error {
	var o sync.Once
	var err error
	return func() error {
		o.Do(func() { err = f() })
		return err
	}
}

func (n *nemesis) arbiterDir() string { return filepath.Join(n.dir, "arbiter") }

func (n *nemesis) workDir() (string, error) {
	work := filepath.Join(n.dir, "chaos")
	return work, os.MkdirAll(work, 0o700)
}

// hangArbiter cuts the daemons of hosts off from the arbiter for d.
func (n *nemesis) hangArbiter(hosts []string, d time.Duration) error {
	work, err := n.workDir()
	if err != nil {
		return err
	}
	var heals []func() error
	for _, ns := range hosts {
		pid, err := n.daemonPid(ns)
		if err != nil || !alive(pid) {
			n.note("%s: no daemon to cut off from the arbiter", ns)
			continue
		}
		heal, err := lab.HangArbiterFor(pid, n.arbiterDir(), work)
		if err != nil {
			return err
		}
		heals = append(heals, heal)
	}
	n.after(d, func() error {
		var errs []error
		for _, h := range heals {
			errs = append(errs, h())
		}
		return errors.Join(errs...)
	})
	return nil
}

// quickStatus asks a daemon for its status with a short deadline: a
// paused one does not answer.
func (n *nemesis) quickStatus(ns string) (Status, bool) {
	var s Status
	client := controlClient(controlPath(hostDir(n.dir, ns)))
	client.Timeout = 300 * time.Millisecond
	resp, err := client.Get("http://ftgw/status")
	if err != nil {
		return s, false
	}
	defer resp.Body.Close()
	return s, json.NewDecoder(resp.Body).Decode(&s) == nil
}

// liveTarget is the host a fault that takes a host down may hit now. The
// schedule drew planned while the pair was protected; earlier faults may
// have left one host serving alone since (a cut link's winner, a
// paused primary's successor), and taking that one down as well would be a
// second failure, which loses the VM by design: then the fault hits the
// other host.
func (n *nemesis) liveTarget(planned string) string {
	statuses := map[string]Status{}
	for _, ns := range []string{n.primary, n.secondary} {
		if s, ok := n.quickStatus(ns); ok {
			statuses[ns] = s
		}
	}
	pri, sec := statuses[n.primary].State, statuses[n.secondary].State
	protected, standby := protect.Protected.String(), protect.Standby.String()
	if (pri == protected && sec == standby) || (pri == standby && sec == protected) {
		return planned // either host may go
	}
	var serving []string
	for ns, s := range statuses {
		if s.Role == "active" {
			serving = append(serving, ns)
		}
	}
	if len(serving) == 1 && serving[0] == planned {
		n.note("%s serves alone: the fault hits %s instead", planned, n.other(planned))
		return n.other(planned)
	}
	return planned
}

// inject starts f; the faults that last end on their own (or at heal).
func (n *nemesis) inject(ctx context.Context, f lab.Fault) error {
	target := n.host(f.Target)
	if f.TakesHostDown() {
		target = n.liveTarget(target)
	}
	switch f.Kind {
	case lab.FaultHostCrash, lab.FaultDaemonKill:
		var err error
		if f.Kind == lab.FaultHostCrash {
			err = n.crashHost(target)
		} else {
			err = n.killDaemonNow(target)
		}
		if err != nil {
			return err
		}
		n.after(f.Duration, func() error { return n.restartIfDead(ctx, target) })
	case lab.FaultDaemonCrashRestart:
		if err := n.killDaemonNow(target); err != nil {
			return err
		}
		return n.restartIfDead(ctx, target)
	case lab.FaultDaemonPause:
		pid, err := n.daemonPid(target)
		if err != nil {
			return err
		}
		return n.pause(target+" daemon", pid, f.Duration)
	case lab.FaultGuestPause:
		pid, err := n.guestPid(target)
		if err != nil {
			n.note("guest pause: %v", err)
			return nil
		}
		return n.pause(target+" guest", pid, f.Duration)
	case lab.FaultLinkCut:
		if err := lab.SetReplLink(false); err != nil {
			return err
		}
		n.after(f.Duration, once(func() error { return lab.SetReplLink(true) }))
	case lab.FaultLinkFlap:
		n.addHeal(func() error { return lab.SetReplLink(true) })
		n.timed.Go(func() {
			for i := 0; i < f.Flaps; i++ {
				if err := lab.SetReplLink(false); err != nil {
					n.note("link flap: %v", err)
					return
				}
				select {
				case <-time.After(f.Duration):
				case <-n.healNow:
				}
				if err := lab.SetReplLink(true); err != nil {
					n.note("link flap: %v", err)
					return
				}
				select {
				case <-time.After(f.Duration):
				case <-n.healNow:
					return
				}
			}
		})
	case lab.FaultAsymPartition:
		heal, err := lab.DropReplFrom(target)
		if err != nil {
			return err
		}
		n.after(f.Duration, heal)
	case lab.FaultArbiterPartition:
		return n.hangArbiter([]string{target}, f.Duration)
	case lab.FaultArbiterStop, lab.FaultArbiterRestart:
		return n.hangArbiter([]string{n.primary, n.secondary}, f.Duration)
	case lab.FaultArbiterSlow:
		stop, err := lab.SlowArbiter(n.arbiterDir(), lab.VMName, f.Hold)
		if err != nil {
			return err
		}
		n.after(f.Duration, stop)
	case lab.FaultSwitchoverInterrupted:
		return n.interruptSwitchover(f)
	case lab.FaultReprotectInterrupted:
		return n.interruptReprotect(ctx, f)
	case lab.FaultDuplicateName:
		return n.duplicateName(ctx)
	default:
		return fmt.Errorf("unknown fault %s", f.Kind)
	}
	return nil
}

// interruptSwitchover asks the primary for a switchover and, f.Delay
// later, hits its standby, the host about to take the VM over.
func (n *nemesis) interruptSwitchover(f lab.Fault) error {
	socket := controlPath(hostDir(n.dir, n.primary))
	replied := make(chan string, 1)
	go func() {
		reply, err := controlPostSocket(socket, "/switchover", nil)
		if err != nil {
			reply = "error: " + err.Error()
		}
		replied <- reply
	}()
	time.Sleep(f.Delay)
	var err error
	if f.Variant == lab.SwitchoverKillStandby {
		err = n.killDaemonNow(n.secondary)
	} else {
		err = n.crashHost(n.secondary)
	}
	select {
	case reply := <-replied:
		n.note("switchover: %s hit %s after it answered: %s", n.secondary, f.Delay.Round(time.Millisecond), reply)
	case <-time.After(100 * time.Millisecond):
		n.note("switchover: %s hit before it answered", n.secondary)
	}
	return err
}

// labArbiterClaim reads the lab's arbiter for its VM.
func labArbiterClaim(dir string) (arbiter.Claim, error) {
	a, err := arbiter.Open("file:" + filepath.Join(dir, "arbiter"))
	if err != nil {
		return arbiter.Claim{}, err
	}
	defer a.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	return a.Current(ctx, lab.VMName)
}

// interruptReprotect restarts the standby's daemon, so the primary
// rebuilds it, and f.Delay after the new daemon answers hits it.
func (n *nemesis) interruptReprotect(ctx context.Context, f lab.Fault) error {
	if err := n.restart(ctx, n.secondary); err != nil {
		return err
	}
	time.Sleep(f.Delay)
	var state string
	if s, err := daemonStatus(n.dir, n.primary); err == nil {
		state = s.State
	}
	var err error
	if f.Variant == lab.ReprotectCrashSecondary {
		err = n.crashHost(n.secondary)
	} else {
		err = n.killDaemonNow(n.secondary)
	}
	n.note("re-protection: %s hit while %s was %s", n.secondary, n.primary, state)
	return err
}

// duplicateName replaces the standby's daemon by one named like the
// primary, in the ways an operator could get there: its config copied
// from the primary's host (or both hosts with one hostname), so its peer
// is its own name; its own certificate and peer, only the name the
// primary's; the primary's name and certificate (its /etc/ftgw copied)
// with this host's addresses. Each must be refused, by its own config
// check or by the peer and the arbiter, and take nothing from the VM. The
// last runs until the heal, when the real daemon comes back.
func (n *nemesis) duplicateName(ctx context.Context) error {
	if err := n.crashHost(n.secondary); err != nil {
		return err
	}
	n.addHeal(func() error { return n.restartIfDead(ctx, n.secondary) })
	cfg, err := loadConfig(filepath.Join(hostDir(n.dir, n.secondary), "ftgw.yaml"))
	if err != nil {
		return err
	}
	cfg.Name = n.primary
	copied := cfg
	swapped := cfg
	swapped.Peer.Name = n.secondary
	primaryCfg, err := loadConfig(filepath.Join(hostDir(n.dir, n.primary), "ftgw.yaml"))
	if err != nil {
		return err
	}
	// The primary's whole identity copied over, its addresses this
	// host's: the certificate the primary's peer check must refuse.
	cloned := swapped
	cloned.Peer.Cert, cloned.Peer.Key = primaryCfg.Peer.Cert, primaryCfg.Peer.Key
	impostors := []struct {
		how string
		cfg Config
	}{
		{"peer " + copied.Peer.Name + " (a copied config)", copied},
		{"peer " + swapped.Peer.Name + " (its own certificate)", swapped},
		{"peer " + cloned.Peer.Name + " (the primary's certificate)", cloned},
	}
	for i, c := range impostors {
		last := i == len(impostors)-1
		if err := n.runImpostor(ctx, c.how, c.cfg, last); err != nil {
			return err
		}
	}
	return nil
}

// runImpostor runs cfg in the standby's namespace and judges it once it
// has had the time to join or to take the VM; unless it stays (until the
// heal), it is killed then.
func (n *nemesis) runImpostor(ctx context.Context, how string, cfg Config, stay bool) error {
	cfg.StateDir = hostDir(n.dir, n.secondary) + "-impostor"
	if err := os.MkdirAll(cfg.StateDir, 0o755); err != nil {
		return err
	}
	raw, err := marshalConfig(cfg)
	if err != nil {
		return err
	}
	cfgPath := filepath.Join(cfg.StateDir, "ftgw.yaml")
	if err := os.WriteFile(cfgPath, raw, 0o644); err != nil {
		return err
	}
	logPath := filepath.Join(cfg.StateDir, "ftgw.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		return err
	}
	defer logFile.Close()
	self, err := os.Executable()
	if err != nil {
		return err
	}
	cmd := exec.Command("ip", "netns", "exec", n.secondary, self, "run", "--config", cfgPath)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start impostor: %w", err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	var stopOnce sync.Once
	stop := func() error {
		stopOnce.Do(func() {
			cmd.Process.Kill()
			<-exited
		})
		return nil
	}
	what := fmt.Sprintf("duplicate name %s on %s, %s", cfg.Name, n.secondary, how)
	watch := 3*n.ft + 2*time.Second
	select {
	case err := <-exited:
		exited <- err
		n.note("%s: refused, the daemon exited (%v): %s", what, err, lastLine(logPath))
		return nil
	case <-time.After(watch):
	case <-ctx.Done():
		stop()
		return ctx.Err()
	}
	s, err := statusAt(controlPath(cfg.StateDir), "")
	switch {
	case err != nil:
		n.note("%s: running, no status (%v): %s", what, err, lastLine(logPath))
	case s.Role == "active" || s.State == protect.Standby.String():
		n.finding("%s: accepted, it is %s (%s) at epoch %d", what, s.State, s.Role, s.Epoch)
	default:
		n.note("%s: kept out, it is %s after %s: %s", what, s.State, watch, lastLine(logPath))
	}
	if stay {
		n.addHeal(stop)
		return nil
	}
	return stop()
}

func lastLine(path string) string {
	return strings.TrimSpace(lab.Tail(path, 1))
}

// heal ends every fault still on, then starts again every daemon that is
// gone (as its supervisor would), the real one in place of an impostor.
func (n *nemesis) heal(ctx context.Context) error {
	close(n.healNow)
	n.timed.Wait()
	n.mu.Lock()
	heals := n.heals
	n.mu.Unlock()
	var errs []error
	for i := len(heals) - 1; i >= 0; i-- {
		errs = append(errs, heals[i]())
	}
	for _, ns := range []string{n.primary, n.secondary} {
		n.mu.Lock()
		killed := n.killed[ns]
		n.mu.Unlock()
		if pid, err := n.daemonPid(ns); err == nil && !alive(pid) && !killed {
			n.note("%s: its daemon had exited: %s", ns, lastLine(filepath.Join(hostDir(n.dir, ns), "ftgw.log")))
		}
		errs = append(errs, n.restartIfDead(ctx, ns))
	}
	return errors.Join(errs...)
}

// arbiterOwner reads the file arbiter's record of the lab's VM.
func arbiterOwner(dir string) (owner string, epoch uint64) {
	raw, err := os.ReadFile(filepath.Join(dir, "arbiter", lab.VMName+".claim"))
	if err != nil {
		return "", 0
	}
	var rec struct {
		Epoch uint64 `json:"epoch"`
		Owner string `json:"owner"`
	}
	json.Unmarshal(raw, &rec)
	return rec.Owner, rec.Epoch
}
