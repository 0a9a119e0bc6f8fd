package guest

import (
	"encoding/binary"
	"net"
	"net/netip"
	"testing"
)

// Hand-built frames for the tests. The checksum here is written
// independently of the one the guest uses, so a shared bug cannot hide.

var (
	guestIP  = netip.MustParseAddr("192.0.2.10")
	guestMAC = net.HardwareAddr{0x02, 0, 0, 0, 0, 0x0a}
	hostIP   = netip.MustParseAddr("192.0.2.1")
	hostMAC  = net.HardwareAddr{0x02, 0, 0, 0, 0, 0x01}
)

const hostPort = 40000

// inetSum is the RFC 1071 checksum of the concatenation of parts (each
// part of even length except possibly the last).
func inetSum(parts ...[]byte) uint16 {
	var all []byte
	for _, p := range parts {
		all = append(all, p...)
	}
	var s uint64
	for i := 0; i < len(all); i++ {
		if i%2 == 0 {
			s += uint64(all[i]) << 8
		} else {
			s += uint64(all[i])
		}
	}
	for s > 0xffff {
		s = s>>16 + s&0xffff
	}
	return ^uint16(s)
}

func ethFrame(dst, src net.HardwareAddr, etherType uint16, payload []byte) []byte {
	f := append([]byte{}, dst...)
	f = append(f, src...)
	f = binary.BigEndian.AppendUint16(f, etherType)
	return append(f, payload...)
}

func arpPayload(op uint16, sha net.HardwareAddr, spa netip.Addr, tha net.HardwareAddr, tpa netip.Addr) []byte {
	p := []byte{0, 1, 8, 0, 6, 4}
	p = binary.BigEndian.AppendUint16(p, op)
	p = append(p, sha...)
	p = append(p, spa.AsSlice()...)
	p = append(p, tha...)
	return append(p, tpa.AsSlice()...)
}

func arpRequestFrame() []byte {
	return ethFrame(net.HardwareAddr(broadcastMAC), hostMAC, etherTypeARP,
		arpPayload(1, hostMAC, hostIP, net.HardwareAddr{0, 0, 0, 0, 0, 0}, guestIP))
}

// ipv4Header returns a valid option-less header (ID 0x1234, DF, TTL 64).
func ipv4Header(src, dst netip.Addr, proto byte, payloadLen int) []byte {
	h := make([]byte, 20)
	h[0] = 0x45
	binary.BigEndian.PutUint16(h[2:], uint16(20+payloadLen))
	binary.BigEndian.PutUint16(h[4:], 0x1234)
	binary.BigEndian.PutUint16(h[6:], 0x4000)
	h[8] = 64
	h[9] = proto
	copy(h[12:], src.AsSlice())
	copy(h[16:], dst.AsSlice())
	binary.BigEndian.PutUint16(h[10:], inetSum(h))
	return h
}

func pseudoHeader(src, dst netip.Addr, udpLen int) []byte {
	p := append(src.AsSlice(), dst.AsSlice()...)
	p = append(p, 0, protoUDP)
	return binary.BigEndian.AppendUint16(p, uint16(udpLen))
}

func udpSegment(src, dst netip.Addr, sport, dport uint16, data []byte) []byte {
	u := binary.BigEndian.AppendUint16(nil, sport)
	u = binary.BigEndian.AppendUint16(u, dport)
	u = binary.BigEndian.AppendUint16(u, uint16(8+len(data)))
	u = append(u, 0, 0)
	u = append(u, data...)
	cs := inetSum(pseudoHeader(src, dst, len(u)), u)
	if cs == 0 {
		cs = 0xffff
	}
	binary.BigEndian.PutUint16(u[6:], cs)
	return u
}

func ipv4Frame(proto byte, payload []byte) []byte {
	ip := append(ipv4Header(hostIP, guestIP, proto, len(payload)), payload...)
	return ethFrame(guestMAC, hostMAC, etherTypeIPv4, ip)
}

// kvFrame is a KV request from the host to the guest.
func kvFrame(req string) []byte {
	return ipv4Frame(protoUDP, udpSegment(hostIP, guestIP, hostPort, KVPort, []byte(req)))
}

