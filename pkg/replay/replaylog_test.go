package replay

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ftgw/ftgw/internal/testutil"
)

// Encoders as QEMU's replay_put_* write: big-endian, arrays length-first.
func be32(v uint32) []byte { return binary.BigEndian.AppendUint32(nil, v) }
func be64(v uint64) []byte { return binary.BigEndian.AppendUint64(nil, v) }
func arr(b []byte) []byte  { return append(be32(uint32(len(b))), b...) }

func ev(k Kind, parts ...[]byte) []byte {
	out := []byte{byte(k)}
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

// logEvent is one event of a hand-built log and what the scanner must say.
type logEvent struct {
	name  string
	bytes []byte
	kind  Kind
	insns uint32 // for INSTRUCTION
}

// everyEvent is one event of every kind QEMU 7.2 writes that the scanner
// delimits, ending with END.
func everyEvent() []logEvent {
	packet := bytes.Repeat([]byte{0xab}, 1514)
	evs := []logEvent{
		{"instruction", ev(KindInstruction, be32(1000)), KindInstruction, 1000},
		{"interrupt", ev(KindInterrupt), KindInterrupt, 0},
		{"exception", ev(KindException), KindException, 0},
		{"instruction-max", ev(KindInstruction, be32(0x7fffffff)), KindInstruction, 0x7fffffff},
		{"bh", ev(KindAsyncBH, be64(0x0102030405060708)), KindAsyncBH, 0},
		{"bh-oneshot", ev(KindAsyncBHOneshot, be64(42)), KindAsyncBHOneshot, 0},
		{"input-key-number", ev(KindAsyncInput, be32(0), be32(0), be64(30), []byte{1}), KindAsyncInput, 0},
		{"input-key-qcode", ev(KindAsyncInput, be32(0), be32(1), be32(17), []byte{0}), KindAsyncInput, 0},
		{"input-btn", ev(KindAsyncInput, be32(1), be32(2), []byte{1}), KindAsyncInput, 0},
		{"input-rel", ev(KindAsyncInput, be32(2), be32(0), be64(^uint64(4))), KindAsyncInput, 0},
		{"input-abs", ev(KindAsyncInput, be32(3), be32(1), be64(32767)), KindAsyncInput, 0},
		{"input-sync", ev(KindAsyncInputSync), KindAsyncInputSync, 0},
		{"char-read", ev(KindAsyncCharRead, []byte{0}, arr([]byte("hello\n"))), KindAsyncCharRead, 0},
		{"char-read-empty", ev(KindAsyncCharRead, []byte{1}, arr(nil)), KindAsyncCharRead, 0},
		{"block", ev(KindAsyncBlock, be64(7)), KindAsyncBlock, 0},
		{"net", ev(KindAsyncNet, []byte{0}, be32(0), arr(packet)), KindAsyncNet, 0},
		{"net-empty", ev(KindAsyncNet, []byte{2}, be32(1), arr(nil)), KindAsyncNet, 0},
		{"char-write", ev(KindCharWrite, be32(5), be32(0)), KindCharWrite, 0},
		{"char-read-all", ev(KindCharReadAll, arr([]byte("abc"))), KindCharReadAll, 0},
		{"char-read-all-error", ev(KindCharReadAllError, be32(uint32(0xfffffff5))), KindCharReadAllError, 0},
		{"audio-out", ev(KindAudioOut, be64(512)), KindAudioOut, 0},
		{"random", ev(KindRandom, be32(0), arr([]byte{1, 2, 3, 4, 5, 6, 7, 8})), KindRandom, 0},
		{"clock-host", ev(KindClockHost, be64(1700000000123456789)), KindClockHost, 0},
		{"clock-virtual-rt", ev(KindClockVirtualRT, be64(99)), KindClockVirtualRT, 0},
		{"instruction-1", ev(KindInstruction, be32(1)), KindInstruction, 1},
	}
	for k := KindShutdown; k <= KindShutdownLast; k++ {
		evs = append(evs, logEvent{k.String(), ev(k), k, 0})
	}
	for k := KindCheckpoint; k <= KindCheckpointLast; k++ {
		evs = append(evs, logEvent{k.String(), ev(k), k, 0})
	}
	return append(evs, logEvent{"end", ev(KindEnd), KindEnd, 0})
}

// boundary is where an event ends and the icount there.
type boundary struct {
	end    int64
	icount uint64
	kind   Kind
}

func joinEvents(evs []logEvent) ([]byte, []boundary) {
	var log []byte
	var want []boundary
	var icount uint64
	for _, e := range evs {
		log = append(log, e.bytes...)
		icount += uint64(e.insns)
		want = append(want, boundary{int64(len(log)), icount, e.kind})
	}
	return log, want
}

// scanChunks feeds log to a scanner in the pieces split gives and returns
// the boundaries it reported.
func scanChunks(t *testing.T, f Framing, log []byte, cuts []int) ([]boundary, *LogScanner) {
	t.Helper()
	s := NewLogScanner(f)
	var got []boundary
	s.OnEvent = func(e LogEvent) {
		got = append(got, boundary{e.Offset + 1 + int64(len(e.Payload)), e.Icount, e.Kind})
	}
	prev := 0
	for _, c := range append(cuts, len(log)) {
		if _, err := s.Write(log[prev:c]); err != nil {
			t.Fatalf("write [%d:%d]: %v", prev, c, err)
		}
		prev = c
	}
	return got, s
}

func TestScanEveryEventKind(t *testing.T) {
	evs := everyEvent()
	log, want := joinEvents(evs)

	got, s := scanChunks(t, StreamFraming, log, nil)
	if len(got) != len(want) {
		t.Fatalf("got %d events, want %d", len(got), len(want))
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("event %d (%s): got %+v, want %+v", i, evs[i].name, got[i], want[i])
		}
	}
	if s.Complete() != int64(len(log)) || s.Icount() != want[len(want)-1].icount || !s.Ended() {
		t.Errorf("complete %d icount %d ended %v, want %d %d true",
			s.Complete(), s.Icount(), s.Ended(), len(log), want[len(want)-1].icount)
	}
	if err := s.Finish(); err != nil {
		t.Errorf("finish: %v", err)
	}
}

