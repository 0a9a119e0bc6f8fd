package guest

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"reflect"
	"strings"
	"testing"
)

func newTestGuest() *Guest { return New(guestIP, guestMAC) }

// one feeds f to g and requires exactly one reply.
func one(t *testing.T, g *Guest, f []byte) []byte {
	t.Helper()
	out := g.HandleFrame(f)
	if len(out) != 1 {
		t.Fatalf("got %d replies, want 1 (dropped: %q)", len(out), g.lastDrop)
	}
	return out[0]
}

func TestARPReply(t *testing.T) {
	padded := append(arpRequestFrame(), make([]byte, 18)...) // to the 60-byte minimum
	unicast := arpRequestFrame()
	copy(unicast[0:6], guestMAC)
	for name, req := range map[string][]byte{"broadcast": arpRequestFrame(), "padded": padded, "unicast": unicast} {
		t.Run(name, func(t *testing.T) {
			g := newTestGuest()
			r := one(t, g, req)
			fields := []struct {
				name      string
				got, want []byte
			}{
				{"eth dst", r[0:6], hostMAC},
				{"eth src", r[6:12], guestMAC},
				{"ethertype", r[12:14], []byte{0x08, 0x06}},
				{"htype", r[14:16], []byte{0, 1}},
				{"ptype", r[16:18], []byte{0x08, 0x00}},
				{"hlen", r[18:19], []byte{6}},
				{"plen", r[19:20], []byte{4}},
				{"op", r[20:22], []byte{0, 2}},
				{"sender MAC", r[22:28], guestMAC},
				{"sender IP", r[28:32], guestIP.AsSlice()},
				{"target MAC", r[32:38], hostMAC},
				{"target IP", r[38:42], hostIP.AsSlice()},
			}
			if len(r) != 42 {
				t.Fatalf("reply is %d bytes, want 42", len(r))
			}
			for _, f := range fields {
				if !bytes.Equal(f.got, f.want) {
					t.Errorf("%s = %x, want %x", f.name, f.got, f.want)
				}
			}
			if st := g.State(); st.Frames != 1 || st.Replies != 1 || st.Ignored != 0 || st.Puts != 0 {
				t.Errorf("state = %+v", st)
			}
		})
	}
}

func TestICMPEcho(t *testing.T) {
	for _, data := range []string{"", "abc", "ftgw ping payload, even"} { // odd and even lengths
		g := newTestGuest()
		r := one(t, g, pingFrame(0xbeef, 7, data))
		m := checkIPv4Reply(t, r, protoICMP, 0)
		want := icmpEcho(0, 0xbeef, 7, []byte(data))
		if !bytes.Equal(m, want) {
			t.Errorf("data %q: ICMP reply = %x, want %x", data, m, want)
		}
		if inetSum(m) != 0 {
			t.Errorf("data %q: ICMP checksum does not verify", data)
		}
	}
}

func TestKV(t *testing.T) {
	steps := []struct{ req, want string }{
		{"GET a", "NOTFOUND a"},
		{"PUT a 1", "OK 1 a"},
		{"GET a", "VALUE a 1"},
		{"PUT b hello  world ", "OK 2 b"}, // value is the rest of the line
		{"GET b", "VALUE b hello  world "},
		{"PUT a 2\n", "OK 3 a"}, // trailing newline trimmed
		{"GET a\r\n", "VALUE a 2"},
		{"PUT empty ", "OK 4 empty"},
		{"GET empty", "VALUE empty "},
		{"PUT a", "ERR usage: PUT <key> <value>"},
		{"PUT  x", "ERR usage: PUT <key> <value>"},
		{"GET", "ERR usage: GET <key>"},
		{"GET a b", "ERR usage: GET <key>"},
		{"", "ERR empty request"},
		{"\n", "ERR empty request"},
		{"get a", "ERR unknown command"},
		{"DEL a", "ERR unknown command"},
		{"PUT k \xff", "ERR request is not UTF-8"},
		{"GET a", "VALUE a 2"},
	}
	g := newTestGuest()
	for i, s := range steps {
		r := one(t, g, kvFrame(s.req))
		if got := kvReply(t, r, uint16(i)); got != s.want {
			t.Errorf("step %d %q: reply %q, want %q", i, s.req, got, s.want)
		}
	}
	st := g.State()
	wantKeys := map[string]string{"a": "2", "b": "hello  world ", "empty": ""}
	if st.Puts != 4 || !maps.Equal(st.Keys, wantKeys) {
		t.Errorf("state puts=%d keys=%q, want 4 %q", st.Puts, st.Keys, wantKeys)
	}
	if st.Frames != uint64(len(steps)) || st.Replies != uint64(len(steps)) || st.Ignored != 0 {
		t.Errorf("counters = %+v", st)
	}
	if st.Digest != digest(4, wantKeys) {
		t.Errorf("digest mismatch")
	}

	// State hands out a copy.
	st.Keys["a"] = "changed"
	if g.State().Keys["a"] != "2" {
		t.Errorf("State shares its map with the guest")
	}
}

