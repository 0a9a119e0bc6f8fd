package replay

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// Command is a QMP command: {"execute": ..., "arguments": ...}.
type Command struct {
	Execute string `json:"execute"`
	Args    any    `json:"arguments,omitempty"`
}

// Event is an asynchronous QMP event.
type Event struct {
	Event     string         `json:"event"`
	Data      map[string]any `json:"data"`
	Timestamp struct {
		Seconds      int64 `json:"seconds"`
		Microseconds int64 `json:"microseconds"`
	} `json:"timestamp"`
}

// Monitor is a QMP connection, in the shape of go-qemu's qmp.Monitor (but
// Run returns the reply's "return" member): pkg/replay/goqemu adapts a
// SocketMonitor to go-qemu, and says why ftgw keeps its own client.
type Monitor interface {
	Connect() error
	Disconnect() error
	// Run sends a raw JSON command and returns the raw JSON value of the
	// reply's "return" member. A QMP error reply becomes an *Error.
	Run(command []byte) (out []byte, err error)
	Events(ctx context.Context) (<-chan Event, error)
}

// EventBuffer is how many events each Events channel holds before further
// events are dropped (and counted in DroppedEvents).
const EventBuffer = 64

var (
	// ErrNotConnected: the monitor has no connection (never connected, or
	// disconnected).
	ErrNotConnected = errors.New("qmp: not connected")
	// ErrAlreadyConnected: Connect on a connected monitor.
	ErrAlreadyConnected = errors.New("qmp: already connected")
	// ErrDisconnected: Disconnect was called while the call was waiting.
	ErrDisconnected = errors.New("qmp: monitor disconnected")
	// ErrTimeout: no reply (or greeting) within the monitor's timeout.
	ErrTimeout = errors.New("qmp: timed out")
)

// Error is a QMP error reply {"error": {"class": ..., "desc": ...}}.
type Error struct {
	Class string `json:"class"`
	Desc  string `json:"desc"`
}

func (e *Error) Error() string { return "qmp error " + e.Class + ": " + e.Desc }

var _ Monitor = (*SocketMonitor)(nil)

// SocketMonitor talks QMP over a stream socket, normally a unix socket
// (QEMU's -qmp unix:PATH,server=on,wait=off).
type SocketMonitor struct {
	network, addr string
	timeout       time.Duration

	runMu   sync.Mutex // serialises Connect and Run: one outstanding command
	mu      sync.Mutex // guards sess
	sess    *session
	nextID  atomic.Uint64
	dropped atomic.Uint64
}

// NewSocketMonitor returns a monitor for addr on network ("unix" for QEMU's
// -qmp unix:PATH). timeout bounds the dial, the greeting and every Run.
func NewSocketMonitor(network, addr string, timeout time.Duration) (*SocketMonitor, error) {
	if timeout <= 0 {
		return nil, fmt.Errorf("new socket monitor: timeout %v must be positive", timeout)
	}
	if addr == "" {
		return nil, errors.New("new socket monitor: empty address")
	}
	return &SocketMonitor{network: network, addr: addr, timeout: timeout}, nil
}

// DroppedEvents is how many events were dropped because a subscriber's
// channel was full, over the monitor's life.
func (m *SocketMonitor) DroppedEvents() uint64 { return m.dropped.Load() }

// reply is one command reply handed from the reader to Run.
type reply struct {
	ret json.RawMessage
	err *Error
}

// session is one connection; the reader goroutine and everything it wakes.
type session struct {
	conn      net.Conn
	done      chan struct{} // closed when the connection ends
	closeOnce sync.Once
	closeErr  error // why it ended; written before done is closed

	mu        sync.Mutex // guards the fields below
	pendingID string     // id of the outstanding command, "" if none
	pending   chan reply // buffer 1
	subs      map[*subscriber]struct{}
}

type subscriber struct{ ch chan Event }

