package main

import (
	"io"
	"log/slog"
	"runtime"
	"testing"

	"golang.org/x/sys/unix"
)

func TestPinToCPUKeepsTheGoroutineOnThatCPU(t *testing.T) {
	var before unix.CPUSet
	if err := unix.SchedGetaffinity(0, &before); err != nil {
		t.Fatal(err)
	}
	cpu := -1
	for c := runtime.NumCPU() - 1; c >= 0; c-- {
		if before.IsSet(c) {
			cpu = c
			break
		}
	}
	if cpu < 0 {
		t.Skip("no CPU in this process's affinity mask")
	}
	got := make(chan unix.CPUSet, 1)
	go func() {
		pinToCPU(cpu, slog.New(slog.NewTextHandler(io.Discard, nil)))
		runtime.Gosched() // still the same thread after a reschedule
		var set unix.CPUSet
		unix.SchedGetaffinity(0, &set)
		got <- set
	}()
	set := <-got
	if set.Count() != 1 || !set.IsSet(cpu) {
		t.Fatalf("pinned goroutine's thread may run on %d CPUs (CPU %d: %v), want only CPU %d", set.Count(), cpu, set.IsSet(cpu), cpu)
	}
	// The thread ended with the goroutine: the test's own thread is as free as before.
	var after unix.CPUSet
	if err := unix.SchedGetaffinity(0, &after); err != nil {
		t.Fatal(err)
	}
	if after != before {
		t.Fatalf("the calling thread's affinity changed: %v -> %v", before, after)
	}
}

func TestPinLogReaderIsOnUnlessTurnedOff(t *testing.T) {
	cfg, err := loadConfig(writeConfig(t, goodPrimary))
	if err != nil {
		t.Fatal(err)
	}
	if !cfg.PinLogReader {
		t.Error("pin_log_reader is off by default")
	}
	cfg, err = loadConfig(writeConfig(t, goodPrimary+"pin_log_reader: false\n"))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.PinLogReader {
		t.Error("pin_log_reader: false left it on")
	}
}
