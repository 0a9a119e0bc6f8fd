package replay

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/ftgw/ftgw/internal/tap"
	"github.com/ftgw/ftgw/internal/testutil"
	"github.com/ftgw/ftgw/pkg/guest"
)

// syncBuffer is an io.Writer that tests can read while a Relay writes.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) Bytes() []byte {
	b.mu.Lock()
	defer b.mu.Unlock()
	return bytes.Clone(b.buf.Bytes())
}

// gateWriter blocks every Write until the test lets it through.
type gateWriter struct {
	syncBuffer
	gate chan struct{}
	err  error
}

func (g *gateWriter) Write(p []byte) (int, error) {
	<-g.gate
	if g.err != nil {
		return 0, g.err
	}
	return g.syncBuffer.Write(p)
}

func waitForwarded(t *testing.T, r *Relay, icount uint64) Position {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	pos, err := r.WaitForwarded(ctx, icount)
	if err != nil {
		t.Fatalf("wait for icount %d: %v (at %+v)", icount, err, pos)
	}
	return pos
}

// Chunks cut anywhere: what reaches the writer is the version header and
// then whole events only, and Forwarded says how many and what icount.
func TestRelayForwardsWholeEvents(t *testing.T) {
	evs := relayedEvents()
	log, want := joinEvents(evs)
	stream := append(bytes.Clone(log), StreamHeader...) // the recorder's trailer
	seed := uint64(time.Now().UnixNano())
	rng := rand.New(rand.NewPCG(seed, 0))
	t.Logf("seed %d", seed)

	for round := 0; round < 50; round++ {
		var out syncBuffer
		r := NewRelay(&out, StreamFraming)
		var fed int
		for fed < len(stream) {
			n := min(1+rng.IntN(300), len(stream)-fed)
			if _, err := r.Write(stream[fed : fed+n]); err != nil {
				t.Fatalf("write: %v", err)
			}
			fed += n
			// Forwarded never runs ahead of the writer, and stops on
			// a boundary.
			pos := r.Forwarded()
			got := out.Bytes()
			if pos.Bytes > 0 && int64(len(got)) < int64(len(StreamHeader))+pos.Bytes {
				t.Fatalf("forwarded %d bytes but the writer has %d", pos.Bytes, len(got))
			}
			if !slices.ContainsFunc(want, func(b boundary) bool { return b.end == pos.Bytes && b.icount == pos.Icount }) && pos != (Position{}) {
				t.Fatalf("forwarded %+v: not an event boundary", pos)
			}
		}
		last := want[len(want)-1]
		pos := waitForwarded(t, r, last.icount)
		if err := r.Close(); err != nil {
			t.Fatal(err)
		}
		if pos = r.Forwarded(); pos.Bytes != last.end || pos.Icount != last.icount {
			t.Fatalf("forwarded %+v, want %d bytes icount %d", pos, last.end, last.icount)
		}
		if got := out.Bytes(); !bytes.Equal(got, append(bytes.Clone(StreamHeader), log...)) {
			t.Fatalf("writer got %d bytes, want header + %d bytes of events", len(got), len(log))
		}
		if !r.Ended() {
			t.Error("relay did not see END")
		}
	}
}

// relayedEvents is every event a relay forwards: all but the host's
// shutdowns.
func relayedEvents() []logEvent {
	return slices.DeleteFunc(everyEvent(), func(e logEvent) bool { return hostShutdown(e.kind) })
}

// The relay leaves out the shutdowns the recorder's host caused (a
// replayer would quit on them) and forwards everything else, the guest's
// own shutdowns and resets included, whatever the cuts.
func TestRelayLeavesOutHostShutdowns(t *testing.T) {
	all, _ := joinEvents(everyEvent())
	want, _ := joinEvents(relayedEvents())
	if len(all)-len(want) != 4 {
		t.Fatalf("everyEvent has %d bytes of host shutdowns, want 4 one-byte events", len(all)-len(want))
	}
	for _, cut := range []int{1, 2, 7, 300} {
		var out syncBuffer
		r := NewRelay(&out, StreamFraming)
		for p := all; len(p) > 0; p = p[min(cut, len(p)):] {
			if _, err := r.Write(p[:min(cut, len(p))]); err != nil {
				t.Fatal(err)
			}
		}
		if err := r.Close(); err != nil {
			t.Fatal(err)
		}
		if got := out.Bytes(); !bytes.Equal(got, append(bytes.Clone(StreamHeader), want...)) {
			t.Fatalf("cuts of %d: the writer got %d bytes, want header + %d bytes without the host shutdowns", cut, len(got), len(want))
		}
		if fwd := r.Forwarded(); fwd.Bytes != int64(len(want)) {
			t.Fatalf("cuts of %d: forwarded %d bytes, want %d", cut, fwd.Bytes, len(want))
		}
	}
}

