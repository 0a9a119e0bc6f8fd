package replay

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
)

// Re-basing: a new replayer from a snapshot the recorder takes now.
//
// A replayer needs to start near where the recorder is, or it replays
// everything since the recorder started, and QEMU replays idle time in
// real time: a VM that ran alone for an hour would wait an hour for its new
// secondary. So the recorder saves its state (savevm, a pause of a few
// hundred milliseconds), and the new replayer loads it and is fed the
// recorder's log from the point of the snapshot on.
//
// QEMU saves its replay state with the VM (vmstate "replay"): the icount
// the recorder has logged up to (current_icount), the log's file offset
// (file_offset; through the preloaded library the recorder's stream is
// seekable, so this is the stream position after the file header), the
// replayer's read-ahead (data_kind, has_unread_data) and the clock values it
// last read from the log (cached_clock). A recorder keeps the last two only
// as it loaded them: zeros after a boot, and after a go-live snapshot (one
// a replayer took) that replayer's "one INSTRUCTION event held, 0
// instructions left". A replayer that loads the latter waits for 0
// instructions forever; one that loads zero clocks answers a clock read the
// log has no event for (the replayer reads clocks around its own pauses)
// with 0, and stalls. PrepareRecorderSnapshot writes what a replayer that
// had replayed the log up to the snapshot would have saved: nothing read
// ahead, and the log's last clock values.
//
// The new replayer first consumes the log of its own start-up up to the
// machine's reset checkpoint, then fetches one event, which the -loadvm
// after the reset overwrites. Its log is therefore the recorder's log up to
// the reset checkpoint (the recorder started the same machine), one spare
// event for the load to drop, then the recorder's log from the snapshot's
// offset.

// QEMU 7.2's vmstate_replay, version 2: the fields' offsets in the section.
const (
	replaySectionVersion = 2
	replayCachedClock    = 0x00 // int64 per ReplayClockKind
	replayCurrentIcount  = 0x10 // uint64
	replayDataKind       = 0x1c // uint32
	replayHasUnreadData  = 0x20 // uint32
	replayFileOffset     = 0x24 // uint64
	replaySectionLen     = 0x3c
	qemuSectionFooter    = 0x7e // QEMU_VM_SECTION_FOOTER
)

// KindCheckpointReset is QEMU's CHECKPOINT_RESET event: the machine's reset
// at start-up, which ends the start-up part of a log.
const KindCheckpointReset = KindCheckpoint + 8

// spareEvent is what a -loadvm drops: a checkpoint, one byte.
var spareEvent = []byte{byte(KindCheckpoint + 1)}

// RecorderSnapshot is where a recorder's snapshot stands in its log.
type RecorderSnapshot struct {
	// Icount is the icount the recorder had logged up to: the log after
	// the snapshot counts on from here.
	Icount uint64
	// LogOffset is how many bytes of events the recorder had logged.
	LogOffset int64
}

// Clocks is what a replayer keeps of the clocks the log carries: the last
// value it read of each (host, virtual_rt, as QEMU's ReplayClockKind). It
// answers with it when QEMU reads a clock where the log has no event for
// it, which a replayer does where the recorder did not (around its own
// pauses and warps). A recorder keeps none: after a boot they are zero,
// and a replayer that loaded zeros stalls.
type Clocks [2]int64

// LastClocks scans a log from its start and returns its last clock values.
func LastClocks(log []byte) (Clocks, error) {
	var c Clocks
	s := NewLogScanner(StreamFraming)
	s.OnEvent = func(ev LogEvent) { c.Note(ev) }
	_, err := s.Write(log)
	return c, err
}

// Note keeps ev's value if it is a clock event.
func (c *Clocks) Note(ev LogEvent) {
	if ev.Kind == KindClockHost || ev.Kind == KindClockVirtualRT {
		c[ev.Kind-KindClockHost] = int64(binary.BigEndian.Uint64(ev.Payload))
	}
}

// PrepareRecorderSnapshot makes the snapshot tag, which a recorder saved in
// the qcow2 image at path, loadable by a replayer, and says where in the
// recorder's log that replayer goes on. clocksAt gives the clock values
// the log had carried up to that point (LastClocks), for the replayer's
// cache. It patches the image: give it a copy, not the running recorder's.
func PrepareRecorderSnapshot(path, tag string, clocksAt func(logOffset int64) (Clocks, error)) (RecorderSnapshot, error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return RecorderSnapshot{}, err
	}
	defer f.Close()
	snap, err := prepareRecorderSnapshot(f, tag, clocksAt)
	if err == nil {
		err = f.Sync()
	}
	if err != nil {
		return RecorderSnapshot{}, fmt.Errorf("prepare snapshot %q for a replayer: %w", tag, err)
	}
	return snap, nil
}

