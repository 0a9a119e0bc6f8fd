// Package guest is a synthetic, deterministic VM used to exercise ftgw.
//
// A Guest answers ARP and ICMP echo for its address and serves a tiny UDP
// key-value protocol on port 7000. Its state and every byte it sends depend
// only on the frames it was given, in order: no clocks, no randomness, no map
// iteration order. Feeding the primary's frames to a second Guest must
// therefore reproduce the primary's state and output exactly, which is what
// lockstep replication relies on.
package guest

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"slices"
)

// KVPort is the UDP port of the key-value protocol.
const KVPort = 7000

const (
	ethHdrLen  = 14
	arpLen     = 28
	ipv4HdrLen = 20
	udpHdrLen  = 8
	icmpHdrLen = 8

	etherTypeIPv4 = 0x0800
	etherTypeARP  = 0x0806
	etherTypeVLAN = 0x8100
	etherTypeQinQ = 0x88a8

	protoICMP = 1
	protoUDP  = 17

	// replyTTL is fixed so replies do not depend on anything but input.
	replyTTL = 64
)

var broadcastMAC = []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}

// State is a snapshot of a Guest. Two Guests fed the same frames in the same
// order have equal States.
type State struct {
	Puts    uint64            `json:"puts"`    // PUTs applied
	Keys    map[string]string `json:"keys"`    // the key-value store
	Frames  uint64            `json:"frames"`  // frames consumed
	Ignored uint64            `json:"ignored"` // frames consumed without a reply
	Replies uint64            `json:"replies"` // frames sent
	// Digest is the sha256 (hex) of Puts and the sorted key/value pairs: the
	// application state, in one comparable string.
	Digest string `json:"digest"`
}

// Guest is the pure core of the synthetic VM. It is not safe for concurrent
// use; Run gives it a single owning goroutine.
type Guest struct {
	ip  [4]byte
	mac [6]byte

	store   *Store // the key-value application, shared with cmd/ftgw-init
	frames  uint64
	ignored uint64
	replies uint64

	// lastDrop says why the last frame was ignored ("" if it was answered),
	// for tests and debug logs.
	lastDrop string
}

// New returns a Guest with address ip and hardware address mac. It panics if
// ip is not IPv4 or mac is not a unicast 48-bit address; Run validates its
// Config before calling it.
func New(ip netip.Addr, mac net.HardwareAddr) *Guest {
	ip = ip.Unmap()
	if !ip.Is4() {
		panic(fmt.Sprintf("guest: address %v is not IPv4", ip))
	}
	if len(mac) != 6 || mac[0]&1 != 0 {
		panic(fmt.Sprintf("guest: hardware address %v is not unicast 48-bit", mac))
	}
	g := &Guest{ip: ip.As4(), store: NewStore()}
	copy(g.mac[:], mac)
	return g
}

// Restore makes g the guest whose state st is: a copy built from a snapshot
// of another guest continues exactly as that guest would. State holds all
// there is (the IPv4 ID of replies comes from Replies).
func (g *Guest) Restore(st State) {
	kv := make(map[string]string, len(st.Keys))
	for k, v := range st.Keys {
		kv[k] = v
	}
	g.store = &Store{kv: kv, puts: st.Puts}
	g.frames, g.ignored, g.replies = st.Frames, st.Ignored, st.Replies
}

// HandleFrame consumes one Ethernet frame and returns the frames the guest
// sends in response (at most one today). Malformed or uninteresting frames
// are counted and ignored. frame is not retained or modified; replies are
// freshly allocated.
func (g *Guest) HandleFrame(frame []byte) (replies [][]byte) {
	g.frames++
	reply, drop := g.handle(frame)
	g.lastDrop = drop
	if reply == nil {
		g.ignored++
		return nil
	}
	g.replies++
	return [][]byte{reply}
}

// State returns a snapshot; the caller owns its Keys map.
func (g *Guest) State() State {
	return State{
		Puts:    g.store.Puts(),
		Keys:    g.store.Keys(),
		Frames:  g.frames,
		Ignored: g.ignored,
		Replies: g.replies,
		Digest:  g.store.Digest(),
	}
}