// TailInput is the network input after the last INSTRUCTION event, whole
// events only: what a replayer held one instruction short has not taken.
func TestRelayTailInput(t *testing.T) {
	net := func(frame string) []byte { return ev(KindAsyncNet, []byte{0}, be32(0), arr([]byte(frame))) }
	checkpoint := ev(KindCheckpoint + 1)
	cases := []struct {
		name string
		log  [][]byte
		want []string
	}{
		{"input answered before any instruction was logged", [][]byte{
			ev(KindInstruction, be32(100)), net("a"), checkpoint, ev(KindInstruction, be32(5)), net("b"), checkpoint, net("c"),
		}, []string{"b", "c"}},
		{"input followed by instructions", [][]byte{
			ev(KindInstruction, be32(100)), net("a"), checkpoint, ev(KindInstruction, be32(5)),
		}, nil},
		{"a partial event is not input yet", [][]byte{
			ev(KindInstruction, be32(100)), net("a"), net("partial")[:5],
		}, []string{"a"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			var out syncBuffer
			r := NewRelay(&out, StreamFraming)
			defer r.Close()
			// One byte at a time: the tail must not depend on the cuts.
			for _, b := range bytes.Join(c.log, nil) {
				if _, err := r.Write([]byte{b}); err != nil {
					t.Fatal(err)
				}
			}
			var got []string
			for _, f := range r.TailInput() {
				got = append(got, string(f))
			}
			if !slices.Equal(got, c.want) {
				t.Errorf("tail input %q, want %q", got, c.want)
			}
		})
	}
}

// Forwarded moves only in whole events, to the boundary the fed bytes
// reach, and only once the writer has taken them.
func TestRelayForwardedFollowsWriter(t *testing.T) {
	log, want := joinEvents(relayedEvents())
	g := &gateWriter{gate: make(chan struct{})}
	r := NewRelay(g, StreamFraming)
	defer r.Close()

	cut := want[5].end + 2 // inside event 6
	done := make(chan error)
	go func() {
		_, err := r.Write(log[:cut])
		done <- err
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Write blocked on a writer that does not take anything")
	}
	if pos := r.Forwarded(); pos != (Position{}) {
		t.Fatalf("forwarded %+v before the writer took anything", pos)
	}
	if p := r.Pending(); p != len(StreamHeader)+int(want[5].end) {
		t.Errorf("pending %d, want header + %d", p, want[5].end)
	}
	close(g.gate)
	pos := waitForwarded(t, r, want[5].icount)
	if pos.Bytes != want[5].end {
		t.Fatalf("forwarded %+v, want %d bytes", pos, want[5].end)
	}
	if got := g.Bytes(); !bytes.Equal(got[len(StreamHeader):], log[:want[5].end]) {
		t.Fatalf("writer got %x, want %x", got, log[:want[5].end])
	}
}