func prepareRecorderSnapshot(f *os.File, tag string, clocksAt func(int64) (Clocks, error)) (RecorderSnapshot, error) {
	q, err := openQcow2(f)
	if err != nil {
		return RecorderSnapshot{}, err
	}
	s, err := q.snapshot(tag)
	if err != nil {
		return RecorderSnapshot{}, err
	}
	at, version, err := q.findSection(s, "replay")
	if err != nil {
		return RecorderSnapshot{}, err
	}
	if version != replaySectionVersion {
		return RecorderSnapshot{}, fmt.Errorf("replay state version %d, want %d (QEMU 7.2)", version, replaySectionVersion)
	}
	b := make([]byte, replaySectionLen+1)
	if _, err := q.readVMState(s, b, at); err != nil {
		return RecorderSnapshot{}, err
	}
	be := binary.BigEndian
	kind, unread, offset := be.Uint32(b[replayDataKind:]), be.Uint32(b[replayHasUnreadData:]), be.Uint64(b[replayFileOffset:])
	// The bytes found are the replay state, not a lookalike: sane values,
	// and the section's footer where this layout ends.
	if unread > 1 || (kind >= uint32(kindCount) && kind != ^uint32(0)) || b[replaySectionLen] != qemuSectionFooter {
		return RecorderSnapshot{}, fmt.Errorf("replay state: data_kind %d, has_unread_data %d: not a replay state", kind, unread)
	}
	if offset < FileHeaderSize || offset > 1<<62 {
		return RecorderSnapshot{}, fmt.Errorf("replay state: file offset %d: the recorder's log is not seekable (run it with the preloaded library)", offset)
	}
	snap := RecorderSnapshot{Icount: be.Uint64(b[replayCurrentIcount:]), LogOffset: int64(offset) - FileHeaderSize}
	clocks, err := clocksAt(snap.LogOffset)
	if err != nil {
		return RecorderSnapshot{}, err
	}
	// What a replayer that had replayed the log up to here would hold.
	for i, c := range clocks {
		be.PutUint64(b[replayCachedClock+8*i:], uint64(c))
	}
	be.PutUint32(b[replayHasUnreadData:], 0)
	for i, v := range b[:replaySectionLen] {
		host, err := q.hostOffset(s, at+int64(i))
		if err != nil {
			return RecorderSnapshot{}, err
		}
		if host < 0 {
			return RecorderSnapshot{}, errors.New("replay state in an unallocated cluster")
		}
		if _, err := f.WriteAt([]byte{v}, host); err != nil {
			return RecorderSnapshot{}, err
		}
	}
	return snap, nil
}

// StartupEvents is the part of a recorder's log its start-up consumed: up to
// the end of the machine's reset checkpoint. ok is false until log holds it
// all.
func StartupEvents(log []byte) (startup []byte, ok bool, err error) {
	s := NewLogScanner(StreamFraming)
	end := int64(-1)
	s.OnEvent = func(ev LogEvent) {
		if end >= 0 {
			return
		}
		switch {
		case ev.Kind == KindInstruction:
			err = errors.New("replay log: an instruction before the reset checkpoint")
			end = 0
		case ev.Kind == KindCheckpointReset:
			end = ev.Offset + 1
		}
	}
	if _, werr := s.Write(log); werr != nil {
		return nil, false, werr
	}
	if err != nil || end < 0 {
		return nil, false, err
	}
	return log[:end], true, nil
}

// NewRelayFromRecorderSnapshot is NewRelay for a replayer that loads a
// recorder's snapshot (see PrepareRecorderSnapshot): the recorder's
// start-up events go first, then a spare event, then whatever is written,
// which must be the recorder's log from snap.LogOffset on. Its positions
// count from snap.Icount.
func NewRelayFromRecorderSnapshot(w io.Writer, startup []byte, snap RecorderSnapshot) (*Relay, error) {
	r := NewRelay(w, StreamFraming)
	r.scan.icount = snap.Icount
	head := append(append([]byte(nil), startup...), spareEvent...)
	if _, err := r.Write(head); err != nil {
		r.Close()
		return nil, err
	}
	return r, nil
}
