package guest

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"log/slog"
	"maps"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"testing"
	"time"

	"github.com/vishvananda/netns"

	"github.com/ftgw/ftgw/internal/tap"
	"github.com/ftgw/ftgw/internal/testutil"
)

func TestEndToEnd(t *testing.T) {
	ns := testutil.InNewNetns(t)
	if err := tap.Create("tap0"); err != nil {
		t.Fatal(err)
	}

	cfg := Config{Tap: "tap0", IP: guestIP, MAC: guestMAC, Control: filepath.Join(t.TempDir(), "guest.sock")}
	ctx, cancel := context.WithCancel(context.Background())
	runErr := make(chan error, 1)
	go func() {
		// Run opens the tap from its own thread, which must be in the test's
		// namespace. The thread stays locked and dies with this goroutine.
		runtime.LockOSThread()
		if err := netns.Set(ns); err != nil {
			runErr <- err
			return
		}
		runErr <- Run(ctx, cfg, slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug})))
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-runErr:
			if err != nil {
				t.Errorf("Run: %v", err)
			}
		case <-time.After(5 * time.Second):
			t.Errorf("Run did not return after cancel")
		}
	})

	// The host side of the tap.
	testutil.LinkUp(t, "tap0", hostIP.String()+"/24")

	// The control socket comes up after the tap is attached.
	waitState(t, cfg.Control, runErr)

	c, err := Dial(net.JoinHostPort(guestIP.String(), "7000"), 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()

	if n, err := c.Put("color", "blue green"); err != nil || n != 1 {
		t.Fatalf("Put color = %d, %v; want 1", n, err)
	}
	if n, err := c.Put("n", "1"); err != nil || n != 2 {
		t.Fatalf("Put n = %d, %v; want 2", n, err)
	}
	if v, ok, err := c.Get("color"); err != nil || !ok || v != "blue green" {
		t.Fatalf("Get color = %q, %v, %v", v, ok, err)
	}
	if v, ok, err := c.Get("missing"); err != nil || ok || v != "" {
		t.Fatalf("Get missing = %q, %v, %v", v, ok, err)
	}
	if resp, err := c.Do("FROB x"); err != nil || resp != "ERR unknown command" {
		t.Fatalf("Do FROB = %q, %v", resp, err)
	}
	if _, err := c.Put("bad key", "v"); err == nil {
		t.Fatalf("Put with a space in the key succeeded")
	}
	if n, err := c.Put("color", "red"); err != nil || n != 3 {
		t.Fatalf("Put color again = %d, %v; want 3", n, err)
	}

	ping(t)

	st, err := QueryState(cfg.Control)
	if err != nil {
		t.Fatal(err)
	}
	wantKeys := map[string]string{"color": "red", "n": "1"}
	if st.Puts != 3 || !maps.Equal(st.Keys, wantKeys) || st.Digest != digest(3, wantKeys) {
		t.Errorf("state = %+v, want puts 3 keys %v", st, wantKeys)
	}
	// 6 KV requests, 1 ping, at least 1 ARP request; the kernel's IPv6
	// chatter is ignored.
	if st.Replies < 8 || st.Frames != st.Replies+st.Ignored {
		t.Errorf("counters = frames %d replies %d ignored %d", st.Frames, st.Replies, st.Ignored)
	}
}

// waitState polls the control socket until the guest answers.
func waitState(t *testing.T, path string, runErr <-chan error) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		_, err := QueryState(path)
		if err == nil {
			return
		}
		select {
		case err := <-runErr:
			t.Fatalf("Run: %v", err)
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("guest not up: %v", err)
		}
	}
}

// ping sends one ICMP echo request from the host side and checks the reply.
func ping(t *testing.T) {
	t.Helper()
	conn, err := net.ListenPacket("ip4:icmp", hostIP.String())
	if err != nil {
		t.Fatalf("listen icmp: %v", err)
	}
	defer conn.Close()
	data := []byte("ftgw e2e ping")
	if _, err := conn.WriteTo(icmpEcho(8, 0x4242, 1, data), &net.IPAddr{IP: guestIP.AsSlice()}); err != nil {
		t.Fatalf("send echo request: %v", err)
	}
	if err := conn.SetReadDeadline(time.Now().Add(3 * time.Second)); err != nil {
		t.Fatal(err)
	}
	want := icmpEcho(0, 0x4242, 1, data)
	buf := make([]byte, 1500)
	for range 20 { // a raw socket sees every ICMP message; skip others
		n, from, err := conn.ReadFrom(buf)
		if errors.Is(err, os.ErrDeadlineExceeded) {
			break
		}
		if err != nil {
			t.Fatalf("read echo reply: %v", err)
		}
		m := buf[:n]
		if from.String() == guestIP.String() && n >= 8 && m[0] == 0 && binary.BigEndian.Uint16(m[4:]) == 0x4242 {
			if !bytes.Equal(m, want) {
				t.Fatalf("echo reply = %x, want %x", m, want)
			}
			return
		}
	}
	t.Fatal("no echo reply")
}
