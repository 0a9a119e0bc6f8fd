package main

import (
	"errors"
	"fmt"

	"github.com/ftgw/ftgw/pkg/replay"
)

// recentLog keeps what a re-protection sends besides the recorder's
// snapshot (pkg/replay/rebase.go): the start-up events at the beginning of
// the current recorder's log, the end of that log, from which the log after
// the snapshot is taken, and the clock values the log carried, which the
// snapshot is patched with. The snapshot is taken just before, so only the
// log read since then is needed: all of it is bounded and in memory, and
// nothing waits on a disk.
type recentLog struct {
	base uint64 // the log position of the stream's first byte
	scan *replay.LogScanner

	startup []byte // the start-up events, once startupOK
	// startupOK: startup is complete; startupErr: it never will be.
	startupOK  bool
	startupErr error

	clocks    replay.Clocks // as of the last event scanned
	clockRing [clockRing]clockMark
	nClocks   int // clock events seen; the last clockRing are in clockRing

	tail []byte // the stream's bytes from end-len(tail) to end
	end  int64  // the stream's bytes so far
}

// clockMark: the log's clocks after the clock event at offset.
type clockMark struct {
	offset int64
	clocks replay.Clocks
}

// recentLogBytes bounds the tail: far more than a recorder logs between
// its snapshot and the re-protection that took it (milliseconds).
const recentLogBytes = 8 << 20

// clockRing bounds the clock events kept: several seconds of a busy guest's.
const clockRing = 4096

// maxStartup bounds the search for the start-up events: a recorder logs a
// few dozen bytes before its machine's reset.
const maxStartup = 1 << 20

// restart begins a new recorder's stream, which starts at log position base.
func (r *recentLog) restart(base uint64) {
	*r = recentLog{base: base, tail: r.tail[:0], scan: replay.NewLogScanner(replay.StreamFraming)}
	r.scan.OnEvent = r.noteEvent
}

func (r *recentLog) noteEvent(ev replay.LogEvent) {
	if ev.Kind == replay.KindClockHost || ev.Kind == replay.KindClockVirtualRT {
		r.clocks.Note(ev)
		r.clockRing[r.nClocks%clockRing] = clockMark{ev.Offset, r.clocks}
		r.nClocks++
	}
}

// append adds the stream's next bytes. A stream the scanner refuses is
// kept no further: no snapshot can be followed by it.
func (r *recentLog) append(chunk []byte) {
	if r.scan == nil {
		r.restart(r.base)
	}
	if !r.startupOK && r.startupErr == nil {
		r.startup = append(r.startup, chunk...)
		startup, ok, err := replay.StartupEvents(r.startup)
		switch {
		case err != nil:
			r.startupErr = err
		case ok:
			r.startup, r.startupOK = startup, true
		case len(r.startup) > maxStartup:
			r.startupErr = fmt.Errorf("no reset checkpoint in the recorder's first %d bytes of log", maxStartup)
		}
	}
	if _, err := r.scan.Write(chunk); err != nil && r.startupErr == nil {
		r.startupErr = fmt.Errorf("the recorder's log: %w", err)
	}
	r.end += int64(len(chunk))
	r.tail = append(r.tail, chunk...)
	if len(r.tail) > 2*recentLogBytes {
		r.tail = r.tail[:copy(r.tail, r.tail[len(r.tail)-recentLogBytes:])]
	}
}

// icount is the guest instruction count the stream has reached, counted
// from the recorder's start.
func (r *recentLog) icount() uint64 {
	if r.scan == nil {
		return 0
	}
	return r.scan.Icount()
}

// since returns the stream from byte off to its end, and the recorder's
// start-up events.
func (r *recentLog) since(off int64) (startup, log []byte, err error) {
	switch {
	case r.startupErr != nil:
		return nil, nil, r.startupErr
	case !r.startupOK:
		return nil, nil, errors.New("the recorder has not logged its start-up yet")
	case off < r.end-int64(len(r.tail)):
		return nil, nil, fmt.Errorf("the log from byte %d is gone: %d bytes kept, up to %d", off, len(r.tail), r.end)
	case off >= r.end:
		return r.startup, nil, nil
	}
	return r.startup, r.tail[int64(len(r.tail))-(r.end-off):], nil
}

// clocksAt is the log's clocks as of stream offset off: what a replayer
// that replayed the log up to there has cached. ok is false until the
// stream has been scanned past off.
func (r *recentLog) clocksAt(off int64) (c replay.Clocks, ok bool, err error) {
	if r.scan == nil || r.scan.Complete() < off {
		return c, false, nil
	}
	oldest := max(0, r.nClocks-clockRing)
	for i := r.nClocks - 1; i >= oldest; i-- {
		if m := r.clockRing[i%clockRing]; m.offset < off {
			return m.clocks, true, nil
		}
	}
	if oldest > 0 {
		return c, false, fmt.Errorf("the log's clocks at byte %d are gone: the last %d clock events start at byte %d",
			off, clockRing, r.clockRing[oldest%clockRing].offset)
	}
	return c, true, nil // no clock logged before off
}
