package replay

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ftgw/ftgw/internal/tap"
	"github.com/ftgw/ftgw/internal/testutil"
	"github.com/ftgw/ftgw/pkg/guest"
)

var pairMAC = net.HardwareAddr{0x52, 0x54, 0x00, 0x12, 0x34, 0x56}

// logState stands in for the gateway's memory-mapped log state: the
// preloaded library writes the head (the first u64) into it.
type logState struct {
	f   *os.File
	mem []byte
}

func newLogState(t *testing.T) *logState {
	fd, err := unix.MemfdCreate("ftgw-log-state", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fd), "ftgw-log-state")
	if err := f.Truncate(4096); err != nil {
		t.Fatal(err)
	}
	mem, err := unix.Mmap(fd, 0, 4096, unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Munmap(mem); f.Close() })
	return &logState{f: f, mem: mem}
}

func (s *logState) head() uint64 { return binary.LittleEndian.Uint64(s.mem[0:8]) }

// capturedLog keeps everything the recorder wrote and feeds the relay up to
// a limit the test moves.
type capturedLog struct {
	mu    sync.Mutex
	cond  *sync.Cond
	data  []byte
	limit int // feed the relay up to here; -1: everything
	fed   int
	eof   bool
}

func (c *capturedLog) read(t *testing.T, r interface{ Read([]byte) (int, error) }) {
	buf := make([]byte, 64<<10)
	for {
		n, err := r.Read(buf)
		c.mu.Lock()
		c.data = append(c.data, buf[:n]...)
		c.eof = err != nil
		c.cond.Broadcast()
		c.mu.Unlock()
		if err != nil {
			return
		}
	}
}

// feed writes the log to relay in random chunks, as the network would
// deliver it, never past the limit.
func (c *capturedLog) feed(relay *Relay, rng *rand.Rand) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for {
		end := len(c.data)
		if c.limit >= 0 {
			end = min(end, c.limit)
		}
		for c.fed < end {
			n := min(end-c.fed, 1+rng.IntN(6000))
			chunk := append([]byte(nil), c.data[c.fed:c.fed+n]...)
			c.fed += n
			c.mu.Unlock()
			relay.Write(chunk)
			c.mu.Lock()
		}
		if c.eof && c.fed == len(c.data) {
			return
		}
		c.cond.Wait()
	}
}

func (c *capturedLog) raiseLimit(n int) {
	c.mu.Lock()
	c.limit += n
	c.cond.Broadcast()
	c.mu.Unlock()
}

func (c *capturedLog) setLimit(n int) {
	c.mu.Lock()
	c.limit = n
	c.cond.Broadcast()
	c.mu.Unlock()
}

// pair is what the real-VM pair tests share: the guest, two taps in a new
// netns (the recorder's reaches the host at 192.0.2.254, the replayer's
// nowhere) and a deadline for the whole test.
type pair struct {
	t              *testing.T
	ctx            context.Context
	machine        Machine
	preload        string
	recTap, repTap *tap.Tap
}

func newPair(t *testing.T) *pair {
	t.Helper()
	if testing.Short() {
		t.Skip("runs VMs under TCG")
	}
	testutil.RequireRoot(t)
	testutil.RequireQEMU(t)
	kernel, initrd := testutil.GuestImage(t)
	p := &pair{t: t, preload: testutil.Preload(t)}
	testutil.InNewNetns(t)
	p.recTap, p.repTap = openTap(t, "rr0", "192.0.2.254/24"), openTap(t, "rr1", "")
	p.machine = Machine{Kernel: kernel, Initrd: initrd, MAC: pairMAC,
		Cmdline: "console=ttyS0 quiet nohz=off panic=-1 ftgw.ip=192.0.2.1/24"}
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	t.Cleanup(cancel)
	p.ctx = ctx
	return p
}

