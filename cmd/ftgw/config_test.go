package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const goodPrimary = `
role: primary
uplink: eth0
vms:
  - name: vm1
    ip: 192.0.2.10
    mac: "02:46:54:47:00:0a"
    tap: tap0
peer:
  address: 198.18.0.2:7100
  listen: 198.18.0.1:7100
  ca: PKI/ca.pem
  cert: PKI/primary.pem
  key: PKI/primary-key.pem
heartbeat: 5ms
`

func writeConfig(t *testing.T, text string) string {
	t.Helper()
	dir := t.TempDir()
	for _, f := range []string{"ca.pem", "primary.pem", "primary-key.pem"} {
		if err := os.WriteFile(filepath.Join(dir, f), []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	path := filepath.Join(dir, "ftgw.yaml")
	if err := os.WriteFile(path, []byte(strings.ReplaceAll(text, "PKI", dir)), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestLoadConfigAppliesDefaults(t *testing.T) {
	cfg, err := loadConfig(writeConfig(t, goodPrimary))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Heartbeat.Milliseconds() != 5 || cfg.Metrics != ":9477" || cfg.HoldCapacity != 4096 || cfg.VMs[0].Engine != "synthetic" {
		t.Errorf("defaults or values not applied: %+v", cfg)
	}
}

func TestLoadConfigNamesTheBadField(t *testing.T) {
	for _, tc := range []struct{ old, new, field string }{
		{"role: primary", "role: leader", "role:"},
		{"address: 198.18.0.2:7100", "address: 198.18.0.2", "peer.address:"},
		{"  listen: 198.18.0.1:7100\n", "", "peer.listen:"},
		{`mac: "02:46:54:47:00:0a"`, `mac: "02:46"`, "vms[0].mac:"},
		{"ip: 192.0.2.10", "ip: 2001:db8::1", "vms[0].ip:"},
		{"tap: tap0", "tap: \"\"", "vms[0].tap:"},
		{"name: vm1", "name: \"vm1,file=/etc/passwd\"", "vms[0].name:"},
		{"name: vm1", "name: ../vm1", "vms[0].name:"},
		{"heartbeat: 5ms", "heartbeat: -1ms", "heartbeat:"},
		{"heartbeat: 5ms", "hold_capacity: 0", "hold_capacity:"},
		{"heartbeat: 5ms", "log_ring_bytes: 5000", "log_ring_bytes:"},
		{"heartbeat: 5ms", "metrics: 9477", "metrics:"},
		{"PKI/ca.pem", "/nonexistent/ca.pem", "peer.ca:"},
		{"  key: PKI/primary-key.pem\n", "", "peer.key: missing"},
		{"heartbeat: 5ms", "hearbeat: 5ms", "field hearbeat not found"},
		{"vms:", "vms: []\nunused:", "field unused not found"},
	} {
		t.Run(tc.field, func(t *testing.T) {
			text := strings.Replace(goodPrimary, tc.old, tc.new, 1)
			if text == goodPrimary {
				t.Fatalf("test case does not change the config: %q", tc.old)
			}
			_, err := loadConfig(writeConfig(t, text))
			if err == nil || !strings.Contains(err.Error(), tc.field) {
				t.Errorf("error %v, want one naming %q", err, tc.field)
			}
		})
	}
}

func TestLoadConfigRefusesSeveralVMs(t *testing.T) {
	text := strings.Replace(goodPrimary, "peer:", `  - name: vm2
    ip: 192.0.2.11
    mac: "02:46:54:47:00:0b"
    tap: tap1
peer:`, 1)
	_, err := loadConfig(writeConfig(t, text))
	if err == nil || !strings.Contains(err.Error(), "vms: 2 VMs") {
		t.Errorf("error %v, want the vms field refused", err)
	}
}
