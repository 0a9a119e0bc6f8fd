package lockstep

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

func TestStreamOverTLS(t *testing.T) {
	pki := newPKI(t)
	var frames frameLog
	s := startSecondary(t, pki, SecondaryConfig{OnFrame: frames.onFrame})
	var acks ackLog
	p := newTestPrimary(t, pki, s.Addr().String(), PrimaryConfig{OnAck: acks.onAck})

	const n = 2000
	appendFrames(t, p, 1, n/2) // queued before the first connection
	run(t, p.Run)
	appendFrames(t, p, n/2+1, n)

	waitFor(t, "acks up to head", func() bool { return p.Acked() == n })
	frames.check(t, n)
	acks.check(t, n)
	if got := acks.last(); got != n {
		t.Errorf("last OnAck = %d, want %d", got, n)
	}
	if p.Head() != n || s.Received() != n {
		t.Errorf("head %d, received %d, want %d", p.Head(), s.Received(), n)
	}
	if !p.Connected() || !s.Connected() {
		t.Errorf("connected: primary %v, secondary %v", p.Connected(), s.Connected())
	}
	waitFor(t, "heartbeat RTT on both sides", func() bool { return p.RTT() > 0 && s.RTT() > 0 })
	time.Sleep(50 * time.Millisecond) // let samples taken during the burst age out
	t.Logf("idle heartbeat RTT: primary %v, secondary %v", p.RTT(), s.RTT())

	ps, ss := p.Stats(), s.Stats()
	if ps.RecordsSent[KindRXFrame] != n || ss.RecordsReceived[KindRXFrame] != n {
		t.Errorf("rx frames sent %d, received %d, want %d", ps.RecordsSent[KindRXFrame], ss.RecordsReceived[KindRXFrame], n)
	}
	if ps.BytesSent[KindRXFrame] != ss.BytesReceived[KindRXFrame] {
		t.Errorf("rx bytes sent %d, received %d", ps.BytesSent[KindRXFrame], ss.BytesReceived[KindRXFrame])
	}
	if ps.RecordsReceived[KindHeartbeat] == 0 || ss.RecordsReceived[KindHeartbeat] == 0 {
		t.Error("no heartbeats received")
	}
	if ps.Connects != 1 || ss.Connects != 1 {
		t.Errorf("connects: primary %d, secondary %d", ps.Connects, ss.Connects)
	}
	for r := range ReasonLen {
		if ps.Errors[r] != 0 || ss.Errors[r] != 0 {
			t.Errorf("%s errors: primary %d, secondary %d", r, ps.Errors[r], ss.Errors[r])
		}
	}
	// Heartbeats must not ping-pong: with a 10ms interval, both directions
	// together stay within a few hundred per second.
	time.Sleep(100 * time.Millisecond)
	before := p.Stats().RecordsReceived[KindHeartbeat]
	time.Sleep(200 * time.Millisecond)
	if hb := p.Stats().RecordsReceived[KindHeartbeat] - before; hb > 200 {
		t.Errorf("%d heartbeats in 200ms: answers are being answered", hb)
	}
}

func TestAckHold(t *testing.T) {
	pki := newPKI(t)
	var frames frameLog
	s := startSecondary(t, pki, SecondaryConfig{OnFrame: frames.onFrame})
	var acks ackLog
	p := newTestPrimary(t, pki, s.Addr().String(), PrimaryConfig{OnAck: acks.onAck})
	run(t, p.Run)

	appendFrames(t, p, 1, 10)
	waitFor(t, "ack 10", func() bool { return p.Acked() == 10 })

	s.SetAckHold(true)
	appendFrames(t, p, 11, 20)
	waitFor(t, "frames received while held", func() bool { return s.Received() == 20 })
	time.Sleep(50 * time.Millisecond) // an ack would have arrived by now
	if got := p.Acked(); got != 10 {
		t.Fatalf("acked %d while acks held, want 10", got)
	}
	if got := acks.last(); got != 10 {
		t.Fatalf("OnAck(%d) while acks held", got)
	}

	s.SetAckHold(false)
	waitFor(t, "ack after release", func() bool { return p.Acked() == 20 })
	frames.check(t, 20)
	acks.check(t, 20)
}

func TestReconnectResends(t *testing.T) {
	pki := newPKI(t)
	var frames frameLog
	s := startSecondary(t, pki, SecondaryConfig{OnFrame: frames.onFrame})
	px := startProxy(t, s.Addr().String())
	var acks ackLog
	p := newTestPrimary(t, pki, px.addr(), PrimaryConfig{OnAck: acks.onAck})
	run(t, p.Run)

	// Hold acks so the secondary's position (50) and the primary's acked
	// position (0) differ: resending from the wrong one would show up as
	// duplicates.
	s.SetAckHold(true)
	appendFrames(t, p, 1, 50)
	waitFor(t, "first 50 frames", func() bool { return s.Received() == 50 })

	// 51..100 go into the proxy and are lost with the connection.
	px.blackhole.Store(true)
	appendFrames(t, p, 51, 100)
	waitFor(t, "frames written into the proxy", func() bool { return p.Stats().RecordsSent[KindRXFrame] == 100 })
	px.kill()
	px.blackhole.Store(false)

	waitFor(t, "reconnect", func() bool { return p.Stats().Connects == 2 && p.Connected() })
	s.SetAckHold(false)
	appendFrames(t, p, 101, 150)
	waitFor(t, "ack 150", func() bool { return p.Acked() == 150 })

	frames.check(t, 150)
	acks.check(t, 150)
	ps, ss := p.Stats(), s.Stats()
	if got := ps.RecordsSent[KindRXFrame]; got != 200 {
		t.Errorf("sent %d rx frames, want 200 (150 + 50 resent from the secondary's position)", got)
	}
	if ss.Duplicates != 0 {
		t.Errorf("secondary skipped %d duplicates, want 0", ss.Duplicates)
	}
	if ps.Errors[ReasonIO] == 0 || ps.Disconnects == 0 {
		t.Errorf("lost connection not counted: %+v", ps.Errors)
	}
}

