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
	"slices"
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
  ftgw lab up [--dir DIR] [--vms N] [--heartbeat D] [--failure-timeout D] [--hold-capacity N]
              [--guest synthetic|qemu] [--guest-dir DIR] [--max-lag D] [--disk]
      build the lab (namespaces ftgw-a, ftgw-b, ftgw-c, ftgw-lan) and start
      a primary daemon in ftgw-a and a secondary in ftgw-b; --guest qemu runs
      a real Linux VM (make guest) under QEMU record/replay (--disk: with its
      disk, the key-value store on it); --vms N (1 to 64,
      synthetic guests only beyond 1) protects vm1..vmN at 192.0.2.10..9+N,
      and above 8 VMs defaults to a 100ms heartbeat, a 1s failure timeout,
      a hold capacity of 512 and a 2 MiB log ring per VM
  ftgw lab down [--dir DIR]      stop the daemons and remove the lab
  ftgw lab status [--dir DIR]    roles, log positions and guest states, per VM
  ftgw lab reprotect [--dir DIR]
      after a failover: start the other host's daemon again; it joins and the
      survivor rebuilds it from its VM's state, without pausing the VM (a real
      VM: from its go-live snapshot and its log since)
  ftgw lab switchover [--dir DIR]
      planned move of the VM from the lab's protected primary to its standby
  ftgw lab traffic [--requests N]
      key-value writes from ftgw-c to vm1, then its commit latency
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
	vms := fs.Int("vms", 1, fmt.Sprintf("VMs to protect, 1 to %d: vm1..vmN at 192.0.2.10..(9+N), each on a tap of its own", lab.MaxVMs))
	defaults := labDefaults(1)
	heartbeat := fs.Duration("heartbeat", defaults.heartbeat, "log channel heartbeat interval (default 100ms above 8 VMs)")
	failureTimeout := fs.Duration("failure-timeout", defaults.failureTimeout, "silence after which a host's peer counts as failed (default 1s above 8 VMs)")
	holdCapacity := fs.Int("hold-capacity", defaults.holdCapacity, "frames the primary may hold at once, per VM (default 512 above 8 VMs)")
	requests := fs.Int("requests", 1000, "requests `ftgw lab traffic` sends")
	guestEngine := fs.String("guest", engineSynthetic, "the VM: synthetic (ftgw guest) or qemu (a real Linux VM under record/replay; builds build/guest with `make guest` when missing)")
	guestDir := fs.String("guest-dir", "build/guest", "where `make guest` put vmlinuz, initrd.img and disk.qcow2 (--guest qemu)")
	maxLag := fs.Duration("max-lag", time.Second, "how far the secondary's replay may trail before the primary's VM is paused (--guest qemu: the VMs' qemu.max_lag)")
	disk := fs.Bool("disk", false, "--guest qemu: the VM has its disk and keeps its key-value store there, fsynced before each reply (default: no disk, the store in memory)")
	if err := fs.Parse(args[1:]); err != nil {
		return err
	}
	// What the command line left unset scales with the VMs.
	settings := labDefaults(*vms)
	if flagSet(fs, "heartbeat") {
		settings.heartbeat = *heartbeat
	}
	if flagSet(fs, "failure-timeout") {
		settings.failureTimeout = *failureTimeout
	} else if *guestEngine == engineQEMU {
		// Two TCG VMs keep both of this machine's CPUs busy: a daemon
		// can be descheduled for longer than the synthetic lab's 50ms.
		settings.failureTimeout = time.Second
	}
	if flagSet(fs, "hold-capacity") {
		settings.holdCapacity = *holdCapacity
	}
	switch args[0] {
	case "up":
		vmCfgs, err := labVMs(*vms, *guestEngine, *guestDir)
		if err != nil {
			return err
		}
		if vmCfgs[0].Engine == engineQEMU {
			vmCfgs[0].QEMU.MaxLag = *maxLag
			if !*disk {
				vmCfgs[0].QEMU.Disk = ""
			}
		}
		if err := labUp(ctx, *dir, vmCfgs, settings); err != nil {
			return err
		}
		if len(vmCfgs) == 1 {
			fmt.Printf("lab up: VM %s at %s (%s) on %s, standby on %s; client in %s; metrics on 127.0.0.1:%d in each host's namespace\n",
				lab.VMName, lab.VMIP, lab.VMMAC, lab.NSPrimary, lab.NSSecondary, lab.NSClient, lab.MetricsPort)
			return nil
		}
		last := lab.VM(len(vmCfgs))
		fmt.Printf("lab up: %d VMs, %s at %s to %s at %s (taps %s..%s) on %s, standby on %s; client in %s; metrics on 127.0.0.1:%d in each host's namespace; heartbeat %s, failure timeout %s, hold capacity %d\n",
			len(vmCfgs), lab.VMName, lab.VMIP, last.Name, last.IP, lab.Tap, last.Tap, lab.NSPrimary, lab.NSSecondary, lab.NSClient, lab.MetricsPort,
			settings.heartbeat, settings.failureTimeout, settings.holdCapacity)
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

// labSettings are the knobs of the lab's daemons that `lab up` sets.
type labSettings struct {
	heartbeat, failureTimeout time.Duration
	holdCapacity              int
	// logRingBytes sizes each VM's kernel log ring; zero: the config's
	// default.
	logRingBytes int
}

// labDefaults are the lab's settings for n VMs. Up to 8 VMs they are the
// single VM's: a 10ms heartbeat and a 50ms failure timeout, which make a
// failover fast. Beyond, everything is per VM and this machine has 2 CPUs:
// 64 VMs at 10ms are 6,400 heartbeats a second each way, each a TLS record
// and a wakeup, and 64 guests and two daemons on 2 CPUs can deschedule a
// daemon for longer than 50ms, which would fail over a healthy pair; a 1s
// timeout with ten heartbeats in it does not. Memory too: each VM's hold
// queue keeps two UMEM frames of 4 KiB per frame of capacity (32 MiB at
// 4096, 2 GiB per host for 64 VMs; 4 MiB at 512), and each VM's kernel
// log ring is locked memory (8 MiB by default: 512 MiB per host; 2 MiB
// still holds thousands of frames for a guest that answers one request at
// a time).
func labDefaults(n int) labSettings {
	if n > 8 {
		return labSettings{heartbeat: 100 * time.Millisecond, failureTimeout: time.Second, holdCapacity: 512, logRingBytes: 2 << 20}
	}
	return labSettings{heartbeat: 10 * time.Millisecond, failureTimeout: 50 * time.Millisecond, holdCapacity: 4096}
}

// labVMs are the lab's n VMs run by engine: lab.VM(1) to lab.VM(n).
func labVMs(n int, engine, guestDir string) ([]VMConfig, error) {
	if n < 1 || n > lab.MaxVMs {
		return nil, fmt.Errorf("--vms %d: the lab protects 1 to %d VMs (VM i sits at 192.0.2.(9+i), below the client's 192.0.2.100)", n, lab.MaxVMs)
	}
	if engine == engineQEMU && n > 1 {
		return nil, fmt.Errorf("--vms %d with --guest qemu: the lab runs one real VM (two TCG VMs already keep both CPUs busy); use the synthetic guest for more", n)
	}
	first, err := labVM(engine, guestDir)
	if err != nil {
		return nil, err
	}
	vms := []VMConfig{first}
	for i := 2; i <= n; i++ {
		vm := lab.VM(i)
		vms = append(vms, VMConfig{Name: vm.Name, IP: vm.IP.String(), MAC: vm.MAC.String(), Tap: vm.Tap, Engine: engine})
	}
	return vms, nil
}

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
	// The kernel boots the VM directly; its disk holds the key-value
	// store's log (ftgw-init's ftgw.disk).
	kernel, initrd, disk := filepath.Join(guestDir, "vmlinuz"), filepath.Join(guestDir, "initrd.img"), filepath.Join(guestDir, "disk.qcow2")
	for _, p := range []string{kernel, initrd, disk} {
		if _, err := os.Stat(p); errors.Is(err, os.ErrNotExist) {
			fmt.Fprintf(os.Stderr, "lab: %s missing: running make guest\n", p)
			build := exec.Command("make", "guest")
			build.Stdout, build.Stderr = os.Stderr, os.Stderr
			if err := build.Run(); err != nil {
				return vm, fmt.Errorf("make guest (run it from the repository, or pass --guest-dir): %w", err)
			}
			break
		}
	}
	var err error
	for _, p := range []*string{&kernel, &initrd, &disk} {
		if *p, err = filepath.Abs(*p); err != nil {
			return vm, err
		}
	}
	vm.QEMU = QEMUConfig{Kernel: kernel, Initrd: initrd, Disk: disk}
	return vm, nil
}

