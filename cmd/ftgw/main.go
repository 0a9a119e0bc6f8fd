// Command ftgw is the fault-tolerance gateway: the daemon that protects a VM
// on one host, the synthetic guest, the two-host lab and its benchmark.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"syscall"

	"github.com/ftgw/ftgw/pkg/datapath"
	"github.com/ftgw/ftgw/pkg/guest"
)

const usage = `ftgw: fault tolerance for VMs, with the Output Rule enforced in XDP.

Usage:
  ftgw run --config FILE [--verbose]   serve one host's side of a protected VM
  ftgw status [--socket PATH]          where this host stands for its VM
  ftgw switchover [--socket PATH]      planned move of the VM from this host to its standby
  ftgw reprotect [--socket PATH]       wait until the VM this host serves is protected again
  ftgw version                         the version of ftgw
  ftgw guest --tap T --ip IP --mac MAC  run the synthetic deterministic guest
  ftgw lab up|down|status|...          the two-host lab on this machine
  ftgw bench [flags]                   measure the lab: commit latency and rates; a --guest qemu
                                       lab: latency and bulk rate, unprotected against protected
  ftgw bench --failover N              N random failovers under load, checked
  ftgw bench --chaos N [--seed S] [--guest qemu]  N random fault schedules, every history checked

The daemon's control socket (default /run/ftgw/control.sock) is root's only.
Run "ftgw COMMAND -h" for a command's flags.
`

func main() {
	if len(os.Args) < 2 {
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	var err error
	switch cmd, args := os.Args[1], os.Args[2:]; cmd {
	case "run":
		err = runCommand(ctx, args)
	case "status":
		err = statusCommand(ctx, args)
	case "switchover":
		err = switchoverCommand(ctx, args)
	case "reprotect":
		err = reprotectCommand(ctx, args)
	case "version", "--version":
		err = versionCommand(args)
	case "guest":
		err = guestCommand(ctx, args)
	case "lab":
		err = labCommand(ctx, args)
	case "bench":
		err = benchCommand(ctx, args)
	case "-h", "--help", "help":
		fmt.Print(usage)
	default:
		fmt.Fprintf(os.Stderr, "ftgw: unknown command %q\n\n%s", cmd, usage)
		os.Exit(2)
	}
	switch {
	case errors.Is(err, flag.ErrHelp):
		os.Exit(0) // -h: the usage went out, as asked
	case errors.Is(err, errUsage):
		os.Exit(2)
	case err != nil:
		fmt.Fprintf(os.Stderr, "ftgw %s: %v\n", os.Args[1], err)
		os.Exit(1)
	}
}

// errUsage: the command line was wrong; the usage went to stderr.
var errUsage = errors.New("usage")

func newLogger(verbose bool) *slog.Logger {
	level := slog.LevelInfo
	if verbose {
		level = slog.LevelDebug
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
}

func runCommand(ctx context.Context, args []string) error {
	fs := newFlagSet("run", "--config FILE [--verbose]", "Serve one host's side of a protected VM, as its configuration says.")
	configPath := fs.String("config", "", "YAML configuration `file`")
	verbose := fs.Bool("verbose", false, "debug logs and the full BPF verifier log on load errors")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *configPath == "" {
		return errors.New("--config is required")
	}
	cfg, err := loadConfig(*configPath)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(cfg.StateDir, 0o755); err != nil {
		return fmt.Errorf("create state dir: %w", err)
	}
	return run(ctx, cfg, newLogger(*verbose), *verbose)
}

func guestCommand(ctx context.Context, args []string) error {
	fs := newFlagSet("guest", "--tap T --ip IP --mac MAC [--control SOCK] [--restore FILE]", "Run the synthetic deterministic guest on a tap (the daemon starts it).")
	tapName := fs.String("tap", "", "tap device the guest owns")
	ipFlag := fs.String("ip", "", "the guest's IPv4 address")
	macFlag := fs.String("mac", "", "the guest's MAC address")
	control := fs.String("control", "", "unix socket answering STATE (optional)")
	restore := fs.String("restore", "", "start from this snapshot (a JSON STATE) instead of empty")
	stateFD := fs.Int("log-state-fd", -1, "internal: the data path's log state, inherited from the daemon, to publish how far the guest has taken its input")
	holdCapacity := fs.Uint64("hold-capacity", 0, "internal: with --log-state-fd, the hold queue's capacity: BLAST waits for the queue rather than overflow it")
	if err := fs.Parse(args); err != nil {
		return err
	}
	ip, err := netip.ParseAddr(*ipFlag)
	if err != nil {
		return fmt.Errorf("--ip: %w", err)
	}
	mac, err := net.ParseMAC(*macFlag)
	if err != nil {
		return fmt.Errorf("--mac: %w", err)
	}
	if *tapName == "" {
		return errors.New("--tap is required")
	}
	cfg := guest.Config{Tap: *tapName, IP: ip, MAC: mac, Control: *control}
	if *restore != "" {
		raw, err := os.ReadFile(*restore)
		if err != nil {
			return fmt.Errorf("--restore: %w", err)
		}
		cfg.Restore = new(guest.State)
		if err := json.Unmarshal(raw, cfg.Restore); err != nil {
			return fmt.Errorf("--restore %s: %w", *restore, err)
		}
	}
	if *stateFD >= 0 {
		f := os.NewFile(uintptr(*stateFD), "log-state")
		counter, err := datapath.OpenGuestCounter(f)
		f.Close()
		if err != nil {
			return fmt.Errorf("--log-state-fd: %w", err)
		}
		defer counter.Close()
		cfg.OnTaken = counter.Taken
		if *holdCapacity > 0 {
			cfg.Backpressure = &guest.Backpressure{Backlog: counter.HoldBacklog, Capacity: *holdCapacity}
		}
	}
	return guest.Run(ctx, cfg, newLogger(false))
}
