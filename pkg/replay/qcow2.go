package replay

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
)

// Reading and patching the VM state of a qcow2 internal snapshot (what
// savevm writes), from the qcow2 specification (QEMU's
// docs/interop/qcow2.txt). Only what a snapshot in the image Start creates
// needs: no backing file, no encryption, no extended L2 entries, no
// compressed clusters in the VM state.
//
// A snapshot's VM state is stored like guest data, at the virtual offset
// just past the disk (the disk's size rounded up to what one L2 table
// maps), through the snapshot's own L1 table.

const (
	qcow2Magic          = 0x514649fb // "QFI\xfb"
	qcow2ExtendedL2     = 1 << 4     // incompatible feature bit
	qcow2OffsetMask     = 0x00fffffffffffe00
	qcow2Compressed     = 1 << 62
	qcow2ZeroCluster    = 1 << 0
	qcow2MaxClusterBits = 21
)

// qcow2Image is an open qcow2 file.
type qcow2Image struct {
	f           *os.File
	clusterBits uint
	l2Bits      uint // log2 of the entries in an L2 table
	size        uint64
	nSnapshots  uint32
	snapshots   int64 // file offset of the snapshot table
}

func openQcow2(f *os.File) (*qcow2Image, error) {
	var h [104]byte
	if _, err := f.ReadAt(h[:], 0); err != nil {
		return nil, fmt.Errorf("qcow2 header: %w", err)
	}
	be := binary.BigEndian
	if be.Uint32(h[0:]) != qcow2Magic {
		return nil, errors.New("not a qcow2 image")
	}
	version := be.Uint32(h[4:])
	if version != 2 && version != 3 {
		return nil, fmt.Errorf("qcow2 version %d", version)
	}
	if be.Uint64(h[8:]) != 0 {
		return nil, errors.New("qcow2 image with a backing file")
	}
	if be.Uint32(h[32:]) != 0 {
		return nil, errors.New("encrypted qcow2 image")
	}
	q := &qcow2Image{
		f:           f,
		clusterBits: uint(be.Uint32(h[20:])),
		size:        be.Uint64(h[24:]),
		nSnapshots:  be.Uint32(h[60:]),
		snapshots:   int64(be.Uint64(h[64:])),
	}
	if q.clusterBits < 9 || q.clusterBits > qcow2MaxClusterBits {
		return nil, fmt.Errorf("qcow2 cluster bits %d", q.clusterBits)
	}
	if version == 3 && be.Uint64(h[72:])&qcow2ExtendedL2 != 0 {
		return nil, errors.New("qcow2 image with extended L2 entries")
	}
	q.l2Bits = q.clusterBits - 3
	return q, nil
}

// vmState is where one snapshot's VM state lies.
type vmState struct {
	l1   []uint64
	size int64
	base uint64 // virtual offset of its first byte
}

// snapshot finds the VM state saved under tag.
func (q *qcow2Image) snapshot(tag string) (*vmState, error) {
	be := binary.BigEndian
	off := q.snapshots
	for range q.nSnapshots {
		var e [40]byte
		if _, err := q.f.ReadAt(e[:], off); err != nil {
			return nil, fmt.Errorf("qcow2 snapshot table: %w", err)
		}
		idLen, nameLen, extraLen := int64(be.Uint16(e[12:])), int64(be.Uint16(e[14:])), int64(be.Uint32(e[36:]))
		rest := make([]byte, extraLen+idLen+nameLen)
		if _, err := q.f.ReadAt(rest, off+40); err != nil {
			return nil, fmt.Errorf("qcow2 snapshot table: %w", err)
		}
		name := string(rest[extraLen+idLen:])
		entryLen := 40 + int64(len(rest))
		off += (entryLen + 7) &^ 7
		if name != tag {
			continue
		}
		s := &vmState{size: int64(be.Uint32(e[32:]))}
		if extraLen >= 8 {
			s.size = int64(be.Uint64(rest[0:]))
		}
		l1Off, l1Len := int64(be.Uint64(e[0:])), int64(be.Uint32(e[8:]))
		raw := make([]byte, 8*l1Len)
		if _, err := q.f.ReadAt(raw, l1Off); err != nil {
			return nil, fmt.Errorf("qcow2 snapshot %q L1 table: %w", tag, err)
		}
		s.l1 = make([]uint64, l1Len)
		for i := range s.l1 {
			s.l1[i] = be.Uint64(raw[8*i:])
		}
		// qcow2_vm_state_offset: the L1 index after the disk's last one.
		shift := q.clusterBits + q.l2Bits
		s.base = (q.size + 1<<shift - 1) >> shift << shift
		return s, nil
	}
	return nil, fmt.Errorf("qcow2: no snapshot %q", tag)
}

