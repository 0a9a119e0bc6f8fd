package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/ftgw/ftgw/pkg/arbiter"
	"github.com/ftgw/ftgw/pkg/lockstep"
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
  name: host-b
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
	if cfg.Heartbeat.Milliseconds() != 5 || cfg.Metrics != "127.0.0.1:9477" || cfg.HoldCapacity != 4096 || cfg.VMs[0].Engine != "synthetic" {
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
		{"  name: host-b\n", "", "peer.name: missing"},
		{"name: host-b", "name: '*.lab'", "peer.name: host name \"*.lab\""},
		{"role: primary", "name: Host-B\nrole: primary", `peer.name: "host-b" is this host's own name`},
		{"role: primary", "name: host_a.\nrole: primary", `name: host name "host_a."`},
		{"heartbeat: 5ms", "etcd:\n  username: ftgw\n  password_file: PKI/ca.pem", "etcd: set, but the arbiter is \"\""},
		{"heartbeat: 5ms", "arbiter: etcd:https://10.0.0.5:2379\netcd:\n  cert: PKI/primary.pem", "etcd.cert: cert and key go together"},
		{"heartbeat: 5ms", "arbiter: etcd:https://10.0.0.5:2379\netcd: {username: ftgw}", "etcd.username: username and password_file go together"},
		{"heartbeat: 5ms", "arbiter: etcd:https://10.0.0.5:2379\netcd: {ca: /nonexistent/ca.pem}", "etcd.ca:"},
		{"heartbeat: 5ms", "arbiter: etcd:https://10.0.0.5:2379\netcd: {username: ftgw, password_file: /nonexistent}", "etcd.password_file:"},
		{"heartbeat: 5ms", "arbiter: etcd:https://10.0.0.5:2379\netcd: {password: x}", "field password not found"},
		{"vms:", "vms: []\nunused:", "field unused not found"},
		{"tap: tap0", "tap: tap0\n    engine: qemu\n    qemu: {preload: PKI/ca.pem}", "vms[0].qemu: neither disk nor kernel"},
		{"tap: tap0", "tap: tap0\n    engine: qemu\n    qemu: {preload: PKI/ca.pem, disk: /nonexistent.qcow2}", "vms[0].qemu.disk:"},
		{"tap: tap0", "tap: tap0\n    engine: qemu\n    qemu: {preload: PKI/ca.pem, disk: PKI}", "vms[0].qemu.disk: "}, // a directory
		{"tap: tap0", "tap: tap0\n    engine: qemu\n    qemu: {preload: PKI/ca.pem, disk: PKI/ca.pem, initrd: PKI/ca.pem}", "initrd and cmdline need a kernel"},
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

// A real VM with only a disk boots from it: no kernel, and no command line
// made up for one.
func TestLoadConfigQEMUDiskAlone(t *testing.T) {
	cfg, err := loadConfig(writeConfig(t, strings.Replace(goodPrimary, "tap: tap0",
		"tap: tap0\n    engine: qemu\n    qemu: {preload: PKI/ca.pem, disk: PKI/ca.pem}", 1)))
	if err != nil {
		t.Fatal(err)
	}
	q := cfg.VMs[0].QEMU
	if q.Kernel != "" || q.Cmdline != "" || !strings.HasSuffix(q.Disk, "ca.pem") || !vmMachine(cfg.VMs[0]).Disk {
		t.Errorf("disk-only VM: %+v", q)
	}
	cfg, err = loadConfig(writeConfig(t, strings.Replace(goodPrimary, "tap: tap0",
		"tap: tap0\n    engine: qemu\n    qemu: {preload: PKI/ca.pem, disk: PKI/ca.pem, kernel: PKI/ca.pem}", 1)))
	if err != nil {
		t.Fatal(err)
	}
	if q := cfg.VMs[0].QEMU; !strings.Contains(q.Cmdline, "ftgw.ip=192.0.2.10/24 ftgw.disk=/dev/vda2") {
		t.Errorf("the lab guest's default command line with a disk: %q", q.Cmdline)
	}
}

// A host protects several VMs, each with its own name, IP, MAC and tap and
// a log channel port of its own.
func TestLoadConfigSeveralVMs(t *testing.T) {
	second := func(name, ip, mac, tap string) string {
		return strings.Replace(goodPrimary, "peer:", fmt.Sprintf("  - name: %s\n    ip: %s\n    mac: %q\n    tap: %s\npeer:", name, ip, mac, tap), 1)
	}
	cfg, err := loadConfig(writeConfig(t, second("vm2", "192.0.2.11", "02:46:54:47:00:0b", "tap1")))
	if err != nil {
		t.Fatal(err)
	}
	if len(cfg.VMs) != 2 {
		t.Fatalf("%d VMs, want 2", len(cfg.VMs))
	}
	vm2 := vmConfig(cfg, 1)
	if len(vm2.VMs) != 1 || vm2.VMs[0].Name != "vm2" {
		t.Errorf("vm 1's config has VMs %+v, want vm2 alone", vm2.VMs)
	}
	for _, addr := range []struct{ base, got string }{{cfg.Peer.Address, vm2.Peer.Address}, {cfg.Peer.Listen, vm2.Peer.Listen}} {
		if want := shiftPort(addr.base, 1); addr.got != want || want == addr.base {
			t.Errorf("vm2's log channel address %s, want %s (the base port plus 1)", addr.got, want)
		}
	}

	for _, tc := range []struct{ text, field string }{
		{second("vm1", "192.0.2.11", "02:46:54:47:00:0b", "tap1"), "vms[1].name"},
		{second("vm2", "192.0.2.10", "02:46:54:47:00:0b", "tap1"), "vms[1].ip"},
		{second("vm2", "192.0.2.11", "02:46:54:47:00:0A", "tap1"), "vms[1].mac"},
		{second("vm2", "192.0.2.11", "02:46:54:47:00:0b", "tap0"), "vms[1].tap"},
	} {
		_, err := loadConfig(writeConfig(t, tc.text))
		if err == nil || !strings.Contains(err.Error(), tc.field) {
			t.Errorf("error %v, want %s refused as a duplicate", err, tc.field)
		}
	}
}

// A second YAML document (an edit appended after a ---) would be ignored:
// the config is refused instead, and a lone leading --- is fine.
func TestLoadConfigRefusesASecondDocument(t *testing.T) {
	if _, err := loadConfig(writeConfig(t, "---\n"+goodPrimary)); err != nil {
		t.Errorf("one document after a leading ---: %v", err)
	}
	_, err := loadConfig(writeConfig(t, goodPrimary+"---\nheartbeat: 1s\n"))
	if err == nil || !strings.Contains(err.Error(), "more than one YAML document") {
		t.Errorf("error %v, want a second document refused", err)
	}
}

// etcdPrimary is goodPrimary with a secured etcd arbiter.
var etcdPrimary = goodPrimary + `arbiter: etcd:https://10.0.0.5:2379
etcd:
  ca: ETCD/ca.pem
  cert: ETCD/primary.pem
  key: ETCD/primary-key.pem
  username: ftgw
  password_file: ETCD/password
`

// writeEtcdConfig writes etcdPrimary with a real PKI for etcd and the
// password file at mode.
func writeEtcdConfig(t *testing.T, mode os.FileMode) string {
	t.Helper()
	dir := t.TempDir()
	if err := lockstep.GenerateLabPKI(dir, "host-a", "etcd"); err != nil {
		t.Fatal(err)
	}
	password := filepath.Join(dir, "password")
	if err := os.WriteFile(password, []byte("s3cret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(password, mode); err != nil {
		t.Fatal(err)
	}
	return writeConfig(t, strings.ReplaceAll(etcdPrimary, "ETCD", dir))
}

func TestLoadConfigEtcdOptions(t *testing.T) {
	cfg, err := loadConfig(writeEtcdConfig(t, 0o640))
	if err != nil {
		t.Fatal(err)
	}
	opts, err := cfg.Etcd.arbiterOptions()
	if err != nil {
		t.Fatal(err)
	}
	if opts.EtcdTLS == nil || opts.EtcdTLS.RootCAs == nil || len(opts.EtcdTLS.Certificates) != 1 {
		t.Errorf("etcd TLS %+v: want the CA and a client certificate", opts.EtcdTLS)
	}
	if opts.EtcdUsername != "ftgw" || opts.EtcdPassword != "s3cret" {
		t.Errorf("etcd login %q/%q, want ftgw/s3cret (the file's first line)", opts.EtcdUsername, opts.EtcdPassword)
	}
	a, err := arbiter.OpenWith(cfg.Arbiter, opts)
	if err != nil {
		t.Fatalf("the arbiter refuses the options: %v", err)
	}
	a.Close()

	if _, err := loadConfig(writeEtcdConfig(t, 0o644)); err == nil || !strings.Contains(err.Error(), "etcd.password_file:") {
		t.Errorf("world-readable password file: %v, want it refused", err)
	}
}
