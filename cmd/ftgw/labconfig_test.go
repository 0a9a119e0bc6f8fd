package main

import (
	"context"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ftgw/ftgw/internal/lab"
	"github.com/ftgw/ftgw/pkg/lockstep"
)

// TestLabConfigsConnect: the configs and PKI `ftgw lab up` writes load, and
// the two hosts' log channel ends accept each other, over loopback here
// instead of the lab's replication link (no namespaces needed).
func TestLabConfigsConnect(t *testing.T) {
	dir := t.TempDir()
	vms, err := labVMs(lab.MaxVMs, engineSynthetic, "")
	if err != nil {
		t.Fatal(err)
	}
	vm := vms[0]
	written, err := labConfigs(dir, vms, labDefaults(len(vms)))
	if err != nil {
		t.Fatal(err)
	}
	var primary, secondary Config
	for _, w := range written {
		raw, err := marshalConfig(w)
		if err != nil {
			t.Fatal(err)
		}
		path := filepath.Join(dir, w.Name+".yaml")
		if err := os.WriteFile(path, raw, 0o644); err != nil {
			t.Fatal(err)
		}
		cfg, err := loadConfig(path)
		if err != nil {
			t.Fatalf("the lab's config for %s is refused: %v", w.Name, err)
		}
		if len(cfg.VMs) != lab.MaxVMs || cfg.VMs[0].Name != lab.VMName || cfg.VMs[lab.MaxVMs-1].Tap != lab.VM(lab.MaxVMs).Tap {
			t.Errorf("%s protects %d VMs, want vm1..vm%d", cfg.Name, len(cfg.VMs), lab.MaxVMs)
		}
		if cfg.LogRingBytes != 2<<20 || cfg.FailureTimeout != time.Second {
			t.Errorf("%s: log ring %d, failure timeout %s: want the defaults of %d VMs", cfg.Name, cfg.LogRingBytes, cfg.FailureTimeout, lab.MaxVMs)
		}
		if cfg.Metrics != "127.0.0.1:9477" {
			t.Errorf("%s serves metrics on %q; want loopback, where lab.Scrape reads them", cfg.Name, cfg.Metrics)
		}
		switch cfg.Role {
		case rolePrimary:
			primary = cfg
		case roleSecondary:
			secondary = cfg
		}
	}
	if primary.Name != lab.NSPrimary || primary.Peer.Name != lab.NSSecondary || secondary.Name != lab.NSSecondary || secondary.Peer.Name != lab.NSPrimary {
		t.Fatalf("names: primary %q (peer %q), secondary %q (peer %q)", primary.Name, primary.Peer.Name, secondary.Name, secondary.Peer.Name)
	}

	serverTLS, err := lockstep.ServerTLS(secondary.Peer.Cert, secondary.Peer.Key, secondary.Peer.CA, secondary.logChannelID())
	if err != nil {
		t.Fatal(err)
	}
	clientTLS, err := lockstep.ClientTLS(primary.Peer.Cert, primary.Peer.Key, primary.Peer.CA, primary.logChannelID())
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	logger := slog.New(slog.NewTextHandler(t.Output(), nil))
	received := make(chan uint64, 1)
	s, err := lockstep.NewSecondary(lockstep.SecondaryConfig{
		Listener: ln, TLS: serverTLS, VM: vm.Name, Boot: true,
		OnFrame: func(pos uint64, frame []byte) error { received <- pos; return nil },
		Logger:  logger,
	})
	if err != nil {
		t.Fatal(err)
	}
	p, err := lockstep.NewPrimary(lockstep.PrimaryConfig{
		Addr: ln.Addr().String(), TLS: clientTLS, VM: vm.Name, Epoch: 1, Incarnation: 1, FromBoot: true,
		Logger: logger,
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 2)
	go func() { done <- s.Run(ctx) }()
	go func() { done <- p.Run(ctx) }()
	defer func() {
		cancel()
		for range 2 {
			if err := <-done; err != nil {
				t.Errorf("run: %v", err)
			}
		}
	}()
	if err := p.AppendFrame(1, []byte("a frame through the lab's PKI")); err != nil {
		t.Fatal(err)
	}
	select {
	case pos := <-received:
		if pos != 1 {
			t.Errorf("the secondary received position %d, want 1", pos)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("no frame through the log channel; refusals: primary %v, secondary %v", p.Stats().Errors, s.Stats().Errors)
	}
}

// The lab takes 1 to 64 VMs, a real one alone, each by lab.VM's rule.
func TestLabVMs(t *testing.T) {
	for _, tc := range []struct {
		n      int
		engine string
		err    string
	}{
		{0, engineSynthetic, "1 to 64"},
		{lab.MaxVMs + 1, engineSynthetic, "1 to 64"},
		{2, engineQEMU, "one real VM"},
	} {
		if _, err := labVMs(tc.n, tc.engine, ""); err == nil || !strings.Contains(err.Error(), tc.err) {
			t.Errorf("--vms %d --guest %s: error %v, want %q", tc.n, tc.engine, err, tc.err)
		}
	}
	vms, err := labVMs(3, engineSynthetic, "")
	if err != nil {
		t.Fatal(err)
	}
	for i, vm := range vms {
		want := lab.VM(i + 1)
		if vm.Name != want.Name || vm.IP != want.IP.String() || vm.MAC != want.MAC.String() || vm.Tap != want.Tap || vm.Engine != engineSynthetic {
			t.Errorf("VM %d: %+v, want %+v", i+1, vm, want)
		}
	}
	if one, many := labDefaults(8), labDefaults(9); one.failureTimeout != 50*time.Millisecond || many.failureTimeout != time.Second || many.logRingBytes != 2<<20 {
		t.Errorf("labDefaults: 8 VMs %+v, 9 VMs %+v", one, many)
	}
}
