package replay

import (
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ftgw/ftgw/pkg/guest"
)

// TestReplayerFromARecorderSnapshotFollowsTheRecorder is re-basing at its
// source, in the hard case: a recorder that itself started from a go-live
// snapshot saves its state while it serves writes; a new replayer loads
// that state (PrepareRecorderSnapshot) and follows the same recorder's log
// from the snapshot on: it reproduces every write after it, and only those.
// Without the patch it stalls at the snapshot.
func TestReplayerFromARecorderSnapshotFollowsTheRecorder(t *testing.T) {
	p := newPair(t)
	base := t.TempDir()
	dirA, dirB := filepath.Join(base, "a"), filepath.Join(base, "b")

	p.promote(dirA, dirB)

	// C records from the go-live snapshot, serves 10 writes, and is
	// re-based while it serves 10 more.
	c, logC, doneC := p.record(dirB, "golive", newLogState(t))
	p.puts(11, 20)
	p.rebase(c, dirB, logC, doneC, filepath.Join(base, "d"), 21, 30)
}

// The easy case: a recorder that booted the VM.
func TestReplayerFromABootRecorderSnapshotFollowsTheRecorder(t *testing.T) {
	p := newPair(t)
	base := t.TempDir()
	dirA := filepath.Join(base, "a")
	a, logA, doneA := p.record(dirA, "", newLogState(t))
	if err := WaitSerial(p.ctx, dirA, "ftgw-init ready"); err != nil {
		t.Fatal(err)
	}
	p.puts(1, 10)
	p.rebase(a, dirA, logA, doneA, filepath.Join(base, "d"), 11, 20)
}

// promote is a secondary's life up to its go-live: A boots in dirA and
// serves writes 1 to 10, B replays them in dirB from A's streamed log, A
// stops, and B replays to the end and saves its state as "golive".
func (p *pair) promote(dirA, dirB string) {
	t := p.t
	t.Helper()
	a, logA, doneA := p.record(dirA, "", newLogState(t))
	b, relayB := p.replay(dirB, "", streamRelay, func(r *Relay) { logA.feed(r, rand.New(rand.NewPCG(1, 2))) })
	if err := WaitSerial(p.ctx, dirA, "ftgw-init ready"); err != nil {
		t.Fatal(err)
	}
	p.puts(1, 10)
	a.Stop()
	<-doneA
	p.replayAll(b, relayB, logA, nil)
	if err := b.SaveVM("golive"); err != nil {
		t.Fatal(err)
	}
	b.Stop()
}

// puts writes keys from to to through the recorder's tap.
func (p *pair) puts(from, to int) {
	t := p.t
	t.Helper()
	client, err := guest.Dial("192.0.2.1:7000", 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	for i := from; i <= to; i++ {
		if n, err := client.Put(fmt.Sprintf("k%d", i), "v"); err != nil || n != uint64(i) {
			t.Fatalf("put %d: %d, %v", i, n, err)
		}
	}
}

// rebase saves the running recorder rec's state (in dir's image), starts a
// new replayer in newDir from a copy of it, and has it follow rec's log
// while rec serves the writes from to to; then rec stops and the replayer
// must have reproduced its console from the snapshot on, writes from to
// to included, and no write before from.
func (p *pair) rebase(rec *QEMU, dir string, log *capturedLog, done <-chan struct{}, newDir string, from, to int) {
	t := p.t
	t.Helper()
	start := time.Now()
	if err := rec.SaveRecorderVM("rebase"); err != nil {
		t.Fatal(err)
	}
	paused := time.Since(start)
	image, err := os.ReadFile(VMStatePath(dir))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(newDir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(VMStatePath(newDir), image, 0o644); err != nil {
		t.Fatal(err)
	}
	if p.machine.Disk {
		if err := ExportDiskSnapshot(dir, "rebase", DiskPath(newDir)); err != nil {
			t.Fatal(err)
		}
	}
	snap, err := PrepareRecorderSnapshot(VMStatePath(newDir), "rebase", func(off int64) (Clocks, error) {
		// QEMU may not have flushed its log up to the snapshot yet.
		waitFor(t, "the log to reach the snapshot", func() bool {
			log.mu.Lock()
			defer log.mu.Unlock()
			return int64(len(log.data)) >= off
		})
		log.mu.Lock()
		defer log.mu.Unlock()
		return LastClocks(log.data[:off])
	})
	if err != nil {
		t.Fatal(err)
	}
	log.mu.Lock()
	startup, ok, err := StartupEvents(log.data)
	log.mu.Unlock()
	if err != nil || !ok {
		t.Fatalf("the recorder's start-up events: %v, %v", ok, err)
	}

	rep, relay := p.replay(newDir, "rebase", func(w io.Writer) *Relay {
		r, err := NewRelayFromRecorderSnapshot(w, startup, snap)
		if err != nil {
			t.Error(err)
		}
		return r
	}, func(r *Relay) {
		log.mu.Lock()
		log.fed = int(snap.LogOffset)
		log.mu.Unlock()
		log.feed(r, rand.New(rand.NewPCG(3, 4)))
	})
	p.puts(from, to)
	rec.Stop()
	<-done
	p.replayAll(rep, relay, log, func(icount uint64) string { return eventsAround(log.data, icount) })

	recSerial, repSerial := readFile(t, SerialPath(dir)), readFile(t, SerialPath(newDir))
	last := fmt.Sprintf("ftgw-kv req=%d puts=%d ", to, to)
	if !strings.Contains(repSerial, last) || !strings.Contains(recSerial, repSerial) {
		t.Fatalf("the new replayer's console is not the recorder's from the snapshot up to %q:\nrecorder:\n%s\nreplayer:\n%s",
			last, tailLines(recSerial, 12), tailLines(repSerial, 12))
	}
	if before := fmt.Sprintf("puts=%d ", from-1); strings.Contains(repSerial, before) {
		t.Errorf("the new replayer replayed writes from before the snapshot (%q):\n%s", before, repSerial)
	}
	n, _ := rep.Icount()
	t.Logf("the recorder paused %s to save its state (%d bytes of image) at icount %d, log offset %d of %d; the new replayer replayed %d bytes of log to icount %d",
		paused.Round(time.Millisecond), len(image), snap.Icount, snap.LogOffset, len(log.data), len(log.data)-int(snap.LogOffset), n)
}