func TestRelayErrors(t *testing.T) {
	t.Run("unknown event", func(t *testing.T) {
		var out syncBuffer
		r := NewRelay(&out, StreamFraming)
		good := ev(KindInstruction, be32(10))
		if _, err := r.Write(append(bytes.Clone(good), 0x42)); !errors.Is(err, ErrUnknownEvent) {
			t.Fatalf("got %v, want ErrUnknownEvent", err)
		}
		if _, err := r.Write(good); !errors.Is(err, ErrUnknownEvent) {
			t.Errorf("next write: %v, want the same error", err)
		}
		if err := r.Close(); !errors.Is(err, ErrUnknownEvent) {
			t.Errorf("close: %v", err)
		}
	})
	t.Run("writer fails", func(t *testing.T) {
		g := &gateWriter{gate: make(chan struct{}), err: io.ErrClosedPipe}
		close(g.gate)
		r := NewRelay(g, StreamFraming)
		r.Write(ev(KindInstruction, be32(10)))
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if _, err := r.WaitForwarded(ctx, 10); !errors.Is(err, io.ErrClosedPipe) {
			t.Fatalf("wait: %v, want the writer's error", err)
		}
		if _, err := r.Write(ev(KindInterrupt)); !errors.Is(err, io.ErrClosedPipe) {
			t.Errorf("write after failure: %v", err)
		}
		if err := r.Close(); !errors.Is(err, io.ErrClosedPipe) {
			t.Errorf("close: %v", err)
		}
	})
	t.Run("write after close", func(t *testing.T) {
		r := NewRelay(io.Discard, StreamFraming)
		r.Close()
		if _, err := r.Write(ev(KindInterrupt)); err == nil {
			t.Error("write after close succeeded")
		}
	})
}

// A regular file's 12-byte header is not forwarded; the replayer gets the
// 4-byte one.
func TestRelayFileFraming(t *testing.T) {
	log, want := joinEvents(relayedEvents())
	file := append(append(be32(Version), make([]byte, 8)...), log...)
	var out syncBuffer
	r := NewRelay(&out, FileFraming)
	for i := range file {
		r.Write(file[i : i+1])
	}
	waitForwarded(t, r, want[len(want)-1].icount)
	r.Close()
	if got := out.Bytes(); !bytes.Equal(got, append(bytes.Clone(StreamHeader), log...)) {
		t.Fatalf("writer got %d bytes, want header + %d", len(got), len(log))
	}
}

func TestFIFO(t *testing.T) {
	path := filepath.Join(t.TempDir(), "log.fifo")
	if err := MakeFIFO(path); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if _, err := OpenFIFOWriter(ctx, path); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("open with no reader: %v, want a deadline error", err)
	}

	got := make(chan []byte)
	go func() {
		f, err := os.Open(path) // blocks until the writer opens
		if err != nil {
			got <- nil
			return
		}
		defer f.Close()
		b, _ := io.ReadAll(f)
		got <- b
	}()
	ctx, cancel = context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	w, err := OpenFIFOWriter(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	log, want := joinEvents(relayedEvents())
	r := NewRelay(w, StreamFraming)
	r.Write(log)
	waitForwarded(t, r, want[len(want)-1].icount)
	r.Close()
	w.Close()
	if b := <-got; !bytes.Equal(b, append(bytes.Clone(StreamHeader), log...)) {
		t.Fatalf("reader got %d bytes, want %d", len(b), len(StreamHeader)+len(log))
	}
}

// ---- A replaying QEMU fed through a Relay while the recorder runs ----

// rrSetup is one record-and-follow run.
type rrSetup struct {
	machine rrMachine
	recNet  string // the netdevs (id n0) of the guest's NIC
	playNet string
	// workload runs against the recorder once its console says ready.
	workload func(ctx context.Context) error
	// minLog is how many log bytes to forward at least before the
	// recording stops: SeaBIOS reaches its ready line in a few bursts.
	minLog int64
	// check looks at the recorded event counts and console at the end.
	check func(t *testing.T, counts map[Kind]int, console []byte)
}

// recordStream reads what the recorder writes into its FIFO and feeds the
// relay in chunks of random sizes, as they would come off the network.
type recordStream struct {
	mu     sync.Mutex
	data   []byte
	chunks int
	done   chan struct{}
	err    error // valid once done is closed
}

func pumpRecording(fifo string, relay <-chan *Relay, seed uint64) *recordStream {
	s := &recordStream{done: make(chan struct{})}
	go func() {
		defer close(s.done)
		f, err := os.Open(fifo) // until the recorder opens it to write
		if err != nil {
			s.err = err
			return
		}
		defer f.Close()
		r, ok := <-relay
		if !ok {
			return // the test ended before it had a relay
		}
		rng := rand.New(rand.NewPCG(seed, 1))
		buf := make([]byte, 64<<10)
		for {
			n, err := f.Read(buf)
			for p := buf[:n]; len(p) > 0; {
				c := min(1+rng.IntN(3000), len(p))
				if _, err := r.Write(p[:c]); err != nil {
					s.err = err
					return
				}
				s.mu.Lock()
				s.data = append(s.data, p[:c]...)
				s.chunks++
				s.mu.Unlock()
				p = p[c:]
			}
			if err == io.EOF {
				return
			}
			if err != nil {
				s.err = err
				return
			}
		}
	}()
	return s
}