func labUp(ctx context.Context, dir string, vms []VMConfig, settings labSettings) (err error) {
	if err := lab.Build(); err != nil {
		return err
	}
	defer func() {
		if err != nil {
			err = errors.Join(err, labDown(dir))
		}
	}()
	cfgs, err := labConfigs(dir, vms, settings)
	if err != nil {
		return err
	}
	for _, cfg := range cfgs {
		if err := startDaemon(ctx, dir, cfg.Name, cfg); err != nil {
			return err
		}
	}
	if vms[0].Engine == engineQEMU {
		return waitVMServes(ctx, 3*time.Minute)
	}
	return nil
}

// labConfigs writes the lab's PKI under dir and returns the two hosts'
// configs, the secondary's first: the primary dials it. Each host is named
// after its namespace, which its certificate carries and its peer pins.
// The peer addresses name the base port: the daemon puts the log channel
// of the VM at index i of vms (from 0) on port LogPort+i at both ends.
func labConfigs(dir string, vms []VMConfig, settings labSettings) ([]Config, error) {
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
		cfg.FailureTimeout = settings.failureTimeout
		// Both hosts see this directory: the lab's shared storage.
		cfg.Arbiter = "file:" + filepath.Join(dir, "arbiter")
		cfg.Uplink = lab.Uplink
		cfg.Heartbeat = settings.heartbeat
		cfg.HoldCapacity = settings.holdCapacity
		if settings.logRingBytes != 0 {
			cfg.LogRingBytes = settings.logRingBytes
		}
		// Loopback, in the host's namespace: lab.Scrape reads it there.
		cfg.Metrics = net.JoinHostPort("127.0.0.1", strconv.Itoa(lab.MetricsPort))
		cfg.StateDir = hostDir(dir, host.NS)
		cfg.VMs = slices.Clone(vms)
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
			return fmt.Errorf("daemon in %s exited at start (%v); its log:\n%s", ns, err, lab.Tail(filepath.Join(hd, "ftgw.log"), 20))
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("daemon in %s not ready after %s; its log:\n%s", ns, ready, lab.Tail(filepath.Join(hd, "ftgw.log"), 20))
		}
	}
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
	var errs []error
	perHost := make([][]Status, 2)
	many := false
	for i, host := range lab.Hosts[:2] {
		vms, err := daemonVMs(dir, host.NS)
		if err != nil {
			// A daemon without /vms protects one VM: its status is it.
			s, serr := daemonStatus(dir, host.NS)
			if serr != nil {
				errs = append(errs, fmt.Errorf("%s: %w", host.NS, serr))
				continue
			}
			vms = []Status{s}
		}
		perHost[i] = vms
		many = many || len(vms) > 1
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	// One row per host, as ever, for one VM; per host and VM for more.
	vmColumn := func(name string) string { return "" }
	if many {
		vmColumn = func(name string) string { return name + "\t" }
	}
	fmt.Fprintln(tw, vmColumn("VM")+"HOST\tSTATE\tROLE\tEPOCH\tHEAD\tACKED\tRECEIVED\tHELD\tLOG RTT\tGUEST PUTS\tGUEST DIGEST")
	// Each VM's two hosts side by side; both configs list the VMs alike.
	for j := range max(len(perHost[0]), len(perHost[1])) {
		for i, host := range lab.Hosts[:2] {
			if j >= len(perHost[i]) {
				continue
			}
			s := perHost[i][j]
			name := s.VM
			if name == "" {
				name = lab.VMName
			}
			gs, err := labGuestState(dir, host.NS, name)
			if err != nil {
				errs = append(errs, fmt.Errorf("%s guest of %s: %w", host.NS, name, err))
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
			fmt.Fprintf(tw, "%s%s\t%s\t%s\t%d\t%s\t%s\t%s\t%s\t%s\t%d\t%.12s\n", vmColumn(name), host.NS, s.State, s.Role, s.Epoch, head, acked, received, held, rtt, gs.Puts, gs.Digest)
		}
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
