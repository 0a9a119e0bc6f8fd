package guest

import (
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// DefaultTimeout bounds a Client request when Dial is given no timeout.
const DefaultTimeout = time.Second

// Client speaks the guest's UDP key-value protocol, one request at a time.
//
// A reply can come late (after its request timed out) or twice (after a
// failover the new primary's VM may send again what the old one sent), so
// it could be taken for the next request's. The Client discards queued
// datagrams before each request, and Put and Get read on past any reply
// that does not name their key (Store.Apply). It never retries: a PUT is not
// idempotent (its reply counts PUTs).
//
// Requests must fit one unfragmented datagram: the guest ignores fragments.
type Client struct {
	mu      sync.Mutex
	conn    *net.UDPConn
	timeout time.Duration
	buf     []byte
}

// Dial returns a Client for the guest at addr ("host:port"). timeout bounds
// each request; zero means DefaultTimeout.
func Dial(addr string, timeout time.Duration) (*Client, error) {
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	ua, err := net.ResolveUDPAddr("udp", addr)
	if err != nil {
		return nil, fmt.Errorf("resolve guest address: %w", err)
	}
	conn, err := net.DialUDP("udp", nil, ua)
	if err != nil {
		return nil, fmt.Errorf("dial guest: %w", err)
	}
	return &Client{conn: conn, timeout: timeout, buf: make([]byte, 1<<16)}, nil
}

// Close releases the socket.
func (c *Client) Close() error { return c.conn.Close() }

// Do sends req as one datagram and returns the first reply, without a
// trailing newline.
func (c *Client) Do(req string) (string, error) {
	return c.exchange(req, func(string) bool { return true })
}

// exchange sends req and returns the first reply that answers it, reading
// on past the others until the timeout.
func (c *Client) exchange(req string, answers func(reply string) bool) (string, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.drain(); err != nil {
		return "", fmt.Errorf("drain stale replies: %w", err)
	}
	if err := c.conn.SetDeadline(time.Now().Add(c.timeout)); err != nil {
		return "", fmt.Errorf("set deadline: %w", err)
	}
	if _, err := c.conn.Write([]byte(req)); err != nil {
		return "", fmt.Errorf("send request: %w", err)
	}
	for {
		n, err := c.conn.Read(c.buf)
		if err != nil {
			return "", fmt.Errorf("receive reply: %w", err)
		}
		if reply := strings.TrimSuffix(string(c.buf[:n]), "\n"); answers(reply) {
			return reply, nil
		}
	}
}

// drain discards datagrams (late replies) and socket errors (ICMP
// unreachables for earlier requests) already queued on the socket.
func (c *Client) drain() error {
	// A passed deadline would make RawConn.Read fail before calling us.
	if err := c.conn.SetReadDeadline(time.Time{}); err != nil {
		return err
	}
	rc, err := c.conn.SyscallConn()
	if err != nil {
		return err
	}
	return rc.Read(func(fd uintptr) bool {
		for range 1024 { // bounded, in case a flood keeps the queue full
			_, _, err := unix.Recvfrom(int(fd), c.buf, unix.MSG_DONTWAIT)
			if errors.Is(err, unix.EAGAIN) {
				break
			}
		}
		return true // never wait for more
	})
}

// Put stores value under key and returns the guest's count of PUTs applied,
// this one included.
func (c *Client) Put(key, value string) (uint64, error) {
	if key == "" || strings.ContainsAny(key, " \r\n") {
		return 0, fmt.Errorf("put: key %q is empty or has spaces or newlines", key)
	}
	if strings.ContainsAny(value, "\r\n") {
		// The guest trims a trailing newline, so it would store another value.
		return 0, fmt.Errorf("put %q: value has a newline", key)
	}
	count := func(reply string) (string, bool) {
		rest, ok := strings.CutPrefix(reply, "OK ")
		if !ok {
			return "", false
		}
		return strings.CutSuffix(rest, " "+key)
	}
	resp, err := c.exchange("PUT "+key+" "+value, func(reply string) bool {
		_, ok := count(reply)
		return ok || strings.HasPrefix(reply, "ERR")
	})
	if err != nil {
		return 0, fmt.Errorf("put %q: %w", key, err)
	}
	if s, ok := count(resp); ok {
		n, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("put %q: parse reply %q: %w", key, resp, err)
		}
		return n, nil
	}
	return 0, replyError("put", key, resp)
}

// Get returns the value stored under key, and whether there is one.
func (c *Client) Get(key string) (value string, found bool, err error) {
	if key == "" || strings.ContainsAny(key, " \r\n") {
		return "", false, fmt.Errorf("get: key %q is empty or has spaces or newlines", key)
	}
	valuePrefix := "VALUE " + key + " "
	resp, err := c.exchange("GET "+key, func(reply string) bool {
		return reply == "NOTFOUND "+key || strings.HasPrefix(reply, valuePrefix) || strings.HasPrefix(reply, "ERR")
	})
	if err != nil {
		return "", false, fmt.Errorf("get %q: %w", key, err)
	}
	if v, ok := strings.CutPrefix(resp, valuePrefix); ok {
		return v, true, nil
	}
	if resp == "NOTFOUND "+key {
		return "", false, nil
	}
	return "", false, replyError("get", key, resp)
}

func replyError(op, key, resp string) error {
	if strings.HasPrefix(resp, "ERR") {
		return fmt.Errorf("%s %q: guest: %s", op, key, resp)
	}
	return fmt.Errorf("%s %q: unexpected reply %q", op, key, resp)
}
