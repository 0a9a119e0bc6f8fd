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

// PrimaryConfig configures the sending end of the log channel.
type PrimaryConfig struct {
	Addr  string      // secondary's host:port
	TLS   *tls.Config // from ClientTLS, which pins the secondary's name
	VM    string      // protected VM; both ends must agree
	Epoch uint64      // stamped on every record
	// OnFenced is called, once, when a secondary answers with an epoch
	// newer than Epoch: another host won the VM while this one was away.
	// The primary must stop releasing output at once.
	OnFenced func(epoch uint64)
	// StartHead is the log position a new secondary already holds (its
	// guest was built from a snapshot taken there): the first frame
	// appended is StartHead+1. Zero for a pair that starts together.
	StartHead uint64
	// Incarnation names this log (see Hello in doc.go); FromBoot says
	// its position 0 is the VM's boot state.
	Incarnation uint64
	FromBoot    bool

	// Snapshot rebuilds a secondary that does not hold the log (it
	// restarted, or joins afresh): it returns the VM's state at some log
	// position P and calls rebase(P) (see Primary.rebase; it may call it
	// earlier at a lower position, to start queueing the log from there
	// while it takes the state). The state goes to the secondary ahead of
	// the log from P+1. ctx ends with the channel. Nil: such a secondary
	// is refused with ErrPeerLacksLog and OnPeerLacksLog is called.
	Snapshot       func(ctx context.Context, rebase func(pos uint64) error) ([]byte, error)
	OnPeerLacksLog func()

	Heartbeat time.Duration // default DefaultHeartbeat
	// Timeout declares the link dead when nothing arrives for this long; it
	// also bounds dialing, the handshakes and each flush. Default 100 ×
	// Heartbeat.
	Timeout time.Duration
	// MaxUnacked bounds the bytes of records kept for resending until the
	// secondary acks them; AppendFrame fails with ErrBacklogFull beyond it.
	// Default DefaultMaxUnacked.
	MaxUnacked int
	// OnAck is called whenever the acked position advances, in increasing
	// order, from the goroutine running Run. It runs on the connection's
	// reader, so keep it short (a slow OnAck delays heartbeat answers and
	// the next acks); it may call AppendFrame.
	OnAck func(pos uint64)
	// OnPeerHeard gets the send time of each heartbeat the secondary
	// echoes: it had this primary's word at sentAt or later, so it cannot
	// declare this primary failed before sentAt plus its failure timeout
	// (the output lease, outputcommit.Gate.Lease).
	OnPeerHeard func(sentAt time.Time)
	// OnProgress gets each progress the secondary reports: the guest
	// instruction count its replay has reached. From the same goroutine
	// as OnAck.
	OnProgress func(replayedIcount uint64)

	Logger *slog.Logger // default slog.Default()
}

// Primary logs frames and streams them to the secondary. AppendFrame may be
// called from any goroutine while Run keeps (re)connecting.
type Primary struct {
	cfg   PrimaryConfig
	tls   *tls.Config
	log   *slog.Logger
	hello []byte
	stats counters
	wake  chan struct{} // capacity 1: "records are waiting"; never blocks AppendFrame

	mu           sync.Mutex
	head         uint64
	acked        uint64
	unacked      [][]byte // encoded RXFrame or QEMULog records for positions acked+1 .. head
	unackedBytes int

	// The connection's RXFrame sender: the writer goroutine, or the caller
	// of AppendFrame when no one else is sending. Holding sendMu is being
	// the sender.
	sendMu    sync.Mutex
	sendLink  *link // nil between connections
	sendNext  uint64
	sendBatch [][]byte

	connected atomic.Bool
	// synced: the connected secondary has acknowledged since it connected,
	// so it holds the log (or the snapshot) up to Acked.
	synced  atomic.Bool
	lastAck atomic.Uint64 // monoNow of the last Ack received, or of the connect
	rtt     atomic.Int64
	fenced  sync.Once
}

