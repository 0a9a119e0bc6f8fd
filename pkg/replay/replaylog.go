package replay

// The QEMU 7.2 record/replay log format, read from QEMU 7.2's replay/*.c,
// include/sysemu/replay.h and net/filter-replay.c (Debian bookworm
// 1:7.2+dfsg-7+deb12u18); the Go below is written from this description.
//
// # Integers
//
// Every integer is big-endian whatever the host: replay_put_word writes the
// high byte first, put_dword is two words high first, put_qword two dwords
// high first. An array is a dword length followed by that many raw bytes.
//
// # Header
//
// A regular log file starts with a 12-byte header (HEADER_SIZE is
// sizeof(uint32_t)+sizeof(uint64_t)): the dword REPLAY_VERSION, 0xe0200c in
// 7.2, then 8 bytes that nothing reads or writes (zeros, a hole). The
// recorder fseeks past the header when it opens the file and writes the
// version only when it finishes (replay_finish), so a file still being
// recorded has zeros where the version goes. The replayer reads the version
// dword, checks it, then fseeks to offset 12.
//
// When the log is a pipe or FIFO both fseeks fail (ESPIPE) and are ignored:
// the recorder's stream starts with the first event at byte 0, and the
// version dword that replay_finish means for offset 0 lands after the END
// event instead (the "trailer"). A replayer reading a FIFO needs only the 4
// version bytes in front of the events: its fseek to 12 fails too, so it
// reads on from byte 4.
//
// The recorder writes through stdio, so a pipe reader sees the stream in
// buffer-sized bursts (4 KiB with glibc) that cut events anywhere.
//
// # Events
//
// Each event is one kind byte followed by a payload fixed by the kind:
//
//	code   kind                  payload
//	0      INSTRUCTION           dword n: n more instructions executed
//	1      INTERRUPT             -
//	2      EXCEPTION             -
//	3      ASYNC BH              qword id (the icount when scheduled)
//	4      ASYNC BH_ONESHOT      qword id
//	5      ASYNC INPUT           input event, see below
//	6      ASYNC INPUT_SYNC      -
//	7      ASYNC CHAR_READ       byte chardev index, array data
//	8      ASYNC BLOCK           qword request id
//	9      ASYNC NET             byte filter index, dword flags, array packet
//	10-21  SHUTDOWN + cause      - (cause 0..10 is ShutdownCause; 21 is
//	                             SHUTDOWN_CAUSE__MAX, reserved, never written)
//	22     CHAR_WRITE            dword result, dword offset
//	23     CHAR_READ_ALL         array data
//	24     CHAR_READ_ALL_ERROR   dword (negative) result
//	25     AUDIO_OUT             qword frames played
//	26     AUDIO_IN              qword recorded, qword wpos, then pairs of
//	                             qword samples whose number depends on the
//	                             capture buffer size, which is not in the
//	                             log: rejected here as ErrUnsupportedEvent
//	27     RANDOM                dword result, array bytes
//	28-29  CLOCK + kind          qword value (28 host, 29 virtual_rt)
//	30-38  CHECKPOINT + id       - (clock_warp_start, clock_warp_account,
//	                             reset_requested, suspend_requested,
//	                             clock_virtual, clock_host, clock_virtual_rt,
//	                             init, reset)
//	39     END                   - (the last event: replay_finish writes
//	                             an INSTRUCTION for the instructions not yet
//	                             logged, SHUTDOWN host-signal whatever the
//	                             cause of the exit, then END)
//
// Codes 40 and up do not exist (EVENT_COUNT is 40); the replayer exits on
// them, and so does this parser, with ErrUnknownEvent.
//
// The ASYNC INPUT payload is a dword InputEventKind then: key (0): dword
// KeyValueKind, then for number (0) a qword, for qcode (1) a dword, then a
// down byte; btn (1): dword button, byte down; rel (2) and abs (3): dword
// axis, qword value.
//
// # Instruction count
//
// The recorder keeps replay_state.current_icount, the raw icount
// (icount_get_raw, the executed guest instructions) up to which it has
// logged, and writes INSTRUCTION with the difference whenever it logs an
// event that needs an exact position (replay_save_instructions, and before
// every clock). So the sum of INSTRUCTION counts up to an event boundary is
// the raw icount at that point of the record, which is what QMP
// query-replay reports as "icount" and what replay-break takes, in both
// record and replay. The recorder's final INSTRUCTION event, written in
// replay_finish, brings the sum to the icount at which it stopped.
//
// The replayer reads ahead: when it finishes an event it immediately reads
// the next kind byte (and for INSTRUCTION its dword) while holding the
// replay lock, blocking there if the stream has no more. It only finishes
// an INSTRUCTION event when its last instruction has run, and while one is
// unfinished it reads no further (replay_next_event_is answers from the
// state it has). So a replayer that has been given every complete event up
// to a boundary with icount N and is held by replay-break at N-1 (or
// earlier) never asks for a byte it does not have.
//
// Events logged after the recorder's last instruction (main-loop timer
// checkpoints and host clock reads while the VM is stopped, the quit) are
// consumed by a replayer only if its own main loop asks for them in the
// same order, which depends on the recorder's timing; the icount does not
// move there.

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Version is QEMU 7.2's REPLAY_VERSION, the log's first dword.
const Version uint32 = 0xe0200c

