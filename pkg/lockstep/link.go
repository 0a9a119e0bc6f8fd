package lockstep

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

const (
	DefaultHeartbeat  = 10 * time.Millisecond // interval between pings on each side
	DefaultMaxUnacked = 64 << 20              // bytes of unacked records the primary keeps
	// timeoutBeats is the default Timeout in heartbeats: long enough that a
	// GC pause or a busy host does not drop a healthy link, short enough to
	// notice a dead peer that never sent a FIN.
	timeoutBeats = 100

	bufSize       = 64 << 10 // bufio sizes: one bufio.Writer flush is one drain
	maxDrainBytes = 256 << 10
	minBackoff    = 10 * time.Millisecond
	maxBackoff    = time.Second
)

// clockStart anchors heartbeat send times: monotonic nanoseconds since the
// process started. Only the sender ever compares its own times, so the two
// hosts' clocks need not agree.
var clockStart = time.Now()

func monoNow() uint64 { return uint64(time.Since(clockStart)) }

// closer ends a connection once: it keeps the first error (the cause) and
// closes the connection, which unblocks every goroutine using it; their
// later errors are consequences and are dropped. It closes the raw TCP
// connection, not the TLS one, because tls.Conn.Close may block up to 5s
// sending close_notify to a peer that stopped reading.
type closer struct {
	raw  net.Conn
	once sync.Once
	err  error
	done chan struct{} // closed on the first fail
}

func newCloser(raw net.Conn) *closer { return &closer{raw: raw, done: make(chan struct{})} }

func (c *closer) fail(err error) {
	c.once.Do(func() {
		c.err = err
		close(c.done)
	})
	c.raw.Close()
}

// handshakeError wraps a failed TLS handshake. It counts as auth (missing or
// foreign certificate, or not TLS at all) unless the connection merely broke
// or timed out, as with a hung peer or a port scanner: "auth" should send an
// operator to the certificates, not to the network.
func handshakeError(peer string, err error) error {
	var ne net.Error
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, syscall.ECONNRESET) ||
		errors.Is(err, context.DeadlineExceeded) || (errors.As(err, &ne) && ne.Timeout()) {
		return fmt.Errorf("tls handshake with %s: %w", peer, err)
	}
	return fmt.Errorf("tls handshake with %s: %w: %w", peer, ErrAuth, err)
}

// link is the write side of one established connection, shared by the
// goroutines that write to it. Every write happens under mu so records never
// interleave. The heartbeat state sits under the same mutex so that a ping
// can never overtake the answer carrying the same echo (see doc.go).
type link struct {
	conn    net.Conn
	fc      *closer // ends the connection
	timeout time.Duration
	stats   *counters
	epoch   uint64 // stamped on every record we send

	mu           sync.Mutex
	bw           *bufio.Writer
	scratch      []byte
	lastStamp    uint64 // our last heartbeat send time; strictly increasing
	lastPeerPing uint64 // send time of the last peer ping we answered
	lastAck      uint64 // secondary: last position acked on this connection

	lastEchoSeen uint64 // reader goroutine only: newest of our pings answered
}

func newLink(conn net.Conn, fc *closer, timeout time.Duration, stats *counters, epoch uint64) *link {
	return &link{
		conn:    conn,
		fc:      fc,
		timeout: timeout,
		stats:   stats,
		epoch:   epoch,
		bw:      bufio.NewWriterSize(conn, bufSize),
		scratch: make([]byte, 0, HeaderLen+heartbeatLen),
	}
}

// lock takes the write side and arms the write deadline, so a peer that
// stops reading fails the connection instead of blocking us forever.
func (l *link) lock() {
	l.mu.Lock()
	l.conn.SetWriteDeadline(time.Now().Add(l.timeout))
}

func (l *link) unlock() { l.mu.Unlock() }

// write buffers one record; the caller holds the lock and flushes.
func (l *link) write(r Record) error {
	l.scratch = AppendRecord(l.scratch[:0], r)
	return l.writeEncoded(r.Kind, l.scratch)
}

func (l *link) writeEncoded(k Kind, b []byte) error {
	if _, err := l.bw.Write(b); err != nil {
		return fmt.Errorf("send %s: %w", k, err)
	}
	l.stats.sent(k, len(b))
	return nil
}

func (l *link) flush() error {
	if err := l.bw.Flush(); err != nil {
		return fmt.Errorf("flush records: %w", err)
	}
	return nil
}

// sendEncoded writes already-encoded records with one flush.
func (l *link) sendEncoded(recs [][]byte) error {
	l.lock()
	defer l.unlock()
	for _, b := range recs {
		if err := l.writeEncoded(Kind(b[4]), b); err != nil {
			return err
		}
	}
	return l.flush()
}

// writeHeartbeat buffers a heartbeat with a fresh send time; caller holds
// the lock.
func (l *link) writeHeartbeat(echo uint64) error {
	l.lastStamp = max(l.lastStamp+1, monoNow())
	var p [heartbeatLen]byte
	binary.BigEndian.PutUint64(p[0:8], l.lastStamp)
	binary.BigEndian.PutUint64(p[8:16], echo)
	return l.write(Record{Kind: KindHeartbeat, Epoch: l.epoch, Payload: p[:]})
}

// ping sends a periodic heartbeat. Its echo is the last peer ping we
// answered, which the peer has therefore already seen echoed.
func (l *link) ping() error {
	l.lock()
	defer l.unlock()
	if err := l.writeHeartbeat(l.lastPeerPing); err != nil {
		return err
	}
	return l.flush()
}

// onHeartbeat handles a received heartbeat (reader goroutine). An echo newer
// than any seen before answers one of our pings: it yields an RTT sample and
// is not answered. Anything else is a peer ping: answer it at once, so the
// peer's sample measures the link and not our ticker.
func (l *link) onHeartbeat(r Record, rtt *atomic.Int64) error {
	if len(r.Payload) != heartbeatLen {
		return fmt.Errorf("handle heartbeat: payload %d bytes, want %d: %w", len(r.Payload), heartbeatLen, ErrUnexpected)
	}
	sent := binary.BigEndian.Uint64(r.Payload[0:8])
	echo := binary.BigEndian.Uint64(r.Payload[8:16])
	if echo > l.lastEchoSeen {
		l.lastEchoSeen = echo
		if now := monoNow(); now > echo {
			rtt.Store(int64(now - echo))
		}
		return nil
	}
	l.lock()
	defer l.unlock()
	l.lastPeerPing = sent
	if err := l.writeHeartbeat(sent); err != nil {
		return err
	}
	return l.flush()
}
