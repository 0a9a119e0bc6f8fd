package replay

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Mode is QEMU's record/replay mode.
type Mode string

const (
	// Record runs the VM and writes every nondeterministic input to the
	// replay log: the primary.
	Record Mode = "record"
	// Replay re-executes the VM from a replay log: the secondary.
	Replay Mode = "replay"
	// Plain runs the VM with neither: the same machine, unprotected, as
	// a baseline (`ftgw bench`).
	Plain Mode = "plain"
)

// IcountShift is QEMU's -icount shift: each guest instruction advances the
// virtual clock by 2^IcountShift ns. Record and replay must agree.
const IcountShift = 5

// DefaultBinary is the QEMU that runs the VM.
const DefaultBinary = "qemu-system-x86_64"

// Machine is the VM: what it boots and how it is wired. The recorder and the
// replayer must be given the same Machine, or the replay diverges.
type Machine struct {
	Binary string // default DefaultBinary
	// Kernel, Initrd and Cmdline boot the VM directly. Without Kernel the
	// firmware boots it from its disk.
	Kernel   string
	Initrd   string
	Cmdline  string
	MemoryMB int // default 256
	MAC      net.HardwareAddr
	// Disk gives the VM a virtio-blk disk: the qcow2 image DiskPath(Dir),
	// which the caller puts there. Each copy of the VM has its own; they
	// must be identical where the copies start (boot, or a snapshot), and
	// record/replay keeps them so (QEMU's blkreplay driver).
	Disk bool
}

// Config starts one QEMU.
type Config struct {
	Machine Machine
	Mode    Mode
	// Dir holds the QMP socket, the serial console log and the image that
	// takes VM snapshots (savevm/loadvm).
	Dir string
	// Tap is the VM's tap. QEMU gets a duplicate of it.
	Tap *os.File

	// Record mode: the replay log goes through the preloaded library
	// (preload/ftgw-rr.c) to a pipe, read from Log.
	Preload string   // path of ftgw-rr.so
	State   *os.File // the gateway's log state map (datapath.StateFile)
	LogBase uint64   // the log position the log starts at
	// LoadVM starts the VM from this snapshot in Dir's image instead of
	// booting it: go-live and re-protection.
	LoadVM string

	// Replay mode: the replay log, a FIFO fed by a Relay.
	LogFIFO string

	// Trace (optional, Record and Plain): a shared memory file where the
	// preloaded library notes the time of each tap read and write and of
	// the flush before it (preload/ftgw-rr.c, struct rr_trace). In Plain
	// mode the library is loaded for this alone (Preload must be set).
	Trace *os.File

	Stderr io.Writer // QEMU's own messages; default os.Stderr
}

// QEMU is one running QEMU process.
type QEMU struct {
	cfg Config
	cmd *exec.Cmd
	qmp *SocketMonitor
	log *os.File // record: the read end of the replay log pipe

	done chan struct{}
	err  error // valid after done
	stop sync.Once
}

// SerialPath is where a QEMU started in dir writes its serial console.
func SerialPath(dir string) string { return filepath.Join(dir, "serial.log") }

// QMPPath is QEMU's QMP socket in dir.
func QMPPath(dir string) string { return filepath.Join(dir, "qmp.sock") }

// VMStatePath is the qcow2 image in dir that holds VM snapshots. It is
// attached to no device: it only stores the state savevm writes.
func VMStatePath(dir string) string { return filepath.Join(dir, "vmstate.qcow2") }

// DiskPath is the VM's disk in dir (Machine.Disk).
func DiskPath(dir string) string { return filepath.Join(dir, "disk.qcow2") }

// logPath is the rrfile name the recorder opens; the preloaded library
// recognises it and sends the log to the pipe instead.
const logPath = "ftgw:replay-log"

// Fds passed to QEMU: ExtraFiles[i] becomes fd 3+i.
const (
	tapFd   = 3
	logFd   = 4
	stateFd = 5
)

