package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/ftgw/ftgw/pkg/datapath"
	"github.com/ftgw/ftgw/pkg/outputcommit"
)

// A request trace: timestamps taken along a real VM's requests, all in
// CLOCK_MONOTONIC (datapath.MonotonicNs), which every process of the lab
// shares, so that `ftgw bench` can put one request's times side by side:
// the client's send and receive, QEMU's tap read and write and the flush
// before the write (the preloaded library), the daemon's read of the log
// chunk that covers the reply, its hand-over to the log channel, the ack
// that covers it, and the reply's release. Each side keeps a ring of its
// last few thousand events and the bench takes them after each case's
// requests; nothing is aggregated on the hot paths.

// rrTraceLen and the layout below are preload/ftgw-rr.c's struct rr_trace.
const (
	rrTraceMagic    = 0x66746777727274
	rrTraceLen      = 8192
	rrTraceEntryU64 = 5 // seq, input_ns, flush_start_ns, flush_end_ns, head
	rrTraceSize     = 8 * (2 + rrTraceLen*rrTraceEntryU64)
)

// rrTrace is the shared memory the preloaded library writes its tap
// timestamps to.
type rrTrace struct {
	f   *os.File
	mem []byte
}

func newRRTrace() (_ *rrTrace, err error) {
	fd, err := unix.MemfdCreate("ftgw-rr-trace", unix.MFD_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("create request trace: %w", err)
	}
	f := os.NewFile(uintptr(fd), "ftgw-rr-trace")
	defer func() {
		if err != nil {
			f.Close()
		}
	}()
	if err := f.Truncate(rrTraceSize); err != nil {
		return nil, fmt.Errorf("size request trace: %w", err)
	}
	mem, err := unix.Mmap(fd, 0, rrTraceSize, unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("map request trace: %w", err)
	}
	return &rrTrace{f: f, mem: mem}, nil
}

// File is the descriptor QEMU gets (replay.Config.Trace).
func (t *rrTrace) File() *os.File { return t.f }

func (t *rrTrace) word(i int) uint64 {
	return atomic.LoadUint64((*uint64)(unsafe.Pointer(&t.mem[8*i])))
}

// tapWrite is one frame QEMU wrote to the tap: when QEMU last read a frame
// from the tap before it, when the flush of the replay log before it began
// and ended (both the write's time for an unprotected VM, which has no
// log), and the log head after the flush (the frame's stamp).
type tapWrite struct {
	InputNs      uint64 `json:"input_ns"`
	FlushStartNs uint64 `json:"flush_start_ns"`
	FlushEndNs   uint64 `json:"flush_end_ns"`
	Head         uint64 `json:"head"`
}

// Writes returns the tap writes the ring still holds whose flush ended at
// or after sinceNs, oldest first. An entry the library is rewriting is
// left out.
func (t *rrTrace) Writes(sinceNs uint64) []tapWrite {
	if t.word(0) != rrTraceMagic {
		return nil // QEMU has not started its library yet
	}
	count := t.word(1)
	var out []tapWrite
	for n := count - min(count, rrTraceLen); n < count; n++ {
		base := 2 + int(n%rrTraceLen)*rrTraceEntryU64
		seq := t.word(base)
		w := tapWrite{InputNs: t.word(base + 1), FlushStartNs: t.word(base + 2), FlushEndNs: t.word(base + 3), Head: t.word(base + 4)}
		if seq != n+1 || t.word(base) != seq {
			continue
		}
		if w.FlushEndNs >= sinceNs {
			out = append(out, w)
		}
	}
	return out
}

func (t *rrTrace) Close() error {
	return errors.Join(unix.Munmap(t.mem), t.f.Close())
}

// chunkTime is one chunk of a recorder's log on its way to the secondary:
// the byte offset it ends at, when the daemon read it from QEMU's pipe,
// when it handed it to the log channel (sent, or queued for the channel's
// writer if that was busy), and when the ack that covers it arrived (0:
// not yet).
type chunkTime struct {
	Pos       uint64 `json:"pos"`
	End       uint64 `json:"end"`
	ReadNs    uint64 `json:"read_ns"`
	ShippedNs uint64 `json:"shipped_ns"`
	AckNs     uint64 `json:"ack_ns"`
}

// chunkTimes remembers the last chunks shipped.
type chunkTimes struct {
	mu    sync.Mutex
	ring  [8192]chunkTime
	last  uint64 // the last position added
	acked uint64 // the last position whose ack time is set
}

func (c *chunkTimes) shipped(pos, end, readNs uint64) {
	now := datapath.MonotonicNs()
	c.mu.Lock()
	c.ring[pos%uint64(len(c.ring))] = chunkTime{Pos: pos, End: end, ReadNs: readNs, ShippedNs: now}
	c.last = max(c.last, pos)
	c.mu.Unlock()
}

func (c *chunkTimes) ack(pos uint64) {
	now := datapath.MonotonicNs()
	c.mu.Lock()
	defer c.mu.Unlock()
	n := uint64(len(c.ring))
	from, to := newlyAcked(c.acked, c.last, pos, n)
	for p := from; p <= to; p++ {
		if t := &c.ring[p%n]; t.Pos == p && t.AckNs == 0 {
			t.AckNs = now
		}
	}
	c.acked = max(c.acked, min(pos, c.last))
}

// since returns the chunks read at or after sinceNs, in position order.
func (c *chunkTimes) since(sinceNs uint64) []chunkTime {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := uint64(len(c.ring))
	var out []chunkTime
	for p := c.last - min(c.last, n-1); p <= c.last; p++ {
		if t := c.ring[p%n]; t.Pos == p && p != 0 && t.ReadNs >= sinceNs {
			out = append(out, t)
		}
	}
	return out
}

type releasedFrame = outputcommit.ReleasedFrame

// requestTrace is what GET /trace returns: a serving real VM's events
// since a point in time.
type requestTrace struct {
	TapWrites []tapWrite                   `json:"tap_writes"`
	Chunks    []chunkTime                  `json:"chunks"`
	Released  []outputcommit.ReleasedFrame `json:"released"`
}

// serveTrace answers GET /trace?since=<MonotonicNs>.
func (d *daemon) serveTrace(w http.ResponseWriter, r *http.Request) {
	since, err := strconv.ParseUint(r.FormValue("since"), 10, 64)
	if err != nil {
		http.Error(w, "since: "+err.Error(), http.StatusBadRequest)
		return
	}
	e, ok := d.eng.(*recordedVM)
	if !ok {
		http.Error(w, "a request trace needs a real VM (engine qemu)", http.StatusNotFound)
		return
	}
	var t requestTrace
	if q := e.copy(); q != nil {
		if rt := q.trace.Load(); rt != nil {
			t.TapWrites = rt.Writes(since)
		}
	}
	t.Chunks = e.chunkTimes.since(since)
	if d.hold != nil {
		t.Released = d.hold.Recent(since)
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(t)
}
