package main

import (
	"encoding/binary"
	"testing"
	"time"
)

// A held reply's timestamps, one microsecond apart or more, come out as the
// segments between them; a reply that left at once has no hold segments,
// and a request whose reply is not in the trace is counted, not measured.
func TestBreakdownJoinsARequestWithItsReplyAndLogChunk(t *testing.T) {
	us := func(n uint64) uint64 { return 1_000_000 + n*1000 }
	trace := requestTrace{
		TapWrites: []tapWrite{
			{InputNs: us(10), FlushStartNs: us(2000), FlushEndNs: us(2050), Head: 700},   // request 1's reply
			{InputNs: us(5000), FlushStartNs: us(6000), FlushEndNs: us(6010), Head: 800}, // request 2's reply
		},
		Chunks: []chunkTime{
			{Pos: 1, End: 600, ReadNs: us(1500), ShippedNs: us(1510), AckNs: us(1700)},
			{Pos: 2, End: 700, ReadNs: us(2060), ShippedNs: us(2100), AckNs: us(2400)},
		},
		Released: []releasedFrame{{Stamp: 700, ArrivalNs: us(2052), ReleaseNs: us(2450)}},
	}
	reqs := []timedRequest{
		{sendNs: us(0), recvNs: us(2500), ok: true},
		{sendNs: us(4990), recvNs: us(6100), ok: true},
		{sendNs: us(7000), recvNs: us(8000), ok: true}, // no reply in the trace
		{sendNs: us(9000), recvNs: us(9100), ok: false},
	}
	var b breakdown
	b.add(reqs, trace)
	if b.requests != 4 || b.matched != 2 || b.held != 1 {
		t.Fatalf("requests/matched/held = %d/%d/%d, want 4/2/1", b.requests, b.matched, b.held)
	}
	want := map[int][]time.Duration{
		segTotal:   {2500 * time.Microsecond, 1110 * time.Microsecond},
		segIn:      {10 * time.Microsecond, 10 * time.Microsecond},
		segGuest:   {1990 * time.Microsecond, 1000 * time.Microsecond},
		segFlush:   {50 * time.Microsecond, 10 * time.Microsecond},
		segHeld:    {398 * time.Microsecond},
		segLogRead: {10 * time.Microsecond},
		segShip:    {40 * time.Microsecond},
		segAck:     {300 * time.Microsecond},
		segRelease: {50 * time.Microsecond},
		segOut:     {50 * time.Microsecond, 90 * time.Microsecond},
	}
	for s := range numSegs {
		got := b.segs[s]
		if len(got) != len(want[s]) {
			t.Errorf("%s: %v, want %v", segNames[s], got, want[s])
			continue
		}
		for i := range got {
			if got[i] != want[s][i] {
				t.Errorf("%s: %v, want %v", segNames[s], got, want[s])
				break
			}
		}
	}
	// Request 2 was read 2950 µs after request 1's reply was written.
	if n := len(b.byIdle[len(idleBuckets)]); n != 1 || b.byIdle[len(idleBuckets)][0] != 1000*time.Microsecond {
		t.Errorf("by idle time: %v, want request 2's 1000µs over the last bound", b.byIdle)
	}
	if len(b.rows) != 2 || b.rows[1][segHeld] != -1 || b.rows[0][segHeld] != 398*time.Microsecond {
		t.Errorf("rows: %v, want two, the second not held", b.rows)
	}
}

// The trace ring as the preloaded library writes it: whole entries are
// read, oldest first, from the time asked; one being rewritten (its seq
// not yet its own) is left out.
func TestRRTraceReadsWholeEntriesSince(t *testing.T) {
	tr, err := newRRTrace()
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	put := func(word int, v uint64) {
		var b [8]byte
		binary.NativeEndian.PutUint64(b[:], v)
		if _, err := tr.File().WriteAt(b[:], int64(8*word)); err != nil {
			t.Fatal(err)
		}
	}
	if got := tr.Writes(0); got != nil {
		t.Fatalf("before the library started: %v, want nothing", got)
	}
	put(0, rrTraceMagic)
	entry := func(n int, seq, flushEnd uint64) {
		base := 2 + n*rrTraceEntryU64
		put(base, seq)
		put(base+1, flushEnd-20)
		put(base+2, flushEnd-10)
		put(base+3, flushEnd)
		put(base+4, uint64(n)*100)
	}
	entry(0, 1, 1000)
	entry(1, 2, 2000)
	entry(2, 0, 3000) // being rewritten
	entry(3, 4, 4000)
	put(1, 4)
	got := tr.Writes(1500)
	want := []tapWrite{{InputNs: 1980, FlushStartNs: 1990, FlushEndNs: 2000, Head: 100}, {InputNs: 3980, FlushStartNs: 3990, FlushEndNs: 4000, Head: 300}}
	if len(got) != len(want) || got[0] != want[0] || got[1] != want[1] {
		t.Errorf("Writes(1500) = %v, want %v", got, want)
	}
}

// An ack stamps every chunk up to it that has no ack time yet, and only
// those.
func TestChunkTimesStampsAcks(t *testing.T) {
	var c chunkTimes
	for pos := uint64(1); pos <= 3; pos++ {
		c.shipped(pos, pos*100, 1)
	}
	c.ack(2)
	got := c.since(0)
	if len(got) != 3 || got[0].AckNs == 0 || got[1].AckNs == 0 || got[2].AckNs != 0 {
		t.Fatalf("after ack 2: %+v, want chunks 1 and 2 acked, 3 not", got)
	}
	first := got[0].AckNs
	c.ack(3)
	got = c.since(0)
	if got[2].AckNs == 0 || got[0].AckNs != first {
		t.Errorf("after ack 3: %+v, want chunk 3 acked and chunk 1's time kept", got)
	}
}