// args is QEMU's command line. Everything that shapes the guest's execution
// is the same in both modes; only the rr option and the log differ.
func (c Config) args() []string {
	m := c.Machine
	mem := m.MemoryMB
	if mem == 0 {
		mem = 256
	}
	icount := fmt.Sprintf("shift=%d,sleep=on", IcountShift)
	switch c.Mode {
	case Record:
		icount += ",rr=record,rrfile=" + logPath
	case Replay:
		icount += ",rr=replay,rrfile=" + c.LogFIFO
	}
	args := []string{
		"-M", "q35", "-nodefaults", "-no-user-config", "-display", "none",
		"-m", strconv.Itoa(mem),
		// One vCPU: record/replay refuses more.
		"-smp", "1",
		"-icount", icount,
		"-chardev", "file,id=serial0,path=" + SerialPath(c.Dir),
		"-serial", "chardev:serial0",
		"-qmp", "unix:" + QMPPath(c.Dir) + ",server=on,wait=off",
		// Before the disk: savevm writes the VM state into the first
		// image that can take snapshots, and a re-protection ships this
		// one.
		"-drive", "if=none,id=vmstate,format=qcow2,file=" + VMStatePath(c.Dir),
		"-netdev", fmt.Sprintf("tap,id=net0,fd=%d", tapFd),
	}
	if m.Kernel != "" {
		args = append(args, "-kernel", m.Kernel)
		if m.Initrd != "" {
			args = append(args, "-initrd", m.Initrd)
		}
		if m.Cmdline != "" {
			args = append(args, "-append", m.Cmdline)
		}
	}
	if m.Disk {
		// blkreplay orders the disk's completions by the replay log: a
		// replayer does the same writes at the same instructions, on its
		// own copy. savevm snapshots the disk too (through the filter,
		// into the qcow2 image), and -loadvm reverts it to that snapshot.
		boot := ""
		if m.Kernel == "" {
			boot = ",bootindex=0"
		}
		args = append(args,
			"-drive", "if=none,id=disk0-file,format=qcow2,file="+DiskPath(c.Dir),
			"-drive", "driver=blkreplay,if=none,image=disk0-file,id=disk0",
			"-device", "virtio-blk-pci,drive=disk0"+boot,
		)
	}
	if c.Mode != Plain {
		// filter-replay puts the frames the guest receives in the log;
		// on replay it feeds them from the log and drops everything.
		args = append(args, "-object", "filter-replay,id=replay0,netdev=net0")
	}
	args = append(args,
		// tx=timer: transmits happen at timer checkpoints, which the log
		// orders; the default bottom-half path did not replay reliably in
		// 7.2. No option ROM: nothing boots from the network.
		// guest_announce=off: after -loadvm, virtio-net arms its guest
		// announce timer already due, and a replayer started from a
		// go-live snapshot (the way to re-protect) can fire it only at a
		// checkpoint while it owes an instruction first: it spins there
		// for good. Go-live announces from the host (announce-self).
		"-device", fmt.Sprintf("virtio-net-pci,netdev=net0,mac=%s,tx=timer,romfile=,guest_announce=off", m.MAC),
	)
	if c.LoadVM != "" {
		args = append(args, "-loadvm", c.LoadVM)
	}
	if c.Mode == Replay && c.LoadVM == "" {
		// Paused until the engine has set the first replay-break. A
		// replayer that loads a recorder's snapshot runs at once, as the
		// recorder ran on after its savevm: paused instead, its main loop
		// takes the host-clock events the running recorder logged in
		// another order, and the replay stalled in 1 of 3 runs.
		args = append(args, "-S")
	}
	return args
}

// Args is QEMU's command line for cfg, without the binary: what a
// baseline compares (the fds it names are Start's).
func (c Config) Args() []string { return c.args() }

