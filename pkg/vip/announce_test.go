package vip_test

import (
	"bytes"
	"context"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/mdlayher/packet"
	"github.com/vishvananda/netlink"

	"github.com/ftgw/ftgw/internal/testutil"
	"github.com/ftgw/ftgw/pkg/vip"
)

func TestGratuitousARPLayout(t *testing.T) {
	ip := netip.MustParseAddr("192.0.2.10")
	mac := net.HardwareAddr{0x02, 0x46, 0x54, 0x47, 0x00, 0x0a}
	want := []byte{
		0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02, 0x46, 0x54, 0x47, 0x00, 0x0a, 0x08, 0x06,
		0, 1, 8, 0, 6, 4, 0, 1, // Ethernet/IPv4, request
		0x02, 0x46, 0x54, 0x47, 0x00, 0x0a, 192, 0, 2, 10, // sender: the VM
		0, 0, 0, 0, 0, 0, 192, 0, 2, 10, // target: its own address
	}
	if got := vip.GratuitousARP(ip, mac); !bytes.Equal(got, want) {
		t.Errorf("gratuitous ARP\n got %x\nwant %x", got, want)
	}
}

func TestAnnounceSendsTheBurst(t *testing.T) {
	testutil.InNewNetns(t)
	if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "up0"}, PeerName: "peer0"}); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"up0", "peer0"} {
		l, _ := netlink.LinkByName(name)
		if err := netlink.LinkSetUp(l); err != nil {
			t.Fatal(err)
		}
	}
	testutil.WaitLinksUp(t, "up0", "peer0")
	up, _ := net.InterfaceByName("up0")
	peer, _ := net.InterfaceByName("peer0")
	listener, err := packet.Listen(peer, packet.Raw, 0x0806, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer listener.Close()

	ip := netip.MustParseAddr("192.0.2.10")
	mac := net.HardwareAddr{0x02, 0x46, 0x54, 0x47, 0x00, 0x0a}
	start := time.Now()
	if err := vip.Announce(context.Background(), up, ip, mac, 3, 20*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	if took := time.Since(start); took < 40*time.Millisecond {
		t.Errorf("3 announcements 20ms apart took %s", took)
	}
	want := vip.GratuitousARP(ip, mac)
	buf := make([]byte, 128)
	for i := range 3 {
		listener.SetReadDeadline(time.Now().Add(time.Second))
		n, _, err := listener.ReadFrom(buf)
		if err != nil {
			t.Fatalf("announcement %d: %v", i, err)
		}
		if !bytes.Equal(buf[:n], want) {
			t.Errorf("announcement %d: %x", i, buf[:n])
		}
	}
	listener.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
	if _, _, err := listener.ReadFrom(buf); err == nil {
		t.Error("more than 3 announcements")
	}
}