// NewPrimary checks cfg and fills in defaults. Nothing is dialed before Run.
func NewPrimary(cfg PrimaryConfig) (*Primary, error) {
	switch {
	case cfg.Addr == "":
		return nil, errors.New("new primary: no secondary address")
	case cfg.TLS == nil:
		return nil, errors.New("new primary: no TLS config; the log channel requires mutual TLS")
	case cfg.VM == "" || len(cfg.VM) > MaxVMName:
		return nil, fmt.Errorf("new primary: VM name %q must be 1..%d bytes", cfg.VM, MaxVMName)
	}
	if cfg.Heartbeat <= 0 {
		cfg.Heartbeat = DefaultHeartbeat
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = timeoutBeats * cfg.Heartbeat
	}
	if cfg.MaxUnacked <= 0 {
		cfg.MaxUnacked = DefaultMaxUnacked
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	tc, err := clientTLSFor(cfg.TLS)
	if err != nil {
		return nil, fmt.Errorf("new primary: %w", err)
	}
	return &Primary{
		cfg:   cfg,
		tls:   tc,
		log:   cfg.Logger.With("component", "lockstep", "role", "primary", "vm", cfg.VM, "secondary", cfg.Addr),
		hello: helloPayload(cfg.VM, helloInfo{Incarnation: cfg.Incarnation, FromBoot: cfg.FromBoot}),
		wake:  make(chan struct{}, 1),
		head:  cfg.StartHead,
		acked: cfg.StartHead,
	}, nil
}

// AppendFrame logs frame at pos, which must be Head()+1, and sends it (see
// Flush). It copies frame and waits for the network only when the socket
// buffer is full. On error nothing is logged and Head is unchanged: after
// ErrBacklogFull the caller may retry the same position later or drop the
// frame (it must then not reach the VM).
func (p *Primary) AppendFrame(pos uint64, frame []byte) error {
	if err := p.QueueFrame(pos, frame); err != nil {
		return err
	}
	p.Flush()
	return nil
}

// QueueFrame logs frame at pos like AppendFrame but leaves it queued: for a
// caller that has more frames at hand, so a burst goes out in one write. The
// last frame of the burst must be followed by Flush (or be an AppendFrame).
func (p *Primary) QueueFrame(pos uint64, frame []byte) error {
	return p.queue(KindRXFrame, pos, frame, MaxFrame)
}

// QueueLog logs one chunk of the VM engine's own log (QEMU's replay log) at
// pos, which must be Head()+1, like QueueFrame. The secondary receives the
// chunks in position order and concatenates them.
func (p *Primary) QueueLog(pos uint64, chunk []byte) error {
	return p.queue(KindQEMULog, pos, chunk, MaxPayload)
}

func (p *Primary) queue(kind Kind, pos uint64, payload []byte, maxLen int) error {
	if len(payload) > maxLen {
		err := fmt.Errorf("append %s %d: over-long payload of %d bytes, max %d: %w", kind, pos, len(payload), maxLen, ErrTooLong)
		p.stats.fail(err)
		return err
	}
	// Encode before locking; the copy is also what keeps the caller's buffer
	// free for reuse.
	rec := AppendRecord(make([]byte, 0, HeaderLen+len(payload)), Record{Kind: kind, Position: pos, Epoch: p.cfg.Epoch, Payload: payload})
	p.mu.Lock()
	var err error
	switch {
	case pos != p.head+1:
		err = fmt.Errorf("append %s %d: head is %d: %w", kind, pos, p.head, ErrOutOfOrder)
	case p.unackedBytes+len(rec) > p.cfg.MaxUnacked:
		err = fmt.Errorf("append %s %d: %d bytes wait for an ack, max %d: %w", kind, pos, p.unackedBytes, p.cfg.MaxUnacked, ErrBacklogFull)
	default:
		p.unacked = append(p.unacked, rec)
		p.unackedBytes += len(rec)
		p.head = pos
	}
	p.mu.Unlock()
	if err != nil {
		p.stats.fail(err)
	}
	return err
}

// Flush sends every queued frame. It sends from the calling goroutine if no
// one else is sending: handing every frame to the writer goroutine costs a
// goroutine switch, often a thread wakeup, on the path every held reply
// waits on. Only a full socket buffer (a secondary that does not keep up)
// makes it block. Without a connection, the writer sends after connecting.
func (p *Primary) Flush() {
	if p.sendMu.TryLock() {
		sent := p.sendLink != nil
		if sent {
			if err := p.sendPendingLocked(); err != nil {
				p.sendLink.fc.fail(err) // the session ends; Run redials and resends
			}
		}
		p.sendMu.Unlock()
		if sent {
			return
		}
	}
	select {
	case p.wake <- struct{}{}:
	default: // the writer is already due to look
	}
}

// clientTLSFor checks that tlsCfg pins the secondary's name, as ClientTLS
// does: the address dialed says nothing about who answers there.
func clientTLSFor(tlsCfg *tls.Config) (*tls.Config, error) {
	if tlsCfg.ServerName == "" || tlsCfg.VerifyConnection == nil {
		return nil, errors.New("TLS config does not pin the secondary's name (use ClientTLS)")
	}
	return tlsCfg.Clone(), nil
}

// dialTLS dials the secondary at addr and runs the TLS handshake, each
// within timeout. It returns the raw connection (what a closer closes) and
// the TLS one over it.
func dialTLS(ctx context.Context, addr string, tc *tls.Config, timeout time.Duration) (net.Conn, *tls.Conn, error) {
	d := net.Dialer{Timeout: timeout}
	raw, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, nil, fmt.Errorf("dial secondary: %w", err)
	}
	conn := tls.Client(raw, tc)
	hctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	if err := conn.HandshakeContext(hctx); err != nil {
		raw.Close()
		return nil, nil, handshakeError("secondary", err)
	}
	return raw, conn, nil
}

