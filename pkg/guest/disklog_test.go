package guest

import (
	"bytes"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

const testLogSize = 4 * MaxRecordSize // room for the tail a torn write can leave

// newLogFile returns a zero-filled file of size bytes, as a fresh disk is.
func newLogFile(t *testing.T, size int64) *os.File {
	t.Helper()
	f, err := os.Create(filepath.Join(t.TempDir(), "disk"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	return f
}

// openLog opens the log on dev and returns it with the payloads replayed.
func openLog(t *testing.T, dev Device, size int64) (*DiskLog, []string) {
	t.Helper()
	var got []string
	l, err := OpenDiskLog(dev, size, func(p []byte) error {
		got = append(got, string(p))
		return nil
	})
	if err != nil {
		t.Fatalf("OpenDiskLog: %v", err)
	}
	return l, got
}

func appendAll(t *testing.T, l *DiskLog, payloads ...string) {
	t.Helper()
	for _, p := range payloads {
		if err := l.Append([]byte(p)); err != nil {
			t.Fatalf("Append(%q): %v", p, err)
		}
	}
}

// record encodes payload as Append does, for tests that forge or tear one.
func record(payload string) []byte { return encodeRecord([]byte(payload)) }

func TestDiskLog(t *testing.T) {
	first := []string{"PUT a 1", "PUT b two words", strings.Repeat("x", 5000)}
	// Offsets of first's records, for the cases that damage one.
	third := int64(2*recordHeaderSize + len(first[0]) + len(first[1]))
	cases := []struct {
		name string
		// damage changes the file after first's records were appended, as
		// a crash or a bad device would.
		damage func(t *testing.T, f *os.File)
		want   []string
	}{
		{"round trip", func(*testing.T, *os.File) {}, first},
		{"torn tail: header and part of the payload", func(t *testing.T, f *os.File) {
			torn := record(strings.Repeat("y", 3000))[:1000]
			writeAt(t, f, torn, third+recordHeaderSize+5000)
		}, first},
		{"torn last record: its end never written", func(t *testing.T, f *os.File) {
			writeAt(t, f, make([]byte, 4000), third+recordHeaderSize+1000)
		}, first[:2]},
		{"torn last record: only its header written", func(t *testing.T, f *os.File) {
			writeAt(t, f, make([]byte, 5000), third+recordHeaderSize)
		}, first[:2]},
		{"corrupt crc", func(t *testing.T, f *os.File) {
			writeAt(t, f, []byte{0xff}, third+4)
		}, first[:2]},
		{"length past the device's end", func(t *testing.T, f *os.File) {
			var h [4]byte
			binary.LittleEndian.PutUint32(h[:], uint32(testLogSize))
			writeAt(t, f, h[:], third)
		}, first[:2]},
		{"length over the maximum", func(t *testing.T, f *os.File) {
			var h [4]byte
			binary.LittleEndian.PutUint32(h[:], MaxRecordPayload+1)
			writeAt(t, f, h[:], third)
		}, first[:2]},
		{"zero header", func(t *testing.T, f *os.File) {
			writeAt(t, f, make([]byte, recordHeaderSize), third)
		}, first[:2]},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			f := newLogFile(t, testLogSize)
			l, got := openLog(t, f, testLogSize)
			if len(got) != 0 || l.End() != 0 {
				t.Fatalf("zero device: %d records, end %d; want an empty log", len(got), l.End())
			}
			appendAll(t, l, first...)
			c.damage(t, f)

			l, got = openLog(t, f, testLogSize)
			if !slices.Equal(got, c.want) {
				t.Fatalf("replayed %q, want %q", got, c.want)
			}
			var wantEnd int64
			for _, p := range c.want {
				wantEnd += int64(recordHeaderSize + len(p))
			}
			if l.End() != wantEnd {
				t.Errorf("End = %d, want %d", l.End(), wantEnd)
			}
			// Whatever the damage left past the end is gone: a record
			// appended now is the next one, and nothing follows it.
			appendAll(t, l, "PUT c 3")
			_, got = openLog(t, f, testLogSize)
			if want := append(slices.Clone(c.want), "PUT c 3"); !slices.Equal(got, want) {
				t.Fatalf("after an append, replayed %q, want %q", got, want)
			}
			tail := make([]byte, testLogSize-wantEnd-int64(recordHeaderSize+len("PUT c 3")))
			if _, err := f.ReadAt(tail, testLogSize-int64(len(tail))); err != nil {
				t.Fatal(err)
			}
			if !allZero(tail) {
				t.Errorf("bytes past the log's end are not all zero")
			}
		})
	}
}

func writeAt(t *testing.T, f *os.File, b []byte, off int64) {
	t.Helper()
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}

// A torn record whose payload holds a well-formed record: once a shorter
// record is written over the torn one, that inner record must not come back
// as part of the log.
func TestDiskLogTornRecordCannotForgeOne(t *testing.T) {
	f := newLogFile(t, testLogSize)
	l, _ := openLog(t, f, testLogSize)
	appendAll(t, l, "PUT a 1")
	// The torn record's payload holds the forged record exactly where the
	// one appended after the crash ("PUT b 2") ends.
	next := record("PUT b 2")
	outer := append([]byte("PUT k "), bytes.Repeat([]byte{'-'}, len(next)-recordHeaderSize-len("PUT k "))...)
	outer = append(outer, record("PUT evil 1")...)
	// The crash: the outer record's payload reached the disk, its header
	// did not.
	writeAt(t, f, outer, l.End()+recordHeaderSize)

	l, got := openLog(t, f, testLogSize)
	if !slices.Equal(got, []string{"PUT a 1"}) {
		t.Fatalf("replayed %q", got)
	}
	appendAll(t, l, "PUT b 2")
	if _, got = openLog(t, f, testLogSize); !slices.Equal(got, []string{"PUT a 1", "PUT b 2"}) {
		t.Fatalf("after an append, replayed %q, want the two records only", got)
	}
}

func TestDiskLogFull(t *testing.T) {
	const size = 58
	f := newLogFile(t, size)
	l, _ := openLog(t, f, size)
	appendAll(t, l, "PUT a 1", "PUT b 2", "PUT c 3") // 3 × 15 bytes of 58
	before := make([]byte, size)
	f.ReadAt(before, 0)
	err := l.Append([]byte("PUT d 4"))
	if !errors.Is(err, ErrLogFull) {
		t.Fatalf("Append past the end = %v, want ErrLogFull", err)
	}
	after := make([]byte, size)
	f.ReadAt(after, 0)
	if !bytes.Equal(before, after) {
		t.Errorf("a refused Append changed the device")
	}
	// A record that still fits goes in: full is about this record's size.
	appendAll(t, l, "PUT e")
	if _, got := openLog(t, f, size); !slices.Equal(got, []string{"PUT a 1", "PUT b 2", "PUT c 3", "PUT e"}) {
		t.Errorf("replayed %q", got)
	}
}

func TestDiskLogRecordSize(t *testing.T) {
	f := newLogFile(t, testLogSize)
	l, _ := openLog(t, f, testLogSize)
	for _, n := range []int{0, MaxRecordPayload + 1} {
		if err := l.Append(make([]byte, n)); !errors.Is(err, ErrRecordSize) {
			t.Errorf("Append of %d bytes = %v, want ErrRecordSize", n, err)
		}
	}
	appendAll(t, l, strings.Repeat("m", MaxRecordPayload))
	if _, got := openLog(t, f, testLogSize); len(got) != 1 || len(got[0]) != MaxRecordPayload {
		t.Errorf("the largest record did not come back")
	}
}

// failingDevice fails its writes or its syncs from the start.
type failingDevice struct {
	*os.File
	failWrite, failSync bool
	syncs               int
}

var errDevice = errors.New("device error")

func (d *failingDevice) WriteAt(b []byte, off int64) (int, error) {
	if d.failWrite {
		return 0, errDevice
	}
	return d.File.WriteAt(b, off)
}

func (d *failingDevice) Sync() error {
	d.syncs++
	if d.failSync {
		return errDevice
	}
	return d.File.Sync()
}

func TestDiskLogDeviceErrors(t *testing.T) {
	for _, dev := range []*failingDevice{{failWrite: true}, {failSync: true}} {
		dev.File = newLogFile(t, testLogSize)
		l, _ := openLog(t, dev, testLogSize)
		if dev.syncs != 0 {
			t.Errorf("opening a zero device synced it %d times, want no writes", dev.syncs)
		}
		if err := l.Append([]byte("PUT a 1")); !errors.Is(err, errDevice) {
			t.Fatalf("Append = %v, want the device's error", err)
		}
		// The device's state is unknown now: no later record may go in,
		// even once the device works again.
		dev.failWrite, dev.failSync = false, false
		if err := l.Append([]byte("PUT b 2")); !errors.Is(err, errDevice) {
			t.Errorf("Append after a failure = %v, want the first failure", err)
		}
		if l.End() != 0 {
			t.Errorf("End = %d after failed appends, want 0", l.End())
		}
	}
}

// A replay error stops the scan and is OpenDiskLog's.
func TestDiskLogReplayError(t *testing.T) {
	f := newLogFile(t, testLogSize)
	l, _ := openLog(t, f, testLogSize)
	appendAll(t, l, "PUT a 1", "PUT b 2")
	var calls int
	_, err := OpenDiskLog(f, testLogSize, func([]byte) error {
		calls++
		return errDevice
	})
	if !errors.Is(err, errDevice) || calls != 1 {
		t.Errorf("OpenDiskLog = %v after %d calls, want the replay's error after 1", err, calls)
	}
}

// FuzzDiskLog opens a log on arbitrary device contents: the scan must stop
// cleanly somewhere, replay only what it can re-read, and leave a log that
// takes a record and gives back exactly what it replayed plus that record.
func FuzzDiskLog(f *testing.F) {
	f.Add([]byte{})
	f.Add(record("PUT a 1"))
	f.Add(append(record("PUT a 1"), record("PUT b 2")[:10]...))
	f.Add(append(record("PUT a 1"), 0xff, 0xff, 0xff, 0xff))
	f.Fuzz(func(t *testing.T, contents []byte) {
		size := int64(len(contents)) + 64 // room for the record appended below
		dev := newLogFile(t, size)
		writeAt(t, dev, contents, 0)
		var replayed []string
		l, err := OpenDiskLog(dev, size, func(p []byte) error {
			replayed = append(replayed, string(p))
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		var end int64
		for _, p := range replayed {
			end += int64(recordHeaderSize + len(p))
		}
		if l.End() != end || end > int64(len(contents)) {
			t.Fatalf("End = %d, want %d, within the %d bytes given", l.End(), end, len(contents))
		}
		if err := l.Append([]byte("PUT z 9")); err != nil {
			t.Fatal(err)
		}
		if _, got := openLog(t, dev, size); !slices.Equal(got, append(replayed, "PUT z 9")) {
			t.Fatalf("reopened: %q, want %q and the appended record", got, replayed)
		}
	})
}