// record starts a recorder in dir, from the snapshot loadvm if set, that
// publishes its log head into state, and captures its log; done is closed
// once the log has ended.
func (p *pair) record(dir, loadvm string, state *logState) (q *QEMU, log *capturedLog, done <-chan struct{}) {
	t := p.t
	t.Helper()
	q, err := Start(p.ctx, Config{Machine: p.machine, Mode: Record, Dir: dir, Tap: p.recTap.File(),
		Preload: p.preload, State: state.f, LoadVM: loadvm})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { q.Stop() })
	log = &capturedLog{limit: -1}
	log.cond = sync.NewCond(&log.mu)
	ended := make(chan struct{})
	go func() { log.read(t, q.Log()); close(ended) }()
	return q, log, ended
}

// replay starts a replayer in dir, from the snapshot loadvm if set, fed
// through the relay newRelay makes while feed writes to it: QEMU answers
// QMP only once its log flows.
func (p *pair) replay(dir, loadvm string, newRelay func(io.Writer) *Relay, feed func(*Relay)) (*QEMU, *Relay) {
	t := p.t
	t.Helper()
	fifo := filepath.Join(dir, "log.fifo")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := MakeFIFO(fifo); err != nil {
		t.Fatal(err)
	}
	started := make(chan *QEMU, 1)
	go func() {
		q, err := Start(p.ctx, Config{Machine: p.machine, Mode: Replay, Dir: dir, Tap: p.repTap.File(), LogFIFO: fifo, LoadVM: loadvm})
		if err != nil {
			t.Error(err)
		}
		started <- q
	}()
	w, err := OpenFIFOWriter(p.ctx, fifo)
	if err != nil {
		t.Fatal(err)
	}
	relay := newRelay(w)
	t.Cleanup(func() { w.Close(); relay.Close() })
	go feed(relay)
	q := <-started
	if q == nil {
		t.FailNow()
	}
	t.Cleanup(func() { q.Stop() })
	return q, relay
}

func streamRelay(w io.Writer) *Relay { return NewRelay(w, StreamFraming) }

// replayAll follows log through relay until it has all been fed and
// forwarded, then replays to its end. A replayer that stalls fails the
// test at once, rather than when the deadline ends it, with describe's
// account of the log where it stands if describe is set.
func (p *pair) replayAll(q *QEMU, relay *Relay, log *capturedLog, describe func(icount uint64) string) {
	t := p.t
	t.Helper()
	replayCtx, stalled := context.WithCancelCause(p.ctx)
	defer stalled(nil)
	go watchProgress(replayCtx, q, func(at uint64) {
		err := fmt.Errorf("the replay stalled at icount %d", at)
		if describe != nil {
			err = fmt.Errorf("%w; the log there:\n%s", err, describe(at))
		}
		stalled(err)
	})
	followCtx, stopFollowing := context.WithCancel(replayCtx)
	go func() {
		for replayCtx.Err() == nil && (log.fedUpTo() < len(log.data) || relay.Pending() > 0) {
			time.Sleep(20 * time.Millisecond)
		}
		stopFollowing()
	}()
	if err := q.Follow(followCtx, relay, nil); err != nil {
		t.Fatal(err)
	}
	if err := q.ReplayToEnd(replayCtx, relay); err != nil {
		t.Fatalf("%v: %v", err, context.Cause(replayCtx))
	}
}

