package lab

import (
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ftgw/ftgw/internal/netnsutil"
	"github.com/ftgw/ftgw/pkg/guest"
)

// AckedWrite is a PUT the client saw acknowledged.
type AckedWrite struct {
	Key, Value string
	Count      uint64 // the n of its OK <n> <key>
	At         time.Time
}

// Writer is a Jepsen-style load from the client namespace: unique keys, one
// PUT at a time, each with a short timeout and never retried (a PUT is not
// idempotent), recording every acknowledged one.
type Writer struct {
	stop    atomic.Bool
	done    chan struct{}
	mu      sync.Mutex
	acked   []AckedWrite
	failed  int
	timeout time.Duration
}

// StartWriter starts writing with prefix-numbered keys, at most maxWrites of
// them and for at most maxTime.
func StartWriter(prefix string, timeout time.Duration, maxWrites int, maxTime time.Duration) (*Writer, error) {
	c, err := clientDial(timeout)
	if err != nil {
		return nil, err
	}
	w := &Writer{done: make(chan struct{}), timeout: timeout}
	go func() {
		defer close(w.done)
		defer c.Close()
		deadline := time.Now().Add(maxTime)
		for i := 0; i < maxWrites && !w.stop.Load() && time.Now().Before(deadline); i++ {
			key, value := fmt.Sprintf("%s%d", prefix, i), fmt.Sprintf("v%d", i)
			n, err := c.Put(key, value)
			w.mu.Lock()
			if err != nil {
				w.failed++
			} else {
				w.acked = append(w.acked, AckedWrite{Key: key, Value: value, Count: n, At: time.Now()})
			}
			w.mu.Unlock()
		}
	}()
	return w, nil
}

// clientDial dials vm1, the lab's first VM, from the client namespace.
func clientDial(timeout time.Duration) (*guest.Client, error) { return DialVM(VMIP, timeout) }

// DialVM dials the key-value service of the lab's VM at addr from the
// client namespace.
func DialVM(addr netip.Addr, timeout time.Duration) (*guest.Client, error) {
	var c *guest.Client
	err := netnsutil.Do(NSClient, func() (err error) {
		c, err = guest.Dial(net.JoinHostPort(addr.String(), strconv.Itoa(KVPort)), timeout)
		return err
	})
	return c, err
}

// Acked is the number of acknowledged writes so far.
func (w *Writer) Acked() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.acked)
}

// WaitAcked waits until n writes are acknowledged, or fails after timeout.
func (w *Writer) WaitAcked(n int, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for w.Acked() < n {
		if time.Now().After(deadline) {
			return fmt.Errorf("%d writes acknowledged after %s, want %d", w.Acked(), timeout, n)
		}
		time.Sleep(5 * time.Millisecond)
	}
	return nil
}

// Stop ends the load and returns every acknowledged write, in order.
func (w *Writer) Stop() []AckedWrite {
	w.stop.Store(true)
	<-w.done
	return w.acked
}

// CheckResult is what the checker found.
type CheckResult struct {
	Acked     int
	Lost      []AckedWrite // acknowledged, but not readable with its value
	Backwards int          // acknowledgements whose PUT count went down
	// Gap is the longest the client went without an acknowledgement
	// after the fault.
	Gap time.Duration
}

// OK reports whether no acknowledged write was lost and the count never
// went backwards.
func (r CheckResult) OK() bool { return len(r.Lost) == 0 && r.Backwards == 0 }

func (r CheckResult) String() string {
	return fmt.Sprintf("%d acknowledged writes, %d lost, %d counts backwards, client gap %s",
		r.Acked, len(r.Lost), r.Backwards, r.Gap.Round(100*time.Microsecond))
}

// Check reads every acknowledged write back through the VM's address and
// checks the PUT count never went backwards; fault is when the fault hit.
func Check(acked []AckedWrite, fault time.Time) (CheckResult, error) {
	res := CheckResult{Acked: len(acked)}
	c, err := clientDial(time.Second)
	if err != nil {
		return res, err
	}
	defer c.Close()
	for _, w := range acked {
		v, found, err := c.Get(w.Key)
		if err != nil {
			return res, fmt.Errorf("read back %s: %w", w.Key, err)
		}
		if !found || v != w.Value {
			res.Lost = append(res.Lost, w)
		}
	}
	last := fault
	for i, w := range acked {
		if i > 0 && w.Count <= acked[i-1].Count {
			res.Backwards++
		}
		if w.At.After(fault) {
			res.Gap = max(res.Gap, w.At.Sub(last))
			last = w.At
		}
	}
	return res, nil
}