// TestSecondaryRejectsBadInput feeds the secondary's port bad input, one
// connection at a time, and checks each is refused and counted, and that a
// real primary still gets served afterwards.
func TestDeliverErrorResends(t *testing.T) {
	pki := newPKI(t)
	var frames frameLog
	failed := false
	onFrame := func(pos uint64, frame []byte) error {
		if pos == 5 && !failed { // e.g. the tap was briefly unwritable
			failed = true
			return errors.New("tap busy")
		}
		return frames.onFrame(pos, frame)
	}
	s := startSecondary(t, pki, SecondaryConfig{OnFrame: onFrame})
	var acks ackLog
	p := newTestPrimary(t, pki, s.Addr().String(), PrimaryConfig{OnAck: acks.onAck})
	appendFrames(t, p, 1, 10)
	run(t, p.Run)
	waitFor(t, "ack 10", func() bool { return p.Acked() == 10 })
	frames.check(t, 10)
	acks.check(t, 10)
	if got := s.Stats().Errors[ReasonDeliver]; got != 1 {
		t.Errorf("deliver errors %d, want 1", got)
	}
	if got := p.Stats().Connects; got != 2 {
		t.Errorf("primary connected %d times, want 2", got)
	}
}

func TestNewConnectionReplacesOld(t *testing.T) {
	pki := newPKI(t)
	s := startSecondary(t, pki, SecondaryConfig{})
	first := dialFake(t, s.Addr().String(), pki.client)
	first.sendRecord(hello(0, testVM))
	first.read()
	// Connected once the primary speaks past the Hellos: it admitted us.
	first.sendRecord(ping())
	waitFor(t, "first connected", s.Connected)

	second := dialFake(t, s.Addr().String(), pki.client)
	second.sendRecord(hello(0, testVM))
	if r := second.read(); r.Kind != KindHello {
		t.Fatalf("second connection got %s, want hello", r.Kind)
	}
	second.sendRecord(ping())
	first.expectClosed()
	waitFor(t, "second connected", func() bool { return s.Stats().Connects == 2 && s.Connected() })
	st := s.Stats()
	for r := range ReasonLen {
		if st.Errors[r] != 0 {
			t.Errorf("replacement counted as %s", r)
		}
	}
}

