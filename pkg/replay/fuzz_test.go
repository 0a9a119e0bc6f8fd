package replay

import (
	"bytes"
	"encoding/binary"
	"reflect"
	"slices"
	"testing"
	"time"
)

// The replay log arrives from the peer, cut wherever the network cut it.
// Whatever the bytes and the cuts, the scanner, the relay and the splice
// must not panic or stall, and what they make of a log must not depend on
// where it was cut.

// bootLog looks like the log of a booting guest so far (what
// BenchmarkLogScanner scans), with a reset checkpoint in front as a -loadvm
// recorder writes it, some network input and a guest shutdown.
func bootLog() []byte {
	log := slices.Concat(
		ev(KindClockHost, be64(1700000000123456789)), ev(KindCheckpoint+7), ev(KindCheckpointReset),
		ev(KindClockVirtualRT, be64(99)), ev(KindInstruction, be32(4688)))
	for i := range 3 {
		log = slices.Concat(log,
			ev(KindCheckpoint+1), ev(KindCheckpointClockVirtual),
			ev(KindClockHost, be64(1700000000123456789+uint64(i))), ev(KindInterrupt),
			ev(KindInstruction, be32(0x24)), ev(KindCharWrite, be32(1), be32(1)),
			ev(KindAsyncNet, []byte{0}, be32(0), arr(bytes.Repeat([]byte{0xab}, 60))),
			ev(KindInstruction, be32(0x2be)))
	}
	return slices.Concat(log, ev(KindShutdown+6), ev(KindInstruction, be32(1)))
}

// finished is log as a recorder that quit on a signal ends its stream
// (replay_finish): a host-signal shutdown, END, the version trailer.
func finished(log []byte) []byte {
	return slices.Concat(log, ev(KindShutdown+4), ev(KindEnd), StreamHeader)
}

// fileOf is log as a regular file: the 12-byte header, then the events.
func fileOf(version uint32, log []byte) []byte {
	return slices.Concat(be32(version), make([]byte, 8), log)
}

// logSeeds are logs for the targets to start from: well formed, cut short,
// and broken in the ways TestScanErrors lists.
func logSeeds() [][]byte {
	every, _ := joinEvents(everyEvent())
	boot := finished(bootLog())
	return [][]byte{
		every,
		boot,
		boot[:len(boot)-7],
		ev(KindInstruction, be32(10), []byte{40}),
		ev(KindAudioIn, be64(4), be64(4)),
		ev(KindAsyncInput, be32(0), be32(2)),
		ev(KindAsyncNet, []byte{0}, be32(0), be32(MaxArrayLen+1)),
		{byte(KindEnd), 0x00, 0xe0, 0x20, 0x0b},
		{},
	}
}

// cutSeeds are piece lengths (see pieces).
var cutSeeds = [][]byte{nil, {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1}, {0, 5, 0, 3}, {7, 200, 13, 255}}

// pieces cuts b into pieces whose lengths are the bytes of cuts in turn (a
// zero is an empty piece), then the rest in one piece.
func pieces(b, cuts []byte) [][]byte {
	var out [][]byte
	for _, c := range cuts {
		n := min(int(c), len(b))
		out = append(out, b[:n])
		b = b[n:]
	}
	return append(out, b)
}

// scanReport is everything a LogScanner says about a log.
type scanReport struct {
	Events    []scannedEvent
	DataStart int64
	Complete  int64
	Icount    uint64
	Count     int64
	Ended     bool
	WriteErr  string // the first error a Write returned
	FinishErr string
}

type scannedEvent struct {
	Offset  int64
	Kind    Kind
	Payload string
	Icount  uint64
}