// Start starts QEMU and connects to its QMP socket. A replayer only opens
// QMP once its log has started to arrive (it reads the first event while
// starting up), so for Replay keep feeding the log FIFO meanwhile: Start
// waits for QMP until ctx ends. A recorder gets 30 seconds.
func Start(ctx context.Context, cfg Config) (*QEMU, error) {
	if cfg.Machine.Binary == "" {
		cfg.Machine.Binary = DefaultBinary
	}
	if cfg.Stderr == nil {
		cfg.Stderr = os.Stderr
	}
	if err := os.MkdirAll(cfg.Dir, 0o755); err != nil {
		return nil, err
	}
	for _, p := range []string{QMPPath(cfg.Dir), SerialPath(cfg.Dir)} {
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, err
		}
	}
	if _, err := os.Stat(VMStatePath(cfg.Dir)); errors.Is(err, os.ErrNotExist) {
		if err := CreateVMStateImage(VMStatePath(cfg.Dir)); err != nil {
			return nil, err
		}
	}

	q := &QEMU{cfg: cfg, done: make(chan struct{})}
	q.cmd = exec.Command(cfg.Machine.Binary, cfg.args()...)
	q.cmd.Stdout, q.cmd.Stderr = cfg.Stderr, cfg.Stderr
	// The VM dies with the daemon that protects it: an orphan would go on
	// sending outputs nobody holds.
	q.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	q.cmd.ExtraFiles = []*os.File{cfg.Tap}

	var logWrite *os.File
	switch cfg.Mode {
	case Record:
		if cfg.Preload == "" || cfg.State == nil {
			return nil, errors.New("start qemu: record mode needs the preload library and the log state")
		}
		r, w, err := os.Pipe()
		if err != nil {
			return nil, err
		}
		// A larger pipe lets QEMU run on while the daemon is descheduled.
		unix.FcntlInt(r.Fd(), unix.F_SETPIPE_SZ, 1<<20)
		q.log, logWrite = r, w
		q.cmd.ExtraFiles = append(q.cmd.ExtraFiles, w, cfg.State)
		q.cmd.Env = append(os.Environ(),
			"LD_PRELOAD="+cfg.Preload,
			"FTGW_LOG_PATH="+logPath,
			fmt.Sprintf("FTGW_TAP_FD=%d", tapFd),
			fmt.Sprintf("FTGW_LOG_FD=%d", logFd),
			fmt.Sprintf("FTGW_STATE_FD=%d", stateFd),
			fmt.Sprintf("FTGW_LOG_BASE=%d", cfg.LogBase),
		)
		if cfg.Trace != nil {
			q.cmd.Env = append(q.cmd.Env, fmt.Sprintf("FTGW_TRACE_FD=%d", 3+len(q.cmd.ExtraFiles)))
			q.cmd.ExtraFiles = append(q.cmd.ExtraFiles, cfg.Trace)
		}
	case Replay:
		if cfg.LogFIFO == "" {
			return nil, errors.New("start qemu: replay mode needs the log FIFO")
		}
	case Plain:
		if cfg.Trace != nil {
			if cfg.Preload == "" {
				return nil, errors.New("start qemu: a trace needs the preload library")
			}
			// Timestamps only: without FTGW_LOG_PATH the library
			// flushes nothing.
			q.cmd.Env = append(os.Environ(),
				"LD_PRELOAD="+cfg.Preload,
				fmt.Sprintf("FTGW_TAP_FD=%d", tapFd),
				fmt.Sprintf("FTGW_TRACE_FD=%d", 3+len(q.cmd.ExtraFiles)),
			)
			q.cmd.ExtraFiles = append(q.cmd.ExtraFiles, cfg.Trace)
		}
	default:
		return nil, fmt.Errorf("start qemu: mode %q", cfg.Mode)
	}

	err := q.cmd.Start()
	if logWrite != nil {
		logWrite.Close() // QEMU has its copy; EOF on the read end means QEMU is gone
	}
	if err != nil {
		if q.log != nil {
			q.log.Close()
		}
		return nil, fmt.Errorf("start qemu: %w", err)
	}
	go func() {
		q.err = q.cmd.Wait()
		close(q.done)
	}()
	if cfg.Mode == Record {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
	}
	if err := q.connect(ctx); err != nil {
		q.Stop()
		return nil, err
	}
	if cfg.Mode == Record {
		if err := q.checkPreloaded(); err != nil {
			q.Stop()
			return nil, err
		}
	}
	return q, nil
}

// CreateVMStateImage makes the small qcow2 image that holds VM snapshots.
func CreateVMStateImage(path string) error {
	if err := qemuImg("create", "-q", "-f", "qcow2", path, "64M"); err != nil {
		return fmt.Errorf("create vm state image: %w", err)
	}
	return nil
}

