package testutil

import (
	"os/exec"
	"path/filepath"
	"runtime"
	"testing"
)

// repoRoot is the repository this file is in.
func repoRoot(tb testing.TB) string {
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		tb.Fatal("testutil: cannot locate the repository")
	}
	return filepath.Join(filepath.Dir(file), "..", "..")
}

// RequireQEMU skips the test when QEMU is not installed.
func RequireQEMU(tb testing.TB) {
	tb.Helper()
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		tb.Skip("qemu-system-x86_64 is not installed (make setup installs it)")
	}
}

// GuestImage builds the real guest (make guest) if needed and returns its
// kernel and initramfs. Call it before leaving the host's network
// namespace: the first build downloads the kernel package.
func GuestImage(tb testing.TB) (kernel, initrd string) {
	tb.Helper()
	root := repoRoot(tb)
	out, err := exec.Command(filepath.Join(root, "scripts/build-guest.sh")).CombinedOutput()
	if err != nil {
		tb.Fatalf("build the guest image (make guest): %v\n%s", err, out)
	}
	return filepath.Join(root, "build/guest/vmlinuz"), filepath.Join(root, "build/guest/initrd.img")
}

// Preload builds the library the recording QEMU runs with (preload/) into
// the test's temporary directory and returns its path.
func Preload(tb testing.TB) string {
	tb.Helper()
	so := filepath.Join(tb.TempDir(), "ftgw-rr.so")
	src := filepath.Join(repoRoot(tb), "preload", "ftgw-rr.c")
	out, err := exec.Command("cc", "-O2", "-Wall", "-shared", "-fPIC", "-o", so, src, "-ldl").CombinedOutput()
	if err != nil {
		tb.Fatalf("build %s: %v\n%s", src, err, out)
	}
	return so
}
