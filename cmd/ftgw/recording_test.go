package main

import (
	"bytes"
	"os"
	"strings"
	"testing"
)

// The recording keeps one recorder's log; a new recorder starts it afresh,
// and past its cap it is dropped, with an error that says why, rather than
// kept in part.
func TestRecording(t *testing.T) {
	r := newRecording(t.TempDir(), 10)
	if _, err := r.reader(); err == nil {
		t.Fatal("a recording before any recorder started can be read")
	}
	r.restart(recorderLog{base: 100, loadvm: goLiveSnapshot, icount: 7})
	r.append([]byte("abcd"))
	r.append([]byte("efg"))
	f, err := r.reader()
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4)
	got, err := readChunk(f, buf, 0, r.size)
	if err != nil || string(got) != "abcd" {
		t.Fatalf("first chunk %q, %v", got, err)
	}
	got, err = readChunk(f, buf, 4, r.size)
	if err != nil || string(got) != "efg" {
		t.Fatalf("second chunk %q, %v", got, err)
	}
	if got, err = readChunk(f, buf, 7, r.size); err != nil || len(got) != 0 {
		t.Fatalf("at the end: %q, %v", got, err)
	}
	f.Close()
	if r.from.base != 100 || r.from.icount != 7 {
		t.Fatalf("the recording starts at %+v", r.from)
	}

	r.restart(recorderLog{base: 200})
	r.append([]byte("xy"))
	if raw, _ := os.ReadFile(r.path); !bytes.Equal(raw, []byte("xy")) {
		t.Fatalf("after restart the file holds %q, want the new recorder's log only", raw)
	}

	r.append([]byte("123456789")) // 11 bytes in all, over the cap of 10
	if _, err := r.reader(); err == nil || !strings.Contains(err.Error(), "keep_log_bytes") {
		t.Fatalf("past the cap: %v, want an error naming keep_log_bytes", err)
	}
	if _, err := os.Stat(r.path); !os.IsNotExist(err) {
		t.Fatalf("the partial recording is still on disk: %v", err)
	}
	r.append([]byte("z")) // ignored: no recording to add to
	if r.size != 2 {
		t.Fatalf("size %d after the recording was dropped", r.size)
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

// A real VM's snapshot crosses the log channel as a header and the go-live
// image; anything cut or inconsistent is refused before a VM starts from it.
func TestRecordingSnapshotRoundTrip(t *testing.T) {
	h := recordingHeader{FromSnapshot: true, SnapshotIcount: 1594166774, TakeoverAfter: 412, RecordingBytes: 26_000_000}
	blob, err := encodeRecordingSnapshot(h, []byte("qcow2 image"))
	if err != nil {
		t.Fatal(err)
	}
	got, image, err := decodeRecordingSnapshot(blob)
	if err != nil || got != h || string(image) != "qcow2 image" {
		t.Errorf("round trip: %+v %q %v", got, image, err)
	}
	boot, _ := encodeRecordingSnapshot(recordingHeader{TakeoverAfter: 3}, nil)
	if got, image, err := decodeRecordingSnapshot(boot); err != nil || got.FromSnapshot || len(image) != 0 {
		t.Errorf("from boot: %+v %d bytes %v", got, len(image), err)
	}
	noImage, _ := encodeRecordingSnapshot(h, nil)
	for name, bad := range map[string][]byte{
		"empty":                 nil,
		"cut header":            blob[:10],
		"length past the end":   {0xff, 0, 0, 0, '{', '}'},
		"not json":              {0, 0, 0, 2, 'x', 'y'},
		"snapshot, no image":    noImage,
		"boot, with some image": append(boot, 'x'),
	} {
		if _, _, err := decodeRecordingSnapshot(bad); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

// A real VM's snapshot header comes from the peer: decoding never panics,
// and what it accepts encodes back to the same header and image.
func FuzzDecodeRecordingSnapshot(f *testing.F) {
	blob, _ := encodeRecordingSnapshot(recordingHeader{FromSnapshot: true, SnapshotIcount: 7, TakeoverAfter: 3, RecordingBytes: 9}, []byte("image"))
	boot, _ := encodeRecordingSnapshot(recordingHeader{TakeoverAfter: 1}, nil)
	f.Add(blob)
	f.Add(boot)
	f.Add([]byte{0, 0, 0, 1, '{'})
	f.Fuzz(func(t *testing.T, b []byte) {
		h, image, err := decodeRecordingSnapshot(b)
		if err != nil {
			return
		}
		again, err := encodeRecordingSnapshot(h, image)
		if err != nil {
			t.Fatal(err)
		}
		h2, image2, err := decodeRecordingSnapshot(again)
		if err != nil || h2 != h || !bytes.Equal(image2, image) {
			t.Fatalf("%+v %q does not survive a round trip: %+v %q %v", h, image, h2, image2, err)
		}
	})
}