// TestStreamedReplayFollowsAndCoversEveryReply runs the real guest as a
// record/replay pair: the replayer follows the recorder's log as it is
// written, in chunks, while the recorder runs. Then the Output Rule at its
// source: a reply the client has seen must be reproduced by replaying only
// the log that was flushed before the reply left QEMU (the head the
// preloaded library published), nothing after it.
func TestStreamedReplayFollowsAndCoversEveryReply(t *testing.T) {
	p := newPair(t)
	ctx := p.ctx
	state := newLogState(t)
	recDir, repDir := filepath.Join(t.TempDir(), "rec"), filepath.Join(t.TempDir(), "rep")
	rec, captured, _ := p.record(recDir, "", state)
	rep, relay := p.replay(repDir, "", streamRelay, func(r *Relay) { captured.feed(r, rand.New(rand.NewPCG(1, 2))) })
	followCtx, stopFollowing := context.WithCancel(ctx)
	following := make(chan error, 1)
	go func() { following <- rep.Follow(followCtx, relay, nil) }()

	bootCtx, bootCancel := context.WithTimeout(ctx, 90*time.Second)
	defer bootCancel()
	if err := WaitSerial(bootCtx, recDir, "ftgw-init ready"); err != nil {
		b, _ := os.ReadFile(SerialPath(recDir))
		t.Fatalf("%v; head %d; console:\n%s", err, state.head(), tailLines(string(b), 10))
	}
	// The replayer boots the same guest from the log while the recorder
	// runs on.
	if err := WaitSerial(ctx, repDir, "ftgw-init ready"); err != nil {
		t.Fatal(err)
	}
	if !isRunning(t, rec) {
		t.Error("the recorder stopped while the replayer caught up")
	}

	client, err := guest.Dial("192.0.2.1:7000", 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	const puts = 20
	for i := 1; i < puts; i++ {
		if n, err := client.Put(fmt.Sprintf("k%d", i%7), fmt.Sprint(i)); err != nil || n != uint64(i) {
			t.Fatalf("put %d: %d, %v", i, n, err)
		}
	}

	// The last reply: stop feeding the replayer first, then cut its log at
	// the head the library published before the reply reached the tap.
	captured.mu.Lock()
	captured.limit = captured.fed
	captured.mu.Unlock()
	if n, err := client.Put("last", "write"); err != nil || n != puts {
		t.Fatalf("put %d: %d, %v", puts, n, err)
	}
	head := state.head()
	captured.mu.Lock()
	logged := len(captured.data)
	captured.mu.Unlock()
	t.Logf("head when the last reply arrived: %d bytes of log (%d read so far)", head, logged)
	captured.setLimit(int(head))
	waitFor(t, "the relay to take the log up to the head", func() bool {
		return relay.Pending() == 0 && captured.fedUpTo() == int(head)
	})
	stopFollowing()
	if err := <-following; err != nil {
		t.Fatalf("follow: %v", err)
	}
	if err := rep.ReplayToEnd(ctx, relay); err != nil {
		t.Fatal(err)
	}

	recSerial := readFile(t, SerialPath(recDir))
	repSerial := readFile(t, SerialPath(repDir))
	lastLine := fmt.Sprintf("ftgw-kv req=%d puts=%d ", puts, puts)
	if !strings.Contains(recSerial, lastLine) {
		t.Fatalf("recorder's console lacks %q:\n%s", lastLine, recSerial)
	}
	if !strings.Contains(repSerial, lastLine) {
		t.Errorf("replaying the log up to the reply's head does not reach the write it acknowledged (%q):\n%s", lastLine, tailLines(repSerial, 5))
	}
	// Same execution: the replay's console is the recording's, up to
	// where the replay stopped.
	if !strings.HasPrefix(recSerial, repSerial) {
		t.Errorf("the consoles differ:\nrecorder:\n%s\nreplayer:\n%s", tailLines(recSerial, 5), tailLines(repSerial, 5))
	}
}

func (c *capturedLog) fedUpTo() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.fed
}

func openTap(t *testing.T, name, addr string) *tap.Tap {
	t.Helper()
	tp, err := tap.Open(name)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tp.Close() })
	testutil.LinkUp(t, name, addr)
	return tp
}

