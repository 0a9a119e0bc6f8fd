package lockstep

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// SecondaryConfig configures the receiving end of the log channel.
type SecondaryConfig struct {
	Listen string      // host:port to listen on; ignored if Listener is set
	TLS    *tls.Config // from ServerTLS: must verify client certs and pin the primary's name
	VM     string      // protected VM; both ends must agree

	Heartbeat time.Duration // default DefaultHeartbeat
	Timeout   time.Duration // as PrimaryConfig.Timeout; default 100 × Heartbeat

	// OnFrame gets each frame once, in position order, never concurrently.
	// frame is only valid during the call. An error closes the connection
	// without acknowledging the frame, so the primary sends it again.
	OnFrame func(pos uint64, frame []byte) error
	// OnLog gets each chunk of the VM engine's log (QEMULog records) the
	// same way. A primary logs either frames or chunks; a kind without a
	// handler is refused (ErrUnexpected).
	OnLog func(pos uint64, chunk []byte) error
	// Epoch is the newest epoch this secondary knows at start (that of the
	// primary whose VM it was built from); a primary with an older one is
	// refused and told.
	Epoch uint64
	// StartPosition is the log position this secondary's VM was built at
	// (from a snapshot): it asks for frames from StartPosition+1 on.
	StartPosition uint64
	// Incarnation names the log the VM was built from (0: none yet).
	// Boot: the VM is at its boot state, so it may follow a log that
	// starts at boot (the primary's FromBoot) from position 0.
	Incarnation uint64
	Boot        bool
	// OnSnapshot rebuilds the VM from a primary's snapshot taken at log
	// position pos, when it cannot follow the primary's log from what it
	// holds: then the log goes on from pos+1. Called from the same
	// goroutine as OnFrame; an error closes the connection. Nil: such a
	// primary is refused.
	OnSnapshot func(pos uint64, state []byte) error
	// OnPrimaryRestarted is told when the host that served the VM at the
	// epoch this secondary follows announces that its daemon restarted
	// (AnnounceRestart): the primary's copy is gone, and waiting for the
	// failure timeout would only keep the VM down. From the connection's
	// own goroutine: it must not block.
	OnPrimaryRestarted func(epoch uint64)
	// OnHandOver is the primary's word, in a planned switchover, that it
	// stopped serving at epoch and that this secondary may take the VM
	// over once it holds the log up to head. From the same goroutine as
	// OnFrame: it must not block. Nil: the record is refused.
	OnHandOver func(epoch, head uint64)

	Logger   *slog.Logger // default slog.Default()
	Listener net.Listener // optional (tests); plain TCP, TLS is added here
}

// Secondary receives the log and acknowledges it.
type Secondary struct {
	cfg   SecondaryConfig
	ln    net.Listener
	log   *slog.Logger
	stats counters

	received    atomic.Uint64 // highest contiguous position delivered to OnFrame
	incarnation atomic.Uint64 // of the log received; 0 before there is one
	boot        atomic.Bool   // the VM is still at its boot state

	progress    atomic.Uint64 // replay lag in ns, for the primary
	hasProgress atomic.Bool
	peerEpoch   atomic.Uint64 // the newest epoch a primary was admitted at
	logEpoch    atomic.Uint64 // the epoch of the log this secondary holds
	hold        atomic.Bool
	connected   atomic.Bool
	rtt         atomic.Int64

	mu  sync.Mutex
	cur *link // the active connection, for SetAckHold
}

