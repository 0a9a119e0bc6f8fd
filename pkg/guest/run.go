package guest

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/ftgw/ftgw/internal/tap"
)

// maxFrame is the read buffer size: any frame a tap can deliver, whatever
// its MTU.
const maxFrame = 1<<16 + ethHdrLen

// Config describes one guest.
type Config struct {
	Tap     string           // tap device to attach to (created if missing)
	IP      netip.Addr       // the guest's IPv4 address
	MAC     net.HardwareAddr // the guest's unicast MAC
	Control string           // unix socket path for STATE queries; "" for none
	// Restore, if set, is where the guest starts: a snapshot of another
	// guest (its STATE) at a log position.
	Restore *State
	// OnTaken, if set, gets the count of frames taken from the tap so
	// far, counted as State.Frames counts them (from the restored count),
	// after each read: the data path paces the guest's input on it.
	OnTaken func(frames uint64)
	// Backpressure, if set, makes BLAST wait for the gateway's hold queue
	// instead of overflowing it.
	Backpressure *Backpressure
}

// Run acts as the VM behind cfg.Tap until ctx is done, then returns nil.
// It returns an error if setup fails or the tap stops working.
//
// The tap is opened before Run starts any goroutine, so it is found (or
// created) in the network namespace of the caller's thread. To run in another
// namespace, lock the calling goroutine to a thread in it (see TestEndToEnd).
//
// One goroutine owns the Guest: it takes frames from a reader goroutine in
// the order the tap delivered them, writes the replies, and answers control
// queries between frames, so queries never race with frame processing.
func Run(ctx context.Context, cfg Config, logger *slog.Logger) error {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	ip := cfg.IP.Unmap()
	if !ip.Is4() {
		return fmt.Errorf("check config: IP %v is not IPv4", cfg.IP)
	}
	if len(cfg.MAC) != 6 || cfg.MAC[0]&1 != 0 {
		return fmt.Errorf("check config: MAC %v is not unicast 48-bit", cfg.MAC)
	}

	t, err := tap.Open(cfg.Tap)
	if err != nil {
		return fmt.Errorf("open tap: %w", err)
	}
	defer t.Close()

	var ln net.Listener
	if cfg.Control != "" {
		ln, err = listenControl(cfg.Control)
		if err != nil {
			return err
		}
		defer ln.Close()
	}

	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	// Deferred after t.Close and ln.Close, so it runs first: cancel wakes the
	// control handlers, the closes wake the reader and the accept loop.
	defer func() {
		cancel()
		t.Close()
		if ln != nil {
			ln.Close()
		}
		wg.Wait()
	}()

	frames := make(chan []byte, 256)
	var readErr error // set before frames is closed
	var taken uint64
	if cfg.Restore != nil {
		taken = cfg.Restore.Frames
	}
	onTaken := cfg.OnTaken
	if onTaken == nil {
		onTaken = func(uint64) {}
	}
	onTaken(taken)
	wg.Go(func() {
		readErr = readFrames(ctx, t, frames, func() { taken++; onTaken(taken) })
		close(frames)
	})
	stateReqs := make(chan chan State)
	blastReqs := make(chan blastReq)
	if ln != nil {
		wg.Go(func() { serveControl(ctx, ln, control{stateReqs, blastReqs}, logger) })
	}

	g := New(ip, cfg.MAC)
	if cfg.Restore != nil {
		g.Restore(*cfg.Restore)
	}
	logger.Info("guest running", "tap", t.Name(), "ip", ip, "mac", cfg.MAC.String(), "control", cfg.Control)
	stopped := func() error {
		st := g.State()
		logger.Info("guest stopped", "frames", st.Frames, "replies", st.Replies, "puts", st.Puts, "digest", st.Digest)
		return nil
	}
	for {
		select {
		case <-ctx.Done():
			return stopped()
		case f, ok := <-frames:
			if !ok {
				if readErr == nil { // the reader saw ctx done first
					return stopped()
				}
				return fmt.Errorf("read tap %s: %w", t.Name(), readErr)
			}
			replies := g.HandleFrame(f)
			if g.lastDrop != "" {
				logger.Debug("ignored frame", "reason", g.lastDrop, "len", len(f))
			}
			for _, r := range replies {
				if _, err := t.Write(r); err != nil {
					// The VM's NIC loses the frame; the guest carries on,
					// as a real one would.
					logger.Warn("write tap", "tap", t.Name(), "err", err)
				}
			}
		case reply := <-stateReqs:
			reply <- g.State()
		case b := <-blastReqs:
			res := blast(t, cfg.MAC, b, cfg.Backpressure)
			b.reply <- fmt.Sprintf("OK %d %d %d", res.Writes.Nanoseconds(), res.Failed, res.Waited.Nanoseconds())
		}
	}
}

