package main

import (
	"bytes"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"
)

// qemuPrimary is goodPrimary with a real VM; PKI/ca.pem stands in for the
// kernel, the initramfs and the preload library, which must only exist.
const qemuPrimary = `
name: host-a
role: primary
uplink: eth0
vms:
  - name: web.1
    ip: 192.0.2.10
    mac: "02:46:54:47:00:0a"
    tap: tap0
    engine: qemu
    qemu:
      kernel: PKI/ca.pem
      initrd: PKI/ca.pem
      preload: PKI/ca.pem
      memory_mb: 512
      max_lag: 250ms
peer: {name: host-b, address: "[2001:db8::2]:7100", listen: ":7100", ca: PKI/ca.pem, cert: PKI/primary.pem, key: PKI/primary-key.pem}
heartbeat: 5ms
failure_timeout: 1s
arbiter: file:/srv/ftgw
announce_count: 1
hold_capacity: 65536
log_ring_bytes: 4096
`

// The config file is the operator's, typos and all. Loading it never
// panics; a config it accepts has every field the daemon uses without
// checking again, and loads back the same once written out.
func FuzzLoadConfig(f *testing.F) {
	pki := f.TempDir()
	for _, name := range []string{"ca.pem", "primary.pem", "primary-key.pem"} {
		if err := os.WriteFile(filepath.Join(pki, name), []byte("x"), 0o600); err != nil {
			f.Fatal(err)
		}
	}
	for _, text := range []string{
		goodPrimary,
		strings.Replace(goodPrimary, "role: primary", "role: secondary", 1),
		qemuPrimary,
		strings.Replace(goodPrimary, "heartbeat: 5ms", "heartbeat: 2562047h", 1),
		strings.Replace(goodPrimary, "heartbeat: 5ms", "hearbeat: 5ms", 1),
		goodPrimary + "arbiter: etcd:https://10.0.0.5:2379\netcd: {ca: PKI/ca.pem, cert: PKI/primary.pem, key: PKI/primary-key.pem}\n",
		strings.Replace(goodPrimary, "vms:", "vms: &v\n", 1),
		goodPrimary + "---\nrole: leader\n",
		"a: &a [*a, *a]\n",
		"!!binary gIGC\n",
		"",
	} {
		f.Add([]byte(text))
	}
	f.Fuzz(func(t *testing.T, text []byte) {
		dir := t.TempDir()
		path := filepath.Join(dir, "ftgw.yaml")
		if err := os.WriteFile(path, bytes.ReplaceAll(text, []byte("PKI"), []byte(pki)), 0o600); err != nil {
			t.Fatal(err)
		}
		cfg, err := loadConfig(path)
		if err != nil {
			return
		}
		checkAccepted(t, cfg)

		out, err := yaml.Marshal(cfg)
		if err != nil {
			t.Fatalf("marshal accepted config %+v: %v", cfg, err)
		}
		again := filepath.Join(dir, "again.yaml")
		if err := os.WriteFile(again, out, 0o600); err != nil {
			t.Fatal(err)
		}
		cfg2, err := loadConfig(again)
		if err != nil {
			t.Fatalf("accepted config written out is refused: %v\n%s", err, out)
		}
		if !reflect.DeepEqual(cfg, cfg2) {
			t.Fatalf("accepted config written out loads as another:\n%+v\n%+v", cfg, cfg2)
		}
	})
}

// checkAccepted checks what the daemon takes from an accepted config as
// given.
func checkAccepted(t *testing.T, cfg Config) {
	t.Helper()
	if cfg.Name == "" || cfg.Role != rolePrimary && cfg.Role != roleSecondary || cfg.Uplink == "" ||
		cfg.Peer.Address == "" || cfg.Peer.Listen == "" || cfg.Peer.CA == "" || cfg.Peer.Cert == "" || cfg.Peer.Key == "" {
		t.Fatalf("accepted without a role, an uplink or a peer: %+v", cfg)
	}
	if cfg.Heartbeat <= 0 || cfg.FailureTimeout/2 < cfg.Heartbeat {
		t.Fatalf("accepted heartbeat %v with failure timeout %v: want two heartbeats at least", cfg.Heartbeat, cfg.FailureTimeout)
	}
	if cfg.AnnounceCount < 1 || cfg.HoldCapacity < 1 || cfg.LogRingBytes < 1 {
		t.Fatalf("accepted %d announcements, hold capacity %d, log ring %d", cfg.AnnounceCount, cfg.HoldCapacity, cfg.LogRingBytes)
	}
	if len(cfg.VMs) != 1 {
		t.Fatalf("accepted %d VMs", len(cfg.VMs))
	}
	vm := cfg.VMs[0]
	if vm.Name == "" || vm.Tap == "" || !vm.addr().Is4() || len(vm.hwAddr()) != 6 {
		t.Fatalf("accepted VM %+v", vm)
	}
	switch vm.Engine {
	case engineSynthetic:
	case engineQEMU:
		q := vm.QEMU
		if q.Kernel == "" && q.Disk == "" || q.Kernel == "" && (q.Initrd != "" || q.Cmdline != "") ||
			q.Kernel != "" && q.Cmdline == "" || q.Preload == "" || q.MemoryMB < 64 || q.MaxLag < 10*time.Millisecond {
			t.Fatalf("accepted QEMU config %+v", q)
		}
	default:
		t.Fatalf("accepted engine %q", vm.Engine)
	}
}