// recordFollow records the machine into a FIFO and, while it runs, replays
// the log through a Relay into a second QEMU held by replay-break at the
// relay's icount minus one. At every break the replayer must stand exactly
// there and its console must be a prefix of the recorder's; at the end it
// must replay to the recorder's last instruction, with the same console,
// and exit cleanly.
func recordFollow(t *testing.T, qemu string, rs rrSetup) {
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	dir := t.TempDir()
	recFIFO, playFIFO := filepath.Join(dir, "record.fifo"), filepath.Join(dir, "play.fifo")
	for _, p := range []string{recFIFO, playFIFO} {
		if err := MakeFIFO(p); err != nil {
			t.Fatal(err)
		}
	}
	recConsole, playConsole := filepath.Join(dir, "record.console"), filepath.Join(dir, "play.console")
	m := rs.machine

	seed := uint64(time.Now().UnixNano())
	t.Logf("chunk seed %d", seed)
	relayc := make(chan *Relay, 1)
	stream := pumpRecording(recFIFO, relayc, seed)
	t.Cleanup(func() {
		// A pump still waiting in open (the recorder never started) is
		// released by a writer that comes and goes.
		if f, err := os.OpenFile(recFIFO, os.O_WRONLY|syscall.O_NONBLOCK, 0); err == nil {
			f.Close()
		}
		close(relayc)
		<-stream.done
	})

	start := time.Now()
	rec := startVM(t, qemu, dir, "record", m.args("record", recFIFO, recConsole, filepath.Join(dir, "record.qmp"), rs.recNet))
	play := startVM(t, qemu, dir, "play", m.args("replay", playFIFO, playConsole, filepath.Join(dir, "play.qmp"), rs.playNet))
	w, err := OpenFIFOWriter(ctx, playFIFO)
	if err != nil {
		t.Fatal(err)
	}
	relay := NewRelay(w, StreamFraming)
	t.Cleanup(func() {
		w.Close() // first: a relay blocked on a dead replayer's FIFO returns
		relay.Close()
	})
	relayc <- relay
	rec.connect(ctx, t)
	play.connect(ctx, t)

	// The recorder's side: ready, the workload, then stop it where the
	// icount can be read, and quit.
	type recordEnd struct {
		icount  uint64
		elapsed time.Duration
		err     error
	}
	recDone := make(chan recordEnd, 1)
	go func() {
		icount, err := func() (uint64, error) {
			if err := waitConsole(ctx, rec, recConsole, m.ready); err != nil {
				return 0, err
			}
			if rs.workload != nil {
				if err := rs.workload(ctx); err != nil {
					return 0, err
				}
			}
			for relay.Forwarded().Bytes < rs.minLog {
				if _, err := relay.WaitForwarded(ctx, relay.Forwarded().Icount+1); err != nil {
					return 0, err
				}
			}
			if err := rec.exec("stop", nil, nil); err != nil {
				return 0, err
			}
			icount, err := rec.icount()
			if err != nil {
				return 0, err
			}
			if err := rec.exec("quit", nil, nil); err != nil {
				return 0, err
			}
			<-rec.exited
			return icount, nil
		}()
		recDone <- recordEnd{icount: icount, elapsed: time.Since(start), err: err}
	}()

	var (
		target        uint64 // the replayer's break
		breaks        int
		breaksDuring  int // reached while the recorder still ran
		recorded      *recordEnd
		recordedAt    time.Time
		lagAtRecorded uint64
	)
	for {
		if recorded == nil {
			select {
			case end := <-recDone:
				if end.err != nil {
					t.Fatalf("record: %v", end.err)
				}
				recorded, recordedAt, lagAtRecorded = &end, time.Now(), end.icount-target
			default:
			}
		}
		// Safe holds while the log grows; once it has all been
		// forwarded, the end, as a go-live would.
		pos := relay.Forwarded()
		next := pos.Hold
		if recorded != nil && relay.Pending() == 0 && pos.Icount == recorded.icount && isDone(stream.done) {
			next = pos.Icount - 1
		}
		if next > target {
			target = next
			play.run(t, "replay-break", map[string]any{"icount": target}, nil)
			play.run(t, "cont", nil, nil)
			waitPaused(ctx, t, play)
			icount, err := play.icount()
			if err != nil {
				t.Fatal(err)
			}
			if icount != target {
				t.Fatalf("replayer stopped at icount %d, break was %d", icount, target)
			}
			checkConsolePrefix(t, playConsole, recConsole)
			breaks++
			if recorded == nil {
				breaksDuring++
			}
			continue
		}
		select {
		case <-stream.done:
			if stream.err != nil {
				t.Fatalf("log stream: %v", stream.err)
			}
		default:
		}
		if recorded != nil && relay.Pending() == 0 && pos.Icount == recorded.icount && isDone(stream.done) {
			break
		}
		// Until the relay moves on.
		wctx, wcancel := context.WithTimeout(ctx, 50*time.Millisecond)
		relay.WaitHold(wctx, target+1)
		wcancel()
		if ctx.Err() != nil {
			t.Fatalf("following: %v (break %d, forwarded %+v)", ctx.Err(), target, relay.Forwarded())
		}
	}
	// Released, the replayer runs the recorder's last instruction, then the
	// events the recorder logged while stopped (main-loop timers and the
	// quit), and exits by itself if its main loop asks for them in the
	// order the recorder's did. That order comes from the timing of the
	// recorder's idle main loop, so the replayer may instead sit at the
	// last instruction for good; then it is told to quit.
	caughtUp := time.Since(recordedAt) // at the last break
	play.run(t, "cont", nil, nil)
	selfExit := waitExitOrIdle(ctx, t, play, recorded.icount)
	recOut, _ := os.ReadFile(recConsole)
	playOut, _ := os.ReadFile(playConsole)
	if !bytes.Equal(recOut, playOut) {
		t.Errorf("replay console (%d bytes) differs from the recording's (%d bytes)", len(playOut), len(recOut))
	}
	if !relay.Ended() {
		t.Error("relay never saw END")
	}

	// The stream itself, scanned whole: it must end on END and the version
	// trailer, with the icount the recorder reported.
	s := NewLogScanner(StreamFraming)
	counts := map[Kind]int{}
	s.OnEvent = func(e LogEvent) { counts[e.Kind]++ }
	stream.mu.Lock()
	data, chunks := stream.data, stream.chunks
	stream.mu.Unlock()
	if _, err := s.Write(data); err != nil {
		t.Fatal(err)
	}
	if err := s.Finish(); err != nil {
		t.Fatal(err)
	}
	if !bytes.HasSuffix(data, append([]byte{byte(KindEnd)}, StreamHeader...)) {
		t.Errorf("stream ends % x, want END and the version trailer", data[max(len(data)-8, 0):])
	}
	if s.Icount() != recorded.icount || relay.Forwarded().Icount != recorded.icount {
		t.Errorf("icount: stream %d, relay %d, recorder %d", s.Icount(), relay.Forwarded().Icount, recorded.icount)
	}
	t.Logf("record %v: %d log bytes in %d chunks (%.0f KB/s), %d events, icount %d; %s",
		recorded.elapsed.Round(time.Millisecond), len(data), chunks,
		float64(len(data))/recorded.elapsed.Seconds()/1e3, s.Events(), s.Icount(), kindCounts(counts))
	t.Logf("replay: %d breaks (%d while recording), %d instructions behind when the recorder quit, at its last break %v later; whole replay %v; exited by itself: %v",
		breaks, breaksDuring, lagAtRecorded, caughtUp.Round(time.Millisecond), time.Since(start).Round(time.Millisecond), selfExit)
	if breaksDuring == 0 {
		t.Error("the replayer never reached a break while the recorder ran")
	}
	if rs.check != nil {
		rs.check(t, counts, recOut)
	}
}