// connect waits for QEMU's QMP socket.
func (q *QEMU) connect(ctx context.Context) error {
	for {
		mon, err := NewSocketMonitor("unix", QMPPath(q.cfg.Dir), 10*time.Second)
		if err == nil {
			if err = mon.Connect(); err == nil {
				q.qmp = mon
				return nil
			}
		}
		select {
		case <-q.done:
			return fmt.Errorf("qemu exited at start: %v", q.err)
		default:
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("connect to qemu's qmp: %w (%w)", err, ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// checkPreloaded makes sure the library that closes the Output Rule hole is
// in QEMU: without it, outputs would be stamped with a log position that may
// not cover them.
func (q *QEMU) checkPreloaded() error {
	maps, err := os.ReadFile(fmt.Sprintf("/proc/%d/maps", q.cmd.Process.Pid))
	if err != nil {
		return err
	}
	if !strings.Contains(string(maps), filepath.Base(q.cfg.Preload)) {
		return fmt.Errorf("qemu runs without %s: the replay log would not be flushed before outputs", q.cfg.Preload)
	}
	return nil
}

// Log is the recorder's replay log stream: event bytes only, without QEMU's
// file header. It ends when QEMU exits.
func (q *QEMU) Log() io.Reader { return q.log }

// Monitor is QEMU's QMP connection.
func (q *QEMU) Monitor() *SocketMonitor { return q.qmp }

// Pid is QEMU's process ID.
func (q *QEMU) Pid() int { return q.cmd.Process.Pid }

// Done is closed when QEMU has exited.
func (q *QEMU) Done() <-chan struct{} { return q.done }

// Wait returns QEMU's exit status once it has exited.
func (q *QEMU) Wait() error {
	<-q.done
	return q.err
}

// Freeze stops the whole QEMU process (SIGSTOP) until Thaw: the lag
// throttle. Unlike QMP stop it is invisible to QEMU. A VM stopped over QMP
// is told (virtio-net drops its transmit timer and arms it anew on cont),
// and a recorder's main loop goes on logging a clock checkpoint each time
// it wakes, which a replayer later has to take one main-loop wakeup each
// for. A frozen QEMU does nothing, so QMP waits until Thaw.
func (q *QEMU) Freeze() error { return q.cmd.Process.Signal(syscall.SIGSTOP) }

// Thaw resumes a frozen QEMU.
func (q *QEMU) Thaw() error { return q.cmd.Process.Signal(syscall.SIGCONT) }

// Stop ends QEMU: quit over QMP, then SIGKILL if it lingers.
func (q *QEMU) Stop() error {
	q.stop.Do(func() {
		q.Thaw() // a frozen QEMU would never answer
		if q.qmp != nil {
			q.qmp.Run([]byte(`{"execute":"quit"}`))
		}
		select {
		case <-q.done:
		case <-time.After(3 * time.Second):
			q.cmd.Process.Kill()
			<-q.done
		}
		if q.qmp != nil {
			q.qmp.Disconnect()
		}
		if q.log != nil {
			q.log.Close()
		}
	})
	return nil
}

// Execute runs one QMP command and decodes its return value into out (which
// may be nil).
func (q *QEMU) Execute(command string, args any, out any) error {
	cmd := Command{Execute: command, Args: args}
	b, err := json.Marshal(cmd)
	if err != nil {
		return err
	}
	ret, err := q.qmp.Run(b)
	if err != nil {
		return fmt.Errorf("qmp %s: %w", command, err)
	}
	if out != nil {
		if err := json.Unmarshal(ret, out); err != nil {
			return fmt.Errorf("qmp %s: decode %s: %w", command, ret, err)
		}
	}
	return nil
}

// ReplayInfo is QMP query-replay's answer.
type ReplayInfo struct {
	Mode   string `json:"mode"`
	Icount uint64 `json:"icount"`
}

// Icount is how many guest instructions the VM has executed (recorded or
// replayed).
func (q *QEMU) Icount() (uint64, error) {
	var info ReplayInfo
	err := q.Execute("query-replay", nil, &info)
	return info.Icount, err
}

// Status is QMP query-status's answer.
type Status struct {
	Running bool   `json:"running"`
	Status  string `json:"status"`
}

// Status reports whether the VM runs.
func (q *QEMU) Status() (Status, error) {
	var st Status
	err := q.Execute("query-status", nil, &st)
	return st, err
}

// WaitSerial waits until the serial console log contains want.
func WaitSerial(ctx context.Context, dir, want string) error {
	for {
		b, _ := os.ReadFile(SerialPath(dir))
		if strings.Contains(string(b), want) {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("serial console: %q not seen: %w", want, ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
}
