package main

import (
	"fmt"
	"net"
	"runtime"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/ftgw/ftgw/internal/tap"
	"github.com/ftgw/ftgw/pkg/guest"
)

// generatorAlone is how fast the guest's BLAST offers frames when the path
// costs it least: the same write loop on a tap of its own whose XDP
// program drops every frame, in a network namespace of its own that
// vanishes with the thread. A path that is not near this rate is not
// bound by the generator: on a single-queue tap, tun runs guest_egress and
// everything it redirects to inside the guest's write, so plain
// forwarding's cost is the writer's.
//
// cpu is the CPU time the writing thread used (RUSAGE_THREAD: the thread,
// and its namespace, are gone before a caller could read /proc).
func generatorAlone(count, size int) (res guest.BlastResult, cpu time.Duration, err error) {
	type result struct {
		res guest.BlastResult
		cpu time.Duration
		err error
	}
	done := make(chan result, 1)
	go func() {
		// Never unlocked: the thread leaves with the goroutine, and with
		// it the namespace.
		runtime.LockOSThread()
		var cpu time.Duration
		res, err := func() (guest.BlastResult, error) {
			if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
				return guest.BlastResult{}, fmt.Errorf("new network namespace: %w", err)
			}
			t, err := tap.Open("gen0")
			if err != nil {
				return guest.BlastResult{}, err
			}
			defer t.Close()
			l, err := netlink.LinkByName(t.Name())
			if err != nil {
				return guest.BlastResult{}, err
			}
			if err := netlink.LinkSetUp(l); err != nil {
				return guest.BlastResult{}, fmt.Errorf("bring up %s: %w", t.Name(), err)
			}
			prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
				Type:         ebpf.XDP,
				License:      "Dual BSD/GPL",
				Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 1 /* XDP_DROP */), asm.Return()},
			})
			if err != nil {
				return guest.BlastResult{}, fmt.Errorf("load xdp drop: %w", err)
			}
			defer prog.Close()
			xl, err := link.AttachXDP(link.XDPOptions{Program: prog, Interface: l.Attrs().Index})
			if err != nil {
				return guest.BlastResult{}, fmt.Errorf("attach xdp drop to %s: %w", t.Name(), err)
			}
			defer xl.Close()
			src := net.HardwareAddr{0x02, 0, 0, 0, 0, 1}
			dst := net.HardwareAddr{0x02, 0, 0, 0, 0, 2}
			guest.BlastTap(t, src, dst, count/10, size) // warm-up
			before := threadCPU()
			res := guest.BlastTap(t, src, dst, count, size)
			cpu = threadCPU() - before
			return res, nil
		}()
		done <- result{res, cpu, err}
	}()
	r := <-done
	return r.res, r.cpu, r.err
}

// threadCPU is the calling thread's user and system time.
func threadCPU() time.Duration {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_THREAD, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