// NewSecondary checks cfg and starts listening, so Addr is known before Run.
func NewSecondary(cfg SecondaryConfig) (*Secondary, error) {
	switch {
	case cfg.TLS == nil:
		return nil, errors.New("new secondary: no TLS config; the log channel requires mutual TLS")
	case cfg.TLS.ClientAuth != tls.RequireAndVerifyClientCert:
		// Anything weaker would let any host inject frames into the VM.
		return nil, errors.New("new secondary: TLS config must set ClientAuth to RequireAndVerifyClientCert (use ServerTLS)")
	case cfg.TLS.VerifyConnection == nil:
		// Any certificate from the CA would do, whoever it was issued to.
		return nil, errors.New("new secondary: TLS config must pin the primary's name (use ServerTLS)")
	case cfg.VM == "" || len(cfg.VM) > MaxVMName:
		return nil, fmt.Errorf("new secondary: VM name %q must be 1..%d bytes", cfg.VM, MaxVMName)
	}
	if cfg.Heartbeat <= 0 {
		cfg.Heartbeat = DefaultHeartbeat
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = timeoutBeats * cfg.Heartbeat
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	ln := cfg.Listener
	if ln == nil {
		var err error
		if ln, err = net.Listen("tcp", cfg.Listen); err != nil {
			return nil, fmt.Errorf("new secondary: %w", err)
		}
	}
	s := &Secondary{
		cfg: cfg,
		ln:  ln,
		log: cfg.Logger.With("component", "lockstep", "role", "secondary", "vm", cfg.VM),
	}
	s.received.Store(cfg.StartPosition)
	s.incarnation.Store(cfg.Incarnation)
	s.boot.Store(cfg.Boot && cfg.StartPosition == 0)
	s.peerEpoch.Store(cfg.Epoch)
	s.logEpoch.Store(cfg.Epoch)
	return s, nil
}

// Addr is the listening address.
func (s *Secondary) Addr() net.Addr { return s.ln.Addr() }

// Received is the highest contiguous position delivered to OnFrame.
func (s *Secondary) Received() uint64 { return s.received.Load() }

// Incarnation is the log this secondary holds, 0 before it has one.
func (s *Secondary) Incarnation() uint64 { return s.incarnation.Load() }

// HoldsLog reports whether this secondary holds a log a primary admitted:
// only then is its VM a copy of the primary's that may take over.
func (s *Secondary) HoldsLog() bool { return s.incarnation.Load() != 0 }

// Connected reports whether a primary is connected past the Hello exchange.
func (s *Secondary) Connected() bool { return s.connected.Load() }

// RTT is the last heartbeat round-trip time measured, 0 before the first.
func (s *Secondary) RTT() time.Duration { return time.Duration(s.rtt.Load()) }

// Stats returns a snapshot of the counters.
func (s *Secondary) Stats() Stats { return s.stats.snapshot() }

// SetAckHold(true) keeps receiving and delivering frames but stops sending
// acks, so the primary keeps holding the VM's output (tests, `ftgw pause`).
// SetAckHold(false) sends the current ack at once.
func (s *Secondary) SetAckHold(hold bool) {
	s.hold.Store(hold)
	if hold {
		return
	}
	s.mu.Lock()
	l := s.cur
	s.mu.Unlock()
	if l != nil {
		if err := s.sendAck(l, true); err != nil {
			l.fc.fail(err)
		}
	}
}

// errReplaced ends a connection that a newer authenticated one replaces.
var errReplaced = errors.New("replaced by a newer connection")

// incoming is a connection that passed TLS and sent a valid Hello, waiting
// to become the active one.
type incoming struct {
	conn        *tls.Conn
	fc          *closer
	br          *bufio.Reader // may already hold records after the Hello
	buf         []byte
	peer        string
	epoch, head uint64 // from the primary's Hello
	incarnation uint64 // the primary's log
	// snapshot: this secondary cannot follow the primary's log from what
	// it holds and waits for the VM's state first.
	snapshot bool
}

// Run accepts primaries until ctx is done, then closes the listener and
// returns nil; it returns an error only if the listener fails. One primary is
// served at a time: a newer connection that passes TLS and the Hello check
// replaces the current one. Call Run once.
func (s *Secondary) Run(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer func() {
		cancel()
		s.ln.Close()
		wg.Wait()
	}()
	ready := make(chan *incoming)
	acceptErr := make(chan error, 1)
	wg.Go(func() { acceptErr <- s.acceptLoop(ctx, ready, &wg) })

	var next *incoming
	for {
		if next == nil {
			select {
			case <-ctx.Done():
				return nil
			case err := <-acceptErr:
				return err
			case next = <-ready:
			}
		}
		in := next
		next = nil
		// Sessions run here, one after another, so OnFrame is only ever
		// called from this goroutine; a watcher ends the session early for
		// shutdown or a replacement.
		sessionDone := make(chan struct{})
		var watch sync.WaitGroup
		watch.Go(func() {
			select {
			case <-sessionDone:
			case <-ctx.Done():
				in.fc.fail(ctx.Err())
			case n := <-ready:
				next = n
				in.fc.fail(errReplaced)
			}
		})
		err := s.session(in)
		close(sessionDone)
		watch.Wait()
		switch {
		case ctx.Err() != nil:
		case errors.Is(err, errReplaced):
			s.log.Info("primary connection replaced by a newer one", "primary", in.peer, "new_primary", next.peer)
		default:
			reason := s.stats.fail(err)
			s.log.Warn("primary connection failed", "primary", in.peer, "reason", reason.String(), "err", err)
		}
	}
}

// acceptLoop admits each connection in its own goroutine, so a slow or
// hostile client cannot hold up the next one.
func (s *Secondary) acceptLoop(ctx context.Context, ready chan<- *incoming, wg *sync.WaitGroup) error {
	backoff := minBackoff
	for {
		raw, err := s.ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			if errors.Is(err, net.ErrClosed) {
				return fmt.Errorf("accept primary: %w", err)
			}
			// Likely out of file descriptors: wait instead of spinning.
			s.log.Warn("accept failed", "err", err, "retry_in", backoff)
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(backoff):
			}
			backoff = min(2*backoff, maxBackoff)
			continue
		}
		backoff = minBackoff
		wg.Go(func() { s.admit(ctx, raw, ready) })
	}
}