// waitExitOrIdle waits for a released replayer to exit by itself (true),
// or, if it has not after a while, checks that it stands at the last
// instruction of the log, quits it and returns false.
func waitExitOrIdle(ctx context.Context, t *testing.T, vm *rrVM, last uint64) bool {
	t.Helper()
	select {
	case <-vm.exited:
		if vm.waitErr != nil {
			t.Fatalf("%s exited: %v", vm.name, vm.waitErr)
		}
		return true
	case <-time.After(10 * time.Second):
	case <-ctx.Done():
		t.Fatalf("%s: %v", vm.name, ctx.Err())
	}
	icount, err := vm.icount()
	if err != nil {
		t.Fatal(err)
	}
	if icount != last {
		t.Fatalf("%s idles at icount %d, the log's last is %d", vm.name, icount, last)
	}
	vm.run(t, "quit", nil, nil)
	vm.waitExit(ctx, t)
	return false
}

func isDone(c <-chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}

// waitPaused waits until the replayer has stopped at its break.
func waitPaused(ctx context.Context, t *testing.T, vm *rrVM) {
	t.Helper()
	for {
		var st struct {
			Status string `json:"status"`
		}
		vm.run(t, "query-status", nil, &st)
		if st.Status == "paused" {
			return
		}
		select {
		case <-vm.exited:
			t.Fatalf("%s exited while running to its break: %v", vm.name, vm.waitErr)
		case <-ctx.Done():
			t.Fatalf("%s never reached its break: status %s", vm.name, st.Status)
		case <-time.After(2 * time.Millisecond):
		}
	}
}

