package main

import (
	"bytes"
	"encoding/binary"
	"reflect"
	"strings"
	"testing"

	"github.com/ftgw/ftgw/pkg/replay"
)

// The recent log keeps the recorder's start-up events and the end of its
// log: a re-protection asks for the log from its snapshot's offset, and
// gets it, or an error that says it is gone.
func TestRecentLog(t *testing.T) {
	var r recentLog
	if _, _, err := r.since(0); err == nil {
		t.Fatal("the log of a recorder that has logged nothing is served")
	}
	r.restart(100)
	startup := []byte{byte(replay.KindClockHost), 0, 0, 0, 0, 0, 0, 0, 1, byte(replay.KindCheckpoint + 8)}
	r.append(startup[:4]) // cut inside an event
	if _, _, err := r.since(0); err == nil {
		t.Fatal("served before the start-up events are complete")
	}
	r.append(startup[4:])
	insn := []byte{byte(replay.KindInstruction), 0, 0, 0, 9}
	r.append(insn)
	gotStartup, log, err := r.since(int64(len(startup)))
	if err != nil || !bytes.Equal(gotStartup, startup) || !bytes.Equal(log, insn) {
		t.Fatalf("since the start-up: %x, %x, %v", gotStartup, log, err)
	}
	if _, log, err := r.since(r.end + 5); err != nil || len(log) != 0 {
		t.Fatalf("from past the end (a snapshot QEMU has not flushed yet): %x, %v", log, err)
	}

	// The clocks a replayer would have cached: the host clock's 1, logged
	// at byte 0, counts from byte 1 on.
	for _, c := range []struct {
		off    int64
		clocks replay.Clocks
		ok     bool
	}{{0, replay.Clocks{}, true}, {1, replay.Clocks{1, 0}, true}, {r.end, replay.Clocks{1, 0}, true}, {r.end + 1, replay.Clocks{}, false}} {
		if clocks, ok, err := r.clocksAt(c.off); err != nil || ok != c.ok || clocks != c.clocks {
			t.Errorf("clocks at %d: %v %v %v, want %v %v", c.off, clocks, ok, err, c.clocks, c.ok)
		}
	}

	// Past twice the bound, the tail keeps the last recentLogBytes.
	big := make([]byte, recentLogBytes)
	r.append(big)
	r.append(big)
	r.append(insn)
	if _, _, err := r.since(int64(len(startup))); err == nil || !strings.Contains(err.Error(), "gone") {
		t.Fatalf("log older than the tail: %v, want an error saying it is gone", err)
	}
	if _, log, err := r.since(r.end - int64(len(insn))); err != nil || !bytes.Equal(log, insn) {
		t.Fatalf("the newest bytes: %x, %v", log, err)
	}

	r.restart(500)
	if r.base != 500 || r.end != 0 || r.startupOK {
		t.Fatalf("after restart: base %d, end %d, start-up known %v", r.base, r.end, r.startupOK)
	}
	r.append(insn)
	if _, _, err := r.since(0); err == nil {
		t.Fatal("a log with an instruction before its reset checkpoint is served")
	}
}

// Chunk positions go on from a new channel's start head, and acks map back
// to the byte offsets the chunks end at.
func TestChunkIndexRestart(t *testing.T) {
	var c chunkIndex
	c.add(10)
	c.add(20) // unacked when the old secondary failed
	c.restart(5, 30)
	if got := c.acked(0); got != 30 {
		t.Fatalf("acked before any new ack: %d, want the offset released at restart (30)", got)
	}
	if pos := c.add(40); pos != 6 {
		t.Fatalf("first new chunk at position %d, want 6", pos)
	}
	c.add(50)
	if got := c.acked(6); got != 40 {
		t.Fatalf("acked 6: offset %d, want 40", got)
	}
	if got := c.acked(7); got != 50 {
		t.Fatalf("acked 7: offset %d, want 50", got)
	}
}