// admit runs the TLS handshake and the Hello check, then hands the
// connection to Run.
func (s *Secondary) admit(ctx context.Context, raw net.Conn, ready chan<- *incoming) {
	fc := newCloser(raw)
	stop := context.AfterFunc(ctx, func() { fc.fail(ctx.Err()) })
	defer stop()
	in, err := s.greet(ctx, raw, fc)
	if err != nil {
		fc.fail(err)
		if ctx.Err() == nil {
			reason := s.stats.fail(err)
			s.log.Warn("refused log channel connection", "peer", raw.RemoteAddr().String(), "reason", reason.String(), "err", err)
		}
		return
	}
	select {
	case ready <- in:
	case <-ctx.Done():
		fc.fail(ctx.Err())
	}
}

func (s *Secondary) greet(ctx context.Context, raw net.Conn, fc *closer) (*incoming, error) {
	conn := tls.Server(raw, s.cfg.TLS)
	hctx, cancel := context.WithTimeout(ctx, s.cfg.Timeout)
	err := conn.HandshakeContext(hctx)
	cancel()
	if err != nil {
		return nil, handshakeError("primary", err)
	}
	conn.SetReadDeadline(time.Now().Add(s.cfg.Timeout))
	br := bufio.NewReaderSize(conn, bufSize)
	buf := make([]byte, MaxPayload)
	r, err := ReadRecord(br, buf)
	if err != nil {
		return nil, fmt.Errorf("await hello: %w", err)
	}
	s.stats.received(r)
	if r.Kind != KindHello {
		return nil, fmt.Errorf("await hello: got %s: %w", r.Kind, ErrUnexpected)
	}
	theirs, err := checkHello(r.Payload, s.cfg.VM)
	if err != nil {
		// Answer anyway, so the primary logs the mismatch itself instead of
		// an unexplained EOF.
		s.answerRefused(conn, fc, r.Epoch)
		return nil, err
	}
	known := s.peerEpoch.Load()
	if theirs.Restarted {
		// Answered, so the announcer knows it got through.
		s.answerRefused(conn, fc, known)
		if r.Epoch == s.logEpoch.Load() && s.incarnation.Load() != 0 && s.cfg.OnPrimaryRestarted != nil {
			s.cfg.OnPrimaryRestarted(r.Epoch)
		}
		return nil, fmt.Errorf("check hello: the primary of epoch %d restarted: %w", r.Epoch, ErrPrimaryRestarted)
	}
	if r.Epoch < known {
		// A primary that lost a failover: tell it the epoch it lost to.
		s.answerRefused(conn, fc, known)
		return nil, fmt.Errorf("check hello: primary at epoch %d, following %d: %w", r.Epoch, known, ErrStaleEpoch)
	}
	in := &incoming{
		conn:        conn,
		fc:          fc,
		br:          br,
		buf:         buf,
		peer:        raw.RemoteAddr().String(),
		epoch:       r.Epoch,
		head:        r.Position,
		incarnation: theirs.Incarnation,
	}
	switch mine := s.incarnation.Load(); {
	case mine != 0 && mine == theirs.Incarnation:
	case mine == 0 && s.boot.Load() && theirs.FromBoot:
		// Both VMs booted the same way: follow this log from boot.
	case mine != 0 && r.Epoch == known:
		// Another log at the epoch we follow: a primary that restarted
		// with a fresh VM. Taking it (or its snapshot) would throw away
		// the acknowledged history this host holds. No answer: the
		// primary must not take this refusal for a secondary to replace.
		return nil, fmt.Errorf("check hello: primary's log is incarnation %#x at epoch %d, we hold %#x: %w",
			theirs.Incarnation, r.Epoch, mine, ErrIncarnation)
	default:
		// A fresh host, or a newer owner's log: the VM's state first.
		if s.cfg.OnSnapshot == nil {
			s.answerRefused(conn, fc, r.Epoch)
			return nil, fmt.Errorf("check hello: cannot follow log incarnation %#x from %#x and takes no snapshot: %w",
				theirs.Incarnation, mine, ErrIncarnation)
		}
		in.snapshot = true
	}
	return in, nil
}

