package guest

import (
	"bufio"
	"context"
	"github.com/ftgw/ftgw/internal/testutil"
	"log/slog"
	"net"
	"net/netip"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
)

func TestRunRejectsBadConfig(t *testing.T) {
	for name, cfg := range map[string]Config{
		"IPv6 address": {Tap: "unused0", IP: netip.MustParseAddr("2001:db8::1"), MAC: guestMAC},
		"no address":   {Tap: "unused0", MAC: guestMAC},
		"short MAC":    {Tap: "unused0", IP: guestIP, MAC: guestMAC[:4]},
	} {
		// Checked before the tap is opened, so this needs no root.
		if err := Run(context.Background(), cfg, nil); err == nil || !strings.Contains(err.Error(), "check config") {
			t.Errorf("%s: Run = %v, want a config error", name, err)
		}
	}
}

func TestListenControl(t *testing.T) {
	path := filepath.Join(t.TempDir(), "c.sock")
	ln, err := listenControl(path)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := listenControl(path); err == nil {
		t.Fatal("second listener took a live socket")
	}

	// A socket file left by a dead guest is replaced.
	ul := ln.(*net.UnixListener)
	ul.SetUnlinkOnClose(false)
	ln.Close()
	ln, err = listenControl(path)
	if err != nil {
		t.Fatalf("listen over stale socket: %v", err)
	}
	ln.Close()
}

// TestControlProtocol runs the control server against a fake owner.
func TestControlProtocol(t *testing.T) {
	path := filepath.Join(t.TempDir(), "c.sock")
	ln, err := listenControl(path)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	reqs := make(chan chan State)
	done := make(chan struct{})
	go func() {
		serveControl(ctx, ln, control{state: reqs}, slog.New(slog.DiscardHandler))
		close(done)
	}()
	go func() { // the owner: answers with a fixed state
		for {
			select {
			case r := <-reqs:
				r <- State{Puts: 1, Keys: map[string]string{"k": "v"}, Digest: "d"}
			case <-ctx.Done():
				return
			}
		}
	}()

	st, err := QueryState(path)
	if err != nil || st.Puts != 1 || st.Keys["k"] != "v" || st.Digest != "d" {
		t.Errorf("QueryState = %+v, %v", st, err)
	}

	// Several commands on one connection, and an unknown one.
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(5 * time.Second))
	r := bufio.NewReader(c)
	for _, cmd := range []string{"NOPE", "STATE", "STATE"} {
		c.Write([]byte(cmd + "\n"))
		line, err := r.ReadString('\n')
		if err != nil {
			t.Fatalf("%s: %v", cmd, err)
		}
		if (cmd == "NOPE") != strings.HasPrefix(line, "ERR") {
			t.Errorf("%s → %q", cmd, line)
		}
	}

	// Shutdown closes idle connections and stops the server.
	cancel()
	ln.Close()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("control server did not stop")
	}
	if _, err := r.ReadString('\n'); err == nil {
		t.Error("connection still open after shutdown")
	}
}

// TestClientMatching checks that the Client takes neither a late reply nor
// a duplicate for another request's answer. A fake server on the loopback
// of a fresh namespace plays the guest.
func TestClientMatching(t *testing.T) {
	testutil.InNewNetns(t)
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		t.Fatal(err)
	}
	if err := netlink.LinkSetUp(lo); err != nil {
		t.Fatal(err)
	}
	srv, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	go func() {
		buf := make([]byte, 1500)
		for {
			n, from, err := srv.ReadFrom(buf)
			if err != nil {
				return // closed
			}
			switch req := string(buf[:n]); req {
			case "SLOW":
				time.Sleep(200 * time.Millisecond)
				srv.WriteTo([]byte("VALUE late"), from)
			case "PUT k v":
				srv.WriteTo([]byte("OK 7 k\n"), from)
			case "PUT dup v":
				// What a new primary's VM can do after a failover: send
				// an earlier answer again before this one.
				srv.WriteTo([]byte("OK 7 k"), from)
				srv.WriteTo([]byte("OK 8 dup"), from)
			case "GET dup":
				srv.WriteTo([]byte("OK 8 dup"), from)
				srv.WriteTo([]byte("NOTFOUND k"), from)
				srv.WriteTo([]byte("VALUE dup v"), from)
			case "PUT bad v":
				srv.WriteTo([]byte("ERR no"), from)
			default:
				srv.WriteTo([]byte("VALUE wrong shape"), from)
			}
		}
	}()

	c, err := Dial(srv.LocalAddr().String(), 50*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Do("SLOW"); err == nil {
		t.Fatal("Do SLOW did not time out")
	}
	time.Sleep(300 * time.Millisecond) // the late reply is now queued
	if n, err := c.Put("k", "v"); err != nil || n != 7 {
		t.Errorf("Put after a late reply = %d, %v; want 7", n, err)
	}
	if n, err := c.Put("dup", "v"); err != nil || n != 8 {
		t.Errorf("Put after another key's duplicate = %d, %v; want 8", n, err)
	}
	if v, found, err := c.Get("dup"); err != nil || !found || v != "v" {
		t.Errorf("Get after other replies = %q, %v, %v; want v", v, found, err)
	}
	if _, err := c.Put("bad", "v"); err == nil || !strings.Contains(err.Error(), "guest: ERR no") {
		t.Errorf("Put answered by ERR: err = %v, want the guest's error", err)
	}
	if _, err := c.Put("x", "y"); err == nil || !strings.Contains(err.Error(), "timeout") {
		t.Errorf("Put answered only by a reply of another shape: err = %v, want a timeout", err)
	}
}