func TestHandshakeTimeoutIsNotAuth(t *testing.T) {
	pki := newPKI(t)
	s := startSecondary(t, pki, SecondaryConfig{Timeout: 100 * time.Millisecond})
	c, err := net.DialTimeout("tcp", s.Addr().String(), 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	// Send nothing: the secondary gives up on the handshake.
	waitFor(t, "handshake timeout counted", func() bool { return s.Stats().Errors[ReasonIO] == 1 })
	if got := s.Stats().Errors[ReasonAuth]; got != 0 {
		t.Errorf("timeout counted as auth %d times", got)
	}
}

func TestDeadPeerTimeout(t *testing.T) {
	pki := newPKI(t)
	ln, err := tls.Listen("tcp", "127.0.0.1:0", pki.server)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	p := newTestPrimary(t, pki, ln.Addr().String(), PrimaryConfig{Timeout: 200 * time.Millisecond})
	run(t, p.Run)
	c, err := acceptWithin(ln, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	f := newFakePeer(t, c)
	f.read()
	f.sendRecord(hello(0, testVM))
	waitFor(t, "connected", p.Connected)
	// Now say nothing, like a host that died without a FIN.
	start := time.Now()
	waitFor(t, "dead link noticed", func() bool { return !p.Connected() })
	if d := time.Since(start); d < 150*time.Millisecond {
		t.Errorf("gave up after %v, before the 200ms timeout", d)
	}
	if got := p.Stats().Errors[ReasonIO]; got != 1 {
		t.Errorf("io errors %d, want 1", got)
	}
}

func TestSecondaryRejectsBadInput(t *testing.T) {
	pki := newPKI(t)
	var frames frameLog
	s := startSecondary(t, pki, SecondaryConfig{OnFrame: frames.onFrame})
	addr := s.Addr().String()

	expectCounted := func(t *testing.T, reason ErrReason, before uint64) {
		t.Helper()
		waitFor(t, reason.String()+" counted", func() bool { return s.Stats().Errors[reason] == before+1 })
	}

	t.Run("not TLS", func(t *testing.T) {
		before := s.Stats().Errors[ReasonAuth]
		c, err := net.DialTimeout("tcp", addr, 10*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		c.Write([]byte("GET / HTTP/1.0\r\n\r\n"))
		buf := make([]byte, 512)
		for {
			if _, err := c.Read(buf); err != nil {
				var ne net.Error
				if errors.As(err, &ne) && ne.Timeout() {
					t.Fatal("secondary kept the connection open")
				}
				break
			}
		}
		expectCounted(t, ReasonAuth, before)
	})

	authCases := []struct {
		name string
		cfg  func() *tls.Config
	}{
		{"no client cert", func() *tls.Config {
			c := pki.client.Clone()
			c.Certificates = nil
			return c
		}},
		{"cert from another CA", func() *tls.Config {
			// Trusts our CA, so only the secondary can refuse.
			other := newPKI(t)
			c := other.client.Clone()
			c.RootCAs = pki.client.RootCAs
			return c
		}},
	}
	for _, tc := range authCases {
		t.Run(tc.name, func(t *testing.T) {
			before := s.Stats().Errors[ReasonAuth]
			cfg := tc.cfg()
			c, err := tls.DialWithDialer(&net.Dialer{Timeout: 10 * time.Second}, "tcp", addr, cfg)
			if err == nil {
				// TLS 1.3: the client finishes first and hears of the
				// refusal on its first read.
				f := newFakePeer(t, c)
				f.sendRecord(hello(0, testVM))
				f.expectClosed()
			}
			expectCounted(t, ReasonAuth, before)
		})
	}

	frame := func(pos uint64) []byte {
		return AppendRecord(nil, Record{Kind: KindRXFrame, Position: pos, Epoch: 1, Payload: frameFor(pos)})
	}
	cases := []struct {
		name      string
		reason    ErrReason
		skipHello bool                     // send bad() instead of a Hello
		bad       func(have uint64) []byte // sent after the Hello exchange
	}{
		{"garbage instead of hello", ReasonBadMagic, true, func(uint64) []byte { return []byte("this is not a record, not at all!!") }},
		{"garbage after hello", ReasonBadMagic, false, func(uint64) []byte { return make([]byte, 64) }},
		{"truncated record", ReasonTruncated, false, func(have uint64) []byte { return frame(have + 1)[:HeaderLen+10] }},
		{"out of order frame", ReasonOutOfOrder, false, func(have uint64) []byte { return frame(have + 2) }},
		{"unknown kind", ReasonUnknownKind, false, func(have uint64) []byte {
			return AppendRecord(nil, Record{Kind: KindLen, Position: have + 1, Epoch: 1})
		}},
		{"bad checksum", ReasonChecksum, false, func(have uint64) []byte {
			b := frame(have + 1)
			b[len(b)-1] ^= 0xff
			return b
		}},
		{"too long", ReasonTooLong, false, func(have uint64) []byte {
			b := frame(have + 1)[:HeaderLen]
			b[8] = 0xff // length ≈ 4 GiB
			return b
		}},
		{"ack from primary", ReasonUnexpected, false, func(have uint64) []byte {
			return AppendRecord(nil, Record{Kind: KindAck, Position: have, Epoch: 1})
		}},
		{"qemu log not accepted yet", ReasonUnexpected, false, func(have uint64) []byte {
			return AppendRecord(nil, Record{Kind: KindQEMULog, Position: 1, Epoch: 1})
		}},
		{"second hello", ReasonUnexpected, false, func(have uint64) []byte { return AppendRecord(nil, hello(have, testVM)) }},
		{"snapshot not taken", ReasonUnexpected, false, func(have uint64) []byte {
			return AppendRecord(nil, Record{Kind: KindSnapshot, Position: have, Epoch: 1, Payload: []byte("x")})
		}},
		{"hand-over not taken", ReasonUnexpected, false, func(have uint64) []byte {
			return AppendRecord(nil, Record{Kind: KindHandOver, Position: have, Epoch: 1})
		}},
		{"wrong vm", ReasonWrongVM, true, func(uint64) []byte { return AppendRecord(nil, hello(0, "other-vm")) }},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			before := s.Stats().Errors[tc.reason]
			f := dialFake(t, addr, pki.client)
			have := s.Received()
			if tc.skipHello {
				f.send(tc.bad(have))
			} else {
				f.sendRecord(hello(have, testVM))
				if r := f.read(); r.Kind != KindHello || r.Position != have {
					t.Fatalf("secondary answered %s at %d, want hello at %d", r.Kind, r.Position, have)
				}
				f.send(tc.bad(have))
			}
			// Let the half-record sit as the end of the stream.
			if tc.reason == ReasonTruncated {
				f.conn.CloseWrite()
			}
			f.expectClosed()
			expectCounted(t, tc.reason, before)
		})
	}

	t.Run("duplicates skipped", func(t *testing.T) {
		f := dialFake(t, addr, pki.client)
		f.sendRecord(hello(0, testVM))
		have := f.read().Position
		f.send(frame(have + 1))
		f.send(frame(have + 1)) // as after a resend overlapping what arrived
		f.send(frame(have + 2))
		f.sendRecord(ping())
		waitFor(t, "both frames", func() bool { return s.Received() == have+2 })
		for {
			if r := f.read(); r.Kind == KindAck && r.Position == have+2 {
				break
			}
		}
		if d := s.Stats().Duplicates; d != 1 {
			t.Errorf("duplicates = %d, want 1", d)
		}
	})

	t.Run("real primary still served", func(t *testing.T) {
		var acks ackLog
		p := newTestPrimary(t, pki, addr, PrimaryConfig{OnAck: acks.onAck})
		// The secondary already has the duplicate test's frames; the primary
		// logs the same ones and must resume after them.
		have := s.Received()
		appendFrames(t, p, 1, have+100)
		run(t, p.Run)
		waitFor(t, "acks", func() bool { return p.Acked() == have+100 })
		frames.check(t, have+100)
		acks.check(t, have+100)
		if sent := p.Stats().RecordsSent[KindRXFrame]; sent != 100 {
			t.Errorf("sent %d frames, want 100 (none of what the secondary had)", sent)
		}
	})
}

func TestPrimaryRejectsBadSecondary(t *testing.T) {
	pki := newPKI(t)
	withVersion := func(v uint16) Record {
		r := hello(0, testVM)
		r.Payload[1] = byte(v)
		return r
	}
	withIncarnation := func(pos, inc uint64) Record {
		r := hello(pos, testVM)
		r.Payload = helloPayload(testVM, helloInfo{Incarnation: inc})
		return r
	}
	cases := []struct {
		name   string
		reason ErrReason
		bad    []Record // the fake secondary's answer to the Hello
	}{
		{"ack beyond head", ReasonAckBeyondHead, []Record{hello(0, testVM), {Kind: KindAck, Position: 100, Epoch: 1}}},
		{"hello beyond head", ReasonAckBeyondHead, []Record{hello(100, testVM)}},
		{"ack backwards", ReasonAckBackwards, []Record{hello(0, testVM), {Kind: KindAck, Position: 2, Epoch: 1}, {Kind: KindAck, Position: 1, Epoch: 1}}},
		{"wrong vm", ReasonWrongVM, []Record{hello(0, "other-vm")}},
		{"version", ReasonVersion, []Record{withVersion(1)}},
		// A restarted secondary: another log, or none, or less than acked.
		{"other incarnation", ReasonLacksLog, []Record{withIncarnation(3, 0x99)}},
		{"no log", ReasonLacksLog, []Record{withIncarnation(0, 0)}},
		{"frame from secondary", ReasonUnexpected, []Record{hello(0, testVM), {Kind: KindRXFrame, Position: 1, Epoch: 1}}},
		{"no hello", ReasonUnexpected, []Record{{Kind: KindAck, Position: 0, Epoch: 1}}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ln, err := tls.Listen("tcp", "127.0.0.1:0", pki.server)
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			var acks ackLog
			p := newTestPrimary(t, pki, ln.Addr().String(), PrimaryConfig{OnAck: acks.onAck})
			appendFrames(t, p, 1, 3)
			run(t, p.Run)
			accept := func() *fakePeer {
				t.Helper()
				c, err := acceptWithin(ln, 10*time.Second)
				if err != nil {
					t.Fatal(err)
				}
				return newFakePeer(t, c)
			}

			f := accept()
			if r := f.read(); r.Kind != KindHello || r.Position != 3 {
				t.Fatalf("primary sent %s at %d, want hello at head 3", r.Kind, r.Position)
			}
			for _, r := range tc.bad {
				f.sendRecord(r)
			}
			f.expectClosed()
			waitFor(t, tc.reason.String()+" counted", func() bool { return p.Stats().Errors[tc.reason] == 1 })
			acks.check(t, 3) // never called with the bad value

			// The primary redials; a well-behaved secondary gets the log.
			f = accept()
			f.read()
			f.sendRecord(hello(3, testVM))
			f.sendRecord(Record{Kind: KindAck, Position: 3, Epoch: 1})
			waitFor(t, "ack 3", func() bool { return p.Acked() == 3 })
			acks.check(t, 3)
		})
	}
}