// FileHeaderSize is the size of a regular log file's header: the version
// dword and 8 unused bytes.
const FileHeaderSize = 12

// StreamHeader is what goes in front of a recorder's pipe stream for a
// replayer reading a FIFO: the version dword alone.
var StreamHeader = binary.BigEndian.AppendUint32(nil, Version)

// MaxArrayLen bounds the length of an array in an event. A net packet is at
// most 64 KiB plus headers and the other arrays are small; a longer length
// means a corrupt stream, and refusing it keeps the scanner from buffering
// gigabytes waiting for an event that will never complete.
const MaxArrayLen = 16 << 20

// Kind is an event's kind byte as written in the log (QEMU's ReplayEvents).
type Kind uint8

// The event kinds of QEMU 7.2 (REPLAY_VERSION 0xe0200c).
const (
	KindInstruction      Kind = 0
	KindInterrupt        Kind = 1
	KindException        Kind = 2
	KindAsyncBH          Kind = 3
	KindAsyncBHOneshot   Kind = 4
	KindAsyncInput       Kind = 5
	KindAsyncInputSync   Kind = 6
	KindAsyncCharRead    Kind = 7
	KindAsyncBlock       Kind = 8
	KindAsyncNet         Kind = 9
	KindShutdown         Kind = 10 // + ShutdownCause
	KindShutdownLast     Kind = 21 // KindShutdown + SHUTDOWN_CAUSE__MAX
	KindCharWrite        Kind = 22
	KindCharReadAll      Kind = 23
	KindCharReadAllError Kind = 24
	KindAudioOut         Kind = 25
	KindAudioIn          Kind = 26
	KindRandom           Kind = 27
	KindClockHost        Kind = 28
	KindClockVirtualRT   Kind = 29
	KindCheckpoint       Kind = 30 // + ReplayCheckpoint
	KindCheckpointLast   Kind = 38
	KindEnd              Kind = 39
	kindCount            Kind = 40
)

// KindCheckpointClockVirtual is the checkpoint before QEMU_CLOCK_VIRTUAL
// timers run, logged when one of them is due: where a virtual timer fired.
const KindCheckpointClockVirtual = KindCheckpoint + 4

var kindNames = [kindCount]string{
	KindInstruction:      "instruction",
	KindInterrupt:        "interrupt",
	KindException:        "exception",
	KindAsyncBH:          "async-bh",
	KindAsyncBHOneshot:   "async-bh-oneshot",
	KindAsyncInput:       "async-input",
	KindAsyncInputSync:   "async-input-sync",
	KindAsyncCharRead:    "async-char-read",
	KindAsyncBlock:       "async-block",
	KindAsyncNet:         "async-net",
	KindCharWrite:        "char-write",
	KindCharReadAll:      "char-read-all",
	KindCharReadAllError: "char-read-all-error",
	KindAudioOut:         "audio-out",
	KindAudioIn:          "audio-in",
	KindRandom:           "random",
	KindClockHost:        "clock-host",
	KindClockVirtualRT:   "clock-virtual-rt",
	KindEnd:              "end",
}

