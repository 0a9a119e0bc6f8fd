package replay

import (
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ftgw/ftgw/internal/testutil"
	"github.com/ftgw/ftgw/pkg/guest"
)

// TestDiskCopiesStayIdentical runs the guest with a disk it writes (its
// key-value store's log, fsynced before each reply), each copy of the VM on
// its own image, through a whole life: a replayer from boot ends with the
// recorder's disk; it goes live (savevm, and a recorder that loads it,
// which reverts the disk to the snapshot); and a new replayer rebuilt from
// that recorder's snapshot, whose disk ExportDiskSnapshot takes while the
// recorder writes on, ends with that recorder's disk too, byte for byte.
func TestDiskCopiesStayIdentical(t *testing.T) {
	p := newPair(t)
	p.machine.Disk = true
	p.machine.Cmdline += " ftgw.disk=/dev/vda"
	base := t.TempDir()
	empty := filepath.Join(base, "empty.qcow2")
	if err := qemuImg("create", "-q", "-f", "qcow2", empty, "64M"); err != nil {
		t.Fatal(err)
	}
	dirA, dirB, dirD := filepath.Join(base, "a"), filepath.Join(base, "b"), filepath.Join(base, "d")
	for _, dir := range []string{dirA, dirB} {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := CopyDisk(empty, DiskPath(dir)); err != nil {
			t.Fatal(err)
		}
	}
	sameDisks := func(what string, dirs ...string) {
		t.Helper()
		var digests []string
		for _, dir := range append([]string{empty}, dirs...) {
			image := DiskPath(dir)
			if dir == empty {
				image = empty
			}
			d, err := DiskDigest(image)
			if err != nil {
				t.Fatal(err)
			}
			digests = append(digests, d)
		}
		t.Logf("%s: disk digests %.12s (empty), %.12s", what, digests[0], digests[1:])
		if digests[1] == digests[0] {
			t.Fatalf("%s: the guest wrote nothing to its disk", what)
		}
		for i, d := range digests[2:] {
			if d != digests[1] {
				t.Errorf("%s: the disk in %s differs from the one in %s", what, dirs[i+1], dirs[0])
			}
		}
	}

	// A boots and serves 10 writes; B replays them from boot and goes
	// live.
	p.promote(dirA, dirB)
	sameDisks("a replayer from boot", dirA, dirB)

	// C records from B's go-live snapshot, on B's disk, and is re-based on
	// D while it writes.
	c, logC, doneC := p.record(dirB, "golive", newLogState(t))
	p.puts(11, 20)
	p.rebase(c, dirB, logC, doneC, dirD, 21, 30)
	sameDisks("a replayer from a recorder's snapshot", dirB, dirD)
}

// TestFirmwareBootFromDiskReplays records a VM that boots from its disk
// (make guest's: SeaBIOS, syslinux, then the guest, whose store is on the
// disk's partition 2) with no -kernel, and replays it from boot on its own
// copy: the replay reproduces the recorder's console and its disk.
func TestFirmwareBootFromDiskReplays(t *testing.T) {
	p := newPair(t)
	kernel, _ := testutil.GuestImage(t)
	image := filepath.Join(filepath.Dir(kernel), "disk.qcow2")
	// The disk's own command line (syslinux.cfg) puts the guest here.
	const guestAddr = "192.0.2.10:7000"
	p.machine = Machine{MAC: pairMAC, Disk: true}
	base := t.TempDir()
	dirA, dirB := filepath.Join(base, "a"), filepath.Join(base, "b")
	for _, dir := range []string{dirA, dirB} {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := CopyDisk(image, DiskPath(dir)); err != nil {
			t.Fatal(err)
		}
	}
	a, logA, doneA := p.record(dirA, "", newLogState(t))
	b, relayB := p.replay(dirB, "", streamRelay, func(r *Relay) { logA.feed(r, rand.New(rand.NewPCG(5, 6))) })
	start := time.Now()
	if err := WaitSerial(p.ctx, dirA, "ftgw-init ready"); err != nil {
		t.Fatal(err)
	}
	t.Logf("the recorder booted from its disk in %s", time.Since(start).Round(time.Millisecond))
	client, err := guest.Dial(guestAddr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	for i := 1; i <= 10; i++ {
		if n, err := client.Put(fmt.Sprintf("k%d", i), "v"); err != nil || n != uint64(i) {
			t.Fatalf("put %d: %d, %v", i, n, err)
		}
	}
	client.Close()
	a.Stop()
	<-doneA
	p.replayAll(b, relayB, logA, nil)
	b.Stop()
	recSerial, repSerial := readFile(t, SerialPath(dirA)), readFile(t, SerialPath(dirB))
	if last := "ftgw-kv req=10 puts=10 "; !strings.Contains(repSerial, last) || !strings.HasPrefix(recSerial, repSerial) {
		t.Fatalf("the replay's console is not the recording's up to %q:\nrecorder:\n%s\nreplayer:\n%s", last, tailLines(recSerial, 5), tailLines(repSerial, 5))
	}
	da, err := DiskDigest(DiskPath(dirA))
	if err != nil {
		t.Fatal(err)
	}
	db, err := DiskDigest(DiskPath(dirB))
	if err != nil {
		t.Fatal(err)
	}
	if da != db {
		t.Errorf("the replayer's disk differs from the recorder's")
	}
}