// acceptWithin accepts one TLS connection and completes its handshake.
func acceptWithin(ln net.Listener, d time.Duration) (*tls.Conn, error) {
	type result struct {
		c   net.Conn
		err error
	}
	ch := make(chan result, 1)
	go func() {
		c, err := ln.Accept()
		ch <- result{c, err}
	}()
	select {
	case r := <-ch:
		if r.err != nil {
			return nil, r.err
		}
		c := r.c.(*tls.Conn)
		c.SetDeadline(time.Now().Add(d))
		if err := c.Handshake(); err != nil {
			c.Close()
			return nil, err
		}
		return c, nil
	case <-time.After(d):
		ln.Close() // unblocks the goroutine
		return nil, errors.New("no connection")
	}
}

func TestPrimaryRefusesForeignSecondary(t *testing.T) {
	pki, other := newPKI(t), newPKI(t)
	// A secondary with a certificate from another CA that accepts our
	// primary: only the primary can refuse.
	cfg := other.server.Clone()
	cfg.ClientCAs = pki.server.ClientCAs
	ln := handshakeOnly(t, cfg)
	p := newTestPrimary(t, pki, ln.Addr().String(), PrimaryConfig{})
	run(t, p.Run)
	waitFor(t, "auth counted", func() bool { return p.Stats().Errors[ReasonAuth] >= 1 })
	if p.Connected() {
		t.Error("connected to a foreign secondary")
	}
}