var shutdownCauses = [...]string{"none", "host-error", "host-qmp-quit",
	"host-qmp-system-reset", "host-signal", "host-ui", "guest-shutdown",
	"guest-reset", "guest-panic", "subsystem-reset", "snapshot-load", "max"}

var checkpointNames = [...]string{"clock-warp-start", "clock-warp-account",
	"reset-requested", "suspend-requested", "clock-virtual", "clock-host",
	"clock-virtual-rt", "init", "reset"}

func (k Kind) String() string {
	switch {
	case k >= KindShutdown && k <= KindShutdownLast:
		return "shutdown-" + shutdownCauses[k-KindShutdown]
	case k >= KindCheckpoint && k <= KindCheckpointLast:
		return "checkpoint-" + checkpointNames[k-KindCheckpoint]
	case k < kindCount:
		return kindNames[k]
	}
	return fmt.Sprintf("unknown-0x%02x", uint8(k))
}

var (
	// ErrUnknownEvent: a kind byte QEMU 7.2 does not have.
	ErrUnknownEvent = errors.New("replay log: unknown event kind")
	// ErrUnsupportedEvent: an event this parser cannot delimit (AUDIO_IN).
	ErrUnsupportedEvent = errors.New("replay log: unsupported event kind")
	// ErrCorrupt: an event whose payload cannot be what QEMU writes.
	ErrCorrupt = errors.New("replay log: corrupt event")
	// ErrBadHeader: a file header whose version is not Version.
	ErrBadHeader = errors.New("replay log: bad header")
	// ErrAfterEnd: bytes after the END event (and its trailer).
	ErrAfterEnd = errors.New("replay log: data after end event")
	// ErrTruncated: the log stops inside an event or header.
	ErrTruncated = errors.New("replay log: truncated")
)

// Framing says how the events are framed in the bytes a LogScanner reads.
type Framing int

const (
	// StreamFraming is a recorder's pipe or FIFO stream: events from byte 0
	// and, after END, an optional 4-byte version trailer.
	StreamFraming Framing = iota
	// FileFraming is a regular log file: the 12-byte header, then events.
	// A version of zero is accepted: the recorder writes the version only
	// when it finishes, so a file read while recording has zeros there.
	FileFraming
)

// LogEvent is one event as the scanner delimited it.
type LogEvent struct {
	Offset  int64  // offset of the kind byte in the bytes scanned
	Kind    Kind   // the kind byte
	Payload []byte // the bytes after the kind byte; valid only during OnEvent
	Icount  uint64 // the instruction count once this event is done
}

// LogScanner delimits the events of a replay log fed to it in pieces of
// any size, without interpreting them beyond what finding their ends
// needs. It is not safe for concurrent use.
type LogScanner struct {
	// OnEvent, if set, is called for every complete event, in order.
	OnEvent func(LogEvent)

	framing   Framing
	dataStart int64  // offset of the first event: 0 or FileHeaderSize
	buf       []byte // bytes from offset base not yet delimited
	base      int64
	complete  int64 // offset just past the last complete event
	icount    uint64
	events    int64
	ended     bool // END seen
	trailer   int  // trailer bytes seen after END (StreamFraming)
	err       error
}

// NewLogScanner returns a scanner for a log framed as f.
func NewLogScanner(f Framing) *LogScanner {
	s := &LogScanner{framing: f}
	if f == FileFraming {
		s.dataStart = FileHeaderSize
	}
	s.complete = s.dataStart
	return s
}

// DataStart is the offset of the first event: FileHeaderSize for
// FileFraming, 0 for StreamFraming.
func (s *LogScanner) DataStart() int64 { return s.dataStart }

// Complete is the offset just past the last complete event: the bytes from
// DataStart to Complete are whole events.
func (s *LogScanner) Complete() int64 { return s.complete }

