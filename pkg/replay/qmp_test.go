package replay

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// fakeQMP is a QMP server on a unix socket that serves one client at a time.
type fakeQMP struct {
	path      string
	noGreet   bool // never send the greeting
	silent    bool // after capabilities, never answer a command
	rejectCap bool // answer qmp_capabilities with an error
	received  chan string
	seq       int // event sequence number, only touched by the serving goroutine
}

func startFake(t *testing.T, f *fakeQMP) *fakeQMP {
	t.Helper()
	f.path = filepath.Join(t.TempDir(), "q.sock")
	f.received = make(chan string, 1024)
	ln, err := net.Listen("unix", f.path)
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var conns []net.Conn
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; i < 16; i++ { // bounded: tests connect a few times at most
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			f.serve(c) // one client at a time, like QEMU
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return f
}

func (f *fakeQMP) serve(c net.Conn) {
	defer c.Close()
	w := bufio.NewWriter(c)
	send := func(v any) {
		b, _ := json.Marshal(v)
		w.Write(append(b, '\n'))
	}
	event := func(name string) {
		f.seq++
		send(map[string]any{
			"event":     name,
			"data":      map[string]any{"seq": f.seq},
			"timestamp": map[string]any{"seconds": 1700000000 + f.seq, "microseconds": 42},
		})
	}
	if f.noGreet {
		// Hold the connection open without a word until the client goes.
		var b [1]byte
		c.Read(b[:])
		return
	}
	send(map[string]any{"QMP": map[string]any{
		"version": map[string]any{"qemu": map[string]int{"major": 9, "minor": 0, "micro": 0}}, "capabilities": []string{"oob"},
	}})
	w.Flush()
	dec := json.NewDecoder(c)
	caps := false
	for {
		var cmd struct {
			Execute string          `json:"execute"`
			ID      json.RawMessage `json:"id"`
		}
		if err := dec.Decode(&cmd); err != nil {
			return
		}
		f.received <- cmd.Execute
		answer := func(key string, v any) {
			m := map[string]any{key: v}
			if cmd.ID != nil {
				m["id"] = cmd.ID
			}
			send(m)
		}
		switch {
		case cmd.Execute == "qmp_capabilities" && f.rejectCap:
			answer("error", map[string]string{"class": "GenericError", "desc": "capabilities refused"})
		case cmd.Execute == "qmp_capabilities":
			caps = true
			answer("return", map[string]any{})
		case !caps:
			answer("error", map[string]string{"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"})
		case f.silent:
		case cmd.Execute == "query-status":
			// Events between replies: emitted before this reply.
			event("STOP")
			event("RESUME")
			answer("return", map[string]any{"status": "running", "running": true})
		case cmd.Execute == "x-hangup":
			w.Flush()
			return
		case cmd.Execute == "x-answer-and-hangup":
			answer("return", map[string]any{"bye": true})
			w.Flush()
			return
		default:
			answer("error", map[string]string{"class": "CommandNotFound", "desc": "The command " + cmd.Execute + " has not been found"})
		}
		w.Flush()
	}
}

func newMon(t *testing.T, f *fakeQMP, timeout time.Duration) *SocketMonitor {
	t.Helper()
	m, err := NewSocketMonitor("unix", f.path, timeout)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func connected(t *testing.T, f *fakeQMP) *SocketMonitor {
	t.Helper()
	m := newMon(t, f, 5*time.Second)
	if err := m.Connect(); err != nil {
		t.Fatalf("Connect: %v", err)
	}
	t.Cleanup(func() { m.Disconnect() })
	return m
}

const queryStatus = `{"execute":"query-status"}`

func TestFakeRequiresCapabilities(t *testing.T) {
	f := startFake(t, &fakeQMP{})
	c, err := net.DialTimeout("unix", f.path, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	r := bufio.NewReader(c)
	greet, err := r.ReadString('\n')
	if err != nil || !strings.Contains(greet, `"QMP"`) {
		t.Fatalf("greeting %q, %v", greet, err)
	}
	fmt.Fprintln(c, queryStatus)
	line, err := r.ReadString('\n')
	if err != nil || !strings.Contains(line, "CommandNotFound") {
		t.Fatalf("query-status before capabilities: %q, %v", line, err)
	}
}

func TestRunQueryStatus(t *testing.T) {
	f := startFake(t, &fakeQMP{})
	m := connected(t, f)
	out, err := m.Run([]byte(queryStatus))
	if err != nil {
		t.Fatalf("Run: %v", err)
	}
	var st struct {
		Status  string `json:"status"`
		Running bool   `json:"running"`
	}
	if err := json.Unmarshal(out, &st); err != nil {
		t.Fatalf("reply %s: %v", out, err)
	}
	if st.Status != "running" || !st.Running {
		t.Fatalf("reply %s", out)
	}
	// Command with arguments, built from the Command type.
	cmd, _ := json.Marshal(Command{Execute: "query-status", Args: map[string]any{"x": 1}})
	if _, err := m.Run(cmd); err != nil {
		t.Fatalf("Run with args: %v", err)
	}
	// The client negotiated capabilities first.
	if first := <-f.received; first != "qmp_capabilities" {
		t.Fatalf("first command %q", first)
	}
}

func TestRunUnknownCommand(t *testing.T) {
	f := startFake(t, &fakeQMP{})
	m := connected(t, f)
	_, err := m.Run([]byte(`{"execute":"no-such-thing"}`))
	var qe *Error
	if !errors.As(err, &qe) || qe.Class != "CommandNotFound" || !strings.Contains(err.Error(), "CommandNotFound") {
		t.Fatalf("err %v", err)
	}
	if !strings.HasPrefix(err.Error(), "run command no-such-thing: ") {
		t.Fatalf("err not wrapped: %v", err)
	}
	// The connection is still good.
	if _, err := m.Run([]byte(queryStatus)); err != nil {
		t.Fatalf("Run after error: %v", err)
	}
	// Not JSON / no execute: refused before sending.
	if _, err := m.Run([]byte(`nope`)); err == nil {
		t.Fatal("Run(nope) succeeded")
	}
	if _, err := m.Run([]byte(`{"arguments":{}}`)); err == nil {
		t.Fatal("Run without execute succeeded")
	}
}

func TestEventsInOrderWithConcurrentRuns(t *testing.T) {
	f := startFake(t, &fakeQMP{})
	m := connected(t, f)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	evs, err := m.Events(ctx)
	if err != nil {
		t.Fatal(err)
	}
	const workers, perWorker = 4, 5
	var wg sync.WaitGroup
	errs := make(chan error, workers*perWorker)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < perWorker; i++ {
				out, err := m.Run([]byte(queryStatus))
				if err == nil && !strings.Contains(string(out), `"running"`) {
					err = fmt.Errorf("reply %s", out)
				}
				if err != nil {
					errs <- err
				}
			}
		}()
	}
	want := 2 * workers * perWorker
	deadline := time.After(10 * time.Second)
	for n := 1; n <= want; n++ {
		select {
		case ev, ok := <-evs:
			if !ok {
				t.Fatalf("events closed after %d", n-1)
			}
			name := map[bool]string{true: "STOP", false: "RESUME"}[n%2 == 1]
			if ev.Event != name || ev.Data["seq"] != float64(n) {
				t.Fatalf("event %d: %+v, want %s seq %d", n, ev, name, n)
			}
			if ev.Timestamp.Seconds != int64(1700000000+n) || ev.Timestamp.Microseconds != 42 {
				t.Fatalf("event %d timestamp %+v", n, ev.Timestamp)
			}
		case <-deadline:
			t.Fatalf("got %d of %d events", n-1, want)
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if d := m.DroppedEvents(); d != 0 {
		t.Errorf("dropped %d", d)
	}
	cancel()
	select {
	case _, ok := <-evs:
		if ok {
			t.Fatal("extra event")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("events channel not closed after cancel")
	}
}

func TestEventsDroppedWhenNobodyReads(t *testing.T) {
	f := startFake(t, &fakeQMP{})
	m := connected(t, f)
	evs, err := m.Events(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	const runs = EventBuffer // 2 events each: half of them do not fit
	for i := 0; i < runs; i++ {
		if _, err := m.Run([]byte(queryStatus)); err != nil {
			t.Fatal(err)
		}
	}
	// Each reply follows its events on the wire, so all were handled.
	if d := m.DroppedEvents(); d != 2*runs-EventBuffer {
		t.Fatalf("dropped %d, want %d", d, 2*runs-EventBuffer)
	}
	if err := m.Disconnect(); err != nil {
		t.Fatal(err)
	}
	n := 0
	timeout := time.After(5 * time.Second)
	for {
		select {
		case _, ok := <-evs:
			if !ok {
				if n != EventBuffer {
					t.Fatalf("buffered %d events, want %d", n, EventBuffer)
				}
				return
			}
			n++
			if n > EventBuffer {
				t.Fatalf("more than %d events buffered", EventBuffer)
			}
		case <-timeout:
			t.Fatal("events channel not closed after Disconnect")
		}
	}
}

func TestNotConnected(t *testing.T) {
	f := startFake(t, &fakeQMP{})
	m := newMon(t, f, 5*time.Second)
	if _, err := m.Run([]byte(queryStatus)); !errors.Is(err, ErrNotConnected) {
		t.Fatalf("Run before Connect: %v", err)
	}
	if _, err := m.Events(context.Background()); !errors.Is(err, ErrNotConnected) {
		t.Fatalf("Events before Connect: %v", err)
	}
	if err := m.Disconnect(); !errors.Is(err, ErrNotConnected) {
		t.Fatalf("Disconnect before Connect: %v", err)
	}
	if err := m.Connect(); err != nil {
		t.Fatal(err)
	}
	if err := m.Connect(); !errors.Is(err, ErrAlreadyConnected) {
		t.Fatalf("second Connect: %v", err)
	}
	if err := m.Disconnect(); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Run([]byte(queryStatus)); !errors.Is(err, ErrNotConnected) {
		t.Fatalf("Run after Disconnect: %v", err)
	}
	if err := m.Disconnect(); !errors.Is(err, ErrNotConnected) {
		t.Fatalf("second Disconnect: %v", err)
	}
	// It can connect again (the fake serves the next client).
	if err := m.Connect(); err != nil {
		t.Fatalf("reconnect: %v", err)
	}
	defer m.Disconnect()
	if _, err := m.Run([]byte(queryStatus)); err != nil {
		t.Fatalf("Run after reconnect: %v", err)
	}
}

func TestNewSocketMonitorChecks(t *testing.T) {
	if _, err := NewSocketMonitor("unix", "/x", 0); err == nil {
		t.Fatal("zero timeout accepted")
	}
	if _, err := NewSocketMonitor("unix", "", time.Second); err == nil {
		t.Fatal("empty address accepted")
	}
	m, _ := NewSocketMonitor("unix", filepath.Join(t.TempDir(), "none.sock"), time.Second)
	if err := m.Connect(); err == nil || !strings.HasPrefix(err.Error(), "connect monitor ") {
		t.Fatalf("Connect to nothing: %v", err)
	}
}

func TestConnectFailures(t *testing.T) {
	f := startFake(t, &fakeQMP{noGreet: true})
	m := newMon(t, f, 200*time.Millisecond)
	if err := m.Connect(); !errors.Is(err, ErrTimeout) || !strings.Contains(err.Error(), "greeting") {
		t.Fatalf("no greeting: %v", err)
	}

	f = startFake(t, &fakeQMP{rejectCap: true})
	m = newMon(t, f, 5*time.Second)
	err := m.Connect()
	var qe *Error
	if !errors.As(err, &qe) || qe.Class != "GenericError" || !strings.HasPrefix(err.Error(), "negotiate capabilities: ") {
		t.Fatalf("capabilities refused: %v", err)
	}
	if _, err := m.Run([]byte(queryStatus)); !errors.Is(err, ErrNotConnected) {
		t.Fatalf("Run after failed Connect: %v", err)
	}
}

func TestRunTimesOut(t *testing.T) {
	f := startFake(t, &fakeQMP{silent: true})
	m := newMon(t, f, 200*time.Millisecond)
	if err := m.Connect(); err != nil {
		t.Fatal(err)
	}
	defer m.Disconnect()
	start := time.Now()
	_, err := m.Run([]byte(queryStatus))
	if !errors.Is(err, ErrTimeout) || !strings.Contains(err.Error(), "run command query-status") ||
		!strings.Contains(err.Error(), "200ms") {
		t.Fatalf("err %v", err)
	}
	if el := time.Since(start); el < 150*time.Millisecond || el > 5*time.Second {
		t.Fatalf("timed out after %v", el)
	}
}

func TestDisconnectWakesRun(t *testing.T) {
	f := startFake(t, &fakeQMP{silent: true})
	m := newMon(t, f, 30*time.Second)
	if err := m.Connect(); err != nil {
		t.Fatal(err)
	}
	evs, err := m.Events(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		_, err := m.Run([]byte(queryStatus))
		done <- err
	}()
	// Wait until the server has the command, so Run is waiting for a reply.
	if name := <-f.received; name != "qmp_capabilities" {
		t.Fatalf("first command %q", name)
	}
	select {
	case name := <-f.received:
		if name != "query-status" {
			t.Fatalf("second command %q", name)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("server never got query-status")
	}
	if err := m.Disconnect(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if !errors.Is(err, ErrDisconnected) {
			t.Fatalf("Run: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Disconnect did not wake Run")
	}
	select {
	case _, ok := <-evs:
		if ok {
			t.Fatal("unexpected event")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("events channel not closed")
	}
}

func TestServerHangupWakesRun(t *testing.T) {
	f := startFake(t, &fakeQMP{})
	m := connected(t, f)
	_, err := m.Run([]byte(`{"execute":"x-hangup"}`))
	if err == nil || !strings.Contains(err.Error(), "read reply") {
		t.Fatalf("Run on hangup: %v", err)
	}
	// The dead connection fails Run fast until a new Connect replaces it.
	if _, err := m.Run([]byte(queryStatus)); err == nil || !strings.Contains(err.Error(), "read reply") {
		t.Fatalf("Run on dead connection: %v", err)
	}
	if err := m.Connect(); err != nil {
		t.Fatalf("reconnect after hangup: %v", err)
	}
	if _, err := m.Run([]byte(queryStatus)); err != nil {
		t.Fatalf("Run after reconnect: %v", err)
	}
}

// A QEMU that answers and hangs up at once (quit does) has answered: Run
// returns the answer, not the hang-up, whichever its reader sees first.
func TestAnswerThenHangupIsTheAnswer(t *testing.T) {
	for i := range 50 {
		f := startFake(t, &fakeQMP{})
		m := connected(t, f)
		out, err := m.Run([]byte(`{"execute":"x-answer-and-hangup"}`))
		if err != nil || string(out) != `{"bye":true}` {
			t.Fatalf("run %d: %s, %v; want the answer", i, out, err)
		}
		m.Disconnect()
	}
}