// AnnounceRestart tells the secondary at addr that this host, which served
// vm at epoch, restarted and lost its copy: a secondary that follows that
// epoch can take over at once instead of after the failure timeout
// (SecondaryConfig.OnPrimaryRestarted). It returns once the secondary has
// answered.
func AnnounceRestart(ctx context.Context, addr string, tlsCfg *tls.Config, vm string, epoch uint64, timeout time.Duration) error {
	tc, err := clientTLSFor(tlsCfg)
	if err != nil {
		return fmt.Errorf("announce restart: %w", err)
	}
	raw, conn, err := dialTLS(ctx, addr, tc, timeout)
	if err != nil {
		return fmt.Errorf("announce restart: %w", err)
	}
	defer raw.Close()
	raw.SetDeadline(time.Now().Add(timeout))
	w := bufio.NewWriter(conn)
	if _, err := w.Write(AppendRecord(nil, Record{Kind: KindHello, Epoch: epoch, Payload: helloPayload(vm, helloInfo{Restarted: true})})); err != nil {
		return fmt.Errorf("announce restart: %w", err)
	}
	if err := w.Flush(); err != nil {
		return fmt.Errorf("announce restart: %w", err)
	}
	r, err := ReadRecord(bufio.NewReader(conn), make([]byte, MaxPayload))
	if err != nil {
		return fmt.Errorf("announce restart: no answer: %w", err)
	}
	if r.Kind != KindHello {
		return fmt.Errorf("announce restart: answered with %s: %w", r.Kind, ErrUnexpected)
	}
	return nil
}

// sendPendingLocked sends every record queued after sendNext; the caller
// holds sendMu and sendLink is set.
func (p *Primary) sendPendingLocked() error {
	for {
		p.sendBatch, p.sendNext = p.pending(p.sendBatch[:0], p.sendNext)
		if len(p.sendBatch) == 0 {
			return nil
		}
		err := p.sendLink.sendEncoded(p.sendBatch)
		clear(p.sendBatch) // drop references so acked records can be freed
		if err != nil {
			return err
		}
	}
}

// Head is the last appended position.
func (p *Primary) Head() uint64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.head
}

// Acked is the highest position the secondary has acknowledged.
func (p *Primary) Acked() uint64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.acked
}

// Connected reports whether a connection has passed the Hello exchange and
// is still up.
func (p *Primary) Connected() bool { return p.connected.Load() }

// Synced reports whether the connected secondary has acknowledged the log
// (or the snapshot it was rebuilt from) since it connected: from then on it
// holds everything up to Acked.
func (p *Primary) Synced() bool { return p.connected.Load() && p.synced.Load() }

// rebase makes pos the log position a new secondary is rebuilt at: what
// was kept for resending up to pos is dropped (the snapshot holds it), what
// comes after stays queued for it, and the next position appended is at
// least pos+1. It refuses a pos before what is already acknowledged.
func (p *Primary) rebase(pos uint64) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	switch {
	case pos >= p.head:
		clear(p.unacked)
		p.unacked, p.unackedBytes = p.unacked[:0], 0
		p.head, p.acked = pos, pos
	case pos >= p.acked:
		n := int(pos - p.acked)
		for i := range n {
			p.unackedBytes -= len(p.unacked[i])
			p.unacked[i] = nil
		}
		p.unacked = p.unacked[n:]
		p.acked = pos
	default:
		return fmt.Errorf("rebase at %d: already acked %d: %w", pos, p.acked, ErrAckBackwards)
	}
	return nil
}

