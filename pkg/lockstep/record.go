package lockstep

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
)

// Wire constants; doc.go describes the layout.
const (
	Magic      = 0x4654474c // "FTGL"
	HeaderLen  = 32
	MaxPayload = 65536 // largest payload ReadRecord accepts
	MaxFrame   = 9216  // largest Ethernet frame Primary.AppendFrame accepts
	Version    = 1     // protocol version carried in Hello
	MaxVMName  = 255   // longest VM name in a Hello

	heartbeatLen = 16 // Heartbeat payload: send time, echo
)

// Kind is the record type in byte 4 of the header.
type Kind uint8

const (
	KindHello     Kind = 1 + iota // handshake, both directions
	KindRXFrame                   // primary → secondary: one logged frame
	KindHeartbeat                 // both directions: liveness and RTT
	KindAck                       // secondary → primary: highest contiguous position
	KindQEMULog                   // primary → secondary: a chunk of the VM engine's replay log
	KindProgress                  // secondary → primary: how far its replay trails the log
	KindLen                       // number of kinds + 1; not a kind
)

var kindNames = [KindLen]string{
	KindHello:     "hello",
	KindRXFrame:   "rx_frame",
	KindHeartbeat: "heartbeat",
	KindAck:       "ack",
	KindQEMULog:   "qemu_log",
	KindProgress:  "progress",
}

func (k Kind) String() string {
	if k > 0 && k < KindLen {
		return kindNames[k]
	}
	return fmt.Sprintf("Kind(%d)", uint8(k))
}

// Record is one decoded record. Epoch is carried for failover (a new primary
// starts a new epoch); the package passes it through but does not act on it.
type Record struct {
	Kind     Kind
	Position uint64
	Epoch    uint64
	Payload  []byte
}

