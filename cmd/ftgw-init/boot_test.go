package main

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/ftgw/ftgw/internal/tap"
	"github.com/ftgw/ftgw/internal/testutil"
	"github.com/ftgw/ftgw/pkg/guest"
)

func TestParseCmdline(t *testing.T) {
	ok := []struct {
		cmdline  string
		wantIP   string
		wantDisk string
	}{
		{"console=ttyS0 quiet ftgw.ip=192.0.2.1/24\n", "192.0.2.1/24", ""},
		{"ftgw.ip=198.18.0.10/32 panic=-1", "198.18.0.10/32", ""},
		{"BOOT_IMAGE=/vmlinuz ftgw.ip=192.0.2.1/24 ftgwx=1 ftgw=2", "192.0.2.1/24", ""},
		{"ftgw.disk=/dev/vda ftgw.ip=192.0.2.1/24", "192.0.2.1/24", "/dev/vda"},
		{"ftgw.ip=192.0.2.1/24 ftgw.disk=/dev/vda2\n", "192.0.2.1/24", "/dev/vda2"},
	}
	for _, c := range ok {
		cfg, err := parseCmdline(c.cmdline)
		if err != nil || cfg.ip != netip.MustParsePrefix(c.wantIP) || cfg.disk != c.wantDisk {
			t.Errorf("parseCmdline(%q) = %v %q, %v; want %s %q", c.cmdline, cfg.ip, cfg.disk, err, c.wantIP, c.wantDisk)
		}
	}
	bad := []string{
		"",
		"console=ttyS0",
		"ftgw.ip=",
		"ftgw.ip=192.0.2.1",    // no prefix length
		"ftgw.ip=192.0.2.1/33", // bad prefix length
		"ftgw.ip=192.0.2.1/0",
		"ftgw.ip=2001:db8::1/64",
		"ftgw.ip=::ffff:192.0.2.1/120", // IPv4-mapped is not IPv4
		"ftgw.ip=192.0.2.1/24 ftgw.ip=192.0.2.2/24",
		"ftgw.ip=192.0.2.1/24 ftgw.mac=52:54:00:12:34:56", // QEMU sets the MAC
		"ftgw.ip",
		"ftgw.disk=/dev/vda", // no address
		"ftgw.ip=192.0.2.1/24 ftgw.disk=",
		"ftgw.ip=192.0.2.1/24 ftgw.disk",
		"ftgw.ip=192.0.2.1/24 ftgw.disk=vda",
		"ftgw.ip=192.0.2.1/24 ftgw.disk=/dev/",
		"ftgw.ip=192.0.2.1/24 ftgw.disk=/dev/vda ftgw.disk=/dev/vdb",
	}
	for _, cmdline := range bad {
		if cfg, err := parseCmdline(cmdline); err == nil {
			t.Errorf("parseCmdline(%q) = %v, want an error", cmdline, cfg.ip)
		}
	}
}

const (
	bootTimeout = 60 * time.Second // TCG boots in seconds; a loaded machine is slower
	guestAddr   = "192.0.2.1/24"
	hostAddr    = "192.0.2.254/24"
)

var readyLine = regexp.MustCompile(`ftgw-init ready ip=(\S+)`)

