package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// The example config that `make install` ships loads as it stands, once
// the files it names exist: no unknown field, nothing invalid.
func TestExampleConfigLoads(t *testing.T) {
	raw, err := os.ReadFile("../../deploy/ftgw.yaml")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	text := strings.ReplaceAll(string(raw), "/etc/ftgw/", dir+"/")
	for _, f := range []string{"pki/ca.pem", "pki/host-a.pem", "pki/host-a-key.pem"} {
		if !strings.Contains(text, filepath.Join(dir, f)) {
			t.Fatalf("the example no longer names /etc/ftgw/%s: update this test", f)
		}
		if err := os.MkdirAll(filepath.Dir(filepath.Join(dir, f)), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, f), nil, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	path := filepath.Join(dir, "ftgw.yaml")
	if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := loadConfig(path)
	if err != nil {
		t.Fatalf("the example config: %v", err)
	}
	if cfg.Name != "host-a" || cfg.Peer.Name != "host-b" || len(cfg.VMs) != 1 {
		t.Errorf("the example config read as name %q, peer %q, %d VMs", cfg.Name, cfg.Peer.Name, len(cfg.VMs))
	}
}

// The systemd unit passes systemd's own check without a warning, with
// ExecStart pointing at an executable that exists here.
func TestSystemdUnitVerifies(t *testing.T) {
	analyze, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Skip("no systemd-analyze on this machine")
	}
	raw, err := os.ReadFile("../../deploy/ftgw.service")
	if err != nil {
		t.Fatal(err)
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(raw), "ExecStart=/usr/local/bin/ftgw run --config /etc/ftgw/ftgw.yaml") {
		t.Fatal("the unit no longer starts /usr/local/bin/ftgw run --config /etc/ftgw/ftgw.yaml: update this test and the Makefile's install")
	}
	unit := filepath.Join(t.TempDir(), "ftgw.service")
	if err := os.WriteFile(unit, []byte(strings.ReplaceAll(string(raw), "/usr/local/bin/ftgw", self)), 0o644); err != nil {
		t.Fatal(err)
	}
	// It reports a bad setting as a warning and still exits 0.
	if out, err := exec.Command(analyze, "verify", unit).CombinedOutput(); err != nil || len(out) > 0 {
		t.Fatalf("systemd-analyze verify: %v\n%s", err, out)
	}
}