// answerRefused answers a refused primary's Hello with ours at epoch.
func (s *Secondary) answerRefused(conn *tls.Conn, fc *closer, epoch uint64) {
	l := newLink(conn, fc, s.cfg.Timeout, &s.stats, epoch)
	l.lock()
	h := helloPayload(s.cfg.VM, helloInfo{Incarnation: s.incarnation.Load()})
	if l.write(Record{Kind: KindHello, Position: s.received.Load(), Epoch: epoch, Payload: h}) == nil {
		l.flush()
	}
	l.unlock()
}

// session serves one admitted primary until the connection ends.
func (s *Secondary) session(in *incoming) error {
	fc := in.fc
	defer fc.fail(nil)
	l := newLink(in.conn, in.fc, s.cfg.Timeout, &s.stats, in.epoch)
	if in.epoch > s.peerEpoch.Load() {
		s.peerEpoch.Store(in.epoch)
	}
	if in.snapshot {
		// A newer owner's log, or none held: what this host holds is
		// no copy of the VM that may take over any more.
		s.incarnation.Store(0)
	} else {
		if s.incarnation.Load() == 0 {
			s.incarnation.Store(in.incarnation) // following from boot
		}
		s.logEpoch.Store(max(s.logEpoch.Load(), in.epoch))
	}
	received := s.received.Load()
	mine := helloInfo{Incarnation: s.incarnation.Load(), NeedSnapshot: in.snapshot}

	// Our Hello tells the primary where to resume; the Ack that follows is
	// what releases its held output, so it respects SetAckHold. s.cur is
	// published before hold is read, under l's lock: either SetAckHold(false)
	// sees the link and sends the ack after our Hello, or we see hold false.
	// A secondary waiting for a snapshot acks once it has it.
	l.lock()
	err := l.write(Record{Kind: KindHello, Position: received, Epoch: l.epoch, Payload: helloPayload(s.cfg.VM, mine)})
	s.mu.Lock()
	s.cur = l
	s.mu.Unlock()
	if err == nil && !s.hold.Load() && !in.snapshot {
		err = l.write(Record{Kind: KindAck, Position: received, Epoch: l.epoch})
		l.lastAck = received
	}
	if err == nil {
		err = l.flush()
	}
	l.unlock()
	defer func() {
		s.mu.Lock()
		s.cur = nil
		s.mu.Unlock()
	}()
	if err != nil {
		return fmt.Errorf("send hello: %w", err)
	}
	if in.head < received && !in.snapshot {
		s.log.Warn("primary's head is behind what we received; it will refuse to resume", "primary_head", in.head, "received", received)
	}
	// Connected once the primary has admitted us too: its first record
	// after the Hellos (a ping, or the snapshot) says so.
	defer func() {
		if s.connected.Swap(false) {
			s.stats.disconnects.Add(1)
		}
	}()

	var wg sync.WaitGroup
	wg.Go(func() { fc.fail(s.pingLoop(l, fc.done)) })
	fc.fail(s.readLoop(l, in))
	wg.Wait()
	return fc.err
}