// TestBoot boots the image `make guest` builds under plain QEMU (TCG, no
// record/replay), in a network namespace of its own, and talks to it: the
// replies and the console's state lines must be what guest.Store computes
// for the same requests.
func TestBoot(t *testing.T) {
	if testing.Short() {
		t.Skip("boots a VM under TCG, which takes seconds")
	}
	testutil.RequireRoot(t)
	qemu, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		t.Skip("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
	}
	// Before leaving the host's namespace: the first build downloads the
	// kernel package.
	kernel, initrd := testutil.GuestImage(t)

	testutil.InNewNetns(t)
	if err := tap.Create("tap0"); err != nil {
		t.Fatal(err)
	}
	link, err := netlink.LinkByName("tap0")
	if err != nil {
		t.Fatal(err)
	}
	addr, err := netlink.ParseAddr(hostAddr)
	if err != nil {
		t.Fatal(err)
	}
	if err := netlink.AddrAdd(link, addr); err != nil {
		t.Fatalf("add address to tap0: %v", err)
	}
	if err := netlink.LinkSetUp(link); err != nil {
		t.Fatalf("set tap0 up: %v", err)
	}

	serial := filepath.Join(t.TempDir(), "serial.log")
	// QEMU runs in the test's namespace: it is forked from this goroutine's
	// thread, which InNewNetns locked there.
	cmd := exec.Command(qemu,
		"-M", "q35", "-nodefaults", "-m", "256", "-nographic",
		"-serial", "file:"+serial,
		"-kernel", kernel, "-initrd", initrd,
		"-append", "console=ttyS0 nohz=off quiet panic=-1 ftgw.ip="+guestAddr,
		"-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no",
		"-device", "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56,tx=timer",
	)
	var qemuOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &qemuOut, &qemuOut
	start := time.Now()
	if err := cmd.Start(); err != nil {
		t.Fatalf("start qemu: %v", err)
	}
	exited := make(chan struct{})
	go func() {
		cmd.Wait()
		close(exited)
	}()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-exited
		if t.Failed() {
			log, _ := os.ReadFile(serial)
			t.Logf("qemu output:\n%s\nserial console:\n%s", qemuOut.Bytes(), log)
		}
	})

	ctx, cancel := context.WithTimeout(context.Background(), bootTimeout)
	defer cancel()
	m := waitSerial(ctx, t, serial, readyLine, exited)
	t.Logf("boot to ready: %v", time.Since(start).Round(time.Millisecond))
	if m[1] != guestAddr {
		t.Fatalf("guest says ip=%s, want %s", m[1], guestAddr)
	}

	c, err := guest.Dial(net.JoinHostPort(strings.Split(guestAddr, "/")[0], fmt.Sprint(guest.KVPort)), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if n, err := c.Put("color", "blue green"); err != nil || n != 1 {
		t.Fatalf("Put color = %d, %v; want 1", n, err)
	}
	if v, ok, err := c.Get("color"); err != nil || !ok || v != "blue green" {
		t.Fatalf("Get color = %q, %v, %v", v, ok, err)
	}

	// The same requests to a local Store: every reply and every console line
	// must match it.
	var want guest.Store
	want.Apply("PUT color blue green")
	want.Apply("GET color")
	requests := 2
	for _, req := range []string{
		"PUT n 1", "GET missing", "FROB x", "PUT color red\n", "GET color", "PUT", "PUT n 2",
	} {
		got, err := c.Do(req)
		if err != nil {
			t.Fatalf("%q: %v", req, err)
		}
		if w := want.Apply(req); got != w {
			t.Errorf("%q = %q, want %q", req, got, w)
		}
		requests++
	}
	// The console lines come in request order, so the last one stands for
	// all; it also shows that every request was printed.
	line := regexp.MustCompile(regexp.QuoteMeta(
		fmt.Sprintf("ftgw-kv req=%d puts=%d digest=%s", requests, want.Puts(), want.Digest())) + `\r?$`)
	waitSerial(ctx, t, serial, line, exited)
	log, _ := os.ReadFile(serial)
	if n := strings.Count(string(log), "ftgw-kv req="); n != requests {
		t.Errorf("console has %d ftgw-kv lines, want %d", n, requests)
	}

	// A bulk transfer over the guest kernel's TCP: every byte the pattern's,
	// and the console line after it; then a request the guest refuses.
	const bulkBytes = 1 << 20
	ip := strings.Split(guestAddr, "/")[0]
	for i, ask := range []int64{bulkBytes, guest.MaxBulkBytes + 1} {
		conn, err := net.DialTimeout("tcp", net.JoinHostPort(ip, fmt.Sprint(guest.BulkPort)), 5*time.Second)
		if err != nil {
			t.Fatalf("dial bulk: %v", err)
		}
		tctx, tcancel := context.WithTimeout(ctx, 30*time.Second)
		res := guest.ReceiveBulk(tctx, conn, ask)
		tcancel()
		if i == 0 && !res.OK() {
			t.Fatalf("bulk transfer of %d bytes: %+v", ask, res)
		}
		if i == 1 && (res.Err == nil || !strings.Contains(res.Err.Error(), "guest: ERR")) {
			t.Fatalf("bulk transfer of %d bytes: %+v, want the guest's ERR", ask, res)
		}
		if i == 0 {
			t.Logf("bulk: %d bytes in %v (%.0f Mbit/s, plain TCG)", res.Received, res.Elapsed.Round(time.Millisecond),
				float64(res.Received)*8/res.Elapsed.Seconds()/1e6)
		}
	}
	waitSerial(ctx, t, serial, regexp.MustCompile(fmt.Sprintf(`^ftgw-bulk conn=1 bytes=%d\r?$`, bulkBytes)), exited)
	waitSerial(ctx, t, serial, regexp.MustCompile(`^ftgw-bulk conn=2 bytes=0 err=.*at most`), exited)

	// ping is answered by the guest's kernel.
	if ping, err := exec.LookPath("ping"); err == nil {
		if out, err := exec.Command(ping, "-c", "1", "-W", "5", "192.0.2.1").CombinedOutput(); err != nil {
			t.Errorf("ping: %v\n%s", err, out)
		}
	} else {
		t.Log("ping is not installed: not checked")
	}
}

// waitSerial polls the serial log until a line matches re, and returns the
// match. It fails the test if QEMU exits or ctx ends first.
func waitSerial(ctx context.Context, t *testing.T, path string, re *regexp.Regexp, exited <-chan struct{}) []string {
	t.Helper()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		log, _ := os.ReadFile(path) // absent until QEMU creates it
		for _, line := range strings.Split(string(log), "\n") {
			if m := re.FindStringSubmatch(line); m != nil {
				return m
			}
		}
		select {
		case <-exited:
			t.Fatalf("qemu exited before the console showed %q", re)
		case <-ctx.Done():
			t.Fatalf("console did not show %q within %v", re, bootTimeout)
		case <-tick.C:
		}
	}
}
