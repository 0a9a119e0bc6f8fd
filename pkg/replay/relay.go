package replay

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Relay feeds a replaying QEMU (rr=replay, rrfile=FIFO) from a recorder's
// log stream that arrives in chunks cut anywhere (as read from the network).
//
// QEMU 7.2's replayer exits ("error reading the replay data") when its
// read hits end of file, and one that has caught up blocks inside a read
// while holding the replay lock, freezing its QMP. So the relay hands the
// replayer only whole events, and says how far they go (Forwarded) so the
// engine can hold the replayer with QMP replay-break short of the forwarded
// icount and cont it as more arrives: a replayer held there never reads
// past what it was given (see the format notes in replaylog.go). Where
// exactly matters, because a break pauses the VM: Position.Hold is where
// following is safe (hold.go), and only a go-live, which never resumes the
// replay, stops at the forwarded icount minus one.
//
// Write never blocks on the replayer: whole events are appended to an
// in-memory backlog that one goroutine writes to the FIFO, and nothing is
// dropped. A replayer that falls behind therefore costs memory, not a stall
// of the stream from the primary; the engine watches Pending and gives up
// on a secondary whose backlog grows past what it will hold.
//
// The backlog is written in pieces of about relayPiece bytes cut at event
// boundaries, and Forwarded moves as each piece is written. One write of
// the whole backlog would deadlock: larger than the room in the FIFO, it
// would wait for the replayer to read, while the replayer, held at a break
// set from Forwarded, which only moves once the write returns, reads
// nothing. With pieces, everything in the FIFO is counted, so a break set
// from Forwarded lets the replayer drain the FIFO and make room for the
// next piece. That needs the FIFO to hold the events that follow the last
// INSTRUCTION event written (a replayer held one instruction before it
// leaves them unread) plus a piece: a few KiB in practice, and
// OpenFIFOWriter makes the pipe FIFOSize bytes.
type Relay struct {
	w       io.Writer
	writeMu sync.Mutex  // serialises Write; guards scan, held, heldAt
	scan    *LogScanner // delimits the events
	held    []byte      // log bytes from offset heldAt not yet whole events
	heldAt  int64
	tail    [][]byte // frames of the NET events after the last INSTRUCTION
	drops   []int64  // offsets of host shutdown events not yet queued
	holds   holdPoints

	mu      sync.Mutex
	cond    *sync.Cond // signalled when the backlog grows or shrinks, on close or failure
	queue   []segment  // whole events not yet handed to w
	backlog int        // bytes in queue or being written
	fwd     Position   // what w has taken
	err     error      // the first scan or write error
	closing bool
	done    chan struct{} // closed when the writer goroutine exits
}

// relayPiece is the size the backlog is written in (a pipe's atomic write
// size); a piece holds at least one whole event, so it can be larger.
const relayPiece = 4096

// segment is whole events, the icount at their end and the latest safe
// hold in them or before.
type segment struct {
	data   []byte
	icount uint64
	hold   uint64
	header bool // the version header, not counted in Forwarded
}

// Position is how far a log has been forwarded: Bytes of events (the
// version header not counted) and the icount at their end.
type Position struct {
	Bytes  int64
	Icount uint64
	// Hold is the latest icount, in what was forwarded, at which a
	// replayer that will resume can be held: no virtual timer fires just
	// after it (see hold.go). 0 until there is one.
	Hold uint64
}

// NewRelay starts relaying a log framed as f to w. The version header goes
// to w first, so w sees what a replayer reading a FIFO expects.
func NewRelay(w io.Writer, f Framing) *Relay {
	r := &Relay{
		w:       w,
		scan:    NewLogScanner(f),
		queue:   []segment{{data: bytes.Clone(StreamHeader), header: true}},
		backlog: len(StreamHeader),
		done:    make(chan struct{}),
	}
	r.cond = sync.NewCond(&r.mu)
	r.scan.OnEvent = r.noteEvent
	go r.writeLoop()
	return r
}

// noteEvent looks for safe holds and keeps the frames of the network input
// events that follow the last INSTRUCTION event scanned (see TailInput).
func (r *Relay) noteEvent(ev LogEvent) {
	r.holds.note(ev)
	if hostShutdown(ev.Kind) {
		r.drops = append(r.drops, ev.Offset)
	}
	switch ev.Kind {
	case KindInstruction:
		r.tail = nil
	case KindAsyncNet:
		if frame, err := NetEventFrame(ev.Payload); err == nil {
			r.tail = append(r.tail, bytes.Clone(frame))
		}
	}
}

