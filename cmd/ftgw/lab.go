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
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/ftgw/ftgw/internal/lab"
	"github.com/ftgw/ftgw/pkg/lockstep"
	"github.com/ftgw/ftgw/pkg/protect"
)

const labUsage = `Usage:
  ftgw lab up [--dir DIR] [--heartbeat D] [--failure-timeout D] [--hold-capacity N]
              [--guest synthetic|qemu] [--guest-dir DIR] [--max-lag D]
      build the lab (namespaces ftgw-a, ftgw-b, ftgw-c, ftgw-lan) and start
      a primary daemon in ftgw-a and a secondary in ftgw-b; --guest qemu runs
      a real Linux VM (make guest) under QEMU record/replay
  ftgw lab down [--dir DIR]      stop the daemons and remove the lab
  ftgw lab status [--dir DIR]    roles, log positions and guest states
  ftgw lab reprotect [--dir DIR]
      after a failover: start the other host's daemon again; it joins and the
      survivor rebuilds it from its VM's state, without pausing the VM (a real
      VM: from its go-live snapshot and its log since)
  ftgw lab switchover [--dir DIR]
      planned move of the VM from the lab's protected primary to its standby
  ftgw lab traffic [--requests N]
      key-value writes from ftgw-c to the VM, then the commit latency
`

const defaultLabDir = "/run/ftgw/lab"

func labCommand(ctx context.Context, args []string) error {
	if len(args) == 0 {
		fmt.Fprint(os.Stderr, labUsage)
		return errUsage
	}
	if args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		fmt.Print(labUsage)
		return flag.ErrHelp
	}
	fs := flag.NewFlagSet("lab "+args[0], flag.ContinueOnError)
	dir := fs.String("dir", defaultLabDir, "where the lab keeps configs, keys, logs and pids")
	heartbeat := fs.Duration("heartbeat", 10*time.Millisecond, "log channel heartbeat interval")
	failureTimeout := fs.Duration("failure-timeout", 50*time.Millisecond, "silence after which a host's peer counts as failed")
	holdCapacity := fs.Int("hold-capacity", 4096, "frames the primary may hold at once")
	requests := fs.Int("requests", 1000, "requests `ftgw lab traffic` sends")
	guestEngine := fs.String("guest", engineSynthetic, "the VM: synthetic (ftgw guest) or qemu (a real Linux VM under record/replay; builds build/guest with `make guest` when missing)")
	guestDir := fs.String("guest-dir", "build/guest", "where `make guest` put vmlinuz and initrd.img (--guest qemu)")
	maxLag := fs.Duration("max-lag", time.Second, "how far the secondary's replay may trail before the primary's VM is paused (--guest qemu: the VMs' qemu.max_lag)")
	if err := fs.Parse(args[1:]); err != nil {
		return err
	}
	if *guestEngine == engineQEMU && !flagSet(fs, "failure-timeout") {
		// Two TCG VMs keep both of this machine's CPUs busy: a daemon
		// can be descheduled for longer than the synthetic lab's 50ms.
		*failureTimeout = time.Second
	}
	switch args[0] {
	case "up":
		vm, err := labVM(*guestEngine, *guestDir)
		if err != nil {
			return err
		}
		if vm.Engine == engineQEMU {
			vm.QEMU.MaxLag = *maxLag
		}
		if err := labUp(ctx, *dir, vm, *heartbeat, *failureTimeout, *holdCapacity); err != nil {
			return err
		}
		fmt.Printf("lab up: VM %s at %s (%s) on %s, standby on %s; client in %s; metrics on 127.0.0.1:%d in each host's namespace\n",
			lab.VMName, lab.VMIP, lab.VMMAC, lab.NSPrimary, lab.NSSecondary, lab.NSClient, lab.MetricsPort)
		return nil
	case "down":
		return labDown(*dir)
	case "status":
		return labStatus(os.Stdout, *dir)
	case "traffic":
		return labTraffic(ctx, os.Stdout, *dir, *requests)
	case "reprotect":
		return labReprotect(ctx, append([]string{"--dir", *dir}, fs.Args()...))
	case "switchover":
		return labSwitchover(ctx, *dir)
	}
	fmt.Fprintf(os.Stderr, "ftgw lab: unknown command %q\n\n%s", args[0], labUsage)
	return errUsage
}

func hostDir(dir, ns string) string { return filepath.Join(dir, ns) }