// readFrames copies each frame from t to out until t fails or ctx is done,
// calling took after each read.
func readFrames(ctx context.Context, t *tap.Tap, out chan<- []byte, took func()) error {
	buf := make([]byte, maxFrame)
	for {
		n, err := t.Read(buf)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		took()
		select {
		case out <- append([]byte(nil), buf[:n]...):
		case <-ctx.Done():
			return nil
		}
	}
}

// listenControl listens on path, replacing a stale socket left by a guest
// that died but refusing to steal one that still answers.
func listenControl(path string) (net.Listener, error) {
	if fi, err := os.Lstat(path); err == nil && fi.Mode()&os.ModeSocket != 0 {
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("listen control %s: socket in use", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("remove stale control socket: %w", err)
		}
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("listen control: %w", err)
	}
	return ln, nil
}

// control is how control connections reach the goroutine that owns the guest.
type control struct {
	state chan<- chan State
	blast chan<- blastReq
}

func serveControl(ctx context.Context, ln net.Listener, ctl control, logger *slog.Logger) {
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() == nil {
				logger.Error("accept control connection; control socket stops", "err", err)
			}
			return
		}
		wg.Go(func() { handleControl(ctx, c, ctl) })
	}
}

// handleControl answers one command per line until the peer hangs up.
func handleControl(ctx context.Context, c net.Conn, ctl control) {
	defer c.Close()
	stop := context.AfterFunc(ctx, func() { c.Close() })
	defer stop()

	sc := bufio.NewScanner(c)
	for sc.Scan() {
		var resp []byte
		line := strings.TrimSpace(sc.Text())
		switch {
		case strings.HasPrefix(line, "BLAST "):
			req, err := parseBlast(line)
			if err != nil {
				resp = fmt.Appendf(nil, "ERR %v", err)
				break
			}
			select {
			case ctl.blast <- req:
			case <-ctx.Done():
				return
			}
			resp = []byte(<-req.reply)
		case line == "STATE":
			reply := make(chan State, 1) // the owner never blocks answering
			select {
			case ctl.state <- reply:
			case <-ctx.Done():
				return
			}
			b, err := json.Marshal(<-reply)
			if err != nil {
				resp = fmt.Appendf(nil, "ERR %v", err)
			} else {
				resp = b
			}
		default:
			resp = []byte("ERR unknown command")
		}
		if _, err := c.Write(append(resp, '\n')); err != nil {
			return
		}
	}
}

// QueryState asks the guest serving the control socket at controlPath for
// its State.
func QueryState(controlPath string) (State, error) {
	line, err := controlCommand(controlPath, "STATE", 5*time.Second)
	if err != nil {
		return State{}, err
	}
	var st State
	if err := json.Unmarshal([]byte(line), &st); err != nil {
		return State{}, fmt.Errorf("decode state: %w", err)
	}
	return st, nil
}

// BlastResult is what a BLAST did.
type BlastResult struct {
	Writes time.Duration // from the first write to the last
	Failed int           // writes the tap refused
	// Waited is the part of Writes the guest spent waiting for the
	// gateway's hold queue to drain (Backpressure).
	Waited time.Duration
}

// Blast makes the guest send count frames of size bytes to dst, at rate
// frames per second or, with 0, as fast as it can.
func Blast(controlPath string, count int, dst net.HardwareAddr, size int, rate float64, timeout time.Duration) (BlastResult, error) {
	line, err := controlCommand(controlPath, BlastCommand(count, dst, size, rate), timeout)
	if err != nil {
		return BlastResult{}, err
	}
	var writes, waited int64
	var failed int
	if _, err := fmt.Sscanf(line, "OK %d %d %d", &writes, &failed, &waited); err != nil {
		return BlastResult{}, fmt.Errorf("decode blast reply %q: %w", line, err)
	}
	return BlastResult{Writes: time.Duration(writes), Failed: failed, Waited: time.Duration(waited)}, nil
}

// controlCommand sends one command line and returns the reply line.
func controlCommand(controlPath, cmd string, timeout time.Duration) (string, error) {
	c, err := net.DialTimeout("unix", controlPath, timeout)
	if err != nil {
		return "", fmt.Errorf("dial control: %w", err)
	}
	defer c.Close()
	if err := c.SetDeadline(time.Now().Add(timeout)); err != nil {
		return "", fmt.Errorf("set control deadline: %w", err)
	}
	verb, _, _ := strings.Cut(cmd, " ")
	if _, err := c.Write([]byte(cmd + "\n")); err != nil {
		return "", fmt.Errorf("send %s: %w", verb, err)
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return "", fmt.Errorf("read %s reply: %w", verb, err)
	}
	if msg, ok := strings.CutPrefix(line, "ERR"); ok {
		return "", fmt.Errorf("%s: guest: %s", strings.ToLower(verb), strings.TrimSpace(msg))
	}
	return strings.TrimSpace(line), nil
}