func checkConsolePrefix(t *testing.T, play, rec string) {
	t.Helper()
	p, _ := os.ReadFile(play)
	r, _ := os.ReadFile(rec)
	if !bytes.HasPrefix(r, p) {
		t.Fatalf("replay console (%d bytes) is not a prefix of the recording's (%d bytes)", len(p), len(r))
	}
}

func TestReplayFollowsRecording(t *testing.T) {
	qemu := requireQEMU(t)
	for _, m := range rrMachines(t) {
		t.Run(m.name, func(t *testing.T) {
			recordFollow(t, qemu, rrSetup{machine: m, recNet: noNet, playNet: noNet, minLog: 64 << 10})
		})
	}
}

// TestReplayNetwork records the guest on a tap with filter-replay while
// the test sends it UDP requests, and replays it on a tap nothing reaches:
// the frames come from the log as ASYNC NET events, and the replayer's
// console must show the same requests and store digests as the recorder's.
func TestReplayNetwork(t *testing.T) {
	qemu := requireQEMU(t)
	m, ok := guestImage(t)
	if !ok {
		t.Skip("needs build/guest/vmlinuz and initrd.img (make guest)")
	}
	testutil.InNewNetns(t)
	// tap0 is the recorder's, with the host end at 192.0.2.2; tap1, the
	// replayer's, stays down: filter-replay drops whatever it would carry.
	for _, name := range []string{"tap0", "tap1"} {
		if err := tap.Create(name); err != nil {
			t.Fatal(err)
		}
	}
	// No IPv6 on the host end: its router solicitations and MLD reports
	// would be logged too, harmlessly but noisily.
	os.WriteFile("/proc/sys/net/ipv6/conf/tap0/disable_ipv6", []byte("1"), 0)
	testutil.LinkUp(t, "tap0", "192.0.2.2/24")
	// Dialled here, on the thread InNewNetns holds in the namespace.
	client, err := guest.Dial(fmt.Sprintf("192.0.2.1:%d", guest.KVPort), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()

	const puts = 5
	recordFollow(t, qemu, rrSetup{
		machine: m,
		recNet:  "tap,id=n0,ifname=tap0,script=no,downscript=no",
		playNet: "tap,id=n0,ifname=tap1,script=no,downscript=no",
		workload: func(ctx context.Context) error {
			for i := 1; i <= puts; i++ {
				n, err := client.Put(fmt.Sprintf("k%d", i), fmt.Sprintf("v%d", i))
				if err != nil {
					return err
				}
				if n != uint64(i) {
					return fmt.Errorf("put %d: guest counts %d puts", i, n)
				}
			}
			return nil
		},
		check: func(t *testing.T, counts map[Kind]int, console []byte) {
			if counts[KindAsyncNet] < puts {
				t.Errorf("%d ASYNC NET events in the log, want at least %d", counts[KindAsyncNet], puts)
			}
			if want := fmt.Sprintf("ftgw-kv req=%d puts=%d ", puts, puts); !bytes.Contains(console, []byte(want)) {
				t.Errorf("console lacks %q", want)
			}
		},
	})
}