// Errors a connection can end with. Callers match them with errors.Is; the
// messages around them carry the detail.
var (
	ErrBadMagic      = errors.New("bad magic")
	ErrChecksum      = errors.New("checksum mismatch")
	ErrTooLong       = errors.New("too long")
	ErrUnknownKind   = errors.New("unknown record kind")
	ErrTruncated     = errors.New("truncated record")
	ErrOutOfOrder    = errors.New("position out of order")
	ErrAckBeyondHead = errors.New("ack beyond head")
	ErrAckBackwards  = errors.New("ack went backwards")
	ErrVersion       = errors.New("protocol version mismatch")
	ErrWrongVM       = errors.New("wrong VM")
	ErrUnexpected    = errors.New("unexpected record")
	ErrAuth          = errors.New("authentication failed")
	ErrBacklogFull   = errors.New("unacked backlog full")
	// ErrStaleEpoch: a primary whose epoch is older than one its peer has
	// already followed lost a failover it may not know about. It must not
	// release anything on its own again (fencing).
	ErrStaleEpoch = errors.New("stale epoch")
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// AppendRecord appends the encoding of r to dst. It does not check r: the
// caller keeps Payload within MaxPayload and Kind within the known kinds
// (tests rely on being able to encode bad records).
func AppendRecord(dst []byte, r Record) []byte {
	start := len(dst)
	dst = append(dst, make([]byte, HeaderLen)...)
	h := dst[start:]
	be := binary.BigEndian
	be.PutUint32(h[0:4], Magic)
	h[4] = byte(r.Kind)
	// h[5] flags and h[6:8] reserved stay 0.
	be.PutUint32(h[8:12], uint32(len(r.Payload)))
	be.PutUint64(h[16:24], r.Position)
	be.PutUint64(h[24:32], r.Epoch)
	be.PutUint32(h[12:16], checksum(h, r.Payload))
	return append(dst, r.Payload...)
}

// checksum is the CRC32C of the header without its own CRC field, then the
// payload.
func checksum(h, payload []byte) uint32 {
	c := crc32.Update(0, castagnoli, h[0:12])
	c = crc32.Update(c, castagnoli, h[16:HeaderLen])
	return crc32.Update(c, castagnoli, payload)
}

// ReadRecord reads and checks one record. The payload is read into buf when
// it fits (so Payload aliases buf until the next call) and into a new slice
// otherwise; pass a buffer of MaxPayload bytes to never allocate.
//
// A clean end of stream before the first header byte returns io.EOF as is;
// anything else wraps one of the sentinel errors, or the read error.
//
// Checks run in an order that keeps the reported cause honest: the length
// must be checked before the payload is read (so a corrupt length cannot make
// us read 4 GiB), but kind and reserved bits only after the CRC, so a
// corrupted header shows up as a checksum error, and ErrUnknownKind means a
// well-formed record from a peer that speaks something we do not.
func ReadRecord(r *bufio.Reader, buf []byte) (Record, error) {
	var h [HeaderLen]byte
	if n, err := io.ReadFull(r, h[:]); err != nil {
		switch {
		case errors.Is(err, io.EOF):
			return Record{}, io.EOF
		case errors.Is(err, io.ErrUnexpectedEOF):
			return Record{}, fmt.Errorf("read record: header cut after %d of %d bytes: %w", n, HeaderLen, ErrTruncated)
		}
		return Record{}, fmt.Errorf("read record: %w", err)
	}
	be := binary.BigEndian
	if m := be.Uint32(h[0:4]); m != Magic {
		return Record{}, fmt.Errorf("read record: magic %#08x, want %#08x: %w", m, Magic, ErrBadMagic)
	}
	n := be.Uint32(h[8:12])
	if n > MaxPayload {
		return Record{}, fmt.Errorf("read record: payload %d bytes, max %d: %w", n, MaxPayload, ErrTooLong)
	}
	var payload []byte
	if n > 0 {
		if cap(buf) >= int(n) {
			payload = buf[:n]
		} else {
			payload = make([]byte, n)
		}
		if got, err := io.ReadFull(r, payload); err != nil {
			if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
				return Record{}, fmt.Errorf("read record: payload cut after %d of %d bytes: %w", got, n, ErrTruncated)
			}
			return Record{}, fmt.Errorf("read record: %w", err)
		}
	}
	if got, want := be.Uint32(h[12:16]), checksum(h[:], payload); got != want {
		return Record{}, fmt.Errorf("read record: crc %#08x, computed %#08x: %w", got, want, ErrChecksum)
	}
	k := Kind(h[4])
	if k == 0 || k >= KindLen {
		return Record{}, fmt.Errorf("read record: kind %d: %w", h[4], ErrUnknownKind)
	}
	// Flags and reserved bits are zero in version 1; a record that sets them
	// is a variant we do not know, so it is reported like an unknown kind.
	if flags, res := h[5], be.Uint16(h[6:8]); flags != 0 || res != 0 {
		return Record{}, fmt.Errorf("read record: %s with flags %#x, reserved %#x: %w", k, flags, res, ErrUnknownKind)
	}
	return Record{
		Kind:     k,
		Position: be.Uint64(h[16:24]),
		Epoch:    be.Uint64(h[24:32]),
		Payload:  payload,
	}, nil
}

// helloPayload encodes a Hello payload: version, VM name length, VM name.
func helloPayload(vm string) []byte {
	p := binary.BigEndian.AppendUint16(nil, Version)
	p = binary.BigEndian.AppendUint16(p, uint16(len(vm)))
	return append(p, vm...)
}

// checkHello checks a peer's Hello payload against our version and VM.
// A malformed payload is reported as a version mismatch: it is what a peer
// speaking another protocol version would most likely send.
func checkHello(p []byte, vm string) error {
	if len(p) < 4 {
		return fmt.Errorf("check hello: payload %d bytes: %w", len(p), ErrVersion)
	}
	if v := binary.BigEndian.Uint16(p[0:2]); v != Version {
		return fmt.Errorf("check hello: peer speaks version %d, we speak %d: %w", v, Version, ErrVersion)
	}
	n := int(binary.BigEndian.Uint16(p[2:4]))
	if len(p) != 4+n {
		return fmt.Errorf("check hello: VM name length %d, payload %d bytes: %w", n, len(p), ErrVersion)
	}
	if got := string(p[4:]); got != vm {
		return fmt.Errorf("check hello: peer is for VM %q, we are for %q: %w", got, vm, ErrWrongVM)
	}
	return nil
}
