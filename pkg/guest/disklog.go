package guest

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"slices"
)

// A DiskLog is an append-only log of records on a block device (or, in
// tests, a file), starting at offset 0. The real guest (cmd/ftgw-init)
// keeps its store's PUTs in one, so that they outlive the VM.
//
// Each record is
//
//	uint32 LE  payload length n, 1 ≤ n ≤ MaxRecordPayload
//	uint32 LE  CRC32C (Castagnoli) of the 4 length bytes and the payload
//	n bytes    payload
//
// and the next record starts right after it. The first record that does not
// check out (a zero length, a length past the device's end or over the
// maximum, a CRC that does not match) ends the log: an all-zero device is an
// empty log, and a record torn by a crash in the middle of its write is
// not part of it.
//
// Durability rests on one invariant: every byte past the log's end is zero.
// A fresh device has it; Append writes only at the end; and a crash can only
// leave a torn record, at most MaxRecordSize bytes from the end, which
// OpenDiskLog zeroes (and syncs) before anything is appended. Without that,
// a shorter record written over a torn one could leave the torn one's tail
// behind it, and that tail, client-chosen bytes, could pass for a record.
//
// A DiskLog trusts the device to return what was written; the CRC is there
// to find the end, not to detect a device's corruption.
type DiskLog struct {
	dev  Device
	size int64 // the device's size: the log never grows past it
	end  int64 // where the next record goes
	err  error // the write or sync that failed, if one has
}

// Device is what a DiskLog lives on: an *os.File of a block device or of a
// plain file.
type Device interface {
	io.ReaderAt
	io.WriterAt
	// Sync makes the writes before it durable (fsync: for a block device,
	// a cache flush of the disk).
	Sync() error
}

const (
	// MaxRecordPayload bounds a record's payload: a UDP datagram's (65507
	// bytes over IPv4) fits.
	MaxRecordPayload = 1 << 16

	recordHeaderSize = 8

	// MaxRecordSize bounds a whole record, header included, and so the
	// span a torn write can have left dirty past the log's end.
	MaxRecordSize = recordHeaderSize + MaxRecordPayload
)

var (
	// ErrLogFull is returned by Append when the record does not fit in
	// what is left of the device; nothing was written.
	ErrLogFull = errors.New("disk log full")
	// ErrRecordSize is returned by Append for an empty record or one over
	// MaxRecordPayload; nothing was written.
	ErrRecordSize = errors.New("disk log record size out of range")
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// OpenDiskLog reads the log on dev, which is size bytes long, and calls
// replay with each record's payload, in order; an error from replay stops
// the scan and is returned. It then zeroes what a crash may have left past
// the log's end (see DiskLog) and returns the log, ready to append to.
//
// The payload handed to replay is only valid during the call.
func OpenDiskLog(dev Device, size int64, replay func(payload []byte) error) (*DiskLog, error) {
	l := &DiskLog{dev: dev, size: size}
	var header [recordHeaderSize]byte
	payload := make([]byte, 0, 4096)
	for {
		n, ok, err := l.readHeader(header[:])
		if err != nil {
			return nil, err
		}
		if !ok {
			break
		}
		payload = slices.Grow(payload[:0], n)[:n]
		if _, err := dev.ReadAt(payload, l.end+recordHeaderSize); err != nil {
			return nil, fmt.Errorf("read disk log record at %d: %w", l.end, err)
		}
		if recordCRC(header[:4], payload) != binary.LittleEndian.Uint32(header[4:]) {
			break
		}
		if err := replay(payload); err != nil {
			return nil, fmt.Errorf("replay disk log record at %d: %w", l.end, err)
		}
		l.end += recordHeaderSize + int64(n)
	}
	if err := l.zeroTail(); err != nil {
		return nil, err
	}
	return l, nil
}

// readHeader reads the header at the log's end into header and returns the
// payload length it announces; ok is false when no record can start there.
func (l *DiskLog) readHeader(header []byte) (n int, ok bool, err error) {
	if l.end+recordHeaderSize > l.size {
		return 0, false, nil
	}
	if _, err := l.dev.ReadAt(header, l.end); err != nil {
		return 0, false, fmt.Errorf("read disk log header at %d: %w", l.end, err)
	}
	length := binary.LittleEndian.Uint32(header)
	if length == 0 || length > MaxRecordPayload || l.end+recordHeaderSize+int64(length) > l.size {
		return 0, false, nil
	}
	return int(length), true, nil
}

// zeroTail restores the invariant that every byte past the end is zero, in
// the only span a torn write can have touched. A clean device is only read,
// so that booting from one writes nothing.
func (l *DiskLog) zeroTail() error {
	span := min(int64(MaxRecordSize), l.size-l.end)
	tail := make([]byte, span)
	if _, err := l.dev.ReadAt(tail, l.end); err != nil {
		return fmt.Errorf("read disk log tail at %d: %w", l.end, err)
	}
	if allZero(tail) {
		return nil
	}
	clear(tail)
	if _, err := l.dev.WriteAt(tail, l.end); err != nil {
		return fmt.Errorf("zero disk log tail at %d: %w", l.end, err)
	}
	if err := l.dev.Sync(); err != nil {
		return fmt.Errorf("sync disk log: %w", err)
	}
	return nil
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// Append writes payload as one record at the log's end and syncs the
// device: when it returns nil, the record survives a crash.
//
// After a failed write or sync the device's contents are unknown (the
// record may be in part or whole on it, and a failed fsync can leave the
// kernel believing dirty pages clean), so every later Append fails too.
func (l *DiskLog) Append(payload []byte) error {
	if l.err != nil {
		return fmt.Errorf("disk log failed earlier: %w", l.err)
	}
	if len(payload) == 0 || len(payload) > MaxRecordPayload {
		return fmt.Errorf("%w: %d bytes", ErrRecordSize, len(payload))
	}
	if l.end+recordHeaderSize+int64(len(payload)) > l.size {
		return fmt.Errorf("%w: %d bytes of %d used, record of %d", ErrLogFull, l.end, l.size, recordHeaderSize+len(payload))
	}
	record := encodeRecord(payload)
	if _, err := l.dev.WriteAt(record, l.end); err != nil {
		l.err = fmt.Errorf("write disk log record at %d: %w", l.end, err)
		return l.err
	}
	if err := l.dev.Sync(); err != nil {
		l.err = fmt.Errorf("sync disk log: %w", err)
		return l.err
	}
	l.end += int64(len(record))
	return nil
}

// encodeRecord returns payload with its header: the bytes Append writes.
func encodeRecord(payload []byte) []byte {
	record := make([]byte, recordHeaderSize+len(payload))
	binary.LittleEndian.PutUint32(record, uint32(len(payload)))
	copy(record[recordHeaderSize:], payload)
	binary.LittleEndian.PutUint32(record[4:], recordCRC(record[:4], payload))
	return record
}

// recordCRC covers the length as well as the payload, so that a torn
// header that kept the old CRC but not the old length fails it.
func recordCRC(length, payload []byte) uint32 {
	return crc32.Update(crc32.Checksum(length, castagnoli), castagnoli, payload)
}

// End is the log's length in bytes: where the next record goes.
func (l *DiskLog) End() int64 { return l.end }