func TestAppendFrameErrors(t *testing.T) {
	pki := newPKI(t)
	p := newTestPrimary(t, pki, "127.0.0.1:1", PrimaryConfig{MaxUnacked: 3 * (HeaderLen + 100)})
	if err := p.AppendFrame(1, make([]byte, MaxFrame+1)); !errors.Is(err, ErrTooLong) {
		t.Errorf("over-long frame: %v", err)
	}
	if err := p.AppendFrame(2, make([]byte, 100)); !errors.Is(err, ErrOutOfOrder) {
		t.Errorf("position 2 first: %v", err)
	}
	if err := p.AppendFrame(0, make([]byte, 100)); !errors.Is(err, ErrOutOfOrder) {
		t.Errorf("position 0: %v", err)
	}
	if h := p.Head(); h != 0 {
		t.Errorf("head %d after refused appends", h)
	}
	for pos := uint64(1); pos <= 3; pos++ {
		if err := p.AppendFrame(pos, make([]byte, 100)); err != nil {
			t.Fatal(err)
		}
	}
	if err := p.AppendFrame(4, make([]byte, MaxFrame)); !errors.Is(err, ErrBacklogFull) {
		t.Errorf("past MaxUnacked: %v", err)
	}
	if err := p.AppendFrame(3, make([]byte, 10)); !errors.Is(err, ErrOutOfOrder) {
		t.Errorf("repeated position: %v", err)
	}
	if h := p.Head(); h != 3 {
		t.Errorf("head %d, want 3", h)
	}
	st := p.Stats()
	if st.Errors[ReasonTooLong] != 1 || st.Errors[ReasonOutOfOrder] != 3 || st.Errors[ReasonBacklogFull] != 1 {
		t.Errorf("counted too_long %d, out_of_order %d, backlog_full %d",
			st.Errors[ReasonTooLong], st.Errors[ReasonOutOfOrder], st.Errors[ReasonBacklogFull])
	}
}

func TestConfigChecks(t *testing.T) {
	pki := newPKI(t)
	loose := pki.server.Clone()
	loose.ClientAuth = tls.RequestClientCert
	if _, err := NewSecondary(SecondaryConfig{Listen: "127.0.0.1:0", TLS: loose, VM: testVM}); err == nil {
		t.Error("secondary accepted a TLS config that does not verify clients")
	}
	if _, err := NewPrimary(PrimaryConfig{Addr: "127.0.0.1:1", VM: testVM}); err == nil {
		t.Error("primary accepted no TLS")
	}
	if err := GenerateLabPKI(pki.dir, primaryHost, secondaryHost); err == nil {
		t.Error("GenerateLabPKI overwrote an existing PKI")
	}
	for _, f := range []string{"primary-key.pem", "secondary-key.pem"} {
		if m := fileMode(t, filepath.Join(pki.dir, f)); m != 0o600 {
			t.Errorf("%s mode %v", f, m)
		}
	}
}

// BenchmarkAppendAck measures one frame's round trip: AppendFrame until
// OnAck reports it, over TLS on loopback.
func BenchmarkAppendAck(b *testing.B) {
	pki := newPKI(b)
	s := startSecondary(b, pki, SecondaryConfig{OnFrame: func(uint64, []byte) error { return nil }})
	acked := make(chan uint64, 1)
	p := newTestPrimary(b, pki, s.Addr().String(), PrimaryConfig{OnAck: func(pos uint64) { acked <- pos }})
	run(b, p.Run)
	frame := make([]byte, 1500)
	waitFor(b, "connection", p.Connected)
	giveUp := time.After(5 * time.Minute)
	pos := uint64(0)
	for b.Loop() {
		pos++
		if err := p.AppendFrame(pos, frame); err != nil {
			b.Fatal(err)
		}
		select {
		case <-acked: // one frame in flight: each ack is for pos
		case <-giveUp:
			b.Fatalf("no ack for %d", pos)
		}
	}
	b.ReportMetric(float64(p.RTT().Microseconds()), "hb-rtt-µs")
}

// A burst is queued and sent by one Flush; nothing else sends it, with
// heartbeats (which also drain the queue) too far apart to fire.
func TestQueuedFramesGoOutOnFlush(t *testing.T) {
	pki := newPKI(t)
	var frames frameLog
	s := startSecondary(t, pki, SecondaryConfig{OnFrame: frames.onFrame})
	var acks ackLog
	p := newTestPrimary(t, pki, s.Addr().String(), PrimaryConfig{OnAck: acks.onAck, Heartbeat: time.Hour, Timeout: time.Minute})
	run(t, p.Run)
	// The writer drains the queue once when it starts, before its first
	// ping is answered.
	waitFor(t, "first heartbeat answered", func() bool { return p.RTT() > 0 })
	time.Sleep(10 * time.Millisecond)

	const n = 50
	for pos := uint64(1); pos <= n; pos++ {
		if err := p.QueueFrame(pos, frameFor(pos)); err != nil {
			t.Fatal(err)
		}
	}
	time.Sleep(100 * time.Millisecond)
	if got := s.Received(); got != 0 {
		t.Fatalf("secondary received %d queued frames before Flush", got)
	}
	if p.Head() != n {
		t.Fatalf("head %d, want %d", p.Head(), n)
	}
	p.Flush()
	waitFor(t, "ack of the burst", func() bool { return p.Acked() == n })
	frames.check(t, n)
	if sent := p.Stats().RecordsSent[KindRXFrame]; sent != n {
		t.Errorf("sent %d RXFrame records, want %d", sent, n)
	}
}

