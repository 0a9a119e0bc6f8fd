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

var loadedLine = regexp.MustCompile(`ftgw-init loaded (\d+) puts from (\S+)`)

// TestBoot boots the image `make guest` builds under plain QEMU (TCG, no
// record/replay), in a network namespace of its own, and talks to it: the
// replies and the console's state lines must be what guest.Store computes
// for the same requests.
func TestBoot(t *testing.T) {
	qemu, kernel, initrd := requireGuest(t)
	hostTap(t)
	vm := bootVM(t, qemu, kernelBoot(kernel, initrd, "")...)

	ctx, cancel := context.WithTimeout(context.Background(), bootTimeout)
	defer cancel()
	m := waitSerial(ctx, t, vm.serial, readyLine, vm.exited)
	t.Logf("boot to ready: %v", time.Since(vm.started).Round(time.Millisecond))
	if m[1] != guestAddr {
		t.Fatalf("guest says ip=%s, want %s", m[1], guestAddr)
	}
	if log, _ := os.ReadFile(vm.serial); strings.Contains(string(log), "ftgw-init loaded") {
		t.Errorf("a guest without ftgw.disk says it loaded a log")
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
	waitSerial(ctx, t, vm.serial, line, vm.exited)
	log, _ := os.ReadFile(vm.serial)
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
	waitSerial(ctx, t, vm.serial, regexp.MustCompile(fmt.Sprintf(`^ftgw-bulk conn=1 bytes=%d\r?$`, bulkBytes)), vm.exited)
	waitSerial(ctx, t, vm.serial, regexp.MustCompile(`^ftgw-bulk conn=2 bytes=0 err=.*at most`), vm.exited)

	// ping is answered by the guest's kernel.
	if ping, err := exec.LookPath("ping"); err == nil {
		if out, err := exec.Command(ping, "-c", "1", "-W", "5", "192.0.2.1").CombinedOutput(); err != nil {
			t.Errorf("ping: %v\n%s", err, out)
		}
	} else {
		t.Log("ping is not installed: not checked")
	}
}

// TestBootDisk boots the guest with a copy of the disk `make guest` builds
// as its ftgw.disk, PUTs, kills QEMU with SIGKILL right after the last OK,
// and boots again from the same disk: every acknowledged PUT must be back,
// and the PUT count must go on from where it was.
func TestBootDisk(t *testing.T) {
	qemu, kernel, initrd := requireGuest(t)
	disk := diskArgs(t, kernel)
	hostTap(t)
	boot := func(wantPuts uint64) (*testVM, *guest.Client) {
		t.Helper()
		vm := bootVM(t, qemu, append(kernelBoot(kernel, initrd, "ftgw.disk="+logDevice), disk...)...)
		return vm, waitDiskGuest(t, vm, guestAddr, wantPuts)
	}

	// The same requests to a local Store: the guest's replies must match.
	var want guest.Store
	do := func(c *guest.Client, req string) {
		t.Helper()
		got, err := c.Do(req)
		if err != nil {
			t.Fatalf("%q: %v", req, err)
		}
		if w := want.Apply(req); got != w {
			t.Fatalf("%q = %q, want %q", req, got, w)
		}
	}

	vm, c := boot(0)
	do(c, "GET color")
	do(c, "PUT color") // refused: not logged, not counted
	const puts = 20
	start := time.Now()
	for i := range puts {
		// Keys written more than once: the last value must win after the
		// reboot too.
		do(c, fmt.Sprintf("PUT key%d value %d of %d", i%7, i, puts))
	}
	t.Logf("%d PUTs, each synced to the disk before its OK: %v per PUT (plain TCG)", puts, (time.Since(start) / puts).Round(time.Microsecond))
	do(c, "PUT color blue green\n")
	// No clean shutdown: the OK is all there is to go by.
	vm.cmd.Process.Kill()
	<-vm.exited

	vm, c = boot(want.Puts())
	for key, value := range want.Keys() {
		if v, ok, err := c.Get(key); err != nil || !ok || v != value {
			t.Errorf("after the reboot, Get %s = %q, %v, %v; want %q", key, v, ok, err, value)
		}
		want.Apply("GET " + key)
	}
	do(c, "GET missing")
	do(c, "PUT color red") // its count follows the last one before the kill
	if want.Puts() != puts+2 {
		t.Fatalf("local store has %d puts, want %d", want.Puts(), puts+2)
	}
	// The digest covers every key: nothing came back that was not PUT.
	ctx, cancel := context.WithTimeout(context.Background(), bootTimeout)
	defer cancel()
	requests := len(want.Keys()) + 2
	line := regexp.MustCompile(regexp.QuoteMeta(
		fmt.Sprintf("ftgw-kv req=%d puts=%d digest=%s", requests, want.Puts(), want.Digest())) + `\r?$`)
	waitSerial(ctx, t, vm.serial, line, vm.exited)
}

// TestBootFirmware boots the guest's disk the way firmware does, with no
// -kernel (SeaBIOS, then syslinux from partition 1), PUTs, and kills it;
// then boots the same disk with -kernel and ftgw.disk=/dev/vda2, as the lab
// does: both boots must use the same log.
func TestBootFirmware(t *testing.T) {
	qemu, kernel, initrd := requireGuest(t)
	disk := diskArgs(t, kernel)
	hostTap(t)

	// syslinux.cfg's address, not guestAddr: the host's tap serves both.
	const firmwareAddr = "192.0.2.10/24"
	vm := bootVM(t, qemu, append([]string{"-boot", "order=c"}, disk...)...)
	c := waitDiskGuest(t, vm, firmwareAddr, 0)
	if n, err := c.Put("booted", "by firmware"); err != nil || n != 1 {
		t.Fatalf("Put booted = %d, %v; want 1", n, err)
	}
	vm.cmd.Process.Kill()
	<-vm.exited

	vm = bootVM(t, qemu, append(kernelBoot(kernel, initrd, "ftgw.disk="+logDevice), disk...)...)
	c = waitDiskGuest(t, vm, guestAddr, 1)
	if v, ok, err := c.Get("booted"); err != nil || !ok || v != "by firmware" {
		t.Fatalf("Get booted = %q, %v, %v; want the firmware boot's value", v, ok, err)
	}
}

// logDevice is the key-value log's partition on the disk `make guest`
// builds.
const logDevice = "/dev/vda2"

// diskArgs copies the disk `make guest` builds for the test and returns
// the QEMU arguments that make it the VM's virtio-blk disk.
func diskArgs(t *testing.T, kernel string) []string {
	t.Helper()
	disk := filepath.Join(t.TempDir(), "disk.qcow2")
	image, err := os.ReadFile(filepath.Join(filepath.Dir(kernel), "disk.qcow2"))
	if err != nil {
		t.Fatalf("read the guest's disk (make guest): %v", err)
	}
	if err := os.WriteFile(disk, image, 0o644); err != nil {
		t.Fatal(err)
	}
	return []string{
		"-drive", "if=none,id=disk0,format=qcow2,file=" + disk,
		"-device", "virtio-blk-pci,drive=disk0",
	}
}

// waitDiskGuest waits until vm's guest has loaded wantPuts PUTs from
// logDevice and is ready at addr, and returns a client of it.
func waitDiskGuest(t *testing.T, vm *testVM, addr string, wantPuts uint64) *guest.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), bootTimeout)
	defer cancel()
	m := waitSerial(ctx, t, vm.serial, loadedLine, vm.exited)
	if want := fmt.Sprintf("%d %s", wantPuts, logDevice); m[1]+" "+m[2] != want {
		t.Fatalf("guest loaded %s puts from %s, want %s", m[1], m[2], want)
	}
	m = waitSerial(ctx, t, vm.serial, readyLine, vm.exited)
	if m[1] != addr {
		t.Fatalf("guest says ip=%s, want %s", m[1], addr)
	}
	t.Logf("boot to ready with %d puts on the disk: %v", wantPuts, time.Since(vm.started).Round(time.Millisecond))
	c, err := guest.Dial(net.JoinHostPort(strings.Split(addr, "/")[0], fmt.Sprint(guest.KVPort)), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// requireGuest skips the test unless it can boot the real guest, and
// returns QEMU and the image, built if needed.
func requireGuest(t *testing.T) (qemu, kernel, initrd string) {
	t.Helper()
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
	kernel, initrd = testutil.GuestImage(t)
	return qemu, kernel, initrd
}

// hostTap moves the test into a network namespace of its own and creates
// tap0 there, with the host's address. The tap is persistent: VMs booted
// one after another use it in turn.
func hostTap(t *testing.T) {
	t.Helper()
	testutil.InNewNetns(t)
	if err := tap.Create("tap0"); err != nil {
		t.Fatal(err)
	}
	testutil.LinkUp(t, "tap0", hostAddr)
}

// testVM is a QEMU process running the guest.
type testVM struct {
	cmd     *exec.Cmd
	serial  string        // the console's log
	exited  chan struct{} // closed when QEMU has exited
	started time.Time
}

// kernelBoot is the QEMU arguments of a direct kernel boot of the guest
// image at guestAddr, with params added to the kernel command line.
func kernelBoot(kernel, initrd, params string) []string {
	return []string{
		"-kernel", kernel, "-initrd", initrd,
		"-append", strings.TrimSpace("console=ttyS0 nohz=off quiet panic=-1 ftgw.ip=" + guestAddr + " " + params),
	}
}

// bootVM starts QEMU with the guest's NIC on tap0 and qemuArgs, which say
// what it boots. It is killed when the test ends, and its output logged if
// the test failed.
func bootVM(t *testing.T, qemu string, qemuArgs ...string) *testVM {
	t.Helper()
	vm := &testVM{serial: filepath.Join(t.TempDir(), "serial.log"), exited: make(chan struct{})}
	// QEMU runs in the test's namespace: it is forked from this goroutine's
	// thread, which InNewNetns locked there.
	vm.cmd = exec.Command(qemu, append([]string{
		"-M", "q35", "-nodefaults", "-m", "256", "-nographic",
		"-serial", "file:" + vm.serial,
		"-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no",
		"-device", "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56,tx=timer",
	}, qemuArgs...)...)
	var qemuOut bytes.Buffer
	vm.cmd.Stdout, vm.cmd.Stderr = &qemuOut, &qemuOut
	vm.started = time.Now()
	if err := vm.cmd.Start(); err != nil {
		t.Fatalf("start qemu: %v", err)
	}
	go func() {
		vm.cmd.Wait()
		close(vm.exited)
	}()
	t.Cleanup(func() {
		vm.cmd.Process.Kill()
		<-vm.exited
		if t.Failed() {
			log, _ := os.ReadFile(vm.serial)
			t.Logf("qemu %s output:\n%s\nserial console:\n%s", vm.serial, qemuOut.Bytes(), log)
		}
	})
	return vm
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