// scanPieces scans log framed as f, fed in pieces (see pieces), up to the
// first error.
func scanPieces(t *testing.T, f Framing, log, cuts []byte) scanReport {
	t.Helper()
	s := NewLogScanner(f)
	var rep scanReport
	s.OnEvent = func(e LogEvent) {
		rep.Events = append(rep.Events, scannedEvent{e.Offset, e.Kind, string(e.Payload), e.Icount})
	}
	for _, p := range pieces(log, cuts) {
		if _, err := s.Write(p); err != nil {
			rep.WriteErr = err.Error()
			// The error sticks: a caller that goes on writing must not
			// get past it.
			if _, again := s.Write([]byte{byte(KindInterrupt)}); again != err {
				t.Fatalf("write after %v: %v", err, again)
			}
			if s.Finish() != err || s.Err() != err {
				t.Fatalf("finish after %v: %v (err %v)", err, s.Finish(), s.Err())
			}
			break
		}
	}
	if err := s.Finish(); err != nil {
		rep.FinishErr = err.Error()
	}
	rep.DataStart, rep.Complete, rep.Icount, rep.Count, rep.Ended = s.DataStart(), s.Complete(), s.Icount(), s.Events(), s.Ended()
	return rep
}

// checkScanReport checks that what the scanner reported for log adds up:
// events back to back from the header on, each where log has its bytes,
// the icount the sum of the INSTRUCTION events, and Finish clean exactly
// when nothing but whole events (and a stream's trailer) was fed.
func checkScanReport(t *testing.T, f Framing, log []byte, rep scanReport) {
	t.Helper()
	at, icount := rep.DataStart, uint64(0)
	for i, e := range rep.Events {
		end := e.Offset + 1 + int64(len(e.Payload))
		if e.Offset != at || end > int64(len(log)) || Kind(log[e.Offset]) != e.Kind || string(log[e.Offset+1:end]) != e.Payload {
			t.Fatalf("event %d (%s at %d, %d bytes): not the log's bytes at offset %d", i, e.Kind, e.Offset, len(e.Payload), at)
		}
		if e.Kind >= kindCount || e.Kind == KindAudioIn || (i > 0 && rep.Events[i-1].Kind == KindEnd) {
			t.Fatalf("event %d: %s accepted after %d events", i, e.Kind, i)
		}
		if e.Kind == KindInstruction {
			icount += uint64(binary.BigEndian.Uint32([]byte(e.Payload)))
		}
		if e.Icount != icount {
			t.Fatalf("event %d (%s): icount %d, want %d", i, e.Kind, e.Icount, icount)
		}
		at = end
	}
	ended := len(rep.Events) > 0 && rep.Events[len(rep.Events)-1].Kind == KindEnd
	if rep.Complete != at || rep.Icount != icount || rep.Count != int64(len(rep.Events)) || rep.Ended != ended {
		t.Fatalf("complete %d icount %d events %d ended %v; the events say %d %d %d %v",
			rep.Complete, rep.Icount, rep.Count, rep.Ended, at, icount, len(rep.Events), ended)
	}
	if rep.WriteErr != "" {
		if rep.FinishErr != rep.WriteErr {
			t.Fatalf("finish %q after write error %q", rep.FinishErr, rep.WriteErr)
		}
		return
	}
	if f == FileFraming && len(log) >= FileHeaderSize {
		if v := binary.BigEndian.Uint32(log); v != Version && v != 0 {
			t.Fatalf("file header version 0x%x accepted", v)
		}
	}
	rest := log[min(rep.Complete, int64(len(log))):]
	clean := rep.Complete <= int64(len(log)) &&
		(len(rest) == 0 || f == StreamFraming && ended && bytes.Equal(rest, StreamHeader))
	if clean != (rep.FinishErr == "") {
		t.Fatalf("finish %q with %d bytes after the last whole event (ended %v)", rep.FinishErr, len(rest), ended)
	}
}