// TestAccepted covers legal variants that must still be answered.
func TestAccepted(t *testing.T) {
	noCsum := ipv4Frame(protoUDP, func() []byte {
		u := udpSegment(hostIP, guestIP, hostPort, KVPort, []byte("PUT a 1"))
		u[6], u[7] = 0, 0 // UDP checksum 0 means none
		return u
	}())
	cases := map[string][]byte{
		"no UDP checksum":   noCsum,
		"ethernet padding":  append(kvFrame("PUT a 1"), make([]byte, 20)...),
		"DF clear":          editIP(kvFrame("PUT a 1"), func(ip []byte) { ip[6] = 0 }),
		"other IP ID / TTL": editIP(kvFrame("PUT a 1"), func(ip []byte) { ip[4], ip[8] = 0xaa, 1 }),
	}
	for name, f := range cases {
		t.Run(name, func(t *testing.T) {
			g := newTestGuest()
			if got := kvReply(t, one(t, g, f), 0); got != "OK 1 a" {
				t.Errorf("reply %q, want OK 1 a", got)
			}
		})
	}
}

func TestIgnored(t *testing.T) {
	put := kvFrame("PUT z 26")
	ping := pingFrame(1, 1, "x")
	arp := arpRequestFrame()
	other := net.HardwareAddr{0x02, 0, 0, 0, 0, 0x99}

	// An IPv4 header with 4 bytes of options, otherwise valid.
	withOptions := func() []byte {
		u := udpSegment(hostIP, guestIP, hostPort, KVPort, []byte("PUT z 26"))
		ip := ipv4Header(hostIP, guestIP, protoUDP, len(u)+4)
		ip[0] = 0x46
		ip = append(ip, 1, 1, 1, 0) // NOP NOP NOP EOL
		ip[10], ip[11] = 0, 0
		binary.BigEndian.PutUint16(ip[10:], inetSum(ip))
		return ethFrame(guestMAC, hostMAC, etherTypeIPv4, append(ip, u...))
	}()
	vlan := func(tpid uint16) []byte {
		f := append([]byte{}, put[:12]...)
		f = binary.BigEndian.AppendUint16(f, tpid)
		f = append(f, 0, 1) // VLAN 1
		return append(f, put[12:]...)
	}

	cases := []struct {
		name  string
		frame []byte
		drop  string // the reason the guest must give
	}{
		{"empty", nil, "short Ethernet header"},
		{"IPv6", ethFrame(guestMAC, hostMAC, 0x86dd, make([]byte, 60)), "not IPv4 or ARP"},
		{"VLAN 802.1Q", vlan(etherTypeVLAN), "VLAN tagged"},
		{"VLAN 802.1ad", vlan(etherTypeQinQ), "VLAN tagged"},
		{"wrong dst MAC", edit(put, func(f []byte) { copy(f[0:6], other) }), "not our MAC"},
		{"broadcast UDP", edit(put, func(f []byte) { copy(f[0:6], broadcastMAC) }), "not our MAC"},
		{"ARP to other MAC", edit(arp, func(f []byte) { copy(f[0:6], other) }), "not our MAC"},
		{"multicast src MAC", edit(put, func(f []byte) { f[6] |= 1 }), "multicast source MAC"},
		{"IP version 6", editIP(put, func(ip []byte) { ip[0] = 0x65 }), "IP version not 4"},
		{"IHL 4", editIP(put, func(ip []byte) { ip[0] = 0x44 }), "bad IHL"},
		{"IHL 0", editIP(put, func(ip []byte) { ip[0] = 0x40 }), "bad IHL"},
		{"IHL 15", editIP(put, func(ip []byte) { ip[0] = 0x4f }), "IPv4 options"},
		{"IP options", withOptions, "IPv4 options"},
		{"total length past frame", editIP(put, func(ip []byte) { ip[2], ip[3] = 0x05, 0xdc }), "bad IPv4 total length"},
		{"total length below header", editIP(put, func(ip []byte) { ip[2], ip[3] = 0, 19 }), "bad IPv4 total length"},
		{"bad IP checksum", edit(put, func(f []byte) { f[14+10] ^= 0x01 }), "bad IPv4 checksum"},
		{"more fragments", editIP(put, func(ip []byte) { ip[6] |= 0x20 }), "fragment"},
		{"fragment offset", editIP(put, func(ip []byte) { ip[6], ip[7] = 0, 1 }), "fragment"},
		{"last fragment", editIP(put, func(ip []byte) { ip[6], ip[7] = 0x40, 0xb9 }), "fragment"},
		{"wrong dst IP", editIP(put, func(ip []byte) { ip[19] = 11 }), "not our IP"},
		{"src IP 0.0.0.0", editIP(put, func(ip []byte) { copy(ip[12:16], []byte{0, 0, 0, 0}) }), "bad source IP"},
		{"src IP broadcast", editIP(put, func(ip []byte) { copy(ip[12:16], []byte{255, 255, 255, 255}) }), "bad source IP"},
		{"src IP multicast", editIP(put, func(ip []byte) { copy(ip[12:16], []byte{224, 0, 0, 1}) }), "bad source IP"},
		{"TCP", editIP(put, func(ip []byte) { ip[9] = 6 }), "unsupported IP protocol"},
		{"UDP length past packet", edit(put, func(f []byte) { f[34+4], f[34+5] = 0x01, 0 }), "bad UDP length"},
		{"UDP length below header", edit(put, func(f []byte) { f[34+4], f[34+5] = 0, 7 }), "bad UDP length"},
		{"bad UDP checksum", edit(put, func(f []byte) { f[34+6] ^= 0x01 }), "bad UDP checksum"},
		{"UDP payload corrupted", edit(put, func(f []byte) { f[len(f)-1] ^= 0x04 }), "bad UDP checksum"},
		{"other UDP port", ipv4Frame(protoUDP, udpSegment(hostIP, guestIP, hostPort, 7001, []byte("PUT z 26"))), "not the KV port"},
		{"UDP source port 0", ipv4Frame(protoUDP, udpSegment(hostIP, guestIP, 0, KVPort, []byte("PUT z 26"))), "UDP source port 0"},
		{"bad ICMP checksum", edit(ping, func(f []byte) { f[34+2] ^= 0x01 }), "bad ICMP checksum"},
		{"ICMP echo reply", ipv4Frame(protoICMP, icmpEcho(0, 1, 1, []byte("x"))), "ICMP not echo request"},
		{"ICMP timestamp", ipv4Frame(protoICMP, icmpEcho(13, 1, 1, nil)), "ICMP not echo request"},
		{"ARP for other IP", edit(arp, func(f []byte) { f[41] = 11 }), "ARP not for our IP"},
		{"ARP reply", edit(arp, func(f []byte) { f[21] = 2 }), "ARP not a request"},
		{"ARP htype", edit(arp, func(f []byte) { f[15] = 6 }), "ARP not Ethernet/IPv4"},
		{"ARP plen", edit(arp, func(f []byte) { f[19] = 16 }), "ARP not Ethernet/IPv4"},
		{"ARP multicast sender", edit(arp, func(f []byte) { f[22] |= 1 }), "ARP sender MAC multicast"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			expectIgnored(t, c.frame, c.drop)
		})
	}
}