// Re-protection: a secondary built from a snapshot at position 40 joins a
// primary whose log starts there, and gets frames from 41 on.
func TestPairStartsAtASnapshotPosition(t *testing.T) {
	pki := newPKI(t)
	var got []uint64
	var mu sync.Mutex
	s := startSecondary(t, pki, SecondaryConfig{StartPosition: 40, Incarnation: testIncarnation, OnFrame: func(pos uint64, frame []byte) error {
		mu.Lock()
		got = append(got, pos)
		mu.Unlock()
		return nil
	}})
	p := newTestPrimary(t, pki, s.Addr().String(), PrimaryConfig{StartHead: 40})
	if p.Head() != 40 || p.Acked() != 40 || s.Received() != 40 {
		t.Fatalf("start: head %d acked %d received %d, want 40", p.Head(), p.Acked(), s.Received())
	}
	if err := p.AppendFrame(40, frameFor(40)); !errors.Is(err, ErrOutOfOrder) {
		t.Errorf("append at the start head: %v, want ErrOutOfOrder", err)
	}
	run(t, p.Run)
	appendFrames(t, p, 41, 60)
	waitFor(t, "ack 60", func() bool { return p.Acked() == 60 })
	mu.Lock()
	defer mu.Unlock()
	if len(got) != 20 || got[0] != 41 || got[19] != 60 {
		t.Errorf("secondary got positions %v, want 41..60", got)
	}
}

// A primary that lost a failover (older epoch) is refused by a secondary
// that follows the newer one, and learns it is fenced.
func TestStalePrimaryIsFenced(t *testing.T) {
	pki := newPKI(t)
	s := startSecondary(t, pki, SecondaryConfig{OnFrame: func(uint64, []byte) error { return nil }})
	current := newTestPrimary(t, pki, s.Addr().String(), PrimaryConfig{Epoch: 3})
	run(t, current.Run)
	waitFor(t, "current primary connected", current.Connected)

	fenced := make(chan uint64, 1)
	stale := newTestPrimary(t, pki, s.Addr().String(), PrimaryConfig{Epoch: 2, OnFenced: func(e uint64) { fenced <- e }})
	run(t, stale.Run)
	select {
	case e := <-fenced:
		if e != 3 {
			t.Errorf("fenced by epoch %d, want 3", e)
		}
	case <-time.After(5 * time.Second):
		t.Fatalf("the stale primary was not fenced: its errors %v, the secondary's %v", stale.Stats().Errors, s.Stats().Errors)
	}
	waitFor(t, "stale_epoch counted on both sides", func() bool {
		return s.Stats().Errors[ReasonStaleEpoch] > 0 && stale.Stats().Errors[ReasonStaleEpoch] > 0
	})
	if !current.Connected() {
		t.Error("the stale primary displaced the current one")
	}
	appendFrames(t, current, 1, 10)
	waitFor(t, "the current primary still streams", func() bool { return current.Acked() == 10 })
}

// A replay log crosses in chunks that the secondary gets back in order, also
// across a reconnect, so their concatenation is the primary's log.
func TestLogChunksArriveWholeAndInOrder(t *testing.T) {
	pki := newPKI(t)
	var mu sync.Mutex
	var got []byte
	var nextPos uint64 = 1
	s := startSecondary(t, pki, SecondaryConfig{OnLog: func(pos uint64, chunk []byte) error {
		mu.Lock()
		defer mu.Unlock()
		if pos != nextPos {
			return fmt.Errorf("chunk %d, want %d", pos, nextPos)
		}
		nextPos++
		got = append(got, chunk...)
		return nil
	}})
	px := startProxy(t, s.Addr().String())
	p := newTestPrimary(t, pki, px.addr(), PrimaryConfig{})
	run(t, p.Run)

	var want []byte
	rng := rand.New(rand.NewPCG(1, 2))
	for pos := uint64(1); pos <= 200; pos++ {
		chunk := make([]byte, 1+rng.IntN(MaxPayload))
		for i := range chunk {
			chunk[i] = byte(rng.Uint32())
		}
		want = append(want, chunk...)
		if err := p.QueueLog(pos, chunk); err != nil {
			t.Fatal(err)
		}
		p.Flush()
		if pos == 100 {
			px.kill()
		}
	}
	waitFor(t, "acks up to 200", func() bool { return p.Acked() == 200 })
	mu.Lock()
	defer mu.Unlock()
	if !bytes.Equal(got, want) {
		t.Errorf("secondary got %d log bytes, primary logged %d; equal: false", len(got), len(want))
	}
	if err := p.QueueLog(201, make([]byte, MaxPayload+1)); !errors.Is(err, ErrTooLong) {
		t.Errorf("over-long chunk: %v, want ErrTooLong", err)
	}
	if sent := p.Stats().RecordsSent[KindQEMULog]; sent < 200 {
		t.Errorf("%d qemu_log records sent, want at least 200", sent)
	}
}