func (s *session) ended() bool {
	select {
	case <-s.done:
		return true
	default:
		return false
	}
}

func (s *session) close(why error) {
	s.closeOnce.Do(func() {
		s.closeErr = why
		s.conn.Close()
		close(s.done)
	})
}

// Connect dials QEMU, reads the greeting and negotiates capabilities.
func (m *SocketMonitor) Connect() error {
	m.runMu.Lock()
	defer m.runMu.Unlock()
	m.mu.Lock()
	connected := m.sess != nil && !m.sess.ended()
	m.mu.Unlock()
	if connected {
		return fmt.Errorf("connect monitor %s: %w", m.addr, ErrAlreadyConnected)
	}

	conn, err := net.DialTimeout(m.network, m.addr, m.timeout)
	if err != nil {
		return fmt.Errorf("connect monitor %s: %w", m.addr, err)
	}
	dec := json.NewDecoder(conn)
	conn.SetReadDeadline(time.Now().Add(m.timeout))
	var greeting struct {
		QMP json.RawMessage `json:"QMP"`
	}
	if err := dec.Decode(&greeting); err != nil {
		conn.Close()
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			err = fmt.Errorf("%w after %v waiting for greeting", ErrTimeout, m.timeout)
		}
		return fmt.Errorf("read greeting: %w", err)
	}
	if len(greeting.QMP) == 0 {
		conn.Close()
		return errors.New("read greeting: no \"QMP\" member, not a QMP server")
	}
	conn.SetReadDeadline(time.Time{})

	s := &session{
		conn: conn,
		done: make(chan struct{}),
		subs: make(map[*subscriber]struct{}),
	}
	go m.readLoop(s, dec)
	if _, err := m.run(s, []byte(`{"execute":"qmp_capabilities"}`)); err != nil {
		s.close(ErrDisconnected)
		return fmt.Errorf("negotiate capabilities: %w", err)
	}
	m.mu.Lock()
	m.sess = s
	m.mu.Unlock()
	return nil
}

// Disconnect closes the connection. A waiting Run returns ErrDisconnected and
// every events channel is closed.
func (m *SocketMonitor) Disconnect() error {
	m.mu.Lock()
	s := m.sess
	m.sess = nil
	m.mu.Unlock()
	if s == nil {
		return fmt.Errorf("disconnect monitor %s: %w", m.addr, ErrNotConnected)
	}
	s.close(ErrDisconnected)
	return nil
}

func (m *SocketMonitor) session() (*session, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.sess == nil {
		return nil, ErrNotConnected
	}
	return m.sess, nil
}

// Run sends command (a JSON object with "execute" and optional "arguments")
// and returns the raw JSON value of the reply's "return" member. Any "id" in
// command is replaced by the monitor's own. It waits at most the monitor's
// timeout.
func (m *SocketMonitor) Run(command []byte) ([]byte, error) {
	m.runMu.Lock()
	defer m.runMu.Unlock()
	s, err := m.session()
	if err != nil {
		return nil, fmt.Errorf("run command: %w", err)
	}
	return m.run(s, command)
}