// handle returns the reply to frame, or nil and the reason it was dropped.
func (g *Guest) handle(f []byte) (reply []byte, drop string) {
	if len(f) < ethHdrLen {
		return nil, "short Ethernet header"
	}
	dst, src := f[0:6], f[6:12]
	if src[0]&1 != 0 {
		return nil, "multicast source MAC"
	}
	toUs := bytes.Equal(dst, g.mac[:])
	switch binary.BigEndian.Uint16(f[12:14]) {
	case etherTypeARP:
		if !toUs && !bytes.Equal(dst, broadcastMAC) {
			return nil, "not our MAC"
		}
		return g.handleARP(f[ethHdrLen:])
	case etherTypeIPv4:
		if !toUs {
			return nil, "not our MAC"
		}
		return g.handleIPv4(src, f[ethHdrLen:])
	case etherTypeVLAN, etherTypeQinQ:
		// A VM on an untagged tap never sees tags; treat them as foreign.
		return nil, "VLAN tagged"
	default:
		return nil, "not IPv4 or ARP"
	}
}

func (g *Guest) handleARP(p []byte) ([]byte, string) {
	// Ethernet padding may follow the 28 ARP bytes; it is ignored.
	if len(p) < arpLen {
		return nil, "short ARP"
	}
	if binary.BigEndian.Uint16(p[0:2]) != 1 || binary.BigEndian.Uint16(p[2:4]) != etherTypeIPv4 ||
		p[4] != 6 || p[5] != 4 {
		return nil, "ARP not Ethernet/IPv4"
	}
	if binary.BigEndian.Uint16(p[6:8]) != 1 {
		return nil, "ARP not a request"
	}
	sha, spa, tpa := p[8:14], p[14:18], p[24:28]
	if !bytes.Equal(tpa, g.ip[:]) {
		return nil, "ARP not for our IP"
	}
	if sha[0]&1 != 0 {
		return nil, "ARP sender MAC multicast"
	}

	r := make([]byte, ethHdrLen+arpLen)
	copy(r[0:6], sha)
	copy(r[6:12], g.mac[:])
	binary.BigEndian.PutUint16(r[12:14], etherTypeARP)
	a := r[ethHdrLen:]
	binary.BigEndian.PutUint16(a[0:2], 1) // Ethernet
	binary.BigEndian.PutUint16(a[2:4], etherTypeIPv4)
	a[4], a[5] = 6, 4
	binary.BigEndian.PutUint16(a[6:8], 2) // reply
	copy(a[8:14], g.mac[:])
	copy(a[14:18], g.ip[:])
	copy(a[18:24], sha)
	copy(a[24:28], spa)
	return r, ""
}

func (g *Guest) handleIPv4(srcMAC, p []byte) ([]byte, string) {
	if len(p) < ipv4HdrLen {
		return nil, "short IPv4 header"
	}
	if p[0]>>4 != 4 {
		return nil, "IP version not 4"
	}
	ihl := int(p[0]&0x0f) * 4
	if ihl < ipv4HdrLen {
		return nil, "bad IHL"
	}
	if ihl > ipv4HdrLen {
		return nil, "IPv4 options"
	}
	total := int(binary.BigEndian.Uint16(p[2:4]))
	if total < ihl || total > len(p) {
		return nil, "bad IPv4 total length"
	}
	p = p[:total] // drop Ethernet padding
	if checksum(p[:ihl], 0) != 0 {
		return nil, "bad IPv4 checksum"
	}
	if frag := binary.BigEndian.Uint16(p[6:8]); frag&0x2000 != 0 || frag&0x1fff != 0 {
		return nil, "fragment"
	}
	src, dst := [4]byte(p[12:16]), [4]byte(p[16:20])
	if dst != g.ip {
		return nil, "not our IP"
	}
	if s := netip.AddrFrom4(src); s.IsUnspecified() || s.IsMulticast() || src == [4]byte{255, 255, 255, 255} {
		return nil, "bad source IP"
	}
	switch p[9] {
	case protoICMP:
		return g.handleICMP(srcMAC, src, p[ihl:])
	case protoUDP:
		return g.handleUDP(srcMAC, src, p[ihl:])
	default:
		return nil, "unsupported IP protocol"
	}
}