// A secondary that restarted holds none of the log: a primary that can take
// a snapshot rebuilds it (the state first, then the log from there); one that
// cannot refuses it and says so, and the refused Hellos never count as the
// secondary being alive.
func TestRestartedSecondaryIsRebuiltFromASnapshot(t *testing.T) {
	pki := newPKI(t)
	var mu sync.Mutex
	var installed []string
	var frames []uint64
	joiner := startSecondary(t, pki, SecondaryConfig{
		OnSnapshot: func(pos uint64, state []byte) error {
			mu.Lock()
			defer mu.Unlock()
			installed = append(installed, fmt.Sprintf("%d:%s", pos, state))
			return nil
		},
		OnFrame: func(pos uint64, frame []byte) error {
			mu.Lock()
			defer mu.Unlock()
			frames = append(frames, pos)
			return nil
		},
	})

	// Without a snapshot to give, the primary refuses it.
	lacks := make(chan struct{}, 100)
	refusing := newTestPrimary(t, pki, joiner.Addr().String(), PrimaryConfig{OnPeerLacksLog: func() { lacks <- struct{}{} }})
	appendFrames(t, refusing, 1, 5)
	ctx, stop := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- refusing.Run(ctx) }()
	select {
	case <-lacks:
	case <-time.After(10 * time.Second):
		t.Fatalf("OnPeerLacksLog not called; primary errors %v", refusing.Stats().Errors)
	}
	waitFor(t, "lacks_log counted", func() bool { return refusing.Stats().Errors[ReasonLacksLog] > 0 })
	stop()
	<-done
	if joiner.Connected() || joiner.Stats().Connects != 0 {
		t.Error("the joiner counts a refused primary as connected")
	}
	if refusing.Stats().Connects != 0 || refusing.Synced() {
		t.Error("the refusing primary counts the joiner as connected")
	}

	// With a snapshot, it is rebuilt at the head and follows from there.
	var p *Primary
	p = newTestPrimary(t, pki, joiner.Addr().String(), PrimaryConfig{
		Snapshot: func(_ context.Context, rebase func(uint64) error) ([]byte, error) {
			// Queue from 5 on while the state is taken, at 7: frames 8
			// and 9 arrive meanwhile and go after the state.
			if err := rebase(5); err != nil {
				return nil, err
			}
			appendFrames(t, p, 8, 9)
			if err := rebase(7); err != nil {
				return nil, err
			}
			if err := rebase(6); err == nil {
				t.Error("rebase went back")
			}
			return []byte("state"), nil
		},
	})
	appendFrames(t, p, 1, 7) // never acked: the joiner gets the state at 7 instead
	run(t, p.Run)
	waitFor(t, "the joiner synced", p.Synced)
	appendFrames(t, p, 10, 12)
	waitFor(t, "ack 12", func() bool { return p.Acked() == 12 })
	mu.Lock()
	defer mu.Unlock()
	if len(installed) != 1 || installed[0] != "7:state" {
		t.Errorf("snapshots installed %q, want [7:state]", installed)
	}
	if fmt.Sprint(frames) != "[8 9 10 11 12]" {
		t.Errorf("frames after the snapshot %v, want 8..12", frames)
	}
	if joiner.Incarnation() != testIncarnation {
		t.Errorf("joiner follows incarnation %#x, want %#x", joiner.Incarnation(), testIncarnation)
	}
}

// A secondary that holds a log refuses another log at the same epoch (a
// primary restarted with a fresh VM), and never counts it as its primary
// being alive; it takes no snapshot from it.
func TestSecondaryRefusesAnotherLogAtItsEpoch(t *testing.T) {
	pki := newPKI(t)
	snapshots := 0
	s := startSecondary(t, pki, SecondaryConfig{
		Incarnation: testIncarnation, StartPosition: 20, Epoch: 1,
		OnFrame:    func(uint64, []byte) error { return nil },
		OnSnapshot: func(uint64, []byte) error { snapshots++; return nil },
	})
	time.Sleep(20 * time.Millisecond)
	quietBefore := s.SinceHeard()
	fresh := newTestPrimary(t, pki, s.Addr().String(), PrimaryConfig{
		Incarnation: 0xf2e54, FromBoot: true,
		Snapshot: func(_ context.Context, rebase func(uint64) error) ([]byte, error) { return []byte("empty"), rebase(0) },
	})
	run(t, fresh.Run)
	waitFor(t, "incarnation refusals", func() bool { return s.Stats().Errors[ReasonIncarnation] >= 2 })
	if s.Connected() || s.Stats().Connects != 0 || snapshots != 0 || s.Received() != 20 {
		t.Errorf("refused primary got in: connected %v connects %d snapshots %d received %d",
			s.Connected(), s.Stats().Connects, snapshots, s.Received())
	}
	if s.SinceHeard() < quietBefore {
		t.Errorf("a refused primary counted as alive: silent %s, was %s", s.SinceHeard(), quietBefore)
	}
}

// A snapshot that arrives corrupt is refused, never installed.
func TestCorruptSnapshotIsRefused(t *testing.T) {
	pki := newPKI(t)
	installs := 0
	s := startSecondary(t, pki, SecondaryConfig{OnSnapshot: func(uint64, []byte) error { installs++; return nil }})
	f := dialFake(t, s.Addr().String(), pki.client)
	r := hello(9, testVM)
	r.Payload = helloPayload(testVM, helloInfo{Incarnation: 5})
	f.sendRecord(r)
	if got := f.read(); got.Kind != KindHello {
		t.Fatalf("got %s, want hello", got.Kind)
	}
	f.sendRecord(Record{Kind: KindSnapshot, Position: 9, Epoch: 1, Payload: []byte("statf")})
	f.sendRecord(Record{Kind: KindSnapshotEnd, Position: 9, Epoch: 1, Payload: snapshotTrailer([]byte("state"))})
	f.expectClosed()
	waitFor(t, "snapshot error counted", func() bool { return s.Stats().Errors[ReasonSnapshot] == 1 })
	if installs != 0 || s.Received() != 0 || s.Incarnation() != 0 {
		t.Errorf("corrupt snapshot installed: %d installs, received %d, incarnation %d", installs, s.Received(), s.Incarnation())
	}
}