// RTT is the last heartbeat round-trip time measured, 0 before the first.
func (p *Primary) RTT() time.Duration { return time.Duration(p.rtt.Load()) }

// Stats returns a snapshot of the counters.
func (p *Primary) Stats() Stats { return p.stats.snapshot() }

// Run connects to the secondary and streams the log until ctx is done, then
// returns nil. A failed connection is logged, counted and redialed with
// backoff (10ms doubling to 1s, back to 10ms after a connection that got
// through the Hello exchange). Call Run once.
func (p *Primary) Run(ctx context.Context) error {
	backoff := minBackoff
	for {
		connected, err := p.session(ctx)
		if ctx.Err() != nil {
			return nil
		}
		if connected {
			backoff = minBackoff
		}
		reason := p.stats.fail(err)
		p.log.Warn("log channel connection failed; redialing", "reason", reason.String(), "err", err, "retry_in", backoff)
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, maxBackoff)
	}
}

// session runs one connection to its end and returns why it ended.
// connected reports whether it got through the Hello exchange.
func (p *Primary) session(ctx context.Context) (connected bool, err error) {
	raw, conn, err := dialTLS(ctx, p.cfg.Addr, p.tls, p.cfg.Timeout)
	if err != nil {
		return false, err
	}
	fc := newCloser(raw)
	defer fc.fail(nil)
	stop := context.AfterFunc(ctx, func() { fc.fail(ctx.Err()) })
	defer stop()

	l := newLink(conn, fc, p.cfg.Timeout, &p.stats, p.cfg.Epoch)
	br := bufio.NewReaderSize(conn, bufSize)
	buf := make([]byte, MaxPayload)
	from, needSnapshot, err := p.handshake(l, br, buf)
	if err != nil {
		return false, err
	}
	p.synced.Store(false)
	if needSnapshot {
		if from, err = p.sendSnapshot(ctx, l); err != nil {
			return false, err
		}
	}

	p.stats.heard()
	p.lastAck.Store(monoNow())
	p.connected.Store(true)
	p.stats.connects.Add(1)
	p.log.Info("log channel connected", "resend_from", from+1, "head", p.Head())
	defer func() {
		p.connected.Store(false)
		p.stats.disconnects.Add(1)
	}()

	var wg sync.WaitGroup
	wg.Go(func() { fc.fail(p.writeLoop(l, from, fc.done)) })
	fc.fail(p.readLoop(l, br, buf))
	wg.Wait()
	return true, fc.err
}

// handshake sends our Hello and checks the secondary's. It returns the
// secondary's position, after which everything gets (re)sent, or that it
// must be rebuilt from a snapshot first.
func (p *Primary) handshake(l *link, br *bufio.Reader, buf []byte) (from uint64, needSnapshot bool, err error) {
	head := p.Head()
	l.lock()
	err = l.write(Record{Kind: KindHello, Position: head, Epoch: p.cfg.Epoch, Payload: p.hello})
	if err == nil {
		err = l.flush()
	}
	l.unlock()
	if err != nil {
		return 0, false, fmt.Errorf("send hello: %w", err)
	}
	l.conn.SetReadDeadline(time.Now().Add(p.cfg.Timeout))
	r, err := ReadRecord(br, buf)
	if err != nil {
		return 0, false, fmt.Errorf("await hello: %w", err)
	}
	p.stats.received(r)
	if r.Kind != KindHello {
		return 0, false, fmt.Errorf("await hello: got %s: %w", r.Kind, ErrUnexpected)
	}
	theirs, err := checkHello(r.Payload, p.cfg.VM)
	if err != nil {
		return 0, false, err
	}
	if r.Epoch > p.cfg.Epoch {
		p.fenced.Do(func() {
			p.log.Error("fenced: the secondary follows a newer epoch", "epoch", p.cfg.Epoch, "newer", r.Epoch)
			if p.cfg.OnFenced != nil {
				p.cfg.OnFenced(r.Epoch)
			}
		})
		return 0, false, fmt.Errorf("check hello: secondary follows epoch %d, ours is %d: %w", r.Epoch, p.cfg.Epoch, ErrStaleEpoch)
	}
	p.mu.Lock()
	head, acked := p.head, p.acked // head may have moved since our Hello
	p.mu.Unlock()
	// The Hello position is only where to resume sending, not an ack, so
	// that SetAckHold on the secondary also holds across reconnects.
	lacks := ""
	switch {
	case theirs.NeedSnapshot:
		lacks = "it asks for a snapshot"
	case theirs.Incarnation != p.cfg.Incarnation:
		lacks = fmt.Sprintf("it follows log incarnation %#x, ours is %#x", theirs.Incarnation, p.cfg.Incarnation)
	case r.Position > head:
		return 0, false, fmt.Errorf("check hello: secondary has %d, head is %d: %w", r.Position, head, ErrAckBeyondHead)
	case r.Position < acked:
		// It lost frames it had acked (a restart), and we no longer
		// have them.
		lacks = fmt.Sprintf("it has position %d, already acked %d", r.Position, acked)
	}
	if lacks == "" {
		return r.Position, false, nil
	}
	if p.cfg.Snapshot == nil {
		// The output waiting on this secondary will never be
		// acknowledged by it.
		if p.cfg.OnPeerLacksLog != nil {
			p.cfg.OnPeerLacksLog()
		}
		return 0, false, fmt.Errorf("check hello: %s: %w", lacks, ErrPeerLacksLog)
	}
	p.log.Info("the secondary does not hold the log: rebuilding it from a snapshot", "why", lacks)
	return 0, true, nil
}