func icmpEcho(typ byte, id, seq uint16, data []byte) []byte {
	m := []byte{typ, 0, 0, 0}
	m = binary.BigEndian.AppendUint16(m, id)
	m = binary.BigEndian.AppendUint16(m, seq)
	m = append(m, data...)
	binary.BigEndian.PutUint16(m[2:], inetSum(m))
	return m
}

func pingFrame(id, seq uint16, data string) []byte {
	return ipv4Frame(protoICMP, icmpEcho(8, id, seq, []byte(data)))
}

// editIP applies edit to the IPv4 header of frame f (a copy) and fixes the
// header checksum, so only the edit makes the frame bad.
func editIP(f []byte, edit func(ip []byte)) []byte {
	f = append([]byte{}, f...)
	ip := f[14:]
	edit(ip)
	ihl := int(ip[0]&0xf) * 4
	if ihl < 20 || ihl > len(ip) {
		ihl = 20
	}
	ip[10], ip[11] = 0, 0
	binary.BigEndian.PutUint16(ip[10:], inetSum(ip[:ihl]))
	return f
}

// edit applies fn to a copy of f.
func edit(f []byte, fn func(f []byte)) []byte {
	f = append([]byte{}, f...)
	fn(f)
	return f
}

// checkIPv4Reply checks the Ethernet and IPv4 headers of a guest reply to the
// host and returns the IP payload.
func checkIPv4Reply(t *testing.T, f []byte, proto byte, wantID uint16) []byte {
	t.Helper()
	if len(f) < 34 {
		t.Fatalf("reply is %d bytes, too short for Ethernet+IPv4", len(f))
	}
	if got := net.HardwareAddr(f[0:6]); got.String() != hostMAC.String() {
		t.Errorf("eth dst = %v, want %v", got, hostMAC)
	}
	if got := net.HardwareAddr(f[6:12]); got.String() != guestMAC.String() {
		t.Errorf("eth src = %v, want %v", got, guestMAC)
	}
	if et := binary.BigEndian.Uint16(f[12:14]); et != etherTypeIPv4 {
		t.Errorf("ethertype = %#x, want IPv4", et)
	}
	ip := f[14:]
	checks := []struct {
		name      string
		got, want int
	}{
		{"version/IHL", int(ip[0]), 0x45},
		{"total length", int(binary.BigEndian.Uint16(ip[2:])), len(ip)},
		{"ID", int(binary.BigEndian.Uint16(ip[4:])), int(wantID)},
		{"flags/fragment", int(binary.BigEndian.Uint16(ip[6:])), 0},
		{"TTL", int(ip[8]), 64},
		{"protocol", int(ip[9]), int(proto)},
		{"header checksum verifies", int(inetSum(ip[:20])), 0},
	}
	for _, c := range checks {
		if c.got != c.want {
			t.Errorf("IPv4 %s = %#x, want %#x", c.name, c.got, c.want)
		}
	}
	if src := netip.AddrFrom4([4]byte(ip[12:16])); src != guestIP {
		t.Errorf("IPv4 src = %v, want %v", src, guestIP)
	}
	if dst := netip.AddrFrom4([4]byte(ip[16:20])); dst != hostIP {
		t.Errorf("IPv4 dst = %v, want %v", dst, hostIP)
	}
	return ip[20:]
}

// kvReply checks a guest's KV reply frame and returns its text.
func kvReply(t *testing.T, f []byte, wantID uint16) string {
	t.Helper()
	u := checkIPv4Reply(t, f, protoUDP, wantID)
	if len(u) < 8 {
		t.Fatalf("UDP segment is %d bytes", len(u))
	}
	if sp := binary.BigEndian.Uint16(u[0:]); sp != KVPort {
		t.Errorf("UDP sport = %d, want %d", sp, KVPort)
	}
	if dp := binary.BigEndian.Uint16(u[2:]); dp != hostPort {
		t.Errorf("UDP dport = %d, want %d", dp, hostPort)
	}
	if l := int(binary.BigEndian.Uint16(u[4:])); l != len(u) {
		t.Errorf("UDP length = %d, want %d", l, len(u))
	}
	if binary.BigEndian.Uint16(u[6:]) == 0 {
		t.Errorf("UDP checksum missing")
	} else if inetSum(pseudoHeader(guestIP, hostIP, len(u)), u) != 0 {
		t.Errorf("UDP checksum does not verify")
	}
	return string(u[8:])
}
