package lockstep

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

const testVM = "vm-test"

// The test hosts' names, which their certificates carry.
const (
	primaryHost   = "host-a"
	secondaryHost = "host-b"
)

var (
	primaryID   = Identity{Self: primaryHost, Peer: secondaryHost}
	secondaryID = Identity{Self: secondaryHost, Peer: primaryHost}
)

type testPKI struct {
	dir            string
	server, client *tls.Config
}

func newPKI(t testing.TB) testPKI {
	t.Helper()
	dir := t.TempDir()
	if err := GenerateLabPKI(dir, primaryHost, secondaryHost); err != nil {
		t.Fatal(err)
	}
	return loadTestPKI(t, dir)
}

// loadTestPKI loads the two hosts' TLS configs from a lab PKI in dir.
func loadTestPKI(t testing.TB, dir string) testPKI {
	t.Helper()
	f := func(name string) string { return filepath.Join(dir, name) }
	server, err := ServerTLS(f("secondary.pem"), f("secondary-key.pem"), f("ca.pem"), secondaryID)
	if err != nil {
		t.Fatal(err)
	}
	client, err := ClientTLS(f("primary.pem"), f("primary-key.pem"), f("ca.pem"), primaryID)
	if err != nil {
		t.Fatal(err)
	}
	return testPKI{dir: dir, server: server, client: client}
}

func testLogger(t testing.TB) *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.DiscardHandler)
}

// run starts fn in a goroutine and makes the test's cleanup stop it and wait
// for it, so nothing logs after the test ends.
func run(t testing.TB, fn func(ctx context.Context) error) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- fn(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("run returned %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Errorf("run did not return after cancel")
		}
	})
}

func startSecondary(t testing.TB, pki testPKI, cfg SecondaryConfig) *Secondary {
	t.Helper()
	cfg.Listen = "127.0.0.1:0"
	cfg.TLS = pki.server
	if cfg.Incarnation == 0 && cfg.OnSnapshot == nil {
		cfg.Boot = true // follows the test primaries' log from boot
	}
	cfg.VM = testVM
	cfg.Logger = testLogger(t)
	s, err := NewSecondary(cfg)
	if err != nil {
		t.Fatal(err)
	}
	run(t, s.Run)
	return s
}