func (s *Secondary) pingLoop(l *link, done <-chan struct{}) error {
	tick := time.NewTicker(s.cfg.Heartbeat)
	defer tick.Stop()
	for {
		select {
		case <-done:
			return nil
		case <-tick.C:
			if err := l.ping(); err != nil {
				return err
			}
			if err := s.sendProgress(l); err != nil {
				return err
			}
		}
	}
}

// SetProgress sets the guest instruction count this secondary's replay has
// reached; it goes to the primary with each heartbeat from now on.
func (s *Secondary) SetProgress(replayedIcount uint64) {
	s.progress.Store(replayedIcount)
	s.hasProgress.Store(true)
}

func (s *Secondary) sendProgress(l *link) error {
	if !s.hasProgress.Load() {
		return nil
	}
	l.lock()
	defer l.unlock()
	if err := l.write(Record{Kind: KindProgress, Position: s.progress.Load(), Epoch: l.epoch}); err != nil {
		return err
	}
	return l.flush()
}

// readLoop delivers frames and acks each batch: once the bufio.Reader has
// nothing buffered, everything the primary flushed together has been
// handled, and one Ack covers it all. A snapshot, if the primary sends one,
// comes first.
func (s *Secondary) readLoop(l *link, in *incoming) error {
	br, buf := in.br, in.buf
	var snapshot []byte // the state arrived so far
	first := true
	for {
		if br.Buffered() == 0 {
			// A primary takes the VM's state before it sends anything
			// (a real VM's image is read from disk): it may be silent
			// that long.
			wait := s.cfg.Timeout
			if first && in.snapshot {
				wait = max(wait, SnapshotWait)
			}
			l.conn.SetReadDeadline(time.Now().Add(wait))
		}
		r, err := ReadRecord(br, buf)
		if err != nil {
			return err
		}
		s.stats.received(r)
		s.stats.heard()
		if first {
			first = false
			s.connected.Store(true)
			s.stats.connects.Add(1)
			s.log.Info("primary connected", "primary", in.peer, "epoch", in.epoch, "primary_head", in.head,
				"received", s.received.Load(), "snapshot", in.snapshot || r.Kind == KindSnapshot || r.Kind == KindSnapshotEnd)
		}
		switch r.Kind {
		case KindRXFrame, KindQEMULog:
			if in.snapshot {
				return fmt.Errorf("handle record: %s before the snapshot this secondary waits for: %w", r.Kind, ErrUnexpected)
			}
			handle := s.cfg.OnFrame
			if r.Kind == KindQEMULog {
				handle = s.cfg.OnLog
			}
			err = s.deliver(r, handle)
		case KindSnapshot:
			if s.cfg.OnSnapshot == nil {
				return fmt.Errorf("handle record: %s, which this secondary does not take: %w", r.Kind, ErrUnexpected)
			}
			in.snapshot = true
			if len(snapshot)+len(r.Payload) > MaxSnapshot {
				return fmt.Errorf("receive snapshot: over %d bytes: %w", MaxSnapshot, ErrSnapshot)
			}
			snapshot = append(snapshot, r.Payload...)
			continue // acked once installed
		case KindSnapshotEnd:
			if s.cfg.OnSnapshot == nil {
				return fmt.Errorf("handle record: %s, which this secondary does not take: %w", r.Kind, ErrUnexpected)
			}
			if err := s.install(in, r, snapshot); err != nil {
				return err
			}
			snapshot = nil
			if err := s.sendAck(l, true); err != nil {
				return err
			}
			continue
		case KindHeartbeat:
			err = l.onHeartbeat(r, &s.rtt)
		case KindHandOver:
			if s.cfg.OnHandOver == nil || in.snapshot {
				return fmt.Errorf("handle record: %s, which this secondary does not take now: %w", r.Kind, ErrUnexpected)
			}
			s.cfg.OnHandOver(r.Epoch, r.Position)
		default: // a second Hello, or an Ack
			err = fmt.Errorf("handle record: %s from primary: %w", r.Kind, ErrUnexpected)
		}
		if err != nil {
			return err
		}
		// A slow delivery (a full tap queue) is not a silent primary.
		s.stats.heard()
		if br.Buffered() == 0 && !in.snapshot {
			if err := s.sendAck(l, false); err != nil {
				return err
			}
		}
	}
}