// expectIgnored feeds frame to a guest with some state and checks it is
// dropped for reason drop ("" for any reason) with no effect but counters.
func expectIgnored(t *testing.T, frame []byte, drop string) {
	t.Helper()
	g := newTestGuest()
	one(t, g, kvFrame("PUT a 1"))
	before := g.State()
	orig := bytes.Clone(frame)
	if out := g.HandleFrame(frame); out != nil {
		t.Fatalf("got %d replies, want none; first: %x", len(out), out[0])
	}
	if drop != "" && g.lastDrop != drop {
		t.Errorf("dropped for %q, want %q", g.lastDrop, drop)
	}
	after := g.State()
	if after.Frames != before.Frames+1 || after.Ignored != before.Ignored+1 {
		t.Errorf("frames %d→%d ignored %d→%d, want both +1", before.Frames, after.Frames, before.Ignored, after.Ignored)
	}
	after.Frames, after.Ignored = before.Frames, before.Ignored
	if !reflect.DeepEqual(before, after) {
		t.Errorf("state changed: %+v → %+v", before, after)
	}
	if !bytes.Equal(frame, orig) {
		t.Errorf("HandleFrame modified its input")
	}
}

// TestTruncated cuts valid frames at every length short of whole.
func TestTruncated(t *testing.T) {
	frames := map[string][]byte{
		"ARP":  arpRequestFrame(),
		"ICMP": pingFrame(1, 2, "payload"),
		"UDP":  kvFrame("PUT key some value"),
	}
	for name, f := range frames {
		for n := range len(f) {
			t.Run(fmt.Sprintf("%s/%d", name, n), func(t *testing.T) {
				expectIgnored(t, f[:n], "")
			})
		}
	}
}