// Feeding in two pieces cut anywhere, or a byte at a time, must give the
// same events as feeding the whole log, and Complete must always be the
// last boundary at or before what was fed.
func TestScanEverySplitPoint(t *testing.T) {
	log, want := joinEvents(everyEvent())
	for cut := 0; cut <= len(log); cut++ {
		got, _ := scanChunks(t, StreamFraming, log, []int{cut})
		if len(got) != len(want) {
			t.Fatalf("cut at %d: got %d events, want %d", cut, len(got), len(want))
		}
		for i := range want {
			if got[i] != want[i] {
				t.Fatalf("cut at %d: event %d: got %+v, want %+v", cut, i, got[i], want[i])
			}
		}
	}

	s := NewLogScanner(StreamFraming)
	var got []boundary
	s.OnEvent = func(e LogEvent) {
		got = append(got, boundary{e.Offset + 1 + int64(len(e.Payload)), e.Icount, e.Kind})
	}
	next := 0 // index in want of the next boundary
	for i := range log {
		if _, err := s.Write(log[i : i+1]); err != nil {
			t.Fatalf("byte %d: %v", i, err)
		}
		for next < len(want) && want[next].end <= int64(i+1) {
			next++
		}
		var wantComplete int64
		var wantIcount uint64
		if next > 0 {
			wantComplete, wantIcount = want[next-1].end, want[next-1].icount
		}
		if s.Complete() != wantComplete || s.Icount() != wantIcount {
			t.Fatalf("after byte %d: complete %d icount %d, want %d %d",
				i, s.Complete(), s.Icount(), wantComplete, wantIcount)
		}
	}
	if len(got) != len(want) {
		t.Fatalf("byte by byte: got %d events, want %d", len(got), len(want))
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("byte by byte: event %d: got %+v, want %+v", i, got[i], want[i])
		}
	}
}

