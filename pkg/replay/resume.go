package replay

import (
	"encoding/binary"
	"errors"
	"io"
)

// Re-protection: a new secondary from a go-live snapshot.
//
// A snapshot a recorder takes cannot seed a replayer (it keeps the stale
// replay state of the snapshot the recorder started from, and a replayer
// that loads it waits for 0 instructions forever), so a new secondary starts
// from the snapshot a replayer took at go-live (-loadvm), and replays the
// log of the recorder that started from that same snapshot. Two things in
// that log must change for it:
//
//   - QEMU loads -loadvm after the machine's reset, and the load overwrites
//     the replay state, dropping the event the replayer had fetched and not
//     yet used. The recorder logged nothing there, so one spare event goes
//     in right after the reset checkpoint, for the load to drop.
//   - The snapshot was taken one instruction short of its log's last
//     INSTRUCTION event, so a replayer that loads it still owes that
//     instruction; the recorder, which reset its counts at load, did not.
//     The new log's first INSTRUCTION event is one instruction shorter
//     (gone if it was one).
//
// The replayer then stands at the snapshot's icount + 1 after the owed
// instruction, where the shortened log starts counting.

// checkpointReset is QEMU's CHECKPOINT_RESET event.
const checkpointReset = KindCheckpoint + 8

// spareEvent is what the load drops: a checkpoint, one byte.
var spareEvent = []byte{byte(KindCheckpoint + 1)}

// spliceForSnapshot rewrites the start of a recorder's log for a replayer
// that loads the go-live snapshot the recorder started from. It needs the
// log up to the end of the first INSTRUCTION event: with less, ok is false
// and the caller gives it more.
func spliceForSnapshot(prefix []byte) (out []byte, ok bool, err error) {
	s := NewLogScanner(StreamFraming)
	resetEnd, insn := int64(-1), int64(-1)
	s.OnEvent = func(ev LogEvent) {
		switch {
		case ev.Kind == checkpointReset && resetEnd < 0:
			resetEnd = ev.Offset + 1
		case ev.Kind == KindInstruction && insn < 0:
			insn = ev.Offset
		}
	}
	if _, err := s.Write(prefix); err != nil {
		return nil, false, err
	}
	if insn < 0 {
		return nil, false, nil
	}
	if resetEnd < 0 || resetEnd > insn {
		return nil, false, errors.New("replay log: no reset checkpoint before the first instruction; not a log from -loadvm")
	}
	n := binary.BigEndian.Uint32(prefix[insn+1:])
	out = append(out, prefix[:resetEnd]...)
	out = append(out, spareEvent...)
	out = append(out, prefix[resetEnd:insn]...)
	if n > 1 {
		out = append(out, byte(KindInstruction))
		out = binary.BigEndian.AppendUint32(out, n-1)
	}
	return append(out, prefix[insn+5:]...), true, nil
}

// NewRelayFromSnapshot is NewRelay for a replayer that starts from the
// go-live snapshot taken at icount at, fed the log of the recorder that
// started from it (see above). Its positions count from at + 1.
func NewRelayFromSnapshot(w io.Writer, at uint64) *Relay {
	r := NewRelay(w, StreamFraming)
	r.scan.icount = at + 1
	r.splicing = true
	return r
}
