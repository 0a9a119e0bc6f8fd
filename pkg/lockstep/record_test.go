package lockstep

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"strings"
	"testing"
)

func TestKindAndReasonNames(t *testing.T) {
	for k := Kind(1); k < KindLen; k++ {
		if name := k.String(); name == "" || strings.HasPrefix(name, "Kind(") {
			t.Errorf("kind %d has no name", k)
		}
	}
	for r := ErrReason(0); r < ReasonLen; r++ {
		if name := r.String(); name == "" || strings.HasPrefix(name, "ErrReason(") {
			t.Errorf("reason %d has no name", r)
		}
	}
	if got := KindLen.String(); got != "Kind(10)" {
		t.Errorf("KindLen.String() = %q", got)
	}
}

func TestRecordRoundTrip(t *testing.T) {
	hb := make([]byte, heartbeatLen)
	binary.BigEndian.PutUint64(hb, 12345)
	big := bytes.Repeat([]byte{0xab}, MaxPayload)
	recs := []Record{
		{Kind: KindHello, Position: 7, Epoch: 3, Payload: helloPayload("vm1", helloInfo{Incarnation: 7})},
		{Kind: KindRXFrame, Position: 1<<63 + 5, Epoch: 1, Payload: []byte("an ethernet frame")},
		{Kind: KindRXFrame, Position: 2, Payload: big}, // largest payload allowed
		{Kind: KindHeartbeat, Epoch: 9, Payload: hb},
		{Kind: KindAck, Position: 42, Epoch: 9},
		{Kind: KindQEMULog, Position: 8, Payload: []byte{1, 2, 3}},
	}
	var stream []byte
	for _, r := range recs {
		stream = AppendRecord(stream, r)
	}
	br := bufio.NewReader(bytes.NewReader(stream))
	buf := make([]byte, MaxPayload)
	for _, want := range recs {
		got, err := ReadRecord(br, buf)
		if err != nil {
			t.Fatalf("read %s: %v", want.Kind, err)
		}
		if got.Kind != want.Kind || got.Position != want.Position || got.Epoch != want.Epoch || !bytes.Equal(got.Payload, want.Payload) {
			t.Errorf("got %s pos %d epoch %d %d bytes, want %s pos %d epoch %d %d bytes",
				got.Kind, got.Position, got.Epoch, len(got.Payload), want.Kind, want.Position, want.Epoch, len(want.Payload))
		}
	}
	if _, err := ReadRecord(br, buf); err != io.EOF {
		t.Errorf("read at end: %v, want io.EOF", err)
	}
}

func TestReadRecordSmallBuffer(t *testing.T) {
	payload := []byte("longer than the buffer")
	br := bufio.NewReader(bytes.NewReader(AppendRecord(nil, Record{Kind: KindRXFrame, Position: 1, Payload: payload})))
	got, err := ReadRecord(br, make([]byte, 4))
	if err != nil || !bytes.Equal(got.Payload, payload) {
		t.Fatalf("got %q, %v", got.Payload, err)
	}
}