func TestScanPayload(t *testing.T) {
	packet := []byte("an ethernet frame")
	log := ev(KindAsyncNet, []byte{3}, be32(0x10), arr(packet))
	s := NewLogScanner(StreamFraming)
	var payload []byte
	s.OnEvent = func(e LogEvent) { payload = append([]byte(nil), e.Payload...) }
	for _, b := range log {
		s.Write([]byte{b})
	}
	want := append([]byte{3}, append(be32(0x10), arr(packet)...)...)
	if !bytes.Equal(payload, want) {
		t.Errorf("payload %x, want %x", payload, want)
	}
}

func TestScanErrors(t *testing.T) {
	prefix := func(b ...byte) []byte { return append(ev(KindInstruction, be32(10)), b...) }
	tests := []struct {
		name    string
		framing Framing
		log     []byte
		want    error
		wantMsg string // in the error text
	}{
		{"unknown kind 40", StreamFraming, prefix(40), ErrUnknownEvent, "offset 5: event kind byte 0x28"},
		{"unknown kind 0xff", StreamFraming, prefix(0xff, 0, 0), ErrUnknownEvent, "offset 5: event kind byte 0xff"},
		{"audio in", StreamFraming, ev(KindAudioIn, be64(4), be64(4)), ErrUnsupportedEvent, "offset 0: event kind byte 0x1a"},
		{"input kind", StreamFraming, ev(KindAsyncInput, be32(4)), ErrCorrupt, "input event kind 4"},
		{"key value kind", StreamFraming, ev(KindAsyncInput, be32(0), be32(2)), ErrCorrupt, "key value kind 2"},
		{"huge array", StreamFraming, ev(KindAsyncNet, []byte{0}, be32(0), be32(MaxArrayLen+1)), ErrCorrupt, "array length"},
		{"file version", FileFraming, append(be32(0xe0200b), make([]byte, 8)...), ErrBadHeader, "version 0xe0200b"},
		{"byte after end in file", FileFraming, append(append(be32(Version), make([]byte, 8)...), byte(KindEnd), 0), ErrAfterEnd, "offset 13"},
		{"bad trailer", StreamFraming, []byte{byte(KindEnd), 0x00, 0xe0, 0x20, 0x0b}, ErrAfterEnd, "offset 4: byte 0x0b"},
		{"byte after trailer", StreamFraming, append(append([]byte{byte(KindEnd)}, StreamHeader...), 0), ErrAfterEnd, "offset 5"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := NewLogScanner(tt.framing)
			_, err := s.Write(tt.log)
			if !errors.Is(err, tt.want) || !strings.Contains(err.Error(), tt.wantMsg) {
				t.Fatalf("got %v, want %v with %q", err, tt.want, tt.wantMsg)
			}
			if _, again := s.Write([]byte{0}); !errors.Is(again, tt.want) {
				t.Errorf("next write: %v, want the same error", again)
			}
			if !errors.Is(s.Finish(), tt.want) {
				t.Errorf("finish: %v, want the same error", s.Finish())
			}
		})
	}
}

func TestScanFraming(t *testing.T) {
	events, want := joinEvents(everyEvent())
	last := want[len(want)-1]
	tests := []struct {
		name      string
		framing   Framing
		log       []byte
		complete  int64
		finishErr error
	}{
		{"stream without trailer", StreamFraming, events, last.end, nil},
		{"stream with trailer", StreamFraming, append(append([]byte(nil), events...), StreamHeader...), last.end, nil},
		{"stream with half a trailer", StreamFraming, append(append([]byte(nil), events...), StreamHeader[:2]...), last.end, ErrTruncated},
		{"stream cut in an event", StreamFraming, events[:want[3].end-2], want[2].end, ErrTruncated},
		{"finished file", FileFraming, append(append(be32(Version), make([]byte, 8)...), events...), FileHeaderSize + last.end, nil},
		{"file being recorded", FileFraming, append(make([]byte, FileHeaderSize), events[:want[3].end]...), FileHeaderSize + want[3].end, nil},
		{"half a header", FileFraming, be32(Version), FileHeaderSize, ErrTruncated},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for _, step := range []int{len(tt.log), 1, 7} {
				s := NewLogScanner(tt.framing)
				for i := 0; i < len(tt.log); i += step {
					if _, err := s.Write(tt.log[i:min(i+step, len(tt.log))]); err != nil {
						t.Fatalf("step %d: write at %d: %v", step, i, err)
					}
				}
				if s.Complete() != tt.complete {
					t.Errorf("step %d: complete %d, want %d", step, s.Complete(), tt.complete)
				}
				if err := s.Finish(); !errors.Is(err, tt.finishErr) {
					t.Errorf("step %d: finish: %v, want %v", step, err, tt.finishErr)
				}
			}
		})
	}
}