func isRunning(t *testing.T, q *QEMU) bool {
	st, err := q.Status()
	if err != nil {
		t.Fatal(err)
	}
	return st.Running
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func readFile(t *testing.T, path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func tailLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

// TestFollowingAGuestThatTransmitsNeverStallsTheReplay records the guest
// under a load that both transmits (a reply per request) and computes (the
// guest hashes its whole store after each request), then replays the log
// fed slowly, so that the replayer keeps catching up with it and being held.
// A replayer held between a transmit kick and virtio-net's transmit timer
// used to stall for good at the timer's checkpoint (hold.go); every hold
// Follow picks must let the replay run on to the end.
func TestFollowingAGuestThatTransmitsNeverStallsTheReplay(t *testing.T) {
	p := newPair(t)
	ctx := p.ctx
	recDir, repDir := filepath.Join(t.TempDir(), "rec"), filepath.Join(t.TempDir(), "rep")

	// Record.
	rec, captured, logged := p.record(recDir, "", newLogState(t))
	if err := WaitSerial(ctx, recDir, "ftgw-init ready"); err != nil {
		t.Fatal(err)
	}
	client, err := guest.Dial("192.0.2.1:7000", 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	payload := strings.Repeat("x", 1200)
	puts := 0
	for start := time.Now(); puts < 150 && time.Since(start) < 6*time.Second; puts++ {
		if _, err := client.Put(fmt.Sprintf("cpu%d", puts), payload); err != nil {
			t.Fatalf("put %d: %v", puts, err)
		}
	}
	rec.Stop()
	<-logged
	recSerial := readFile(t, SerialPath(recDir))
	lastLine := fmt.Sprintf("ftgw-kv req=%d puts=%d ", puts, puts)
	if !strings.Contains(recSerial, lastLine) {
		t.Fatalf("recorder's console lacks %q", lastLine)
	}

	// Replay, the log trickling in slower than the replayer runs.
	captured.setLimit(0)
	go func() {
		for captured.fedUpTo() < len(captured.data) && ctx.Err() == nil {
			time.Sleep(20 * time.Millisecond)
			captured.raiseLimit(2000)
		}
	}()
	rep, relay := p.replay(repDir, "", streamRelay, func(r *Relay) { captured.feed(r, rand.New(rand.NewPCG(3, 4))) })

	replayStart := time.Now()
	p.replayAll(rep, relay, captured, func(at uint64) string { return eventsAround(captured.data, at) })
	end, err := rep.Icount()
	if err != nil {
		t.Fatal(err)
	}
	if want := relay.Forwarded().Icount - 1; end != want {
		t.Errorf("the replay stopped at icount %d, the log ends at %d", end, want)
	}
	repSerial := readFile(t, SerialPath(repDir))
	if !strings.HasPrefix(recSerial, repSerial) || !strings.Contains(repSerial, lastLine) {
		t.Errorf("the replay's console is not the recording's up to %q:\nrecorder:\n%s\nreplayer:\n%s",
			lastLine, tailLines(recSerial, 3), tailLines(repSerial, 3))
	}
	t.Logf("%d puts; %d log bytes, %d instructions replayed in %s", puts, len(captured.data), end,
		time.Since(replayStart).Round(time.Millisecond))
}

// watchProgress calls stalled once if q's icount stands still for 15
// seconds while q runs, and returns when ctx ends.
func watchProgress(ctx context.Context, q *QEMU, stalled func(icount uint64)) {
	var last uint64
	since := time.Now()
	for ctx.Err() == nil {
		time.Sleep(500 * time.Millisecond)
		n, err := q.Icount()
		if err != nil {
			return
		}
		st, err := q.Status()
		if err != nil {
			return
		}
		if n != last || !st.Running {
			last, since = n, time.Now()
		} else if time.Since(since) > 15*time.Second {
			stalled(n)
			return
		}
	}
}

// eventsAround lists the log's events just before and after icount.
func eventsAround(log []byte, icount uint64) string {
	var lines []string
	after := 0
	s := NewLogScanner(StreamFraming)
	s.OnEvent = func(ev LogEvent) {
		if after >= 12 {
			return
		}
		line := fmt.Sprintf("  %-30v icount %d", ev.Kind, ev.Icount)
		if ev.Icount < icount {
			lines = append(lines[max(0, len(lines)-7):], line)
			return
		}
		lines = append(lines, line)
		after++
	}
	s.Write(log)
	return strings.Join(lines, "\n")
}