// FuzzLogScanner: the same bytes scanned in one Write and in pieces cut at
// fuzzer-chosen points give the same events, Complete, Icount and errors,
// and what the scanner reports agrees with the bytes.
func FuzzLogScanner(f *testing.F) {
	for _, log := range logSeeds() {
		for _, cuts := range cutSeeds {
			f.Add(log, cuts, false)
		}
		f.Add(fileOf(Version, log), []byte{3, 9}, true)
	}
	f.Add(fileOf(0, bootLog()), []byte{12}, true)
	f.Add(fileOf(0xe0200b, bootLog()), []byte(nil), true)
	f.Fuzz(func(t *testing.T, log, cuts []byte, file bool) {
		framing := StreamFraming
		if file {
			framing = FileFraming
		}
		whole := scanPieces(t, framing, log, nil)
		checkScanReport(t, framing, log, whole)
		split := scanPieces(t, framing, log, cuts)
		if !reflect.DeepEqual(whole, split) {
			t.Fatalf("in one piece and in pieces %v, the scanner disagrees:\n%+v\n%+v", cuts, whole, split)
		}
	})
}

// delimited is a log as a scanner fed it at once delimits it.
type delimited struct {
	events [][]byte // each event's bytes, kind byte included
	icount uint64
	err    error
}

func delimit(f Framing, log []byte) delimited {
	var d delimited
	s := NewLogScanner(f)
	s.OnEvent = func(e LogEvent) {
		d.events = append(d.events, slices.Concat([]byte{byte(e.Kind)}, e.Payload))
	}
	_, d.err = s.Write(log)
	d.icount = s.Icount()
	return d
}

// relayDeadline bounds a relay fed from memory into memory: it has nothing
// to wait for, so running out of it is a deadlock.
const relayDeadline = 10 * time.Second

// runRelay feeds log to r in pieces up to the first error, then closes it.
func runRelay(t *testing.T, r *Relay, log, cuts []byte) (writeErr, closeErr error) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		for _, p := range pieces(log, cuts) {
			if _, writeErr = r.Write(p); writeErr != nil {
				break
			}
		}
		closeErr = r.Close()
	}()
	select {
	case <-done:
	case <-time.After(relayDeadline):
		t.Fatalf("relay still busy after %v: deadlocked", relayDeadline)
	}
	return writeErr, closeErr
}

// checkForwarded checks what a relay wrote: the stream's version header,
// then whole events, those of want but the host's shutdowns: all of them
// if the relay ran to the end, else the first few (it may stop before it
// writes anything, header included).
func checkForwarded(t *testing.T, out []byte, want [][]byte, all bool) {
	t.Helper()
	if len(out) == 0 && !all {
		return
	}
	body, ok := bytes.CutPrefix(out, StreamHeader)
	if !ok {
		t.Fatalf("forwarded % x...: not the version header first", out[:min(len(out), 8)])
	}
	s := NewLogScanner(StreamFraming)
	if _, err := s.Write(body); err != nil {
		t.Fatalf("forwarded what a scanner refuses: %v", err)
	}
	if err := s.Finish(); err != nil {
		t.Fatalf("forwarded more than whole events: %v", err)
	}
	var kept []byte
	for _, e := range want {
		if !hostShutdown(Kind(e[0])) {
			kept = append(kept, e...)
		}
	}
	if !bytes.HasPrefix(kept, body) || all && len(body) != len(kept) {
		t.Fatalf("forwarded %d bytes of events that are not the first of the log's %d bytes of whole events but host shutdowns (all of them: %v)",
			len(body), len(kept), all)
	}
}

// FuzzRelay: a relay fed a log in pieces forwards exactly the whole events
// a scanner finds in it, host shutdowns left out, fails exactly when the
// log is malformed, and never stalls with a writer that never blocks.
func FuzzRelay(f *testing.F) {
	for _, log := range logSeeds() {
		f.Add(log, []byte{1, 2, 3, 4, 5, 6, 7}, false)
		f.Add(fileOf(Version, log), []byte{11, 2}, true)
	}
	big := finished(bytes.Repeat(bootLog(), 40)) // more than relayPiece
	f.Add(big, []byte{255, 0, 255}, false)
	f.Fuzz(func(t *testing.T, log, cuts []byte, file bool) {
		framing := StreamFraming
		if file {
			framing = FileFraming
		}
		want := delimit(framing, log)
		var out bytes.Buffer
		r := NewRelay(&out, framing)
		writeErr, closeErr := runRelay(t, r, log, cuts)
		if (writeErr != nil) != (want.err != nil) || closeErr != writeErr {
			t.Fatalf("relay: write %v, close %v; the log scanned at once: %v", writeErr, closeErr, want.err)
		}
		checkForwarded(t, out.Bytes(), want.events, want.err == nil)
		if want.err != nil {
			return
		}
		if pos := r.Forwarded(); pos.Bytes != int64(out.Len()-len(StreamHeader)) || pos.Icount != want.icount {
			t.Fatalf("forwarded %+v, the writer has %d bytes of events, icount %d", pos, out.Len()-len(StreamHeader), want.icount)
		}
		if r.Pending() != 0 {
			t.Fatalf("%d bytes pending after Close", r.Pending())
		}
	})
}

