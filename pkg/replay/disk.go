package replay

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// A VM's disk (Machine.Disk) is a qcow2 image per copy of the VM, in the
// copy's directory. These are the operations on it that happen outside
// QEMU, through qemu-img.
//
// Each copy writes only its own image: a recorder's writes go to its disk,
// and blkreplay has a replayer do the same writes at the same instructions
// to its own. So two copies stay identical only if they start identical:
// from the same image at boot, or from the same snapshot when a new
// secondary is rebuilt (ExportDiskSnapshot).

// CopyDisk makes dst a standalone qcow2 copy of the image src (any format
// qemu-img reads; a backing chain is flattened): a copy of the VM's disk
// that no other copy shares. dst appears whole or not at all.
func CopyDisk(src, dst string) error {
	tmp := dst + ".new"
	if err := qemuImg("convert", "-O", "qcow2", src, tmp); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("copy disk %s: %w", src, err)
	}
	return os.Rename(tmp, dst)
}

// ExportDiskSnapshot writes to dst the VM's disk in dir as it was at the
// snapshot tag, as a standalone image that carries a disk-only snapshot
// of the same name: a replayer's -loadvm needs every disk to have it.
//
// It may run while QEMU goes on writing the disk: a snapshot's clusters and
// tables are never written again while it exists (qcow2 copies on write),
// and savevm flushed them. -U reads the image that QEMU holds locked.
func ExportDiskSnapshot(dir, tag, dst string) error {
	if err := qemuImg("convert", "-U", "-O", "qcow2", "-l", "snapshot.name="+tag, DiskPath(dir), dst); err != nil {
		return fmt.Errorf("export disk snapshot %s: %w", tag, err)
	}
	if err := qemuImg("snapshot", "-c", tag, dst); err != nil {
		return fmt.Errorf("export disk snapshot %s: %w", tag, err)
	}
	return nil
}

// DiskDigest is the SHA-256 (hex) of the disk image's contents, as the
// guest sees them: two images with the same digest hold the same disk,
// whatever their layout. It reads an image QEMU may hold (-U); the VM
// should be paused for the answer to mean anything.
func DiskDigest(image string) (string, error) {
	tmp, err := os.MkdirTemp("", "ftgw-disk-digest")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(tmp)
	raw := filepath.Join(tmp, "disk.raw")
	if err := qemuImg("convert", "-U", "-O", "raw", image, raw); err != nil {
		return "", fmt.Errorf("digest of %s: %w", image, err)
	}
	f, err := os.Open(raw)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

func qemuImg(args ...string) error {
	out, err := exec.Command("qemu-img", args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("qemu-img %s: %v: %s", args[0], err, strings.TrimSpace(string(out)))
	}
	return nil
}
