package vip

import (
	"context"
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"time"

	"github.com/mdlayher/packet"
)

const etherTypeARP = 0x0806

// GratuitousARP is the frame that announces ip at mac: an ARP request from
// mac for its own address, broadcast. Switches learn mac's port from its
// source; neighbours refresh the entry they have for ip.
func GratuitousARP(ip netip.Addr, mac net.HardwareAddr) []byte {
	f := make([]byte, 14+28)
	copy(f[0:6], []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff})
	copy(f[6:12], mac)
	binary.BigEndian.PutUint16(f[12:14], etherTypeARP)
	arp := f[14:]
	binary.BigEndian.PutUint16(arp[0:2], 1)      // Ethernet
	binary.BigEndian.PutUint16(arp[2:4], 0x0800) // IPv4
	arp[4], arp[5] = 6, 4
	binary.BigEndian.PutUint16(arp[6:8], 1) // request
	a := ip.As4()
	copy(arp[8:14], mac)
	copy(arp[14:18], a[:])
	// Target hardware address stays zero; target protocol address is ip.
	copy(arp[24:28], a[:])
	return f
}

// Announce sends count gratuitous ARPs for ip at mac out of iface, interval
// apart: more than one, because the first can be lost while the LAN
// converges.
func Announce(ctx context.Context, iface *net.Interface, ip netip.Addr, mac net.HardwareAddr, count int, interval time.Duration) error {
	if !ip.Is4() || len(mac) != 6 {
		return fmt.Errorf("announce %s at %s: want an IPv4 address and a 6-byte MAC", ip, mac)
	}
	// Protocol 0: send only.
	conn, err := packet.Listen(iface, packet.Raw, 0, nil)
	if err != nil {
		return fmt.Errorf("announce on %s: %w", iface.Name, err)
	}
	defer conn.Close()
	frame := GratuitousARP(ip, mac)
	broadcast := &packet.Addr{HardwareAddr: net.HardwareAddr(frame[0:6])}
	for i := range count {
		if i > 0 {
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(interval):
			}
		}
		if _, err := conn.WriteTo(frame, broadcast); err != nil {
			return fmt.Errorf("announce on %s: %w", iface.Name, err)
		}
	}
	return nil
}