// Icount is the instruction count at Complete: the sum of the INSTRUCTION
// events so far, the number query-replay reports and replay-break takes.
func (s *LogScanner) Icount() uint64 { return s.icount }

// Events is how many complete events have been scanned.
func (s *LogScanner) Events() int64 { return s.events }

// Ended says whether the END event has been scanned.
func (s *LogScanner) Ended() bool { return s.ended }

// Err is the error that stopped the scanner, if any.
func (s *LogScanner) Err() error { return s.err }

// Write scans p. It returns len(p) unless the log is malformed, in which
// case the error (sticky: every later Write returns it) names the offset and
// the byte at fault.
func (s *LogScanner) Write(p []byte) (int, error) {
	if s.err != nil {
		return 0, s.err
	}
	s.buf = append(s.buf, p...)
	pos := 0 // into buf
	defer func() {
		// Keep only the partial event; copy so the array under a long
		// stream does not grow without bound.
		rest := len(s.buf) - pos
		if pos > 0 {
			copy(s.buf, s.buf[pos:])
			s.buf = s.buf[:rest]
			s.base += int64(pos)
		}
	}()
	for pos < len(s.buf) {
		off := s.base + int64(pos)
		if off < s.dataStart {
			if len(s.buf)-pos < FileHeaderSize {
				return len(p), nil
			}
			v := binary.BigEndian.Uint32(s.buf[pos:])
			if v != Version && v != 0 {
				s.err = fmt.Errorf("offset 0: version 0x%x, want 0x%x: %w", v, Version, ErrBadHeader)
				return 0, s.err
			}
			pos += FileHeaderSize
			continue
		}
		if s.ended {
			n, err := s.scanTrailer(s.buf[pos:], off)
			pos += n
			if err != nil {
				s.err = err
				return 0, err
			}
			continue
		}
		n, err := eventLen(s.buf[pos:], off)
		if err != nil {
			s.err = err
			return 0, err
		}
		if n == 0 {
			break // partial event: wait for more
		}
		ev := LogEvent{Offset: off, Kind: Kind(s.buf[pos]), Payload: s.buf[pos+1 : pos+n]}
		switch ev.Kind {
		case KindInstruction:
			s.icount += uint64(binary.BigEndian.Uint32(ev.Payload))
		case KindEnd:
			s.ended = true
		}
		ev.Icount = s.icount
		pos += n
		s.complete = off + int64(n)
		s.events++
		if s.OnEvent != nil {
			s.OnEvent(ev)
		}
	}
	return len(p), nil
}

// NetEventFrame returns the frame an ASYNC NET event's payload carries
// (byte filter index, dword flags, array frame).
func NetEventFrame(payload []byte) ([]byte, error) {
	if len(payload) < 9 {
		return nil, fmt.Errorf("net event of %d bytes: %w", len(payload), ErrCorrupt)
	}
	n := binary.BigEndian.Uint32(payload[5:9])
	if uint64(n) != uint64(len(payload)-9) {
		return nil, fmt.Errorf("net event: frame of %d bytes in %d: %w", n, len(payload)-9, ErrCorrupt)
	}
	return payload[9:], nil
}

// scanTrailer checks what follows END: in a stream, the version dword the
// recorder meant for the header; in a file, nothing.
func (s *LogScanner) scanTrailer(b []byte, off int64) (int, error) {
	if s.framing != StreamFraming || s.trailer == len(StreamHeader) {
		return 0, fmt.Errorf("offset %d: byte 0x%02x: %w", off, b[0], ErrAfterEnd)
	}
	n := 0
	for n < len(b) && s.trailer < len(StreamHeader) {
		if b[n] != StreamHeader[s.trailer] {
			return n, fmt.Errorf("offset %d: byte 0x%02x is not version trailer byte 0x%02x: %w",
				off+int64(n), b[n], StreamHeader[s.trailer], ErrAfterEnd)
		}
		s.trailer++
		n++
	}
	return n, nil
}