func TestKindString(t *testing.T) {
	for k, want := range map[Kind]string{
		KindInstruction:    "instruction",
		KindAsyncNet:       "async-net",
		KindShutdown:       "shutdown-none",
		KindShutdown + 4:   "shutdown-host-signal",
		KindShutdownLast:   "shutdown-max",
		KindCharWrite:      "char-write",
		KindClockVirtualRT: "clock-virtual-rt",
		KindCheckpoint:     "checkpoint-clock-warp-start",
		KindCheckpoint + 5: "checkpoint-clock-host",
		KindCheckpointLast: "checkpoint-reset",
		KindEnd:            "end",
		kindCount:          "unknown-0x28",
		0xff:               "unknown-0xff",
	} {
		if got := k.String(); got != want {
			t.Errorf("Kind(%d).String() = %q, want %q", k, got, want)
		}
	}
}

// ---- Against real QEMU 7.2 ----

// rrMachine is a VM both the recorder and the replayer run: the same
// command line but for the rr option (and the netdev's tap).
type rrMachine struct {
	name string
	// guest boots build/guest (make guest); otherwise SeaBIOS runs alone,
	// finds nothing to boot and idles, and its debug port (0x402), read
	// through an isa-debugcon chardev, stands in for the console.
	guest  bool
	kernel string
	initrd string
	// ready is the console line that says the machine got somewhere.
	ready string
}

// noNet is a netdev for a guest that needs a NIC but no network: a hub
// port alone on its hub, so frames go nowhere, not even to the host.
const noNet = "hubport,id=n0,hubid=0"

// rrMachines are the machines this host can run: SeaBIOS alone always, the
// project's guest when build/guest holds it.
func rrMachines(t *testing.T) []rrMachine {
	ms := []rrMachine{{name: "seabios", ready: "No bootable device"}}
	if g, ok := guestImage(t); ok {
		ms = append(ms, g)
	} else {
		t.Log("build/guest/vmlinuz or initrd.img missing (make guest): the guest is not tested")
	}
	return ms
}

func guestImage(t *testing.T) (rrMachine, bool) {
	root, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	g := rrMachine{
		name:   "guest",
		guest:  true,
		kernel: filepath.Join(root, "build/guest/vmlinuz"),
		initrd: filepath.Join(root, "build/guest/initrd.img"),
		ready:  "ftgw-init ready",
	}
	for _, p := range []string{g.kernel, g.initrd} {
		if _, err := os.Stat(p); err != nil {
			return g, false
		}
	}
	return g, true
}

// args is the QEMU command line; rr is "record" or "replay", console the
// file that gets the console, netdev a -netdev value with id n0 for the
// guest's NIC (the SeaBIOS machine has none).
func (m rrMachine) args(rr, rrfile, console, qmp, netdev string) []string {
	args := []string{
		"-M", "q35", "-nodefaults", "-no-user-config", "-m", "128", "-display", "none",
		"-icount", "shift=5,rr=" + rr + ",rrfile=" + rrfile,
		"-qmp", "unix:" + qmp + ",server=on,wait=off",
	}
	if m.guest {
		args = append(args, "-serial", "file:"+console,
			"-kernel", m.kernel, "-initrd", m.initrd,
			"-append", "console=ttyS0 nohz=off panic=-1 ftgw.ip=192.0.2.1/24")
	} else {
		args = append(args, "-debugcon", "file:"+console, "-global", "isa-debugcon.iobase=0x402")
	}
	if m.guest {
		args = append(args, "-netdev", netdev,
			"-object", "filter-replay,id=r0,netdev=n0",
			"-device", "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56,tx=timer,romfile=")
	}
	if rr == "replay" {
		// Held until the first replay-break is set.
		args = append(args, "-S")
	}
	return args
}

