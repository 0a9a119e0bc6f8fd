package replay

import (
	"bytes"
	"encoding/binary"
	"testing"
)

func TestSpliceForSnapshot(t *testing.T) {
	clock := append([]byte{byte(KindClockHost)}, make([]byte, 8)...)
	insn := func(n uint32) []byte { return binary.BigEndian.AppendUint32([]byte{byte(KindInstruction)}, n) }
	cat := func(parts ...[]byte) []byte { return bytes.Join(parts, nil) }
	init, reset, irq := []byte{byte(KindCheckpoint + 7)}, []byte{byte(checkpointReset)}, []byte{byte(KindInterrupt)}

	for _, tc := range []struct {
		name string
		in   []byte
		want []byte
		ok   bool
	}{
		{"the spare event after the reset, one instruction less",
			cat(clock, init, reset, clock, insn(4688), irq),
			cat(clock, init, reset, spareEvent, clock, insn(4687), irq), true},
		{"a first instruction event of one goes",
			cat(clock, reset, clock, insn(1), irq, insn(7)),
			cat(clock, reset, spareEvent, clock, irq, insn(7)), true},
		{"not yet the first instruction event", cat(clock, init, reset, clock), nil, false},
		{"the first instruction event cut short", cat(clock, reset, insn(9))[:6], nil, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, ok, err := spliceForSnapshot(tc.in)
			if err != nil || ok != tc.ok || !bytes.Equal(out, tc.want) {
				t.Errorf("got % x, %v, %v; want % x, %v", out, ok, err, tc.want, tc.ok)
			}
		})
	}
	if _, _, err := spliceForSnapshot(cat(clock, init, insn(3))); err == nil {
		t.Error("a log with no reset before its first instruction was taken")
	}
}

// A relay for a snapshot replayer forwards the spliced log, whatever the
// chunks, and counts from the snapshot's icount + 1.
func TestRelayFromSnapshot(t *testing.T) {
	clock := append([]byte{byte(KindClockHost)}, make([]byte, 8)...)
	log := bytes.Join([][]byte{clock, {byte(checkpointReset)}, clock,
		binary.BigEndian.AppendUint32([]byte{byte(KindInstruction)}, 10), {byte(KindInterrupt)},
		binary.BigEndian.AppendUint32([]byte{byte(KindInstruction)}, 5)}, nil)
	var sink bytes.Buffer
	r := NewRelayFromSnapshot(&sink, 1000)
	for i := range log {
		if _, err := r.Write(log[i : i+1]); err != nil {
			t.Fatal(err)
		}
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	want, _, _ := spliceForSnapshot(log)
	if got := sink.Bytes()[len(StreamHeader):]; !bytes.Equal(got, want) {
		t.Errorf("forwarded % x, want % x", got, want)
	}
	if pos := r.Forwarded(); pos.Icount != 1000+1+9+5 {
		t.Errorf("forwarded to icount %d, want %d", pos.Icount, 1000+1+9+5)
	}
}