// labVM is the lab's VM run by engine.
func labVM(engine, guestDir string) (VMConfig, error) {
	vm := VMConfig{Name: lab.VMName, IP: lab.VMIP.String(), MAC: lab.VMMAC.String(), Tap: lab.Tap, Engine: engine}
	switch engine {
	case engineSynthetic:
		return vm, nil
	case engineQEMU:
	default:
		return vm, fmt.Errorf("--guest %q: want %s or %s", engine, engineSynthetic, engineQEMU)
	}
	kernel, initrd := filepath.Join(guestDir, "vmlinuz"), filepath.Join(guestDir, "initrd.img")
	if _, err := os.Stat(initrd); errors.Is(err, os.ErrNotExist) {
		fmt.Fprintf(os.Stderr, "lab: %s missing: running make guest\n", initrd)
		build := exec.Command("make", "guest")
		build.Stdout, build.Stderr = os.Stderr, os.Stderr
		if err := build.Run(); err != nil {
			return vm, fmt.Errorf("make guest (run it from the repository, or pass --guest-dir): %w", err)
		}
	}
	var err error
	for _, p := range []*string{&kernel, &initrd} {
		if *p, err = filepath.Abs(*p); err != nil {
			return vm, err
		}
	}
	vm.QEMU = QEMUConfig{Kernel: kernel, Initrd: initrd}
	return vm, nil
}

func labUp(ctx context.Context, dir string, vm VMConfig, heartbeat, failureTimeout time.Duration, holdCapacity int) (err error) {
	if err := lab.Build(); err != nil {
		return err
	}
	defer func() {
		if err != nil {
			err = errors.Join(err, labDown(dir))
		}
	}()
	cfgs, err := labConfigs(dir, vm, heartbeat, failureTimeout, holdCapacity)
	if err != nil {
		return err
	}
	for _, cfg := range cfgs {
		if err := startDaemon(ctx, dir, cfg.Name, cfg); err != nil {
			return err
		}
	}
	if vm.Engine == engineQEMU {
		return waitVMServes(ctx, 3*time.Minute)
	}
	return nil
}

// labConfigs writes the lab's PKI under dir and returns the two hosts'
// configs, the secondary's first: the primary dials it. Each host is named
// after its namespace, which its certificate carries and its peer pins.
func labConfigs(dir string, vm VMConfig, heartbeat, failureTimeout time.Duration, holdCapacity int) ([]Config, error) {
	pki := filepath.Join(dir, "pki")
	for _, d := range []string{pki, filepath.Join(dir, "arbiter")} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, err
		}
	}
	if err := lockstep.GenerateLabPKI(pki, lab.NSPrimary, lab.NSSecondary); err != nil {
		return nil, fmt.Errorf("generate lab keys: %w", err)
	}
	var cfgs []Config
	for _, host := range []lab.Host{lab.Hosts[1], lab.Hosts[0]} {
		role, name := roleSecondary, "secondary"
		if host.NS == lab.NSPrimary {
			role, name = rolePrimary, "primary"
		}
		cfg := defaultConfig()
		cfg.Name = host.NS
		cfg.Role = role
		cfg.FailureTimeout = failureTimeout
		// Both hosts see this directory: the lab's shared storage.
		cfg.Arbiter = "file:" + filepath.Join(dir, "arbiter")
		cfg.Uplink = lab.Uplink
		cfg.Heartbeat = heartbeat
		cfg.HoldCapacity = holdCapacity
		// Loopback, in the host's namespace: lab.Scrape reads it there.
		cfg.Metrics = net.JoinHostPort("127.0.0.1", strconv.Itoa(lab.MetricsPort))
		cfg.StateDir = hostDir(dir, host.NS)
		cfg.VMs = []VMConfig{vm}
		// Each host dials the other's replication address while it serves
		// and accepts on its own while it follows.
		peer := lab.Hosts[1]
		if host.NS == lab.NSSecondary {
			peer = lab.Hosts[0]
		}
		cfg.Peer = PeerConfig{
			Name:    peer.NS,
			Address: net.JoinHostPort(peer.Repl.Addr().String(), strconv.Itoa(lab.LogPort)),
			Listen:  net.JoinHostPort(host.Repl.Addr().String(), strconv.Itoa(lab.LogPort)),
			CA:      filepath.Join(pki, "ca.pem"),
			Cert:    filepath.Join(pki, name+".pem"),
			Key:     filepath.Join(pki, name+"-key.pem"),
		}
		cfgs = append(cfgs, cfg)
	}
	return cfgs, nil
}

// waitVMServes waits until the VM answers a key-value request from the
// client, through the gateway: a real VM boots for seconds after its daemon
// is up, its boot recorded and replayed on the way.
func waitVMServes(ctx context.Context, budget time.Duration) error {
	c, err := kvClient(time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	deadline := time.Now().Add(budget)
	for {
		_, _, err := c.Get("ready")
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("the VM did not answer within %s: %w", budget, err)
		}
	}
}