// A switchover's hand-over reaches the secondary after every frame before
// it, with the primary's epoch.
func TestHandOverFollowsTheLog(t *testing.T) {
	pki := newPKI(t)
	type handOver struct{ epoch, head, received uint64 }
	got := make(chan handOver, 1)
	var s *Secondary
	s = startSecondary(t, pki, SecondaryConfig{
		OnFrame:    func(uint64, []byte) error { return nil },
		OnHandOver: func(epoch, head uint64) { got <- handOver{epoch, head, s.Received()} },
	})
	p := newTestPrimary(t, pki, s.Addr().String(), PrimaryConfig{Epoch: 4})
	if err := p.HandOver(0); err == nil {
		t.Error("hand-over with no secondary connected succeeded")
	}
	run(t, p.Run)
	waitFor(t, "connected", p.Connected)
	for pos := uint64(1); pos <= 20; pos++ {
		if err := p.QueueFrame(pos, frameFor(pos)); err != nil {
			t.Fatal(err)
		}
	}
	if err := p.HandOver(20); err != nil {
		t.Fatal(err)
	}
	select {
	case h := <-got:
		if h != (handOver{4, 20, 20}) {
			t.Errorf("hand-over %+v, want epoch 4 at head 20 with 20 received", h)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no hand-over")
	}
}

// A primary whose daemon restarted says so; the secondary that follows its
// epoch learns its primary's copy is gone at once. Any other epoch, or a
// secondary that holds no log, changes nothing.
func TestAnnouncedRestartReachesTheSecondaryOfThatEpoch(t *testing.T) {
	pki := newPKI(t)
	restarted := make(chan uint64, 4)
	s := startSecondary(t, pki, SecondaryConfig{
		Incarnation: testIncarnation, StartPosition: 9, Epoch: 3,
		OnFrame:            func(uint64, []byte) error { return nil },
		OnPrimaryRestarted: func(epoch uint64) { restarted <- epoch },
	})
	ctx := context.Background()
	if err := AnnounceRestart(ctx, s.Addr().String(), pki.client, testVM, 2, time.Second); err != nil {
		t.Fatal(err)
	}
	if err := AnnounceRestart(ctx, s.Addr().String(), pki.client, testVM, 3, time.Second); err != nil {
		t.Fatal(err)
	}
	select {
	case e := <-restarted:
		if e != 3 {
			t.Errorf("restart announced for epoch %d, want 3", e)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the secondary was not told")
	}
	if len(restarted) != 0 {
		t.Errorf("told %d more times", len(restarted))
	}
	waitFor(t, "primary_restarted counted", func() bool { return s.Stats().Errors[ReasonRestarted] == 2 })
	if s.Stats().Connects != 0 {
		t.Error("an announcement counted as a primary connecting")
	}

	fresh := startSecondary(t, pki, SecondaryConfig{
		OnSnapshot:         func(uint64, []byte) error { return nil },
		OnPrimaryRestarted: func(epoch uint64) { restarted <- epoch },
	})
	if err := AnnounceRestart(ctx, fresh.Addr().String(), pki.client, testVM, 0, time.Second); err != nil {
		t.Fatal(err)
	}
	time.Sleep(50 * time.Millisecond)
	if len(restarted) != 0 {
		t.Error("a secondary with no log was told its primary restarted")
	}
}

// Each heartbeat the secondary echoes gives the primary its send time: the
// moment after which the secondary has heard from it (the output lease).
// The times only grow and are never in the future.
func TestPeerHeardReportsEchoedSendTimes(t *testing.T) {
	pki := newPKI(t)
	s := startSecondary(t, pki, SecondaryConfig{OnFrame: new(frameLog).onFrame, Heartbeat: 5 * time.Millisecond})
	type echo struct{ sentAt, heardAt time.Time }
	echoes := make(chan echo, 100)
	p := newTestPrimary(t, pki, s.Addr().String(), PrimaryConfig{Heartbeat: 5 * time.Millisecond,
		OnPeerHeard: func(sentAt time.Time) {
			select {
			case echoes <- echo{sentAt, time.Now()}:
			default:
			}
		}})
	start := time.Now()
	run(t, p.Run)
	var last time.Time
	for i := range 5 {
		select {
		case e := <-echoes:
			if e.sentAt.Before(start) || e.sentAt.After(e.heardAt) || !e.sentAt.After(last) {
				t.Fatalf("echo %d: sent at %s, heard at %s, the last sent at %s (start %s)", i, e.sentAt, e.heardAt, last, start)
			}
			last = e.sentAt
		case <-time.After(5 * time.Second):
			t.Fatalf("%d echoes in 5s, want 5", i)
		}
	}
}
