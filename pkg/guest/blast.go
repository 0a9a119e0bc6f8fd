package guest

import (
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ftgw/ftgw/internal/tap"
)

// BLAST makes the guest transmit raw frames, for measuring the gateway's
// output paths: as fast as it can write them, or at an offered rate. The
// frames are outside the key-value protocol (EtherType 0x88b5, local
// experimental), so they leave the guest's state, and its determinism,
// untouched.
//
//	BLAST <count> <dst-mac> <size> [<frames-per-second>]  →  OK <elapsed-ns> <write-errors> <waited-ns>
//
// At an offered rate the guest writes at full speed until it is a
// millisecond ahead of the schedule, then sleeps: bursts of up to a
// millisecond's worth of frames, with the right mean. (Spacing each frame
// would take a spinning core, of the two the whole lab shares.)
//
// With Backpressure (the daemon's guest has it), the guest also waits while
// the gateway's hold queue is nearly full, as a NIC's driver stops its
// transmit queue when the ring is full; waited-ns is how long it waited.
// Each write is one write(2) on the tap's descriptor, not through os.File:
// at a million frames a second its locking and poller bookkeeping are a
// tenth of the generator's time.

const (
	blastEtherType = 0x88b5
	maxBlastCount  = 10_000_000
	maxBlastSize   = 1514
	minBlastSize   = 60
	// blastAhead is how far ahead of an offered rate's schedule the guest
	// may run before it sleeps.
	blastAhead = time.Millisecond
	// blastMaxWait bounds one wait for the hold queue to drain: a queue
	// that does not drain (no ack, no lease) gets the frame anyway, and
	// drops it as hold_full, counted.
	blastMaxWait = time.Second
	// blastPoll is how often a waiting guest looks at the hold queue: a
	// fraction of the time the queue takes to drain from full to half.
	blastPoll = 50 * time.Microsecond
)

// Backpressure is the gateway's hold queue as the guest's NIC sees it.
type Backpressure struct {
	// Backlog is the number of the guest's frames in the hold queue.
	Backlog func() uint64
	// Capacity is the most it holds: guest_egress drops beyond it.
	Capacity uint64
}

// wait blocks while the hold queue is within a sixteenth of its capacity,
// until it has drained to half (fewer, longer waits than stopping at the
// edge), or for blastMaxWait, and returns how long it waited.
func (b *Backpressure) wait() time.Duration {
	if b == nil || b.Backlog == nil || b.Capacity == 0 || b.Backlog() < b.Capacity-b.Capacity/16 {
		return 0
	}
	start := time.Now()
	for b.Backlog() > b.Capacity/2 && time.Since(start) < blastMaxWait {
		time.Sleep(blastPoll)
	}
	return time.Since(start)
}

type blastReq struct {
	count, size int
	rate        float64 // frames per second; 0: as fast as it can
	dst         net.HardwareAddr
	reply       chan string
}

func parseBlast(line string) (blastReq, error) {
	f := strings.Fields(line)
	if len(f) != 4 && len(f) != 5 {
		return blastReq{}, errors.New("usage: BLAST <count> <dst-mac> <size> [<frames-per-second>]")
	}
	count, err := strconv.Atoi(f[1])
	if err != nil || count < 1 || count > maxBlastCount {
		return blastReq{}, fmt.Errorf("count %q: want 1 to %d", f[1], maxBlastCount)
	}
	dst, err := net.ParseMAC(f[2])
	if err != nil || len(dst) != 6 {
		return blastReq{}, fmt.Errorf("dst-mac %q: want a 6-byte MAC", f[2])
	}
	size, err := strconv.Atoi(f[3])
	if err != nil || size < minBlastSize || size > maxBlastSize {
		return blastReq{}, fmt.Errorf("size %q: want %d to %d", f[3], minBlastSize, maxBlastSize)
	}
	var rate float64
	if len(f) == 5 {
		rate, err = strconv.ParseFloat(f[4], 64)
		if err != nil || !(rate > 0 && rate <= 1e9) {
			return blastReq{}, fmt.Errorf("frames-per-second %q: want more than 0, up to 1e9", f[4])
		}
	}
	return blastReq{count: count, size: size, rate: rate, dst: dst, reply: make(chan string, 1)}, nil
}

// BlastCommand formats a BLAST request; a rate of 0 asks for full speed.
func BlastCommand(count int, dst net.HardwareAddr, size int, rate float64) string {
	if rate > 0 {
		return fmt.Sprintf("BLAST %d %s %d %.0f", count, dst, size, rate)
	}
	return fmt.Sprintf("BLAST %d %s %d", count, dst, size)
}

// BlastTap writes count frames of size bytes from src to dst on t as fast
// as it can, as BLAST does: how fast the guest can offer frames when the
// tap costs it least (the bench measures it on a tap that drops them).
func BlastTap(t *tap.Tap, src, dst net.HardwareAddr, count, size int) BlastResult {
	return blast(t, src, blastReq{count: count, size: size, dst: dst}, nil)
}

func blast(t *tap.Tap, src net.HardwareAddr, req blastReq, bp *Backpressure) BlastResult {
	frame := make([]byte, req.size)
	copy(frame[0:6], req.dst)
	copy(frame[6:12], src)
	frame[12], frame[13] = blastEtherType>>8, blastEtherType&0xff
	var res BlastResult
	sent := 0
	start := time.Now()
	write := func(fd uintptr) bool {
		for ; sent < req.count; sent++ {
			if req.rate > 0 {
				due := start.Add(time.Duration(float64(sent) / req.rate * float64(time.Second)))
				if ahead := time.Until(due); ahead >= blastAhead {
					time.Sleep(ahead)
				}
			}
			res.Waited += bp.wait()
			if _, err := unix.Write(int(fd), frame); err != nil {
				if err == unix.EAGAIN {
					return false // the poller calls again once the tap is writable
				}
				res.Failed++
			}
		}
		return true
	}
	rc, err := t.SyscallConn()
	if err == nil {
		err = rc.Write(write)
	}
	if err != nil {
		res.Failed += req.count - sent
	}
	res.Writes = time.Since(start)
	return res
}