// TailInput returns the frames the log delivered to the guest after its
// last INSTRUCTION event. A replayer held one instruction short of the end
// (Follow, ReplayToEnd) has not taken them in, yet the recorder may have
// answered them: it flushes the log before each frame it sends, and an
// answer can leave (virtio-net flushes a second queued frame at once, from
// the vCPU) before any further INSTRUCTION event is logged. A VM that goes
// live from such a replay must be given these frames again.
func (r *Relay) TailInput() [][]byte {
	r.writeMu.Lock()
	defer r.writeMu.Unlock()
	return slices.Clone(r.tail)
}

// Write takes the next chunk of the log. It returns an error, and the relay
// stops, if the log is malformed or w failed.
func (r *Relay) Write(chunk []byte) (int, error) {
	r.writeMu.Lock()
	defer r.writeMu.Unlock()
	r.mu.Lock()
	err, closing := r.err, r.closing
	r.mu.Unlock()
	if err != nil {
		return 0, err
	}
	if closing {
		return 0, errors.New("relay write: relay closed")
	}
	written := len(chunk)
	// Scanned a piece at a time so that the backlog has an event boundary,
	// a point Forwarded can stop at, at least every relayPiece bytes.
	for p := chunk; len(p) > 0; {
		n := min(len(p), relayPiece)
		if err := r.take(p[:n]); err != nil {
			r.fail(err)
			return 0, err
		}
		p = p[n:]
	}
	return written, nil
}

// take scans p and queues the events it completes.
func (r *Relay) take(p []byte) error {
	if _, err := r.scan.Write(p); err != nil {
		return fmt.Errorf("relay scan: %w", err)
	}
	// held keeps the bytes from heldAt on that are not yet whole events;
	// those the scanner now reports complete are queued, minus a file
	// header.
	r.held = append(r.held, p...)
	end := r.scan.Complete()
	from := max(r.heldAt, r.scan.DataStart())
	if end <= from {
		return nil
	}
	seg := segment{data: r.withoutDrops(from, end), icount: r.scan.Icount(), hold: r.holds.safe}
	r.held = r.held[:copy(r.held, r.held[end-r.heldAt:])]
	r.heldAt = end
	r.mu.Lock()
	r.queue = append(r.queue, seg)
	r.backlog += len(seg.data)
	r.cond.Broadcast()
	r.mu.Unlock()
	return nil
}

// hostShutdown says whether k is a shutdown the recorder's host caused (QMP
// quit, a signal, the UI, an error): the recorder's QEMU ending, not the
// guest's doing. A replayer that read one would shut its VM down at once,
// silently, so the relay leaves them out: the VM a secondary replays lives
// on to take over. (A replayer reaches one whenever the recorder ran
// instructions after it was told to quit, which showed as a replayer
// vanishing in 2 of 18 runs of a pkg/replay test.) Shutdowns and resets
// the guest asked for stay: they are its execution.
func hostShutdown(k Kind) bool {
	switch k {
	case KindShutdown + 1, KindShutdown + 2, KindShutdown + 4, KindShutdown + 5:
		return true // host-error, host-qmp-quit, host-signal, host-ui
	}
	return false
}

// withoutDrops copies the held bytes from offset from to end, leaving out
// the one-byte host shutdown events among them.
func (r *Relay) withoutDrops(from, end int64) []byte {
	out := make([]byte, 0, end-from)
	at := from
	for len(r.drops) > 0 && r.drops[0] < end {
		if d := r.drops[0]; d >= at {
			out = append(out, r.held[at-r.heldAt:d-r.heldAt]...)
			at = d + 1
		}
		r.drops = r.drops[1:]
	}
	return append(out, r.held[at-r.heldAt:end-r.heldAt]...)
}

// Forwarded is how much of the log w has taken: whole events only.
func (r *Relay) Forwarded() Position {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.fwd
}

// Received is the icount at the end of the whole events received, those
// still in the backlog included: what a go-live would have to replay.
func (r *Relay) Received() uint64 {
	r.writeMu.Lock()
	defer r.writeMu.Unlock()
	return r.scan.Icount()
}

// Pending is how many bytes w has not taken yet, those being written
// included: the replayer's backlog.
func (r *Relay) Pending() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.backlog
}

// Ended says whether the log's END event has been received.
func (r *Relay) Ended() bool {
	r.writeMu.Lock()
	defer r.writeMu.Unlock()
	return r.scan.Ended()
}

// Err is the error that stopped the relay, if any.
func (r *Relay) Err() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.err
}

// WaitForwarded waits until w has taken events up to icount at least, the
// relay fails, or ctx ends.
func (r *Relay) WaitForwarded(ctx context.Context, icount uint64) (Position, error) {
	return r.waitFor(ctx, func(p Position) bool { return p.Icount >= icount })
}

