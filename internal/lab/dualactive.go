package lab

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"slices"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ftgw/ftgw/internal/netnsutil"
)

// The dual-active check watches the LAN from its bridge: every frame the VM
// sends reaches the bridge through the bridge port of the host that
// released it (port "a" for ftgw-a, "b" for ftgw-b), whatever that host
// believes. A standby's copy of the VM never reaches the wire, so frames
// of the VM arriving from both ports within one instant mean two hosts
// served the VM at once.

// DualActiveWindow is the instant of the dual-active check: two releases
// from different hosts less than this apart count as simultaneous. A
// failover or a switchover passes the VM on through the arbiter, whose
// claim alone takes milliseconds, so a clean hand-over never looks like
// this.
const DualActiveWindow = time.Millisecond

// Release is one frame of the VM seen on the LAN, and the host it came
// from.
type Release struct {
	At   time.Time
	Host string
}

// DualActiveInstant is a stretch of time in which both hosts released
// frames of the VM, each less than the window from one of the other's.
type DualActiveInstant struct {
	From, To time.Time
	Frames   map[string]int // frames of each host in the stretch
}

func (d DualActiveInstant) String() string {
	var hosts []string
	for h, n := range d.Frames {
		hosts = append(hosts, fmt.Sprintf("%s %d", h, n))
	}
	slices.Sort(hosts)
	return fmt.Sprintf("%s +%s: frames %v", d.From.Format("15:04:05.000000"), d.To.Sub(d.From), hosts)
}

// DualActiveInstants finds the instants in which two hosts released: each
// pair of releases from different hosts less than window apart, merged
// with any pair that overlaps it or comes within the window of it.
func DualActiveInstants(releases []Release, window time.Duration) []DualActiveInstant {
	sorted := slices.SortedStableFunc(slices.Values(releases), func(a, b Release) int { return a.At.Compare(b.At) })
	var instants []DualActiveInstant
	last := map[string]time.Time{} // each host's latest release so far
	for _, r := range sorted {
		for host, at := range last {
			if host == r.Host || r.At.Sub(at) >= window {
				continue
			}
			if n := len(instants); n > 0 && at.Sub(instants[n-1].To) < window {
				instants[n-1].To = r.At
			} else {
				instants = append(instants, DualActiveInstant{From: at, To: r.At})
			}
		}
		last[r.Host] = r.At
	}
	// Count each instant's frames in a second pass, now that the
	// stretches are known.
	i := 0
	for _, r := range sorted {
		for i < len(instants) && r.At.After(instants[i].To) {
			i++
		}
		if i == len(instants) {
			break
		}
		if !r.At.Before(instants[i].From) {
			if instants[i].Frames == nil {
				instants[i].Frames = map[string]int{}
			}
			instants[i].Frames[r.Host]++
		}
	}
	return instants
}

// releaseHost attributes a frame the LAN's packet socket saw: a frame of
// the VM (its source MAC) coming into the bridge (not one it sends out)
// through a host's port is that host's release.
func releaseHost(ports map[int]string, ifindex int, pktType uint8, frame []byte) (string, bool) {
	if pktType == unix.PACKET_OUTGOING || len(frame) < 12 || !bytes.Equal(frame[6:12], VMMAC) {
		return "", false
	}
	host, ok := ports[ifindex]
	return host, ok
}

// maxReleases bounds a capture's memory: a schedule's load answers far
// fewer frames.
const maxReleases = 4 << 20

// Capture records the VM's frames on the lab's bridge.
type Capture struct {
	fd    int
	ports map[int]string
	stop  chan struct{}
	done  chan struct{}

	mu       sync.Mutex
	releases []Release
	err      error
}

// CaptureStats is what the capture saw and what the kernel dropped before
// it could (a dual-active check over a capture with drops is incomplete).
type CaptureStats struct {
	Frames  int
	Dropped uint32
}

