package lab

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Faults that the nemesis injects into the lab beyond Crash and
// SetReplLink. Each returns its heal, which may be called more than once.

// partitions numbers the nftables tables partitions create, one each (two
// partitions of one host overlap: each heal deletes only its own).
var partitions atomic.Int64

// DropReplFrom drops, in ns, every packet it sends on the replication
// link: a one-way partition (the peer's packets still arrive).
func DropReplFrom(ns string) (heal func() error, err error) {
	table := fmt.Sprintf("ftgw_chaos_%d", partitions.Add(1))
	rules := fmt.Sprintf(`table inet %s {
	chain out {
		type filter hook output priority 0; policy accept;
		oifname %q counter drop
	}
}
`, table, ReplLink)
	if err := nft(ns, rules, "-f", "-"); err != nil {
		return nil, fmt.Errorf("one-way partition from %s: %w", ns, err)
	}
	return once(func() error { return nft(ns, "", "delete", "table", "inet", table) }), nil
}

func nft(ns, stdin string, args ...string) error {
	cmd := exec.Command("ip", append([]string{"netns", "exec", ns, "nft"}, args...)...)
	cmd.Stdin = strings.NewReader(stdin)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("nft %s in %s: %v: %s", strings.Join(args, " "), ns, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// The lab's arbiter is `file:` on a directory both hosts share, as shared
// storage would be. Cutting a host off from it is what a dead NFS mount
// does to that host: its reads of the claim hang (until the caller's
// deadline turns them into "unavailable"), and it cannot take the lock the
// other host takes. The daemon runs in a mount namespace of its own (`ip
// netns exec` makes one), so the cut is a bind mount there, over the
// arbiter's directory, of a directory whose claim is a FIFO nobody writes:
// the other host, and any daemon started later, still see the real one.

// HangArbiterFor cuts the daemon with pid off from the arbiter directory
// dir; work is a directory of the nemesis's own.
func HangArbiterFor(pid int, dir, work string) (heal func() error, err error) {
	hang, err := os.MkdirTemp(work, "arbiter-hang-")
	if err != nil {
		return nil, err
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	// The lab's VM has a claim from its first boot on; a missing one
	// would read as epoch 0, which is no outage but a lie.
	claims := []string{VMName + ".claim"}
	for _, e := range entries {
		if strings.HasSuffix(e.Name(), ".claim") && e.Name() != claims[0] {
			claims = append(claims, e.Name())
		}
	}
	var fifos []string
	for _, name := range claims {
		fifo := filepath.Join(hang, name)
		if err := unix.Mkfifo(fifo, 0o600); err != nil {
			return nil, fmt.Errorf("hang arbiter: %w", err)
		}
		fifos = append(fifos, fifo)
	}
	if err := nsenterMount(pid, "mount", "--bind", hang, dir); err != nil {
		return nil, fmt.Errorf("hang arbiter for pid %d: %w", pid, err)
	}
	return once(func() error {
		// A daemon that is gone took its mount namespace with it.
		var err error
		// (A zombie has no namespaces left either.)
		if _, serr := os.Stat(fmt.Sprintf("/proc/%d/ns/mnt", pid)); serr == nil {
			// Lazily: the daemon's readers stuck on the FIFO keep the
			// mount busy until they wake, below.
			err = nsenterMount(pid, "umount", "--lazy", dir)
		}
		// Readers stuck on a FIFO wake with EOF once a writer comes and
		// goes (they read an empty, undecodable claim, past their
		// callers' deadlines). Without a reader the open fails: fine.
		for _, fifo := range fifos {
			if f, ferr := os.OpenFile(fifo, os.O_WRONLY|syscall.O_NONBLOCK, 0); ferr == nil {
				f.Close()
			}
		}
		return err
	}), nil
}

func nsenterMount(pid int, args ...string) error {
	cmd := exec.Command("nsenter", append([]string{"-t", strconv.Itoa(pid), "-m", "--"}, args...)...)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("%s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// SlowArbiter makes the file arbiter in dir slow for vm: it holds the
// claim lock for hold at a time, letting go for a moment between, so each
// claim waits up to hold (reads take no lock and stay fast). Stop lets go.
func SlowArbiter(dir, vm string, hold time.Duration) (stop func() error, err error) {
	f, err := os.OpenFile(filepath.Join(dir, vm+".lock"), os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("slow arbiter: %w", err)
	}
	done, stopped := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(stopped)
		defer f.Close()
		for {
			if err := lockWithin(f, time.Second, done); err != nil {
				return
			}
			select {
			case <-done:
				unix.Flock(int(f.Fd()), unix.LOCK_UN)
				return
			case <-time.After(hold):
			}
			unix.Flock(int(f.Fd()), unix.LOCK_UN)
			// Long enough for a waiting claimer's poll (2ms) to get in.
			select {
			case <-done:
				return
			case <-time.After(5 * time.Millisecond):
			}
		}
	}()
	return once(func() error {
		close(done)
		<-stopped
		return nil
	}), nil
}

func lockWithin(f *os.File, timeout time.Duration, done <-chan struct{}) error {
	deadline := time.Now().Add(timeout)
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			return nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) || time.Now().After(deadline) {
			return err
		}
		select {
		case <-done:
			return errors.New("stopped")
		case <-time.After(time.Millisecond):
		}
	}
}

// once makes heal safe to call again: the second call returns the first's
// result.
func once(heal func() error) func() error {
	var o sync.Once
	var err error
	return func() error {
		o.Do(func() { err = heal() })
		return err
	}
}