// sendSnapshot takes the VM's state (PrimaryConfig.Snapshot), which moves
// the log to start at its position, and sends it: SnapshotChunk records,
// then SnapshotEnd with its length and SHA-256. It returns the position
// the log goes on from.
func (p *Primary) sendSnapshot(ctx context.Context, l *link) (uint64, error) {
	var at uint64
	rebased := false
	state, err := p.cfg.Snapshot(ctx, func(pos uint64) error {
		if err := p.rebase(pos); err != nil {
			return err
		}
		at, rebased = pos, true
		return nil
	})
	if err != nil {
		return 0, fmt.Errorf("take snapshot: %w", err)
	}
	if !rebased {
		return 0, errors.New("take snapshot: the log was not rebased at the snapshot")
	}
	if len(state) > MaxSnapshot {
		return 0, fmt.Errorf("send snapshot: %d bytes, max %d: %w", len(state), MaxSnapshot, ErrSnapshot)
	}
	l.lock()
	defer l.unlock()
	// The whole state goes in one write (a real VM's image is about a
	// third of its memory): a heartbeat's deadline is too short for it.
	l.conn.SetWriteDeadline(time.Now().Add(max(l.timeout, SnapshotWait)))
	for off := 0; off < len(state); off += MaxPayload {
		chunk := state[off:min(off+MaxPayload, len(state))]
		if err := l.write(Record{Kind: KindSnapshot, Position: at, Epoch: p.cfg.Epoch, Payload: chunk}); err != nil {
			return 0, fmt.Errorf("transfer snapshot: %w", err)
		}
	}
	if err := l.write(Record{Kind: KindSnapshotEnd, Position: at, Epoch: p.cfg.Epoch, Payload: snapshotTrailer(state)}); err != nil {
		return 0, fmt.Errorf("transfer snapshot: %w", err)
	}
	if err := l.flush(); err != nil {
		return 0, fmt.Errorf("transfer snapshot: %w", err)
	}
	p.log.Info("sent snapshot", "position", at, "bytes", len(state))
	return at, nil
}

// writeLoop sends the RXFrames AppendFrame's callers could not send
// themselves (a resend after reconnecting, frames queued while another was
// sending), and heartbeats: each wake drains everything queued into the
// bufio.Writer and flushes once, so a burst costs one syscall.
func (p *Primary) writeLoop(l *link, from uint64, done <-chan struct{}) error {
	tick := time.NewTicker(p.cfg.Heartbeat)
	defer tick.Stop()
	if err := l.ping(); err != nil { // an RTT sample right away
		return err
	}
	p.sendMu.Lock()
	p.sendLink, p.sendNext = l, from+1
	p.sendMu.Unlock()
	defer func() {
		p.sendMu.Lock()
		p.sendLink = nil
		p.sendMu.Unlock()
	}()
	for {
		p.sendMu.Lock()
		err := p.sendPendingLocked()
		p.sendMu.Unlock()
		if err != nil {
			return err
		}
		select {
		case <-done:
			return nil
		case <-p.wake:
		case <-tick.C:
			if err := l.ping(); err != nil {
				return err
			}
		}
	}
}

