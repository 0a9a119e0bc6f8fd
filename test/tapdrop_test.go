package test

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ftgw/ftgw/internal/lab"
)

// Hole 9 of the fault campaign: the data path logs a frame before it hands
// it to the tap, and the tap drops it once the guest is a full queue (4096
// frames) behind. That frame reached the secondary's guest and not the
// primary's: the copies differ, and the secondary must not take over with
// its copy. The primary sees the drop, gives the secondary up and rebuilds
// it from a snapshot: afterwards the two guests are equal again.
func TestTapDropAfterLoggingRebuildsTheSecondary(t *testing.T) {
	labUp(t)
	c := kvClient(t)
	if _, err := c.Put("warm", "up"); err != nil { // the client learns the VM's MAC
		t.Fatal(err)
	}
	pid := guestPid(t, lab.NSPrimary)
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	stopped := true
	defer func() {
		if stopped {
			syscall.Kill(pid, syscall.SIGCONT)
		}
	}()
	const flood = 6000 // more than the tap's queue
	sendPuts(t, "flood", flood)
	time.Sleep(500 * time.Millisecond)
	syscall.Kill(pid, syscall.SIGCONT)
	stopped = false

	waitFor(t, 30*time.Second, "the primary to be protected again by a rebuilt secondary", func() bool {
		a, err := tryHostStatus(lab.NSPrimary)
		return err == nil && a["state"] == "protected" && a["last_reprotect"] != nil
	})
	if _, err := c.Put("after", "rebuild"); err != nil {
		t.Fatal(err)
	}
	primary, secondary := waitReplicated(t)
	if primary.Digest != secondary.Digest || primary.Puts != secondary.Puts {
		t.Errorf("guest states differ after the rebuild: primary %d puts (%s), secondary %d puts (%s)",
			primary.Puts, primary.Digest, secondary.Puts, secondary.Digest)
	}
	// Some of the flood was dropped (else the test proved nothing): the
	// primary's guest took in fewer PUTs than were sent.
	if primary.Puts >= flood+2 {
		t.Errorf("the primary's guest took all %d PUTs: the tap dropped nothing", flood)
	}
	t.Logf("the primary's guest took %d of %d PUTs; rebuilt, both copies have %d", primary.Puts-2, flood, secondary.Puts)
}

// guestPid is the synthetic guest process of the daemon in ns (its child).
func guestPid(t *testing.T, ns string) int {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join(labDir, ns, "ftgw.pid"))
	if err != nil {
		t.Fatal(err)
	}
	daemon := strings.TrimSpace(string(raw))
	tasks, err := os.ReadDir(filepath.Join("/proc", daemon, "task"))
	if err != nil {
		t.Fatal(err)
	}
	for _, task := range tasks {
		children, _ := os.ReadFile(filepath.Join("/proc", daemon, "task", task.Name(), "children"))
		for _, f := range strings.Fields(string(children)) {
			cmdline, _ := os.ReadFile(filepath.Join("/proc", f, "cmdline"))
			if strings.Contains(string(cmdline), "guest\x00") {
				pid, err := strconv.Atoi(f)
				if err == nil {
					return pid
				}
			}
		}
	}
	t.Fatalf("no guest process under the daemon %s in %s", daemon, ns)
	return 0
}