func requireQEMU(t *testing.T) string {
	t.Helper()
	if testing.Short() {
		t.Skip("runs QEMU")
	}
	testutil.RequireRoot(t)
	qemu, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		t.Skip("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
	}
	return qemu
}

// rrVM is a QEMU the test started.
type rrVM struct {
	name    string
	cmd     *exec.Cmd
	qmpPath string
	stderr  string // file with QEMU's own messages
	mon     *SocketMonitor
	exited  chan struct{}
	waitErr error // valid once exited is closed
}

// startVM starts QEMU (name names its files in dir). It does not connect
// QMP: a replayer opens its QMP socket only once its log has started.
func startVM(t *testing.T, qemu, dir, name string, args []string) *rrVM {
	t.Helper()
	vm := &rrVM{
		name:    name,
		qmpPath: filepath.Join(dir, name+".qmp"),
		stderr:  filepath.Join(dir, name+".stderr"),
		exited:  make(chan struct{}),
	}
	stderr, err := os.Create(vm.stderr)
	if err != nil {
		t.Fatal(err)
	}
	defer stderr.Close()
	vm.cmd = exec.Command(qemu, args...)
	vm.cmd.Stdout, vm.cmd.Stderr = stderr, stderr
	vm.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := vm.cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	go func() {
		vm.waitErr = vm.cmd.Wait()
		close(vm.exited)
	}()
	t.Cleanup(func() {
		if vm.mon != nil {
			vm.mon.Disconnect()
		}
		vm.cmd.Process.Kill()
		<-vm.exited
		if t.Failed() {
			out, _ := os.ReadFile(vm.stderr)
			t.Logf("%s: %v, stderr:\n%s", name, vm.waitErr, out)
		}
	})
	return vm
}