func newTestPrimary(t testing.TB, pki testPKI, addr string, cfg PrimaryConfig) *Primary {
	t.Helper()
	cfg.Addr = addr
	if cfg.TLS == nil {
		cfg.TLS = pki.client
	}
	cfg.VM = testVM
	if cfg.Epoch == 0 {
		cfg.Epoch = 1
	}
	if cfg.Incarnation == 0 {
		cfg.Incarnation, cfg.FromBoot = testIncarnation, true
	}
	cfg.Logger = testLogger(t)
	p, err := NewPrimary(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// waitFor polls cond for up to 10s.
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// frameFor is a recognizable frame for pos, of varying length.
func frameFor(pos uint64) []byte {
	b := make([]byte, 60+pos%200)
	binary.BigEndian.PutUint64(b, pos)
	for i := 8; i < len(b); i++ {
		b[i] = byte(pos) + byte(i)
	}
	return b
}

func appendFrames(t testing.TB, p *Primary, from, to uint64) {
	t.Helper()
	for pos := from; pos <= to; pos++ {
		if err := p.AppendFrame(pos, frameFor(pos)); err != nil {
			t.Fatal(err)
		}
	}
}

// frameLog records what OnFrame saw and flags anything out of order, out of
// goroutine or with the wrong content.
type frameLog struct {
	mu        sync.Mutex
	positions []uint64
	problems  []string
	inCall    atomic.Bool
}

func (f *frameLog) onFrame(pos uint64, frame []byte) error {
	if f.inCall.Swap(true) {
		f.problem("concurrent OnFrame calls")
	}
	defer f.inCall.Store(false)
	f.mu.Lock()
	defer f.mu.Unlock()
	if n := uint64(len(f.positions)); pos != n+1 {
		f.problems = append(f.problems, fmt.Sprintf("got position %d after %d", pos, n))
	}
	if want := frameFor(pos); string(frame) != string(want) {
		f.problems = append(f.problems, fmt.Sprintf("frame %d: wrong content", pos))
	}
	f.positions = append(f.positions, pos)
	return nil
}

func (f *frameLog) problem(s string) {
	f.mu.Lock()
	f.problems = append(f.problems, s)
	f.mu.Unlock()
}

// check verifies OnFrame saw exactly 1..n once each, in order.
func (f *frameLog) check(t testing.TB, n uint64) {
	t.Helper()
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, p := range f.problems {
		t.Error(p)
	}
	if uint64(len(f.positions)) != n {
		t.Errorf("OnFrame saw %d frames, want %d", len(f.positions), n)
	}
}

// ackLog records OnAck calls and flags non-increasing ones.
type ackLog struct {
	mu       sync.Mutex
	acks     []uint64
	problems []string
	notify   chan uint64 // optional
}

func (a *ackLog) onAck(pos uint64) {
	a.mu.Lock()
	if n := len(a.acks); n > 0 && pos <= a.acks[n-1] {
		a.problems = append(a.problems, fmt.Sprintf("ack %d after %d", pos, a.acks[n-1]))
	}
	a.acks = append(a.acks, pos)
	a.mu.Unlock()
	if a.notify != nil {
		a.notify <- pos
	}
}

func (a *ackLog) last() uint64 {
	a.mu.Lock()
	defer a.mu.Unlock()
	if len(a.acks) == 0 {
		return 0
	}
	return a.acks[len(a.acks)-1]
}

func (a *ackLog) check(t testing.TB, maxAck uint64) {
	t.Helper()
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, p := range a.problems {
		t.Error(p)
	}
	for _, pos := range a.acks {
		if pos > maxAck {
			t.Errorf("OnAck(%d), beyond %d", pos, maxAck)
		}
	}
}

// proxy forwards TCP between the primary and the secondary so a test can
// cut the connection, or silently drop what the primary sends.
type proxy struct {
	ln        net.Listener
	target    string
	blackhole atomic.Bool // drop primary → secondary bytes
	mu        sync.Mutex
	conns     []net.Conn
	wg        sync.WaitGroup
}

func startProxy(t testing.TB, target string) *proxy {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &proxy{ln: ln, target: target}
	p.wg.Go(func() {
		for {
			down, err := ln.Accept()
			if err != nil {
				return
			}
			up, err := net.Dial("tcp", target)
			if err != nil {
				down.Close()
				continue
			}
			p.mu.Lock()
			p.conns = append(p.conns, down, up)
			p.mu.Unlock()
			p.wg.Go(func() { pipe(up, down, &p.blackhole) })
			p.wg.Go(func() { pipe(down, up, nil) })
		}
	})
	t.Cleanup(func() {
		ln.Close()
		p.kill()
		p.wg.Wait()
	})
	return p
}

func (p *proxy) addr() string { return p.ln.Addr().String() }

// kill closes every connection through the proxy; it keeps listening.
func (p *proxy) kill() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range p.conns {
		c.Close()
	}
	p.conns = nil
}

func pipe(dst, src net.Conn, drop *atomic.Bool) {
	defer dst.Close()
	defer src.Close()
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 && (drop == nil || !drop.Load()) {
			if _, err := dst.Write(buf[:n]); err != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// fakePeer is a hand-driven end of the log channel for feeding bad input.
type fakePeer struct {
	t    testing.TB
	conn *tls.Conn
	br   *bufio.Reader
	buf  []byte
}

func newFakePeer(t testing.TB, conn *tls.Conn) *fakePeer {
	conn.SetDeadline(time.Now().Add(10 * time.Second)) // bound every read and write
	t.Cleanup(func() { conn.Close() })
	return &fakePeer{t: t, conn: conn, br: bufio.NewReader(conn), buf: make([]byte, MaxPayload)}
}

// dialFake connects to a secondary as a primary would, up to the TLS
// handshake.
func dialFake(t testing.TB, addr string, cfg *tls.Config) *fakePeer {
	t.Helper()
	d := tls.Dialer{NetDialer: &net.Dialer{Timeout: 10 * time.Second}, Config: cfg}
	c, err := d.DialContext(context.Background(), "tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	return newFakePeer(t, c.(*tls.Conn))
}

func (f *fakePeer) send(b []byte) {
	f.t.Helper()
	if _, err := f.conn.Write(b); err != nil {
		f.t.Fatalf("fake peer send: %v", err)
	}
}

func (f *fakePeer) sendRecord(r Record) { f.t.Helper(); f.send(AppendRecord(nil, r)) }

// read returns the next record that is not a heartbeat.
func (f *fakePeer) read() Record {
	f.t.Helper()
	for {
		r, err := ReadRecord(f.br, f.buf)
		if err != nil {
			f.t.Fatalf("fake peer read: %v", err)
		}
		if r.Kind != KindHeartbeat {
			return r
		}
	}
}

// expectClosed reads until the other side closes the connection.
func (f *fakePeer) expectClosed() {
	f.t.Helper()
	for {
		_, err := ReadRecord(f.br, f.buf)
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			f.t.Fatalf("connection still open: %v", err)
		}
		if err != nil {
			return
		}
	}
}

// testIncarnation is the log the test pairs write and follow, from boot.
const testIncarnation = 0x1ce

func hello(pos uint64, vm string) Record {
	return Record{Kind: KindHello, Position: pos, Epoch: 1, Payload: helloPayload(vm, helloInfo{Incarnation: testIncarnation, FromBoot: true})}
}

func ping() Record {
	return Record{Kind: KindHeartbeat, Epoch: 1, Payload: make([]byte, heartbeatLen)}
}

func fileMode(t testing.TB, path string) os.FileMode {
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return st.Mode().Perm()
}

// handshakeOnly listens with cfg and does nothing with a connection but its
// TLS handshake: a server whose only part is accepting or refusing the
// dialer's certificate.
func handshakeOnly(t *testing.T, cfg *tls.Config) net.Listener {
	t.Helper()
	ln, err := tls.Listen("tcp", "127.0.0.1:0", cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				c.SetDeadline(time.Now().Add(10 * time.Second))
				c.(*tls.Conn).Handshake()
				c.Close()
			}()
		}
	}()
	return ln
}
