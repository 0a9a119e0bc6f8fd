package main

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"strings"
	"time"

	"github.com/ftgw/ftgw/pkg/guest"
)

const (
	// loadOrderDiskFile lists virtio-blk's modules, in modulesDir: loaded
	// only when there is a disk, so that a guest without one runs as it
	// did before disks existed.
	loadOrderDiskFile = "load-order-disk"

	// diskWait bounds the wait for the disk's device node.
	diskWait = 10 * time.Second
)

// openDiskStore loads the virtio-blk driver, opens the block device at path
// and returns a store rebuilt from the log on it, with the log, to which
// every PUT is to be appended from now on.
func openDiskStore(path string) (store *guest.Store, log *guest.DiskLog, err error) {
	if err := loadModules(modulesDir, loadOrderDiskFile); err != nil {
		return nil, nil, err
	}
	if err := waitForBlockDevice(path, diskWait); err != nil {
		return nil, nil, err
	}
	dev, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("open disk: %w", err)
	}
	// The device stays open for the guest's life; closed only if the log
	// cannot be read.
	defer func() {
		if err != nil {
			dev.Close()
		}
	}()
	// A block device's size is where its end is: stat reports 0.
	size, err := dev.Seek(0, io.SeekEnd)
	if err != nil {
		return nil, nil, fmt.Errorf("size of %s: %w", path, err)
	}
	store = guest.NewStore()
	log, err = guest.OpenDiskLog(dev, size, func(req []byte) error {
		// The log holds only PUTs that succeeded, and a PUT's success does
		// not depend on the store: each must succeed again.
		if reply := store.Apply(string(req)); !strings.HasPrefix(reply, "OK ") {
			return fmt.Errorf("request %q replies %q, not OK: is this disk's log the guest's?", req, reply)
		}
		return nil
	})
	if err != nil {
		return nil, nil, fmt.Errorf("read log on %s: %w", path, err)
	}
	return store, log, nil
}

// waitForBlockDevice waits up to timeout for path to be a block device.
//
// It is one at once, in practice: device_add_disk scans the partitions
// before virtio-blk's probe returns, and devtmpfs has created each node
// before the kernel goes on, so the node is there when finit_module
// returns. The wait covers a driver that probes asynchronously; only a
// guest that would otherwise fail to boot reads the clock in it.
func waitForBlockDevice(path string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		info, err := os.Stat(path)
		switch {
		case err == nil && info.Mode()&fs.ModeDevice != 0 && info.Mode()&fs.ModeCharDevice == 0:
			return nil
		case err == nil:
			return fmt.Errorf("disk %s is not a block device (%v)", path, info.Mode())
		case !errors.Is(err, fs.ErrNotExist):
			return fmt.Errorf("stat disk: %w", err)
		case time.Now().After(deadline):
			return fmt.Errorf("disk %s did not appear within %v (is the VM's disk virtio-blk?)", path, timeout)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// errDiskFull is the reply to a PUT the log has no room for; the store is
// unchanged, and GETs are still answered.
const errDiskFull = "ERR disk full"

// applyLogged applies req to store and returns the reply. With a log, a PUT
// that succeeds is appended to it, and synced, before it is applied: once
// the client holds the OK, the PUT survives the VM.
//
// An error means the log's device failed: what it holds is unknown, so the
// guest must stop rather than reply (see guest.DiskLog.Append).
func applyLogged(store *guest.Store, log *guest.DiskLog, req string) (string, error) {
	if log == nil {
		return store.Apply(req), nil
	}
	// Whether a PUT succeeds depends only on its text, never on the
	// store's contents, so an empty store tells without changing this one.
	// Applying first and logging after would leave the store ahead of the
	// log when the log is full.
	if !strings.HasPrefix(new(guest.Store).Apply(req), "OK ") {
		return store.Apply(req), nil
	}
	err := log.Append([]byte(req))
	if errors.Is(err, guest.ErrLogFull) {
		return errDiskFull, nil
	}
	if err != nil {
		return "", fmt.Errorf("log put: %w", err)
	}
	return store.Apply(req), nil
}