// connect connects QMP, retrying until QEMU has opened its socket.
func (vm *rrVM) connect(ctx context.Context, t *testing.T) {
	t.Helper()
	mon, err := NewSocketMonitor("unix", vm.qmpPath, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	for {
		if err = mon.Connect(); err == nil {
			vm.mon = mon
			return
		}
		select {
		case <-vm.exited:
			t.Fatalf("%s exited before QMP came up: %v", vm.name, vm.waitErr)
		case <-ctx.Done():
			t.Fatalf("%s: connect qmp: %v", vm.name, err)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// exec runs a QMP command and decodes its return value into out (if not
// nil). It does not fail the test, for goroutines other than the test's.
func (vm *rrVM) exec(command string, args any, out any) error {
	cmd, err := json.Marshal(Command{Execute: command, Args: args})
	if err != nil {
		return err
	}
	ret, err := vm.mon.Run(cmd)
	if err != nil {
		return fmt.Errorf("%s: %w", vm.name, err)
	}
	if out != nil {
		if err := json.Unmarshal(ret, out); err != nil {
			return fmt.Errorf("%s: decode %s reply %s: %w", vm.name, command, ret, err)
		}
	}
	return nil
}

// run is exec that fails the test.
func (vm *rrVM) run(t *testing.T, command string, args any, out any) {
	t.Helper()
	if err := vm.exec(command, args, out); err != nil {
		t.Fatal(err)
	}
}

// icount is what query-replay reports.
func (vm *rrVM) icount() (uint64, error) {
	var info struct {
		Mode   string `json:"mode"`
		Icount uint64 `json:"icount"`
	}
	err := vm.exec("query-replay", nil, &info)
	return info.Icount, err
}

// waitExit waits for QEMU to exit by itself and fails if it did not exit 0.
func (vm *rrVM) waitExit(ctx context.Context, t *testing.T) {
	t.Helper()
	select {
	case <-vm.exited:
		if vm.waitErr != nil {
			t.Fatalf("%s exited: %v", vm.name, vm.waitErr)
		}
	case <-ctx.Done():
		t.Fatalf("%s did not exit: %v", vm.name, ctx.Err())
	}
}

// waitConsole waits until the file console contains want.
func waitConsole(ctx context.Context, vm *rrVM, console, want string) error {
	for {
		b, _ := os.ReadFile(console)
		if bytes.Contains(b, []byte(want)) {
			return nil
		}
		select {
		case <-vm.exited:
			return fmt.Errorf("%s exited before its console said %q: %v", vm.name, want, vm.waitErr)
		case <-ctx.Done():
			return fmt.Errorf("%s: console never said %q: %w", vm.name, want, ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// kindCounts counts a log's events by kind, for the test log.
func kindCounts(counts map[Kind]int) string {
	var parts []string
	for k := Kind(0); k < kindCount; k++ {
		if counts[k] > 0 {
			parts = append(parts, fmt.Sprintf("%s=%d", k, counts[k]))
		}
	}
	return strings.Join(parts, " ")
}

// TestRecordedLog records a real log to a regular file and scans it: the
// scanner must take the whole file, to its last byte, and its icount must
// be what QEMU reported when recording stopped.
func TestRecordedLog(t *testing.T) {
	qemu := requireQEMU(t)
	for _, m := range rrMachines(t) {
		t.Run(m.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			dir := t.TempDir()
			logPath := filepath.Join(dir, "rr.bin")
			console := filepath.Join(dir, "console.log")
			rec := startVM(t, qemu, dir, "record", m.args("record", logPath, console, filepath.Join(dir, "record.qmp"), noNet))
			start := time.Now()
			rec.connect(ctx, t)
			if err := waitConsole(ctx, rec, console, m.ready); err != nil {
				t.Fatal(err)
			}
			// Stopped, the icount holds still between the query and the
			// final INSTRUCTION event that quit writes.
			rec.run(t, "stop", nil, nil)
			want, err := rec.icount()
			if err != nil {
				t.Fatal(err)
			}
			elapsed := time.Since(start)
			rec.run(t, "quit", nil, nil)
			rec.waitExit(ctx, t)

			log, err := os.ReadFile(logPath)
			if err != nil {
				t.Fatal(err)
			}
			if v := binary.BigEndian.Uint32(log); v != Version {
				t.Errorf("header version 0x%x, want 0x%x", v, Version)
			}
			s := NewLogScanner(FileFraming)
			counts := map[Kind]int{}
			var last LogEvent
			s.OnEvent = func(e LogEvent) { counts[e.Kind]++; last = e }
			if _, err := s.Write(log); err != nil {
				t.Fatal(err)
			}
			if err := s.Finish(); err != nil {
				t.Fatal(err)
			}
			if s.Complete() != int64(len(log)) || !s.Ended() || last.Kind != KindEnd {
				t.Errorf("complete %d of %d bytes, ended %v, last event %s", s.Complete(), len(log), s.Ended(), last.Kind)
			}
			if s.Icount() != want {
				t.Errorf("log icount %d, query-replay said %d", s.Icount(), want)
			}
			t.Logf("%d bytes, %d events, icount %d in %v (%.0f KB/s, %.1f Minsn/s): %s",
				len(log), s.Events(), s.Icount(), elapsed.Round(time.Millisecond),
				float64(len(log))/elapsed.Seconds()/1e3, float64(s.Icount())/elapsed.Seconds()/1e6, kindCounts(counts))
		})
	}
}

// BenchmarkLogScanner scans what a booting guest's log is mostly made of
// (instructions, checkpoints, clocks, interrupts, console writes) in
// network-sized chunks; the figure is log bytes per second.
func BenchmarkLogScanner(b *testing.B) {
	one := slices.Concat(
		ev(KindInstruction, be32(0x2be)), ev(KindCheckpoint+1), ev(KindCheckpoint+5),
		ev(KindClockHost, be64(1700000000123456789)), ev(KindInterrupt),
		ev(KindInstruction, be32(0x24)), ev(KindCharWrite, be32(1), be32(1)))
	log := bytes.Repeat(one, 4096)
	b.SetBytes(int64(len(log)))
	for b.Loop() {
		s := NewLogScanner(StreamFraming)
		for p := log; len(p) > 0; {
			n := min(1400, len(p))
			if _, err := s.Write(p[:n]); err != nil {
				b.Fatal(err)
			}
			p = p[n:]
		}
	}
}