func TestReadRecordErrors(t *testing.T) {
	good := func() []byte {
		return AppendRecord(nil, Record{Kind: KindRXFrame, Position: 1, Epoch: 1, Payload: []byte("payload")})
	}
	// reseal fixes the CRC after a header edit, so the edit itself is what
	// the decoder sees.
	reseal := func(b []byte) []byte {
		binary.BigEndian.PutUint32(b[12:16], checksum(b[:HeaderLen], b[HeaderLen:]))
		return b
	}
	tests := []struct {
		name  string
		input []byte
		want  error
		rest  int // bytes the decoder must leave unread
	}{
		{"bad magic", func() []byte { b := good(); b[0] = 'X'; return b }(), ErrBadMagic, 0},
		{"bad crc", func() []byte { b := good(); b[len(b)-1] ^= 1; return b }(), ErrChecksum, 0},
		{"corrupt kind without reseal", func() []byte { b := good(); b[4] = 99; return b }(), ErrChecksum, 0},
		{"too long", func() []byte {
			b := good()[:HeaderLen]
			binary.BigEndian.PutUint32(b[8:12], MaxPayload+1)
			return append(b, make([]byte, 100)...) // must stay unread
		}(), ErrTooLong, 100},
		{"unknown kind 0", func() []byte { b := good(); b[4] = 0; return reseal(b) }(), ErrUnknownKind, 0},
		{"unknown kind after the last", func() []byte { b := good(); b[4] = byte(KindLen); return reseal(b) }(), ErrUnknownKind, 0},
		{"nonzero flags", func() []byte { b := good(); b[5] = 1; return reseal(b) }(), ErrUnknownKind, 0},
		{"nonzero reserved", func() []byte { b := good(); b[7] = 1; return reseal(b) }(), ErrUnknownKind, 0},
		{"truncated header", good()[:HeaderLen-1], ErrTruncated, 0},
		{"truncated payload", func() []byte { b := good(); return b[:len(b)-1] }(), ErrTruncated, 0},
		{"missing payload", good()[:HeaderLen], ErrTruncated, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			br := bufio.NewReader(bytes.NewReader(tt.input))
			_, err := ReadRecord(br, make([]byte, MaxPayload))
			if !errors.Is(err, tt.want) {
				t.Fatalf("err = %v, want %v", err, tt.want)
			}
			if !strings.HasPrefix(err.Error(), "read record: ") {
				t.Errorf("err %q lacks context", err)
			}
			if rest, _ := io.ReadAll(br); tt.rest > 0 && len(rest) != tt.rest {
				t.Errorf("%d bytes left unread, want %d", len(rest), tt.rest)
			}
		})
	}
}

func TestHelloRoundTrip(t *testing.T) {
	for _, h := range []helloInfo{{}, {Incarnation: 0xfeedface, FromBoot: true}, {Incarnation: 1, NeedSnapshot: true}} {
		got, err := checkHello(helloPayload("vm", h), "vm")
		if err != nil || got != h {
			t.Errorf("hello %+v came back as %+v, %v", h, got, err)
		}
	}
}

func TestSnapshotTrailer(t *testing.T) {
	state := []byte("the VM's state")
	if err := checkSnapshot(state, snapshotTrailer(state)); err != nil {
		t.Errorf("whole snapshot refused: %v", err)
	}
	for name, got := range map[string][]byte{
		"cut":     state[:5],
		"corrupt": []byte("the VM's statE"),
		"longer":  append(append([]byte{}, state...), 0),
	} {
		if err := checkSnapshot(got, snapshotTrailer(state)); !errors.Is(err, ErrSnapshot) {
			t.Errorf("%s snapshot: err = %v, want ErrSnapshot", name, err)
		}
	}
	if err := checkSnapshot(state, snapshotTrailer(state)[:9]); !errors.Is(err, ErrSnapshot) {
		t.Errorf("short trailer: err = %v, want ErrSnapshot", err)
	}
}

func TestCheckHello(t *testing.T) {
	withVersion := func(v uint16) []byte {
		p := helloPayload("vm", helloInfo{})
		binary.BigEndian.PutUint16(p, v)
		return p
	}
	tests := []struct {
		name    string
		payload []byte
		want    error
	}{
		{"ok", helloPayload("vm", helloInfo{}), nil},
		{"wrong vm", helloPayload("other", helloInfo{}), ErrWrongVM},
		{"version", withVersion(1), ErrVersion},
		{"unknown flag", append(helloPayload("vm", helloInfo{})[:len(helloPayload("vm", helloInfo{}))-1], 0x80), ErrVersion},
		{"short", []byte{0, 1}, ErrVersion},
		{"name length", append(helloPayload("vm", helloInfo{}), 'x'), ErrVersion},
	}
	for _, tt := range tests {
		if _, err := checkHello(tt.payload, "vm"); !errors.Is(err, tt.want) || (tt.want == nil && err != nil) {
			t.Errorf("%s: err = %v, want %v", tt.name, err, tt.want)
		}
	}
}

func TestReasonOf(t *testing.T) {
	if r := reasonOf(io.ErrUnexpectedEOF); r != ReasonIO {
		t.Errorf("plain error: %s", r)
	}
	// OnFrame's own error might wrap anything; it still counts as deliver.
	if r := reasonOf(errors.Join(errDeliver, ErrChecksum)); r != ReasonDeliver {
		t.Errorf("deliver: %s", r)
	}
	if r := reasonOf(errors.Join(ErrAuth, io.EOF)); r != ReasonAuth {
		t.Errorf("auth: %s", r)
	}
}
