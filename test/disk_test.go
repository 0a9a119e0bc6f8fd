package test

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ftgw/ftgw/internal/lab"
	"github.com/ftgw/ftgw/pkg/guest"
	"github.com/ftgw/ftgw/pkg/replay"
)

// The real VM's disk: the lab's guest keeps its key-value store in a log on
// its virtio-blk disk, appended and fsynced before each reply, and reloads
// it at boot. Each host's copy of the VM writes its own copy of the disk.

// TestRealVMDiskKeepsEveryAcknowledgedWrite crashes the primary host under
// a load of several clients overwriting a few keys: the new primary has
// every acknowledged write. Then the survivor's host is lost too, and the
// VM boots from the survivor's disk alone, with none of its memory: every
// acknowledged write is still there. Both are judged by porcupine on the
// whole history, final reads included.
func TestRealVMDiskKeepsEveryAcknowledgedWrite(t *testing.T) {
	qemuPairUp(t, "--disk")
	l := startLoad(t)
	waitAcked(t, l, 100)
	crashed := crashHost(t, lab.NSPrimary)
	waitLive(t, lab.NSSecondary)
	waitAcked(t, l, l.Acked()+100)
	h := l.Stop()
	keys := loadKeys(h)
	c := kvClient(t)
	finalReads(t, h, c, keys, "the new primary")
	checkHistory(t, h, crashed)

	// The survivor's disk, alone: its host dies (its QEMU with its
	// daemon), and the VM boots from a copy of that disk.
	machine, pid := labQEMU(t, lab.NSSecondary)
	disk := filepath.Join(labDir, lab.NSSecondary, lab.VMName+"-qemu", "disk.qcow2")
	crashHost(t, lab.NSSecondary)
	// QEMU dies with its daemon (SIGKILL on the parent's death), a moment
	// after it.
	waitFor(t, 10*time.Second, "the survivor's QEMU to die", func() bool { return syscall.Kill(pid, 0) != nil })
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	start := time.Now()
	vm, err := lab.StartPlainVM(ctx, lab.PlainVMConfig{Machine: machine, Disk: disk})
	if err != nil {
		t.Fatal(err)
	}
	defer vm.Close()
	loaded := regexp.MustCompile(`ftgw-init loaded (\d+) puts`).FindStringSubmatch(vm.Console())
	if loaded == nil {
		t.Fatalf("the VM booted from the disk did not load its store; console:\n%s", tailLines(vm.Console(), 10))
	}
	t.Logf("booted from %s's disk alone in %s: it loaded %s PUTs", lab.NSSecondary, time.Since(start).Round(time.Millisecond), loaded[1])
	if n, _ := strconv.Atoi(loaded[1]); n < countAcked(h) {
		t.Errorf("the disk holds %d PUTs, but %d were acknowledged", n, countAcked(h))
	}
	rc, err := vm.DialKV(time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	finalReads(t, h, rc, keys, "the VM booted from the disk alone")
	checkHistory(t, h, crashed)
}

// TestRealVMReprotectionCopiesTheDisk loses the secondary's host under a
// write load; the survivor rebuilds a new secondary, whose disk comes with
// the snapshot of the running VM, and the writes after it are replayed
// onto it. With the VM paused, the two hosts' disks hold the same bytes.
func TestRealVMReprotectionCopiesTheDisk(t *testing.T) {
	qemuPairUp(t, "--disk")
	l := startLoad(t)
	waitAcked(t, l, 50)
	// The load stops before the snapshot: a disk write in flight when the
	// recorder saves its state is a known race (docs/ARCHITECTURE.md,
	// "Disks").
	var h *lab.History
	crashed := loseTheSecondaryThenReprotect(t, func() {
		waitAcked(t, l, l.Acked()+50)
		h = l.Stop()
	})
	c := kvClient(t)
	for i := range 20 {
		if _, err := c.Put(fmt.Sprintf("after%d", i), "v"); err != nil {
			t.Fatalf("PUT after re-protection: %v", err)
		}
	}
	finalReads(t, h, c, loadKeys(h), "the primary")
	checkHistory(t, h, crashed)

	// The load has stopped: once the new secondary has replayed the last
	// request, pause the VM and compare the disks.
	want := lastState(console(t, lab.NSPrimary))
	waitFor(t, time.Minute, "the new secondary to replay the last request", func() bool {
		return lastState(console(t, lab.NSSecondary)) == want
	})
	_, pid := labQEMU(t, lab.NSPrimary)
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	defer syscall.Kill(pid, syscall.SIGCONT)
	digests := map[string]string{}
	for _, ns := range []string{lab.NSPrimary, lab.NSSecondary} {
		d, err := replay.DiskDigest(filepath.Join(labDir, ns, lab.VMName+"-qemu", "disk.qcow2"))
		if err != nil {
			t.Fatal(err)
		}
		digests[ns] = d
	}
	syscall.Kill(pid, syscall.SIGCONT)
	t.Logf("disk SHA-256 with the VM paused at %q: %s %s, %s %s", want,
		lab.NSPrimary, digests[lab.NSPrimary], lab.NSSecondary, digests[lab.NSSecondary])
	if digests[lab.NSPrimary] != digests[lab.NSSecondary] {
		t.Errorf("the disks differ after re-protection")
	}
}

// loadKeys are the keys a load's history wrote or read.
func loadKeys(h *lab.History) []string {
	seen := map[string]bool{}
	var keys []string
	for _, op := range h.Ops() {
		if !seen[op.Key] {
			seen[op.Key] = true
			keys = append(keys, op.Key)
		}
	}
	return keys
}

// countAcked is the number of acknowledged PUTs in h.
func countAcked(h *lab.History) int {
	n := 0
	for _, op := range h.Ops() {
		if op.Kind == lab.OpPut && op.Outcome == lab.OutcomeOK {
			n++
		}
	}
	return n
}

// finalReads reads every key through c, after every operation of h has
// returned, and adds the reads to h as one more client's: a lost
// acknowledged write makes the history illegal.
func finalReads(t *testing.T, h *lab.History, c *guest.Client, keys []string, where string) {
	t.Helper()
	client := 0
	for _, op := range h.Ops() {
		client = max(client, op.Client+1)
	}
	for _, key := range keys {
		op := lab.Op{Client: client, Kind: lab.OpGet, Key: key, Invoke: time.Now()}
		var err error
		op.Value, op.Found, err = c.Get(key)
		op.Return = time.Now()
		if err != nil {
			t.Fatalf("final read of %s on %s: %v", key, where, err)
		}
		op.Outcome = lab.OutcomeOK
		h.Add(op)
	}
}

// labQEMU finds the QEMU that host ns runs for the lab's VM: its machine,
// read back from its command line (what the daemon really started), and
// its pid.
func labQEMU(t *testing.T, ns string) (replay.Machine, int) {
	t.Helper()
	dir := filepath.Join(labDir, ns, lab.VMName+"-qemu")
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		raw, err := os.ReadFile(p)
		if err != nil || !bytes.Contains(raw, []byte("qemu-system")) || !bytes.Contains(raw, []byte(dir+"/")) {
			continue
		}
		args := strings.Split(strings.TrimRight(string(raw), "\x00"), "\x00")
		m := replay.Machine{MAC: lab.VMMAC}
		for i := 0; i+1 < len(args); i++ {
			switch v := args[i+1]; args[i] {
			case "-kernel":
				m.Kernel = v
			case "-initrd":
				m.Initrd = v
			case "-append":
				m.Cmdline = v
			case "-m":
				m.MemoryMB, _ = strconv.Atoi(v)
			case "-drive":
				m.Disk = m.Disk || strings.Contains(v, "id=disk0")
			}
		}
		pid, _ := strconv.Atoi(filepath.Base(filepath.Dir(p)))
		return m, pid
	}
	t.Fatalf("no QEMU runs for %s", dir)
	return replay.Machine{}, 0
}
