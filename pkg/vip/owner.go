// Package vip owns the VM's floating identity (its IP and MAC) on a host: the
// BPF owner record that decides whether this host serves the VM, and the
// announcements that tell the LAN where the VM now is.
package vip

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"

	"github.com/cilium/ebpf"

	"github.com/ftgw/ftgw/pkg/datapath"
)

// Role of this host for the VM.
type Role = datapath.Role

const (
	RoleNone     = datapath.RoleNone
	RoleStandby  = datapath.RoleStandby
	RoleActive   = datapath.RoleActive
	RoleDraining = datapath.RoleDraining
)

// RoleName is the role's name as shown to users and in metrics.
func RoleName(r Role) string {
	switch r {
	case RoleNone:
		return "none"
	case RoleStandby:
		return "standby"
	case RoleActive:
		return "active"
	case RoleDraining:
		return "draining"
	}
	return fmt.Sprintf("role(%d)", uint32(r))
}

// Record is what every data-path program reads to treat the VM's frames.
type Record struct {
	Epoch uint64
	Role  Role
	IP    netip.Addr
	MAC   net.HardwareAddr
	// Passthrough turns output commit off: outputs leave at once.
	Passthrough bool
	// HoldAll sends every output through the hold queue (benchmarks).
	HoldAll bool
	// EngineLogs: the VM engine logs its own input, as QEMU's replay log
	// does, and writes the log head itself.
	EngineLogs bool
	// GuestPaced: the guest publishes how far it has taken its input, and
	// input is not logged too far ahead of it (datapath.OwnerGuestPaced).
	GuestPaced bool
}

func (r Record) encode() (datapath.OwnerRecord, error) {
	var out datapath.OwnerRecord
	if !r.IP.Is4() {
		return out, fmt.Errorf("vm ip %s: must be IPv4", r.IP)
	}
	if len(r.MAC) != 6 {
		return out, fmt.Errorf("vm mac %s: must be 6 bytes", r.MAC)
	}
	out.Epoch = r.Epoch
	out.Role = r.Role
	ip := r.IP.As4()
	// The program compares it with the raw bytes of the packet.
	out.VmIp = uint32(ip[0]) | uint32(ip[1])<<8 | uint32(ip[2])<<16 | uint32(ip[3])<<24
	copy(out.VmMac[:], r.MAC)
	if r.Passthrough {
		out.Flags |= datapath.OwnerPassthrough
	}
	if r.HoldAll {
		out.Flags |= datapath.OwnerHoldAll
	}
	if r.EngineLogs {
		out.Flags |= datapath.OwnerEngineLogs
	}
	if r.GuestPaced {
		out.Flags |= datapath.OwnerGuestPaced
	}
	return out, nil
}

// Owner publishes owner records. A record is never changed in place: an
// in-place map update is a copy that a program on another CPU can observe
// half done, seeing the new role with the old MAC. Each Publish builds a new
// one-entry inner map and swaps it into the outer map's slot, a single
// pointer exchange; programs see the old record or the new one, whole.
type Owner struct {
	dp    *datapath.Datapath
	inner *ebpf.MapSpec

	mu      sync.Mutex
	current Record
	routed  bool // the data path sends the frames of current's IP and MAC here
}

// NewOwner publishes the records of the VM in dp's slot of its host's
// outer ARRAY_OF_MAPS.
func NewOwner(dp *datapath.Datapath) (*Owner, error) {
	spec, err := datapath.Spec(datapath.DefaultConfig)
	if err != nil {
		return nil, err
	}
	inner := spec.Maps["owner"].InnerMap
	if inner == nil {
		return nil, errors.New("owner map spec has no inner map")
	}
	return &Owner{dp: dp, inner: inner.Copy()}, nil
}

// Publish makes r the record every program sees from now on.
func (o *Owner) Publish(r Record) error {
	value, err := r.encode()
	if err != nil {
		return fmt.Errorf("publish owner record: %w", err)
	}
	o.mu.Lock()
	defer o.mu.Unlock()

	// The index first, so the record is found the moment it is there. A VM
	// keeps its IP and MAC; the index changes only with them.
	if !o.routed || o.current.IP != r.IP || !bytes.Equal(o.current.MAC, r.MAC) {
		if err := o.dp.Route(r.IP, r.MAC); err != nil {
			return fmt.Errorf("publish owner record: %w", err)
		}
		o.routed = true
	}
	slot, err := ebpf.NewMap(o.inner)
	if err != nil {
		return fmt.Errorf("create owner record: %w", err)
	}
	// The outer map keeps its own reference; ours goes when we return.
	defer slot.Close()
	if err := slot.Put(uint32(0), value); err != nil {
		return fmt.Errorf("fill owner record: %w", err)
	}
	// The commit point: one map update swaps the whole record.
	if err := o.dp.OwnerMap().Put(o.dp.Slot(), slot); err != nil {
		return fmt.Errorf("swap owner record: %w", err)
	}
	o.current = r
	return nil
}

// Current is the record last published.
func (o *Owner) Current() Record {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.current
}
