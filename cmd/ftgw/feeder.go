package main

import (
	"errors"
	"fmt"
	"net"
	"time"

	"github.com/mdlayher/packet"
	"golang.org/x/sys/unix"
)

// guestFeeder gives the standby guest its input from the log: frames written
// on a packet socket bound to the tap come out of the tap's fd, where the VM
// engine reads them.
type guestFeeder struct {
	conn *packet.Conn
}

func newGuestFeeder(tap *net.Interface) (*guestFeeder, error) {
	// Protocol 0: this socket only sends; it must not take a copy of
	// every frame on the tap.
	conn, err := packet.Listen(tap, packet.Raw, 0, nil)
	if err != nil {
		return nil, fmt.Errorf("open feeder on %s: %w", tap.Name, err)
	}
	// The guest must see its input in log order. A qdisc may reorder
	// (pfifo_fast bands, fq_codel flows), so go to the device directly.
	raw, err := conn.SyscallConn()
	if err == nil {
		ctrlErr := raw.Control(func(fd uintptr) {
			err = unix.SetsockoptInt(int(fd), unix.SOL_PACKET, unix.PACKET_QDISC_BYPASS, 1)
		})
		err = errors.Join(err, ctrlErr)
	}
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("bypass qdisc on %s: %w", tap.Name, err)
	}
	return &guestFeeder{conn: conn}, nil
}

// errCopyCannotTake marks a log record this host's copy of the VM refuses
// for good (a frame its tap will never take, a replayer that failed): the
// copy no longer follows the log, and resending cannot help.
var errCopyCannotTake = errors.New("this copy of the VM cannot take the log")

// Feed delivers one frame. Without a qdisc a full tap queue refuses the
// frame instead of queueing it; a frame lost here would make this copy of the
// VM diverge, so it waits (bounded) for the guest to catch up. A guest
// still behind after that is an error to retry (the log channel resends);
// any other refusal is errCopyCannotTake.
func (f *guestFeeder) Feed(frame []byte) error {
	if len(frame) < 14 {
		return fmt.Errorf("feed guest: frame of %d bytes: %w", len(frame), errCopyCannotTake)
	}
	addr := &packet.Addr{HardwareAddr: net.HardwareAddr(frame[0:6])}
	var err error
	for wait := 50 * time.Microsecond; wait < time.Second; wait *= 2 {
		if _, err = f.conn.WriteTo(frame, addr); err == nil {
			return nil
		}
		if !guestBehind(err) {
			return fmt.Errorf("feed guest a frame of %d bytes: %w: %w", len(frame), errCopyCannotTake, err)
		}
		time.Sleep(wait)
	}
	return fmt.Errorf("feed guest: %w", err)
}

// guestBehind: the tap's queue is full, for now.
func guestBehind(err error) bool {
	return errors.Is(err, unix.ENOBUFS) || errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EBUSY)
}

func (f *guestFeeder) Close() error { return f.conn.Close() }