func (g *Guest) handleICMP(srcMAC []byte, src [4]byte, p []byte) ([]byte, string) {
	if len(p) < icmpHdrLen {
		return nil, "short ICMP"
	}
	if checksum(p, 0) != 0 {
		return nil, "bad ICMP checksum"
	}
	if p[0] != 8 || p[1] != 0 {
		return nil, "ICMP not echo request"
	}
	// Same identifier, sequence and payload; only type and checksum change.
	msg := slices.Clone(p)
	msg[0] = 0
	msg[2], msg[3] = 0, 0
	binary.BigEndian.PutUint16(msg[2:4], checksum(msg, 0))
	return g.ipv4Reply(srcMAC, src, protoICMP, msg), ""
}

func (g *Guest) handleUDP(srcMAC []byte, src [4]byte, p []byte) ([]byte, string) {
	if len(p) < udpHdrLen {
		return nil, "short UDP header"
	}
	ulen := int(binary.BigEndian.Uint16(p[4:6]))
	if ulen < udpHdrLen || ulen > len(p) {
		return nil, "bad UDP length"
	}
	p = p[:ulen]
	if binary.BigEndian.Uint16(p[6:8]) != 0 && checksum(p, pseudoSum(src, g.ip, ulen)) != 0 {
		return nil, "bad UDP checksum"
	}
	sport, dport := binary.BigEndian.Uint16(p[0:2]), binary.BigEndian.Uint16(p[2:4])
	if dport != KVPort {
		return nil, "not the KV port"
	}
	if sport == 0 {
		return nil, "UDP source port 0"
	}

	resp := g.store.Apply(string(p[udpHdrLen:]))
	seg := make([]byte, udpHdrLen+len(resp))
	binary.BigEndian.PutUint16(seg[0:2], KVPort)
	binary.BigEndian.PutUint16(seg[2:4], sport)
	binary.BigEndian.PutUint16(seg[4:6], uint16(len(seg)))
	copy(seg[udpHdrLen:], resp)
	cs := checksum(seg, pseudoSum(g.ip, src, len(seg)))
	if cs == 0 {
		cs = 0xffff // 0 would mean "no checksum"
	}
	binary.BigEndian.PutUint16(seg[6:8], cs)
	return g.ipv4Reply(srcMAC, src, protoUDP, seg), ""
}

// ipv4Reply wraps payload in IPv4 and Ethernet headers addressed to dstMAC
// and dst. The IP ID is the number of frames sent before this one, so it is
// a function of the input like everything else.
func (g *Guest) ipv4Reply(dstMAC []byte, dst [4]byte, proto byte, payload []byte) []byte {
	f := make([]byte, ethHdrLen+ipv4HdrLen+len(payload))
	copy(f[0:6], dstMAC)
	copy(f[6:12], g.mac[:])
	binary.BigEndian.PutUint16(f[12:14], etherTypeIPv4)
	ip := f[ethHdrLen : ethHdrLen+ipv4HdrLen]
	ip[0] = 0x45
	binary.BigEndian.PutUint16(ip[2:4], uint16(ipv4HdrLen+len(payload)))
	binary.BigEndian.PutUint16(ip[4:6], uint16(g.replies))
	ip[8] = replyTTL
	ip[9] = proto
	copy(ip[12:16], g.ip[:])
	copy(ip[16:20], dst[:])
	binary.BigEndian.PutUint16(ip[10:12], checksum(ip, 0))
	copy(f[ethHdrLen+ipv4HdrLen:], payload)
	return f
}

// pseudoSum is the unfolded sum of the UDP pseudo-header.
func pseudoSum(src, dst [4]byte, udpLen int) uint32 {
	var s uint32
	s += uint32(src[0])<<8 | uint32(src[1])
	s += uint32(src[2])<<8 | uint32(src[3])
	s += uint32(dst[0])<<8 | uint32(dst[1])
	s += uint32(dst[2])<<8 | uint32(dst[3])
	s += protoUDP
	s += uint32(udpLen)
	return s
}

// checksum is the Internet checksum (RFC 1071) of b, starting from the
// unfolded sum initial. Over data that includes a valid checksum it is 0.
func checksum(b []byte, initial uint32) uint16 {
	s := initial
	for len(b) >= 2 {
		s += uint32(b[0])<<8 | uint32(b[1])
		b = b[2:]
	}
	if len(b) == 1 {
		s += uint32(b[0]) << 8
	}
	for s>>16 != 0 {
		s = s&0xffff + s>>16
	}
	return ^uint16(s)
}