// Finish reports whether the log stopped cleanly: nil if everything fed
// was whole events (plus a whole header and trailer), ErrTruncated if it
// stopped inside one.
func (s *LogScanner) Finish() error {
	if s.err != nil {
		return s.err
	}
	end := s.base + int64(len(s.buf))
	switch {
	case end < s.dataStart:
		return fmt.Errorf("header ends at offset %d, want %d: %w", end, s.dataStart, ErrTruncated)
	case len(s.buf) > 0:
		return fmt.Errorf("event %s at offset %d: %d bytes, incomplete: %w",
			Kind(s.buf[0]), s.complete, len(s.buf), ErrTruncated)
	case s.trailer != 0 && s.trailer != len(StreamHeader):
		return fmt.Errorf("version trailer: %d of %d bytes: %w", s.trailer, len(StreamHeader), ErrTruncated)
	}
	return nil
}

// eventLen returns the length of the event at the start of b (kind byte
// included), or 0 if b holds only part of it. off is b's offset, for errors.
func eventLen(b []byte, off int64) (int, error) {
	k := Kind(b[0])
	r := reader{b: b, n: 1}
	switch {
	case k == KindInstruction, k == KindCharReadAllError:
		r.skip(4)
	case k == KindInterrupt, k == KindException, k == KindAsyncInputSync,
		k >= KindShutdown && k <= KindShutdownLast,
		k >= KindCheckpoint && k <= KindCheckpointLast, k == KindEnd:
	case k == KindAsyncBH, k == KindAsyncBHOneshot, k == KindAsyncBlock,
		k == KindAudioOut, k == KindClockHost, k == KindClockVirtualRT:
		r.skip(8)
	case k == KindAsyncCharRead:
		r.skip(1)
		r.array()
	case k == KindAsyncNet:
		r.skip(1 + 4)
		r.array()
	case k == KindCharWrite:
		r.skip(4 + 4)
	case k == KindCharReadAll:
		r.array()
	case k == KindRandom:
		r.skip(4)
		r.array()
	case k == KindAsyncInput:
		r.input()
	case k == KindAudioIn:
		return 0, fmt.Errorf("offset %d: event kind byte 0x%02x (%s): sample count depends on the capture buffer size: %w",
			off, b[0], k, ErrUnsupportedEvent)
	default:
		return 0, fmt.Errorf("offset %d: event kind byte 0x%02x: %w", off, b[0], ErrUnknownEvent)
	}
	if r.err != nil {
		return 0, fmt.Errorf("offset %d: event %s: %w", off, k, r.err)
	}
	if r.short || r.n > len(b) {
		return 0, nil
	}
	return r.n, nil
}

// reader walks an event's payload. Reading past the end of b sets short
// rather than failing: the rest of the event has not arrived yet.
type reader struct {
	b     []byte
	n     int // bytes walked, may run past len(b)
	short bool
	err   error
}

func (r *reader) skip(n int) { r.n += n }

func (r *reader) dword() uint32 {
	if r.n+4 > len(r.b) {
		r.short = true
		r.n += 4
		return 0
	}
	v := binary.BigEndian.Uint32(r.b[r.n:])
	r.n += 4
	return v
}

func (r *reader) array() {
	n := r.dword()
	if r.short {
		return
	}
	if n > MaxArrayLen {
		r.err = fmt.Errorf("array length %d over %d: %w", n, MaxArrayLen, ErrCorrupt)
		return
	}
	r.n += int(n)
}

// input walks an ASYNC INPUT payload (replay_save_input_event).
func (r *reader) input() {
	switch typ := r.dword(); {
	case r.short:
	case typ == 0: // key
		switch kv := r.dword(); {
		case r.short:
		case kv == 0: // number
			r.skip(8 + 1)
		case kv == 1: // qcode
			r.skip(4 + 1)
		default:
			r.err = fmt.Errorf("key value kind %d: %w", kv, ErrCorrupt)
		}
	case typ == 1: // btn
		r.skip(4 + 1)
	case typ == 2, typ == 3: // rel, abs
		r.skip(4 + 8)
	default:
		r.err = fmt.Errorf("input event kind %d: %w", typ, ErrCorrupt)
	}
}
