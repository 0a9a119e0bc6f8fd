package lockstep

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"time"
)

// Wire constants; doc.go describes the layout.
const (
	Magic      = 0x4654474c // "FTGL"
	HeaderLen  = 32
	MaxPayload = 65536 // largest payload ReadRecord accepts
	MaxFrame   = 9216  // largest Ethernet frame Primary.AppendFrame accepts
	Version    = 2     // protocol version carried in Hello
	MaxVMName  = 255   // longest VM name in a Hello
	// MaxSnapshot bounds the VM state a secondary takes in before its log
	// (SnapshotChunk records): it is held in memory until it is whole. A
	// real VM's is its saved RAM (about 190 MB for the lab's 256 MiB
	// guest) and its disk's allocated clusters (16 MB for the lab's).
	MaxSnapshot = 512 << 20
	// SnapshotWait is how long a secondary that asked for a snapshot waits
	// for it to begin: the primary takes it first.
	SnapshotWait = 30 * time.Second

	heartbeatLen = 16 // Heartbeat payload: send time, echo
)

// Kind is the record type in byte 4 of the header.
type Kind uint8

const (
	KindHello       Kind = 1 + iota // handshake, both directions
	KindRXFrame                     // primary → secondary: one logged frame
	KindHeartbeat                   // both directions: liveness and RTT
	KindAck                         // secondary → primary: highest contiguous position
	KindQEMULog                     // primary → secondary: a chunk of the VM engine's replay log
	KindProgress                    // secondary → primary: how far its replay trails the log
	KindSnapshot                    // primary → secondary: a piece of the VM's state the log starts from
	KindSnapshotEnd                 // primary → secondary: the state's length and SHA-256
	KindHandOver                    // primary → secondary: take the VM over (switchover)
	KindLen                         // number of kinds + 1; not a kind
)

var kindNames = [KindLen]string{
	KindHello:       "hello",
	KindRXFrame:     "rx_frame",
	KindHeartbeat:   "heartbeat",
	KindAck:         "ack",
	KindQEMULog:     "qemu_log",
	KindProgress:    "progress",
	KindSnapshot:    "snapshot",
	KindSnapshotEnd: "snapshot_end",
	KindHandOver:    "hand_over",
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
	// ErrIncarnation: the peer's log is another incarnation of the VM's
	// log than the one this host holds, at the same epoch: a primary that
	// restarted with a fresh VM. Following it would graft a different
	// history onto the acknowledged one.
	ErrIncarnation = errors.New("log incarnation mismatch")
	// ErrPeerLacksLog: the secondary does not hold the log the primary's
	// outputs wait on (it restarted, or follows another incarnation), and
	// this primary has no snapshot to rebuild it from.
	ErrPeerLacksLog = errors.New("secondary lacks the log")
	// ErrSnapshot: a snapshot that arrived cut, too long or corrupt.
	ErrSnapshot = errors.New("bad snapshot")
	// ErrPrimaryRestarted: the connection only announced that the primary's
	// daemon restarted (AnnounceRestart).
	ErrPrimaryRestarted = errors.New("primary restarted")
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

// helloInfo is what a Hello carries besides the VM name: which log the sender
// writes or follows, and how it may follow it.
type helloInfo struct {
	// Incarnation names the log: a random number a host draws whenever it
	// starts the VM's log afresh (first boot, go-live). 0: no log yet.
	Incarnation uint64
	// FromBoot (primary): position 0 of this log is the VM's boot state,
	// so a secondary that booted the same VM can follow it from 0.
	FromBoot bool
	// NeedSnapshot (secondary): it cannot follow this log from what it
	// holds and wants the VM's state first (Snapshot records).
	NeedSnapshot bool
	// Restarted (AnnounceRestart): the sender served the VM at the Hello's
	// epoch and its daemon restarted: its copy, and its log, are gone.
	Restarted bool
}

const (
	helloFromBoot     = 1 << 0
	helloNeedSnapshot = 1 << 1
	helloRestarted    = 1 << 2
)

// helloPayload encodes a Hello payload: version, VM name length, VM name,
// incarnation, flags.
func helloPayload(vm string, h helloInfo) []byte {
	p := binary.BigEndian.AppendUint16(nil, Version)
	p = binary.BigEndian.AppendUint16(p, uint16(len(vm)))
	p = append(p, vm...)
	p = binary.BigEndian.AppendUint64(p, h.Incarnation)
	var flags byte
	if h.FromBoot {
		flags |= helloFromBoot
	}
	if h.NeedSnapshot {
		flags |= helloNeedSnapshot
	}
	if h.Restarted {
		flags |= helloRestarted
	}
	return append(p, flags)
}

// checkHello checks a peer's Hello payload against our version and VM and
// returns what else it says. A malformed payload is reported as a version
// mismatch: it is what a peer speaking another protocol version would most
// likely send.
func checkHello(p []byte, vm string) (helloInfo, error) {
	if len(p) < 4 {
		return helloInfo{}, fmt.Errorf("check hello: payload %d bytes: %w", len(p), ErrVersion)
	}
	if v := binary.BigEndian.Uint16(p[0:2]); v != Version {
		return helloInfo{}, fmt.Errorf("check hello: peer speaks version %d, we speak %d: %w", v, Version, ErrVersion)
	}
	n := int(binary.BigEndian.Uint16(p[2:4]))
	if len(p) != 4+n+9 {
		return helloInfo{}, fmt.Errorf("check hello: VM name length %d, payload %d bytes: %w", n, len(p), ErrVersion)
	}
	if got := string(p[4 : 4+n]); got != vm {
		return helloInfo{}, fmt.Errorf("check hello: peer is for VM %q, we are for %q: %w", got, vm, ErrWrongVM)
	}
	flags := p[4+n+8]
	if flags&^(helloFromBoot|helloNeedSnapshot|helloRestarted) != 0 {
		return helloInfo{}, fmt.Errorf("check hello: unknown flags %#x: %w", flags, ErrVersion)
	}
	return helloInfo{
		Incarnation:  binary.BigEndian.Uint64(p[4+n:]),
		FromBoot:     flags&helloFromBoot != 0,
		NeedSnapshot: flags&helloNeedSnapshot != 0,
		Restarted:    flags&helloRestarted != 0,
	}, nil
}

// snapshotTrailer is the SnapshotEnd payload: the state's length and its
// SHA-256, so a secondary never starts its VM from a state that arrived
// cut or corrupt (each record's CRC only covers that record).
func snapshotTrailer(state []byte) []byte {
	sum := sha256.Sum256(state)
	return append(binary.BigEndian.AppendUint64(nil, uint64(len(state))), sum[:]...)
}

// checkSnapshot checks a whole snapshot against its SnapshotEnd payload.
func checkSnapshot(state, trailer []byte) error {
	if len(trailer) != 8+sha256.Size {
		return fmt.Errorf("check snapshot: trailer of %d bytes: %w", len(trailer), ErrSnapshot)
	}
	if n := binary.BigEndian.Uint64(trailer); n != uint64(len(state)) {
		return fmt.Errorf("check snapshot: %d bytes arrived, %d sent: %w", len(state), n, ErrSnapshot)
	}
	if sum := sha256.Sum256(state); !bytes.Equal(sum[:], trailer[8:]) {
		return fmt.Errorf("check snapshot: SHA-256 mismatch: %w", ErrSnapshot)
	}
	return nil
}
