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
// it to the tap, and a tap whose guest is a full queue (4096 frames) behind
// drops it: a frame the secondary's guest would take and the primary's
// never saw. The data path keeps the guest within its budget instead (2048
// frames): what would go further is dropped before it is logged, like any
// network loss, and the copies stay equal.
func TestAGuestFarBehindLosesInputBeforeItIsLogged(t *testing.T) {
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
	behind := value(t, scrape(t, lab.NSPrimary), "ftgw_dropped_frames_total", map[string]string{"vm": lab.VMName, "reason": "guest_behind"})
	syscall.Kill(pid, syscall.SIGCONT)
	stopped = false

	// The guest works through the frames it was handed first.
	waitFor(t, 20*time.Second, "a PUT answered after the flood", func() bool {
		_, err := c.Put("after", "the flood")
		return err == nil
	})
	primary, secondary := waitReplicated(t)
	if primary.Digest != secondary.Digest || primary.Puts != secondary.Puts {
		t.Errorf("guest states differ: primary %d puts (%s), secondary %d puts (%s)",
			primary.Puts, primary.Digest, secondary.Puts, secondary.Digest)
	}
	a := hostStatus(t, lab.NSPrimary)
	if a["state"] != "protected" || float64(primary.Frames) != a["head"].(float64) {
		t.Errorf("primary %v with head %v, its guest took %d frames: want protected, and every logged frame taken", a["state"], a["head"], primary.Frames)
	}
	if behind == 0 || primary.Puts >= flood+2 {
		t.Errorf("%v frames dropped for the guest, %d of %d PUTs taken: the flood never outran the guest", behind, primary.Puts-2, flood)
	}
	t.Logf("%v frames dropped before logging while the guest was stopped; both copies took %d of %d PUTs", behind, primary.Puts-2, flood)
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