// startDaemon writes cfg for the host and starts `ftgw run` in its namespace,
// detached, then waits until its status endpoint answers.
func startDaemon(ctx context.Context, dir, ns string, cfg Config) error {
	hd := hostDir(dir, ns)
	if err := os.MkdirAll(hd, 0o755); err != nil {
		return err
	}
	raw, err := marshalConfig(cfg)
	if err != nil {
		return err
	}
	cfgPath := filepath.Join(hd, "ftgw.yaml")
	if err := os.WriteFile(cfgPath, raw, 0o644); err != nil {
		return err
	}
	logFile, err := os.OpenFile(filepath.Join(hd, "ftgw.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer logFile.Close()
	self, err := os.Executable()
	if err != nil {
		return err
	}
	cmd := exec.Command("ip", "netns", "exec", ns, self, "run", "--config", cfgPath)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start daemon in %s: %w", ns, err)
	}
	if err := os.WriteFile(filepath.Join(hd, "ftgw.pid"), []byte(strconv.Itoa(cmd.Process.Pid)), 0o644); err != nil {
		return err
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()

	// A real VM boots under TCG while recording before its daemon serves.
	ready := 30 * time.Second
	if cfg.VMs[0].Engine == engineQEMU {
		ready = 3 * time.Minute
	}
	deadline := time.Now().Add(ready)
	for {
		if _, err := daemonStatus(dir, ns); err == nil {
			return nil
		}
		select {
		case err := <-exited:
			return fmt.Errorf("daemon in %s exited at start (%v); its log:\n%s", ns, err, tail(filepath.Join(hd, "ftgw.log"), 20))
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("daemon in %s not ready after %s; its log:\n%s", ns, ready, tail(filepath.Join(hd, "ftgw.log"), 20))
		}
	}
}

func tail(path string, lines int) string {
	raw, _ := os.ReadFile(path)
	all := strings.Split(strings.TrimRight(string(raw), "\n"), "\n")
	return strings.Join(all[max(0, len(all)-lines):], "\n")
}

func labDown(dir string) error {
	var errs []error
	for _, host := range lab.Hosts[:2] {
		pidFile := filepath.Join(hostDir(dir, host.NS), "ftgw.pid")
		if pid, err := readPid(pidFile); err == nil {
			stopProcess(pid)
			os.Remove(pidFile)
		}
	}
	// Whatever else still runs in the lab (a test's client, a stray guest).
	for _, ns := range lab.Namespaces() {
		lab.Crash(ns) // a namespace that is gone has nothing left to kill
	}
	errs = append(errs, lab.Remove(), os.RemoveAll(dir))
	return errors.Join(errs...)
}

func stopProcess(pid int) {
	if syscall.Kill(pid, syscall.SIGTERM) != nil {
		return
	}
	for range 50 {
		if syscall.Kill(pid, 0) != nil {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	syscall.Kill(pid, syscall.SIGKILL)
}

func labStatus(w io.Writer, dir string) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "HOST\tSTATE\tROLE\tEPOCH\tHEAD\tACKED\tRECEIVED\tHELD\tLOG RTT\tGUEST PUTS\tGUEST DIGEST")
	var errs []error
	for _, host := range lab.Hosts[:2] {
		s, err := daemonStatus(dir, host.NS)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", host.NS, err))
			continue
		}
		gs, err := labGuestState(dir, host.NS)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s guest: %w", host.NS, err))
		}
		// Head, acked and held are the primary's; received the secondary's.
		head, acked, received, held := fmt.Sprint(s.Head), fmt.Sprint(s.Acked), "-", fmt.Sprint(s.Held)
		if s.State == protect.Standby.String() {
			head, acked, received, held = "-", "-", fmt.Sprint(s.Received), "-"
		}
		rtt := "down"
		if s.Connected {
			rtt = fmt.Sprintf("%.0fµs", s.RTTMicros)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\t%s\t%s\t%s\t%s\t%d\t%.12s\n", host.NS, s.State, s.Role, s.Epoch, head, acked, received, held, rtt, gs.Puts, gs.Digest)
	}
	tw.Flush()
	return errors.Join(errs...)
}

func readPid(path string) (int, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	return strconv.Atoi(strings.TrimSpace(string(raw)))
}

// flagSet reports whether the command line set the flag called name.
func flagSet(fs *flag.FlagSet, name string) bool {
	set := false
	fs.Visit(func(f *flag.Flag) { set = set || f.Name == name })
	return set
}
