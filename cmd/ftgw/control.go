package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"runtime/debug"
	"text/tabwriter"
	"time"

	"github.com/ftgw/ftgw/pkg/lockstep"
	"github.com/ftgw/ftgw/pkg/protect"
)

// The operator's commands: each addresses one daemon through its control
// socket, a unix socket only root can open (state_dir/control.sock).

// newFlagSet is a subcommand's flags, with a usage that says what it does;
// -h prints it and exits 0.
func newFlagSet(name, synopsis, what string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: ftgw %s %s\n\n%s\n\nFlags:\n", name, synopsis, what)
		fs.PrintDefaults()
	}
	return fs
}

// socketFlag is the --socket flag, the daemon's control socket, and the
// --vm flag, the VM a command is about.
func socketFlag(fs *flag.FlagSet) (socket, vm *string) {
	return fs.String("socket", controlPath(defaultConfig().StateDir), "the daemon's control `socket` (state_dir/control.sock)"),
		fs.String("vm", "", "the `name` of the VM, on a host that protects several (default: the first in its config)")
}

func statusCommand(ctx context.Context, args []string) error {
	fs := newFlagSet("status", "[--socket PATH] [--vm NAME] [--json]", "Where this host stands for its VM: state, role, epoch, log positions, the peer's link.")
	socket, vm := socketFlag(fs)
	asJSON := fs.Bool("json", false, "print the daemon's status as JSON")
	if err := fs.Parse(args); err != nil {
		return err
	}
	s, err := statusAt(*socket, *vm)
	if err != nil {
		return fmt.Errorf("read status from %s (is the daemon running?): %w", *socket, err)
	}
	if *asJSON {
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(s)
	}
	printStatus(os.Stdout, s)
	return nil
}

// printStatus shows one daemon's status for an operator.
func printStatus(w io.Writer, s Status) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	link := "down"
	if s.Connected {
		link = fmt.Sprintf("up, rtt %.0fµs", s.RTTMicros)
	}
	fmt.Fprintf(tw, "vm\t%s\nhost\t%s\nstate\t%s\nrole\t%s\nepoch\t%d\nlog incarnation\t%s\n", s.VM, s.Host, s.State, s.Role, s.Epoch, s.Incarnation)
	switch s.State {
	case protect.Standby.String(), protect.Joining.String():
		fmt.Fprintf(tw, "log received\t%d\n", s.Received)
	default:
		fmt.Fprintf(tw, "log head\t%d\nlog acked\t%d\noutputs held\t%d\n", s.Head, s.Acked, s.Held)
	}
	fmt.Fprintf(tw, "peer link\t%s\nserved alone\t%.3fs in all\n", link, s.UnprotectedSeconds)
	if rp := s.Reprotect; rp != nil {
		if rp.Error != "" {
			fmt.Fprintf(tw, "re-protection\tlast try failed: %s\n", rp.Error)
		} else {
			fmt.Fprintf(tw, "re-protection\tthe new secondary acked %d of %d\n", rp.Acked, rp.TakeoverAfter)
		}
	}
	if f := s.LastFailover; f != nil {
		fmt.Fprintf(tw, "last failover\t%s, won %v, epoch %d: detection %s, arbitration %s, go-live %s\n",
			f.Cause, f.Won, f.Epoch, f.Detection.Round(time.Microsecond), f.Arbitration.Round(time.Microsecond), f.GoLive.Round(time.Microsecond))
	}
	tw.Flush()
}

// reprotectCommand waits until the daemon at --socket serves its VM
// protected again, reporting progress. Re-protection itself needs no
// command: a host that serves alone rebuilds the first peer that joins it
// (a peer whose daemon starts, or that lost the VM to this host).
func reprotectCommand(ctx context.Context, args []string) error {
	fs := newFlagSet("reprotect", "[--socket PATH] [--vm NAME] [--timeout D]", "Wait until this host's VM is protected again, and show how it goes.\nA host that serves alone re-protects on its own: it rebuilds its peer from a\nsnapshot as soon as the peer's daemon runs.")
	socket, vm := socketFlag(fs)
	timeout := fs.Duration("timeout", 5*time.Minute, "how long to wait")
	if err := fs.Parse(args); err != nil {
		return err
	}
	start, last := time.Now(), ""
	var s Status
	err := waitUntil(ctx, *timeout, "the VM to be protected", func() (bool, error) {
		var err error
		if s, err = statusAt(*socket, *vm); err != nil {
			return false, err
		}
		msg := s.State
		switch s.State {
		case protect.Protected.String():
			return true, nil
		case protect.Unprotected.String():
			msg = "serving alone: waiting for the peer's daemon to join"
		case protect.Reprotecting.String():
			if rp := s.Reprotect; rp != nil {
				msg = fmt.Sprintf("rebuilding the peer: it acked %d of %d", rp.Acked, rp.TakeoverAfter)
			}
		case protect.Standby.String(), protect.Joining.String(), protect.Passive.String():
			return false, fmt.Errorf("this host is %s: run the command on the host that serves the VM", s.State)
		}
		if msg != last {
			fmt.Printf("%6.1fs  %s\n", time.Since(start).Seconds(), msg)
			last = msg
		}
		return false, nil
	})
	if err != nil {
		return err
	}
	fmt.Printf("%6.1fs  protected at epoch %d; served alone %.3fs in all\n", time.Since(start).Seconds(), s.Epoch, s.UnprotectedSeconds)
	return nil
}

// buildVersion is the module's version and the VCS revision it was built
// from, as the Go toolchain recorded them.
func buildVersion() (version, revision string) {
	version, revision = "(devel)", "unknown"
	info, ok := debug.ReadBuildInfo()
	if !ok {
		return version, revision
	}
	if info.Main.Version != "" {
		version = info.Main.Version
	}
	for _, s := range info.Settings {
		switch s.Key {
		case "vcs.revision":
			revision = s.Value
		case "vcs.modified":
			if s.Value == "true" {
				revision += "+dirty"
			}
		}
	}
	return version, revision
}

func versionCommand(args []string) error {
	fs := newFlagSet("version", "", "The version of ftgw and what built it.")
	if err := fs.Parse(args); err != nil {
		return err
	}
	version, revision := buildVersion()
	info, _ := debug.ReadBuildInfo()
	goVersion := "unknown"
	if info != nil {
		goVersion = info.GoVersion
	}
	fmt.Printf("ftgw %s (revision %s, %s, lockstep protocol %d)\n", version, revision, goVersion, lockstep.Version)
	return nil
}