// StartCapture opens a packet socket in the LAN's namespace that sees
// every frame entering the bridge from the hosts' ports.
func StartCapture() (_ *Capture, err error) {
	c := &Capture{fd: -1, ports: map[int]string{}, stop: make(chan struct{}), done: make(chan struct{})}
	err = netnsutil.Do(NSLAN, func() error {
		for _, host := range Hosts[:2] {
			iface, err := net.InterfaceByName(host.Port)
			if err != nil {
				return err
			}
			c.ports[iface.Index] = host.NS
		}
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, int(htons(unix.ETH_P_ALL)))
		if err != nil {
			return fmt.Errorf("packet socket: %w", err)
		}
		c.fd = fd
		return nil
	})
	if err != nil {
		if c.fd >= 0 {
			unix.Close(c.fd)
		}
		return nil, fmt.Errorf("start capture: %w", err)
	}
	defer func() {
		if err != nil {
			unix.Close(c.fd)
		}
	}()
	for _, opt := range []struct {
		level, name, value int
	}{
		{unix.SOL_SOCKET, unix.SO_TIMESTAMPNS, 1},
		{unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 16 << 20},
	} {
		if err := unix.SetsockoptInt(c.fd, opt.level, opt.name, opt.value); err != nil {
			return nil, fmt.Errorf("start capture: setsockopt %d: %w", opt.name, err)
		}
	}
	// The reader checks for Stop between frames.
	tv := unix.NsecToTimeval((50 * time.Millisecond).Nanoseconds())
	if err := unix.SetsockoptTimeval(c.fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		return nil, fmt.Errorf("start capture: %w", err)
	}
	// Drops counted from here on.
	if _, err := unix.GetsockoptTpacketStats(c.fd, unix.SOL_PACKET, unix.PACKET_STATISTICS); err != nil {
		return nil, fmt.Errorf("start capture: %w", err)
	}
	go c.read()
	return c, nil
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

func (c *Capture) read() {
	defer close(c.done)
	buf := make([]byte, 64) // the Ethernet header is all the check needs
	oob := make([]byte, unix.CmsgSpace(16))
	for {
		select {
		case <-c.stop:
			return
		default:
		}
		n, oobn, _, from, err := unix.Recvmsg(c.fd, buf, oob, unix.MSG_TRUNC)
		if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			c.mu.Lock()
			c.err = fmt.Errorf("capture: %w", err)
			c.mu.Unlock()
			return
		}
		ll, ok := from.(*unix.SockaddrLinklayer)
		if !ok {
			continue
		}
		host, ok := releaseHost(c.ports, ll.Ifindex, ll.Pkttype, buf[:min(n, len(buf))])
		if !ok {
			continue
		}
		at := time.Now()
		if ts, ok := kernelTimestamp(oob[:oobn]); ok {
			at = ts
		}
		c.mu.Lock()
		if len(c.releases) < maxReleases {
			c.releases = append(c.releases, Release{At: at, Host: host})
		}
		c.mu.Unlock()
	}
}

// kernelTimestamp is the SO_TIMESTAMPNS receive time: when the frame came
// in, not when this reader got to it.
func kernelTimestamp(oob []byte) (time.Time, bool) {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return time.Time{}, false
	}
	for _, m := range msgs {
		if m.Header.Level == unix.SOL_SOCKET && m.Header.Type == unix.SO_TIMESTAMPNS && len(m.Data) >= 16 {
			sec, nsec := binary.NativeEndian.Uint64(m.Data[0:8]), binary.NativeEndian.Uint64(m.Data[8:16])
			return time.Unix(int64(sec), int64(nsec)), true
		}
	}
	return time.Time{}, false
}

// Stop ends the capture and returns the releases it saw.
func (c *Capture) Stop() ([]Release, CaptureStats, error) {
	close(c.stop)
	<-c.done
	stats, serr := unix.GetsockoptTpacketStats(c.fd, unix.SOL_PACKET, unix.PACKET_STATISTICS)
	unix.Close(c.fd)
	c.mu.Lock()
	defer c.mu.Unlock()
	var st CaptureStats
	st.Frames = len(c.releases)
	if serr == nil {
		st.Dropped = stats.Drops
	}
	return c.releases, st, errors.Join(c.err, serr)
}