// pending appends to dst the encoded records from position next on, up to
// about maxDrainBytes so heartbeat answers are not held behind a long resend,
// and returns the position after the last one.
func (p *Primary) pending(dst [][]byte, next uint64) ([][]byte, uint64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	next = max(next, p.acked+1)
	size := 0
	for i := next - p.acked - 1; i < uint64(len(p.unacked)) && size < maxDrainBytes; i++ {
		dst = append(dst, p.unacked[i])
		size += len(p.unacked[i])
	}
	return dst, next + uint64(len(dst))
}

// readLoop handles acks and heartbeats until the connection fails.
func (p *Primary) readLoop(l *link, br *bufio.Reader, buf []byte) error {
	for {
		if br.Buffered() == 0 { // about to block on the network
			l.conn.SetReadDeadline(time.Now().Add(p.cfg.Timeout))
		}
		r, err := ReadRecord(br, buf)
		if err != nil {
			return err
		}
		p.stats.received(r)
		p.stats.heard()
		switch r.Kind {
		case KindAck:
			err = p.ack(r.Position)
			if err == nil {
				p.lastAck.Store(monoNow())
				p.synced.Store(true)
			}
		case KindHeartbeat:
			before := l.lastEchoSeen
			err = l.onHeartbeat(r, &p.rtt)
			// A time from the future would be no proof of anything.
			if echo := l.lastEchoSeen; err == nil && echo != before && echo <= monoNow() && p.cfg.OnPeerHeard != nil {
				p.cfg.OnPeerHeard(clockStart.Add(time.Duration(echo)))
			}
		case KindProgress:
			if p.cfg.OnProgress != nil {
				p.cfg.OnProgress(r.Position)
			}
		default:
			err = fmt.Errorf("handle record: %s from secondary: %w", r.Kind, ErrUnexpected)
		}
		if err != nil {
			return err
		}
		// Handling may have taken a while (OnAck releases output), with
		// the secondary's records waiting unread: it was not silent.
		p.stats.heard()
	}
}

// ack advances the acked position, frees the acked records and tells OnAck.
// A bad ack ends the connection before OnAck could see it.
func (p *Primary) ack(pos uint64) error {
	p.mu.Lock()
	head, acked := p.head, p.acked
	switch {
	case pos > head:
		p.mu.Unlock()
		return fmt.Errorf("process ack %d: head is %d: %w", pos, head, ErrAckBeyondHead)
	case pos < acked:
		p.mu.Unlock()
		return fmt.Errorf("process ack %d: already acked %d: %w", pos, acked, ErrAckBackwards)
	case pos == acked: // e.g. the ack the secondary sends after its Hello
		p.mu.Unlock()
		return nil
	}
	n := int(pos - acked)
	for i := range n {
		p.unackedBytes -= len(p.unacked[i])
		p.unacked[i] = nil // the backing array outlives the reslice
	}
	p.unacked = p.unacked[n:]
	p.acked = pos
	p.mu.Unlock()
	if p.cfg.OnAck != nil {
		p.cfg.OnAck(pos)
	}
	return nil
}

// HandOver tells the connected secondary to take the VM over at this
// primary's epoch once it holds the log up to head (a planned switchover).
// The caller has stopped serving first; it fails if no secondary is
// connected.
func (p *Primary) HandOver(head uint64) error {
	p.sendMu.Lock()
	defer p.sendMu.Unlock()
	l := p.sendLink
	if l == nil || !p.connected.Load() {
		return errors.New("hand over: no secondary connected")
	}
	if err := p.sendPendingLocked(); err != nil {
		return fmt.Errorf("hand over: %w", err)
	}
	l.lock()
	defer l.unlock()
	if err := l.write(Record{Kind: KindHandOver, Position: head, Epoch: p.cfg.Epoch}); err != nil {
		return fmt.Errorf("hand over: %w", err)
	}
	if err := l.flush(); err != nil {
		return fmt.Errorf("hand over: %w", err)
	}
	return nil
}

// SinceAck is how long the connected secondary has sent no Ack (since it
// connected, if it sent none): with output waiting, a secondary that
// answers heartbeats but acknowledges nothing is as good as lost.
func (p *Primary) SinceAck() time.Duration { return time.Duration(monoNow() - p.lastAck.Load()) }

// SinceHeard is how long the secondary has sent nothing (heartbeats, log
// records, acks): the input to failure detection.
func (p *Primary) SinceHeard() time.Duration { return p.stats.sinceHeard() }
