package lab

import (
	"net/netip"
	"testing"
)

// The first VM keeps the single VM's names and addresses, which docs,
// tests and users rely on; the others follow the rule, all distinct and
// below the client's address.
func TestVMAddresses(t *testing.T) {
	first := VM(1)
	if first.Name != VMName || first.IP != VMIP || first.MAC.String() != VMMAC.String() || first.Tap != Tap {
		t.Errorf("VM(1) = %+v, want %s %s %s %s", first, VMName, VMIP, VMMAC, Tap)
	}
	last := VM(MaxVMs)
	if last.Name != "vm64" || last.IP != netip.MustParseAddr("192.0.2.73") || last.MAC.String() != "02:46:54:47:00:49" || last.Tap != "tap63" {
		t.Errorf("VM(%d) = %+v", MaxVMs, last)
	}
	seen := map[string]bool{}
	for _, vm := range VMs(MaxVMs) {
		for _, k := range []string{vm.Name, vm.IP.String(), vm.MAC.String(), vm.Tap} {
			if seen[k] {
				t.Errorf("%s used twice", k)
			}
			seen[k] = true
		}
		if !vm.IP.Less(ClientIP.Addr()) || !ClientIP.Contains(vm.IP) {
			t.Errorf("%s at %s: want it on the LAN below the client's %s", vm.Name, vm.IP, ClientIP.Addr())
		}
	}
	// VM's MAC is a copy: changing it must not change VMMAC.
	VM(1).MAC[5] = 0xff
	if VMMAC[5] != 0x0a {
		t.Error("VM(1).MAC aliases VMMAC")
	}
}

func TestVMOutOfRangePanics(t *testing.T) {
	for _, i := range []int{0, MaxVMs + 1} {
		func() {
			defer func() {
				if recover() == nil {
					t.Errorf("VM(%d) did not panic", i)
				}
			}()
			VM(i)
		}()
	}
}