// hostOffset maps the VM state's byte at off to the file, or returns -1
// for a cluster that reads as zeros.
func (q *qcow2Image) hostOffset(s *vmState, off int64) (int64, error) {
	virt := s.base + uint64(off)
	l1i := virt >> (q.clusterBits + q.l2Bits)
	if l1i >= uint64(len(s.l1)) {
		return -1, nil
	}
	l2Table := int64(s.l1[l1i] & qcow2OffsetMask)
	if l2Table == 0 {
		return -1, nil
	}
	l2i := (virt >> q.clusterBits) & (1<<q.l2Bits - 1)
	var e [8]byte
	if _, err := q.f.ReadAt(e[:], l2Table+int64(8*l2i)); err != nil {
		return 0, fmt.Errorf("qcow2 L2 table: %w", err)
	}
	entry := binary.BigEndian.Uint64(e[:])
	if entry&qcow2Compressed != 0 {
		return 0, errors.New("qcow2: compressed cluster in the VM state")
	}
	cluster := int64(entry & qcow2OffsetMask)
	if cluster == 0 || entry&qcow2ZeroCluster != 0 {
		return -1, nil
	}
	return cluster + int64(virt&(1<<q.clusterBits-1)), nil
}

// readVMState reads the VM state from off into p (not past its end).
func (q *qcow2Image) readVMState(s *vmState, p []byte, off int64) (int, error) {
	p = p[:max(0, min(int64(len(p)), s.size-off))]
	clusterSize := int64(1) << q.clusterBits
	for n := 0; n < len(p); {
		at := off + int64(n)
		// s.base is cluster-aligned: clusters start where off is aligned.
		chunk := p[n:min(int64(len(p)), int64(n)+clusterSize-at&(clusterSize-1))]
		host, err := q.hostOffset(s, at)
		if err != nil {
			return n, err
		}
		if host < 0 {
			clear(chunk)
		} else if _, err := q.f.ReadAt(chunk, host); err != nil && !errors.Is(err, io.EOF) {
			return n, err
		}
		n += len(chunk)
	}
	return len(p), nil
}

// findSection finds the full section idstr (instance 0) in the VM state
// stream: the offset of its first field and its version. Device sections
// follow the RAM, so the last match is the section (RAM that happened to
// hold the same bytes comes before it).
func (q *qcow2Image) findSection(s *vmState, idstr string) (fields int64, version uint32, err error) {
	// QEMU_VM_SECTION_FULL, section id (any), idstr length and idstr,
	// instance id 0, then the version.
	pattern := append(append([]byte{byte(len(idstr))}, idstr...), 0, 0, 0, 0)
	const chunk = 1 << 20
	buf := make([]byte, chunk+len(pattern)+4)
	found := int64(-1)
	for off := int64(0); off < s.size; off += chunk {
		n, err := q.readVMState(s, buf, off)
		if err != nil {
			return 0, 0, err
		}
		b := buf[:n]
		for i := 0; ; {
			j := bytes.Index(b[i:], pattern)
			if j < 0 {
				break
			}
			at := i + j
			if at >= 5 && b[at-5] == 0x04 && at+len(pattern)+4 <= n && int64(at) < chunk {
				found = off + int64(at)
				version = binary.BigEndian.Uint32(b[at+len(pattern):])
			}
			i = at + 1
		}
	}
	if found < 0 {
		return 0, 0, fmt.Errorf("no %q section in the VM state", idstr)
	}
	return found + int64(len(pattern)) + 4, version, nil
}