// sequence is a mixed input: ARP, ping, PUTs, GETs, errors and garbage.
func sequence() [][]byte {
	var seq [][]byte
	seq = append(seq, arpRequestFrame(), pingFrame(9, 1, "hello"))
	for i := range 20 {
		seq = append(seq, kvFrame(fmt.Sprintf("PUT k%d v%d %s", i%7, i, strings.Repeat("x", i))))
		seq = append(seq, kvFrame(fmt.Sprintf("GET k%d", (i*3)%9)))
		if i%5 == 0 {
			seq = append(seq, kvFrame("BAD"), editIP(kvFrame("PUT dropped 1"), func(ip []byte) { ip[6] |= 0x20 }), []byte{1, 2, 3})
		}
	}
	return append(seq, pingFrame(9, 2, "bye"), arpRequestFrame())
}

func TestDeterminism(t *testing.T) {
	a, b := newTestGuest(), newTestGuest()
	for i, f := range sequence() {
		ra, rb := a.HandleFrame(f), b.HandleFrame(f)
		if !reflect.DeepEqual(ra, rb) {
			t.Fatalf("frame %d: outputs differ:\n%x\n%x", i, ra, rb)
		}
	}
	sa, sb := a.State(), b.State()
	if !reflect.DeepEqual(sa, sb) {
		t.Fatalf("states differ:\n%+v\n%+v", sa, sb)
	}
	if sa.Puts != 20 || sa.Ignored != 8 {
		t.Errorf("puts=%d ignored=%d, want 20 and 8", sa.Puts, sa.Ignored)
	}
}

func TestDigest(t *testing.T) {
	// The digest is of content, not history: insertion order does not matter,
	// values and the PUT count do.
	kv := func(reqs ...string) string {
		g := newTestGuest()
		for _, r := range reqs {
			one(t, g, kvFrame(r))
		}
		return g.State().Digest
	}
	ab := kv("PUT a 1", "PUT b 2")
	if ba := kv("PUT b 2", "PUT a 1"); ba != ab {
		t.Errorf("digest depends on insertion order")
	}
	for _, other := range []string{
		kv("PUT a 1", "PUT b 3"),
		kv("PUT a 1", "PUT b 2", "PUT b 2"),
		kv("PUT a 1"),
		kv("PUT ab 1", "PUT b 2"),
		kv("PUT a b1", "PUT b 2"), // same bytes as the line above without length prefixes
	} {
		if other == ab {
			t.Errorf("different stores share a digest")
		}
	}
	if len(ab) != 64 {
		t.Errorf("digest %q is not sha256 hex", ab)
	}
}

func TestNewPanicsOnBadConfig(t *testing.T) {
	cases := map[string]func(){
		"IPv6 address":  func() { New(netip.MustParseAddr("2001:db8::1"), guestMAC) },
		"short MAC":     func() { New(guestIP, guestMAC[:5]) },
		"multicast MAC": func() { New(guestIP, net.HardwareAddr{0x01, 0, 0x5e, 0, 0, 1}) },
	}
	for name, fn := range cases {
		t.Run(name, func(t *testing.T) {
			defer func() {
				if recover() == nil {
					t.Error("New did not panic")
				}
			}()
			fn()
		})
	}
}

// A guest restored from another's snapshot continues exactly as the
// original: the same replies, byte for byte, and the same state.
func TestRestoredGuestContinuesAsTheOriginal(t *testing.T) {
	original := newTestGuest()
	for i := range 20 {
		original.HandleFrame(kvFrame(fmt.Sprintf("PUT k%d v%d", i%7, i)))
	}
	copyOf := newTestGuest()
	copyOf.Restore(original.State())
	for i := range 20 {
		f := kvFrame(fmt.Sprintf("PUT k%d w%d", i%5, i))
		a, b := original.HandleFrame(f), copyOf.HandleFrame(f)
		if len(a) != len(b) || (len(a) == 1 && !bytes.Equal(a[0], b[0])) {
			t.Fatalf("frame %d: restored guest answered differently", i)
		}
	}
	if o, c := original.State(), copyOf.State(); o.Digest != c.Digest || o.Frames != c.Frames || o.Replies != c.Replies {
		t.Errorf("states differ after restore: %+v vs %+v", o, c)
	}
}