// FuzzStartupEvents: the start-up part of a recorder's log is its events up
// to and including the first reset checkpoint, found once it is whole; a log
// with an instruction before it, or malformed, has none.
func FuzzStartupEvents(f *testing.F) {
	for _, log := range logSeeds() {
		f.Add(log)
	}
	f.Add(bootLog()[:30])
	f.Add(slices.Concat(ev(KindCheckpointReset), ev(KindInstruction, be32(1)), ev(KindInterrupt)))
	f.Add(slices.Concat(ev(KindInstruction, be32(3)), ev(KindCheckpointReset)))
	f.Fuzz(func(t *testing.T, log []byte) {
		startup, ok, err := StartupEvents(log)
		in := delimit(StreamFraming, log)
		insn := slices.IndexFunc(in.events, func(e []byte) bool { return Kind(e[0]) == KindInstruction })
		reset := slices.IndexFunc(in.events, func(e []byte) bool { return Kind(e[0]) == KindCheckpointReset })
		switch {
		case in.err != nil || insn >= 0 && (reset < 0 || reset > insn):
			if err == nil {
				t.Fatalf("start-up found (ok %v) in a log that has an instruction before its reset or is malformed (%v)", ok, in.err)
			}
		case reset < 0:
			if ok || err != nil {
				t.Fatalf("start-up found (ok %v, %v) in a log with no whole reset checkpoint", ok, err)
			}
		case !ok || err != nil:
			t.Fatalf("no start-up (ok %v): %v", ok, err)
		case !bytes.Equal(startup, slices.Concat(in.events[:reset+1]...)):
			t.Fatalf("start-up % x, want the events up to the reset % x", startup, slices.Concat(in.events[:reset+1]...))
		}
	})
}

// FuzzRelayFromRecorderSnapshot: a relay for a replayer that loads a
// recorder's snapshot forwards the start-up events, the spare event, then
// the whole events of the log it is fed, whatever the pieces; its positions
// count from the snapshot's icount.
func FuzzRelayFromRecorderSnapshot(f *testing.F) {
	startup, _, _ := StartupEvents(bootLog())
	for _, log := range logSeeds() {
		f.Add(log, []byte{1, 2, 3}, uint64(1000))
	}
	boot := finished(bootLog())
	f.Add(boot, []byte{1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1}, uint64(0))
	f.Add(boot[:20], []byte{3}, uint64(1<<40))
	f.Fuzz(func(t *testing.T, log, cuts []byte, icount uint64) {
		want := delimit(StreamFraming, log)
		var out bytes.Buffer
		r, err := NewRelayFromRecorderSnapshot(&out, startup, RecorderSnapshot{Icount: icount})
		if err != nil {
			t.Fatal(err)
		}
		writeErr, closeErr := runRelay(t, r, log, cuts)
		if (writeErr != nil) != (want.err != nil) || closeErr != writeErr {
			t.Fatalf("relay: write %v, close %v; the log scanned at once: %v", writeErr, closeErr, want.err)
		}
		head := delimit(StreamFraming, slices.Concat(startup, spareEvent))
		checkForwarded(t, out.Bytes(), slices.Concat(head.events, want.events), want.err == nil)
		if want.err != nil {
			return
		}
		if pos := r.Forwarded(); pos.Icount != icount+want.icount {
			t.Fatalf("forwarded to icount %d, want %d + %d", pos.Icount, icount, want.icount)
		}
	})
}
