package lockstep

import (
	"bufio"
	"bytes"
	"testing"
)

// The log channel's parsers take whatever a peer sends. They must never
// panic, and what they accept must be exactly what the encoder writes.

func FuzzReadRecord(f *testing.F) {
	for _, r := range []Record{
		{Kind: KindHello, Position: 7, Epoch: 2, Payload: helloPayload("vm1", helloInfo{Incarnation: 9, FromBoot: true})},
		{Kind: KindRXFrame, Position: 1, Epoch: 1, Payload: bytes.Repeat([]byte{0xab}, 60)},
		{Kind: KindHeartbeat, Epoch: 1, Payload: make([]byte, heartbeatLen)},
		{Kind: KindAck, Position: 1 << 40, Epoch: 3},
		{Kind: KindSnapshotEnd, Position: 5, Epoch: 1, Payload: snapshotTrailer([]byte("state"))},
		{Kind: KindHandOver, Position: 12, Epoch: 4},
	} {
		b := AppendRecord(nil, r)
		f.Add(b)
		f.Add(b[:len(b)-1]) // cut
	}
	f.Add([]byte("not a record at all, not even close to one"))
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := ReadRecord(bufio.NewReader(bytes.NewReader(b)), make([]byte, MaxPayload))
		if err != nil {
			return
		}
		if again := AppendRecord(nil, r); !bytes.Equal(again, b[:len(again)]) {
			t.Fatalf("accepted %x, which encodes back as %x", b[:len(again)], again)
		}
	})
}

func FuzzCheckHello(f *testing.F) {
	for _, h := range []helloInfo{{}, {Incarnation: 1 << 63, FromBoot: true}, {NeedSnapshot: true}, {Restarted: true}} {
		f.Add(helloPayload("vm1", h))
	}
	f.Add([]byte{0, 2, 0, 3, 'v', 'm', '1'})
	f.Fuzz(func(t *testing.T, p []byte) {
		h, err := checkHello(p, "vm1")
		if err != nil {
			return
		}
		if again := helloPayload("vm1", h); !bytes.Equal(again, p) {
			t.Fatalf("accepted hello %x, which encodes back as %x", p, again)
		}
	})
}

func FuzzCheckSnapshot(f *testing.F) {
	f.Add([]byte("state"), snapshotTrailer([]byte("state")))
	f.Add([]byte{}, snapshotTrailer(nil))
	f.Add([]byte("state"), []byte("short"))
	f.Fuzz(func(t *testing.T, state, trailer []byte) {
		if err := checkSnapshot(state, trailer); err == nil && !bytes.Equal(trailer, snapshotTrailer(state)) {
			t.Fatalf("accepted trailer %x for %d bytes of state", trailer, len(state))
		}
	})
}
