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

// BLAST makes the guest transmit a burst of raw frames as fast as it can
// write them, for measuring the gateway's output paths. The frames are
// outside the key-value protocol (EtherType 0x88b5, local experimental), so
// they leave the guest's state, and its determinism, untouched.
//
//	BLAST <count> <dst-mac> <size>  →  OK <elapsed-ns> <write-errors>

const (
	blastEtherType = 0x88b5
	maxBlastCount  = 10_000_000
	maxBlastSize   = 1514
	minBlastSize   = 60
)

type blastReq struct {
	count, size int
	dst         net.HardwareAddr
	reply       chan string
}

func parseBlast(line string) (blastReq, error) {
	f := strings.Fields(line)
	if len(f) != 4 {
		return blastReq{}, errors.New("usage: BLAST <count> <dst-mac> <size>")
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
	return blastReq{count: count, size: size, dst: dst, reply: make(chan string, 1)}, nil
}

// BlastCommand formats a BLAST request.
func BlastCommand(count int, dst net.HardwareAddr, size int) string {
	return fmt.Sprintf("BLAST %d %s %d", count, dst, size)
}

func blast(t *tap.Tap, src net.HardwareAddr, req blastReq) string {
	frame := make([]byte, req.size)
	copy(frame[0:6], req.dst)
	copy(frame[6:12], src)
	frame[12], frame[13] = blastEtherType>>8, blastEtherType&0xff
	var failed int
	start := time.Now()
	for range req.count {
		if _, err := t.Write(frame); err != nil {
			failed++
		}
	}
	return fmt.Sprintf("OK %d %d", time.Since(start).Nanoseconds(), failed)
}