// run sends one command on s and waits for its reply; runMu is held.
func (m *SocketMonitor) run(s *session, command []byte) ([]byte, error) {
	var obj map[string]json.RawMessage
	if err := json.Unmarshal(command, &obj); err != nil {
		return nil, fmt.Errorf("parse command: %w", err)
	}
	var name string
	if err := json.Unmarshal(obj["execute"], &name); err != nil || name == "" {
		return nil, errors.New("parse command: no \"execute\" string")
	}
	id := "ftgw-" + strconv.FormatUint(m.nextID.Add(1), 10)
	obj["id"] = json.RawMessage(strconv.Quote(id))
	msg, err := json.Marshal(obj)
	if err != nil {
		return nil, fmt.Errorf("encode command %s: %w", name, err)
	}
	msg = append(msg, '\n')

	if s.ended() {
		return nil, fmt.Errorf("run command %s: %w", name, s.closeErr)
	}
	ch := make(chan reply, 1)
	s.mu.Lock()
	s.pendingID, s.pending = id, ch
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		s.pendingID, s.pending = "", nil
		s.mu.Unlock()
	}()

	timer := time.NewTimer(m.timeout)
	defer timer.Stop()
	s.conn.SetWriteDeadline(time.Now().Add(m.timeout))
	if _, err := s.conn.Write(msg); err != nil {
		select {
		case <-s.done:
			err = s.closeErr
		default:
		}
		return nil, fmt.Errorf("send command %s: %w", name, err)
	}
	select {
	case r := <-ch:
		if r.err != nil {
			return nil, fmt.Errorf("run command %s: %w", name, r.err)
		}
		return r.ret, nil
	case <-s.done:
		// QEMU may answer and hang up at once (quit, or dying): both
		// are ready, and select picks either. The answer counts.
		select {
		case r := <-ch:
			if r.err != nil {
				return nil, fmt.Errorf("run command %s: %w", name, r.err)
			}
			return r.ret, nil
		default:
		}
		return nil, fmt.Errorf("run command %s: %w", name, s.closeErr)
	case <-timer.C:
		return nil, fmt.Errorf("run command %s: %w after %v waiting for reply", name, ErrTimeout, m.timeout)
	}
}

// Events returns a channel of the events QEMU sends from now on. It is closed
// when ctx ends or the connection ends. The channel holds EventBuffer events;
// events that do not fit are dropped and counted in DroppedEvents.
func (m *SocketMonitor) Events(ctx context.Context) (<-chan Event, error) {
	s, err := m.session()
	if err != nil {
		return nil, fmt.Errorf("subscribe events: %w", err)
	}
	sub := &subscriber{ch: make(chan Event, EventBuffer)}
	s.mu.Lock()
	s.subs[sub] = struct{}{}
	s.mu.Unlock()
	go func() {
		select {
		case <-ctx.Done():
		case <-s.done:
		}
		s.mu.Lock()
		delete(s.subs, sub)
		close(sub.ch)
		s.mu.Unlock()
	}()
	return sub.ch, nil
}

// readLoop decodes every message on s until the connection ends.
func (m *SocketMonitor) readLoop(s *session, dec *json.Decoder) {
	for {
		var raw json.RawMessage
		if err := dec.Decode(&raw); err != nil {
			s.close(fmt.Errorf("read reply: %w", err))
			return
		}
		var msg map[string]json.RawMessage
		if json.Unmarshal(raw, &msg) != nil {
			continue // not an object: nothing QMP sends, skip it
		}
		switch {
		case msg["event"] != nil:
			var ev Event
			if err := json.Unmarshal(raw, &ev); err != nil {
				continue // malformed event: skip it, keep the connection
			}
			s.mu.Lock()
			for sub := range s.subs {
				select {
				case sub.ch <- ev:
				default:
					m.dropped.Add(1)
				}
			}
			s.mu.Unlock()
		case msg["return"] != nil || msg["error"] != nil:
			var r reply
			if raw := msg["error"]; raw != nil {
				r.err = new(Error)
				if err := json.Unmarshal(raw, r.err); err != nil {
					r.err = &Error{Class: "MalformedError", Desc: string(raw)}
				}
			} else {
				r.ret = msg["return"]
			}
			var id string
			if raw := msg["id"]; raw != nil {
				if json.Unmarshal(raw, &id) != nil {
					id = "?" // not one of ours
				}
			}
			s.mu.Lock()
			// A reply without id is taken as the answer to the outstanding
			// command (only one is ever outstanding); one with another id is
			// the late answer to a command that timed out.
			if s.pending != nil && (id == "" || id == s.pendingID) {
				select {
				case s.pending <- r:
				default:
				}
			}
			s.mu.Unlock()
		}
	}
}