// A real VM's snapshot crosses the log channel as a header, the image and
// the disk; anything cut or inconsistent is refused before a VM starts
// from it.
func TestRebaseSnapshotRoundTrip(t *testing.T) {
	h := rebaseHeader{Icount: 1594166774, Startup: []byte{28, 0, 0, 0, 0, 0, 0, 0, 1, 38}, TakeoverAfter: 412}
	for _, disk := range []string{"", "qcow2 disk"} {
		blob, err := encodeRebaseSnapshot(h, []byte("qcow2 image"), []byte(disk))
		if err != nil {
			t.Fatal(err)
		}
		want := h
		want.DiskBytes = len(disk)
		got, image, gotDisk, err := decodeRebaseSnapshot(blob)
		if err != nil || !reflect.DeepEqual(got, want) || string(image) != "qcow2 image" || string(gotDisk) != disk {
			t.Errorf("round trip with disk %q: %+v %q %q %v", disk, got, image, gotDisk, err)
		}
	}
	blob, _ := encodeRebaseSnapshot(h, []byte("qcow2 image"), []byte("disk"))
	noImage, _ := encodeRebaseSnapshot(h, nil, nil)
	onlyDisk, _ := encodeRebaseSnapshot(h, nil, []byte("disk"))
	noStartup, _ := encodeRebaseSnapshot(rebaseHeader{Icount: 1}, []byte("qcow2 image"), nil)
	diskPastTheEnd, _ := encodeRebaseSnapshot(rebaseHeader{Icount: 1, Startup: []byte{38}, DiskBytes: 99}, []byte("qcow2 image"), nil)
	// encode sets DiskBytes from the disk it is given: make one that lies.
	diskPastTheEnd = bytes.Replace(diskPastTheEnd, []byte(`"icount":1`), []byte(`"icount":1,"disk_bytes":99`), 1)
	binary.BigEndian.PutUint32(diskPastTheEnd, binary.BigEndian.Uint32(diskPastTheEnd)+uint32(len(`,"disk_bytes":99`)))
	for name, bad := range map[string][]byte{
		"empty":                 nil,
		"cut header":            blob[:10],
		"length past the end":   {0xff, 0, 0, 0, '{', '}'},
		"not json":              {0, 0, 0, 2, 'x', 'y'},
		"no image":              noImage,
		"a disk but no image":   onlyDisk,
		"no start-up log":       noStartup,
		"disk longer than sent": diskPastTheEnd,
	} {
		if _, _, _, err := decodeRebaseSnapshot(bad); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

// A real VM's snapshot header comes from the peer: decoding never panics,
// and what it accepts encodes back to the same header, image and disk.
func FuzzDecodeRebaseSnapshot(f *testing.F) {
	blob, _ := encodeRebaseSnapshot(rebaseHeader{Icount: 7, Startup: []byte{38}, TakeoverAfter: 3}, []byte("image"), []byte("disk"))
	f.Add(blob)
	f.Add([]byte{0, 0, 0, 1, '{'})
	f.Fuzz(func(t *testing.T, b []byte) {
		h, image, disk, err := decodeRebaseSnapshot(b)
		if err != nil {
			return
		}
		again, err := encodeRebaseSnapshot(h, image, disk)
		if err != nil {
			t.Fatal(err)
		}
		h2, image2, disk2, err := decodeRebaseSnapshot(again)
		if err != nil || !reflect.DeepEqual(h2, h) || !bytes.Equal(image2, image) || !bytes.Equal(disk2, disk) {
			t.Fatalf("%+v %q %q does not survive a round trip: %+v %q %q %v", h, image, disk, h2, image2, disk2, err)
		}
	})
}

// Hole 13 of the fault campaign: a standby acknowledges log it holds only
// in memory, for a replayer that may stop taking it. Past the bound, Feed
// refuses the chunk, and the copy is given up and rebuilt (copyTook).
func TestReplayBacklogIsBounded(t *testing.T) {
	if err := checkReplayBacklog(maxReplayBacklog-100, 100); err != nil {
		t.Errorf("a backlog at the bound: %v", err)
	}
	if err := checkReplayBacklog(maxReplayBacklog-100, 101); err == nil {
		t.Error("a backlog past the bound was taken")
	}
}