// install checks a whole snapshot and rebuilds the VM from it: from now on
// this secondary holds the primary's log up to the snapshot's position.
func (s *Secondary) install(in *incoming, end Record, state []byte) error {
	if err := checkSnapshot(state, end.Payload); err != nil {
		return err
	}
	if err := s.cfg.OnSnapshot(end.Position, state); err != nil {
		return fmt.Errorf("install snapshot at %d: %w: %w", end.Position, errDeliver, err)
	}
	// Starting the VM took a while, with the primary's heartbeats waiting
	// unread: it was not silent. Noted before this copy may take over.
	s.stats.heard()
	s.received.Store(end.Position)
	s.incarnation.Store(in.incarnation)
	s.logEpoch.Store(in.epoch)
	s.boot.Store(false)
	in.snapshot = false
	s.log.Info("installed snapshot", "position", end.Position, "bytes", len(state), "incarnation", fmt.Sprintf("%#x", in.incarnation))
	return nil
}

func (s *Secondary) deliver(r Record, handle func(pos uint64, payload []byte) error) error {
	if handle == nil {
		return fmt.Errorf("handle record: %s, which this secondary does not take: %w", r.Kind, ErrUnexpected)
	}
	have := s.received.Load()
	switch {
	case r.Position <= have:
		// A resend overlapping what we already have: harmless.
		s.stats.duplicates.Add(1)
		return nil
	case r.Position != have+1:
		return fmt.Errorf("receive frame %d: expected %d: %w", r.Position, have+1, ErrOutOfOrder)
	}
	if err := handle(r.Position, r.Payload); err != nil {
		return fmt.Errorf("deliver %s %d: %w: %w", r.Kind, r.Position, errDeliver, err)
	}
	s.received.Store(r.Position)
	return nil
}

// sendAck acks Received on l unless acks are held, or (without force)
// nothing new arrived. Reading Received under l's lock keeps the acks on
// the wire in non-decreasing order whoever sends them.
func (s *Secondary) sendAck(l *link, force bool) error {
	l.lock()
	defer l.unlock()
	if s.hold.Load() {
		return nil
	}
	pos := s.received.Load()
	if pos == l.lastAck && !force {
		return nil
	}
	if err := l.write(Record{Kind: KindAck, Position: pos, Epoch: l.epoch}); err != nil {
		return err
	}
	l.lastAck = pos
	return l.flush()
}

// SinceHeard is how long the primary has sent nothing (heartbeats, log
// records, acks): the input to failure detection.
func (s *Secondary) SinceHeard() time.Duration { return s.stats.sinceHeard() }

// PeerEpoch is the newest epoch a primary was admitted at: a primary at an
// older one is refused (fenced).
func (s *Secondary) PeerEpoch() uint64 { return s.peerEpoch.Load() }

// LogEpoch is the epoch of the log this secondary holds: the one it must
// name to claim the VM. A newer owner seen but not yet followed does not
// count: its log is not here.
func (s *Secondary) LogEpoch() uint64 { return s.logEpoch.Load() }
