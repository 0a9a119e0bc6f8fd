package guest

import (
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"time"

	"github.com/ftgw/ftgw/internal/tap"
)

// BLAST makes the guest transmit raw frames, for measuring the gateway's
// output paths: as fast as it can write them, or at an offered rate. The
// frames are outside the key-value protocol (EtherType 0x88b5, local
// experimental), so they leave the guest's state, and its determinism,
// untouched.
//
//	BLAST <count> <dst-mac> <size> [<frames-per-second>]  →  OK <elapsed-ns> <write-errors>
//
// At an offered rate the guest writes at full speed until it is a
// millisecond ahead of the schedule, then sleeps: bursts of up to a
// millisecond's worth of frames, with the right mean. (Spacing each frame
// would take a spinning core, of the two the whole lab shares.)

const (
	blastEtherType = 0x88b5
	maxBlastCount  = 10_000_000
	maxBlastSize   = 1514
	minBlastSize   = 60
	// blastAhead is how far ahead of an offered rate's schedule the guest
	// may run before it sleeps.
	blastAhead = time.Millisecond
)

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

func blast(t *tap.Tap, src net.HardwareAddr, req blastReq) string {
	frame := make([]byte, req.size)
	copy(frame[0:6], req.dst)
	copy(frame[6:12], src)
	frame[12], frame[13] = blastEtherType>>8, blastEtherType&0xff
	var failed int
	start := time.Now()
	for i := range req.count {
		if req.rate > 0 {
			due := start.Add(time.Duration(float64(i) / req.rate * float64(time.Second)))
			if ahead := time.Until(due); ahead >= blastAhead {
				time.Sleep(ahead)
			}
		}
		if _, err := t.Write(frame); err != nil {
			failed++
		}
	}
	return fmt.Sprintf("OK %d %d", time.Since(start).Nanoseconds(), failed)
}
