package lab

import (
	"net"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestReleaseHost(t *testing.T) {
	ports := map[int]string{4: NSPrimary, 5: NSSecondary}
	frame := func(src net.HardwareAddr) []byte {
		f := make([]byte, 42)
		copy(f[0:6], net.HardwareAddr{0xff, 0xff, 0xff, 0xff, 0xff, 0xff})
		copy(f[6:12], src)
		return f
	}
	client := net.HardwareAddr{0x02, 0, 0, 0, 0, 0x64}
	for _, tt := range []struct {
		name    string
		ifindex int
		pkt     uint8
		frame   []byte
		want    string
	}{
		{"the VM's frame from port a", 4, unix.PACKET_HOST, frame(VMMAC), NSPrimary},
		{"the VM's broadcast (ARP) from port b", 5, unix.PACKET_BROADCAST, frame(VMMAC), NSSecondary},
		{"the VM's frame on its way from the bridge to port a", 4, unix.PACKET_OUTGOING, frame(VMMAC), ""},
		{"the client's frame", 4, unix.PACKET_HOST, frame(client), ""},
		{"the VM's frame on the client's port", 6, unix.PACKET_HOST, frame(VMMAC), ""},
		{"truncated", 4, unix.PACKET_HOST, frame(VMMAC)[:10], ""},
	} {
		got, ok := releaseHost(ports, tt.ifindex, tt.pkt, tt.frame)
		if got != tt.want || ok != (tt.want != "") {
			t.Errorf("%s: %q %v, want %q", tt.name, got, ok, tt.want)
		}
	}
}

func TestDualActiveInstants(t *testing.T) {
	t0 := time.Date(2026, 12, 5, 0, 0, 0, 0, time.UTC)
	at := func(us int) time.Time { return t0.Add(time.Duration(us) * time.Microsecond) }
	a := func(us ...int) []Release {
		var rs []Release
		for _, u := range us {
			rs = append(rs, Release{At: at(u), Host: NSPrimary})
		}
		return rs
	}
	b := func(us ...int) []Release {
		var rs []Release
		for _, u := range us {
			rs = append(rs, Release{At: at(u), Host: NSSecondary})
		}
		return rs
	}
	cat := func(parts ...[]Release) []Release {
		var all []Release
		for _, p := range parts {
			all = append(all, p...)
		}
		return all
	}
	type instant struct {
		from, to int
		a, b     int
	}
	for _, tt := range []struct {
		name     string
		releases []Release
		want     []instant
	}{
		{"one host", a(0, 100, 200, 5000), nil},
		{"failover: the new owner goes live 60ms after the old one's last frame", cat(a(0, 100, 200), b(60200, 60300)), nil},
		{"a hand-over exactly one window apart is not simultaneous", cat(a(0, 100), b(1100)), nil},
		{"interleaved", cat(a(0, 400, 800), b(200, 600)), []instant{{0, 800, 3, 2}}},
		{"a stale owner's late burst inside the new owner's stream",
			cat(b(0, 300, 600, 900, 5000, 5300), a(750, 760)),
			[]instant{{600, 900, 2, 2}}},
		{"two instants, apart",
			cat(a(0, 10000), b(500, 9800), a(50000)),
			[]instant{{0, 500, 1, 1}, {9800, 10000, 1, 1}}},
		{"unsorted input", cat(b(600, 200), a(800, 400, 0)), []instant{{0, 800, 3, 2}}},
	} {
		got := DualActiveInstants(tt.releases, time.Millisecond)
		if len(got) != len(tt.want) {
			t.Errorf("%s: %d instants %v, want %d", tt.name, len(got), got, len(tt.want))
			continue
		}
		for i, w := range tt.want {
			g := got[i]
			if !g.From.Equal(at(w.from)) || !g.To.Equal(at(w.to)) || g.Frames[NSPrimary] != w.a || g.Frames[NSSecondary] != w.b {
				t.Errorf("%s: instant %d is %s, want %dµs-%dµs with %d+%d frames", tt.name, i, g, w.from, w.to, w.a, w.b)
			}
		}
	}
}
