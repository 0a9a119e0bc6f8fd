package datapath

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/cilium/ebpf/ringbuf"
)

// LogEntry is one input frame as the serializer logged it.
type LogEntry struct {
	Position uint64
	// LoggedNs is when it was logged, on the MonotonicNs clock.
	LoggedNs uint64
	// Frame is valid only during the ship call.
	Frame []byte
}

// ReadLog hands every record of the log ring to ship, in position order,
// until ctx is done or ship or flush fails. It calls flush whenever it has
// emptied the ring, so that ship can batch a burst and flush send it.
func (d *Datapath) ReadLog(ctx context.Context, ship func(LogEntry) error, flush func() error) error {
	r, err := ringbuf.NewReader(d.ring)
	if err != nil {
		return fmt.Errorf("open log ring: %w", err)
	}
	defer r.Close()

	var rec ringbuf.Record
	var hdr LogRecord
	hdrLen := binary.Size(hdr)
	for ctx.Err() == nil {
		// The deadline only bounds how late we notice ctx; records wake
		// the reader at once.
		r.SetDeadline(time.Now().Add(100 * time.Millisecond))
		if err := r.ReadInto(&rec); err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				continue
			}
			return fmt.Errorf("read log ring: %w", err)
		}
		if _, err := binary.Decode(rec.RawSample, binary.NativeEndian, &hdr); err != nil {
			return fmt.Errorf("decode log record: %w", err)
		}
		if int(hdr.Len) > len(rec.RawSample)-hdrLen {
			return fmt.Errorf("log record %d: length %d beyond its slot", hdr.Position, hdr.Len)
		}
		entry := LogEntry{Position: hdr.Position, LoggedNs: hdr.LoggedNs, Frame: rec.RawSample[hdrLen : hdrLen+int(hdr.Len)]}
		if err := ship(entry); err != nil {
			return err
		}
		if r.AvailableBytes() == 0 {
			if err := flush(); err != nil {
				return err
			}
		}
	}
	return nil
}