// WaitHold waits until the forwarded events hold a safe hold at icount or
// later, the relay fails, or ctx ends.
func (r *Relay) WaitHold(ctx context.Context, icount uint64) (Position, error) {
	return r.waitFor(ctx, func(p Position) bool { return p.Hold >= icount })
}

func (r *Relay) waitFor(ctx context.Context, reached func(Position) bool) (Position, error) {
	stop := context.AfterFunc(ctx, func() {
		r.mu.Lock()
		r.cond.Broadcast()
		r.mu.Unlock()
	})
	defer stop()
	r.mu.Lock()
	defer r.mu.Unlock()
	for !reached(r.fwd) {
		if r.err != nil {
			return r.fwd, r.err
		}
		if err := ctx.Err(); err != nil {
			return r.fwd, err
		}
		r.cond.Wait()
	}
	return r.fwd, nil
}

// Close stops the relay once the backlog is written and returns the
// relay's error, if any. It does not close w; if w can block for good (a
// replayer that stopped reading), close w first to make Close return.
func (r *Relay) Close() error {
	r.mu.Lock()
	r.closing = true
	r.cond.Broadcast()
	r.mu.Unlock()
	<-r.done
	return r.Err()
}

func (r *Relay) fail(err error) {
	r.mu.Lock()
	if r.err == nil {
		r.err = err
	}
	r.cond.Broadcast()
	r.mu.Unlock()
}

// writeLoop writes the backlog to w a piece at a time, small segments
// coalesced, and advances Forwarded as each piece is written.
func (r *Relay) writeLoop() {
	defer close(r.done)
	var piece []byte
	for {
		r.mu.Lock()
		for len(r.queue) == 0 && !r.closing && r.err == nil {
			r.cond.Wait()
		}
		if r.err != nil || len(r.queue) == 0 {
			r.mu.Unlock()
			return
		}
		queue := r.queue
		r.queue = nil
		r.mu.Unlock()

		for len(queue) > 0 {
			piece = piece[:0]
			var events int64 // bytes of events in piece
			var icount, hold uint64
			for len(queue) > 0 && (len(piece) == 0 || len(piece)+len(queue[0].data) <= relayPiece) {
				seg := queue[0]
				queue = queue[1:]
				piece = append(piece, seg.data...)
				if !seg.header {
					events += int64(len(seg.data))
					icount, hold = seg.icount, seg.hold
				}
			}
			if _, err := r.w.Write(piece); err != nil {
				r.fail(fmt.Errorf("relay write: %w", err))
				return
			}
			r.mu.Lock()
			r.backlog -= len(piece)
			if events > 0 {
				r.fwd.Bytes += events
				r.fwd.Icount, r.fwd.Hold = icount, hold
			}
			r.cond.Broadcast()
			r.mu.Unlock()
		}
	}
}

// MakeFIFO creates a FIFO at path for the replayer to read its log from.
func MakeFIFO(path string) error {
	if err := unix.Mkfifo(path, 0o600); err != nil {
		return fmt.Errorf("make fifo %s: %w", path, err)
	}
	return nil
}

// FIFOSize is the pipe size OpenFIFOWriter sets: room for the events a
// held replayer leaves unread (see Relay), with a wide margin.
const FIFOSize = 1 << 20

// OpenFIFOWriter opens the FIFO at path for writing once a reader (the
// replaying QEMU) has it open, polling until then or until ctx ends, and
// makes the pipe FIFOSize bytes.
//
// A plain O_WRONLY open would block the thread with no way to give up;
// O_NONBLOCK fails with ENXIO while there is no reader instead. The file
// stays non-blocking, which lets Go's poller park a writer goroutine on a
// full pipe rather than a thread. O_RDWR would never wait, but the relay
// would then be a reader itself and never see EPIPE when the replayer dies.
func OpenFIFOWriter(ctx context.Context, path string) (*os.File, error) {
	for {
		fd, err := unix.Open(path, unix.O_WRONLY|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
		if err == nil {
			if _, err := unix.FcntlInt(uintptr(fd), unix.F_SETPIPE_SZ, FIFOSize); err != nil {
				unix.Close(fd)
				return nil, fmt.Errorf("set fifo %s size to %d: %w", path, FIFOSize, err)
			}
			return os.NewFile(uintptr(fd), path), nil
		}
		if !errors.Is(err, unix.ENXIO) {
			return nil, fmt.Errorf("open fifo %s: %w", path, err)
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("open fifo %s: no reader: %w", path, ctx.Err())
		case <-time.After(10 * time.Millisecond):
		}
	}
}
