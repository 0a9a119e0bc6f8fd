package replay

import "slices"

// Where a replayer may be held.
//
// The engine holds a replayer at the end of the log it has with QMP
// replay-break, and a break pauses the VM (vm_stop). In QEMU 7.2 a pause is
// not invisible to the guest: virtio-net drops a pending transmit timer
// when the VM stops and arms it a whole period anew when the VM resumes
// (virtio_net_set_status). A replayer paused between the guest's transmit
// kick and the timer's expiry fires that timer later than the recording
// did, so when the log reaches its clock-virtual checkpoint no virtual
// timer has expired, the checkpoint never matches, and the replayer spins
// at that icount for good. (Pausing the recorder over QMP is, for this timer,
// harmless: the log records where the timer fired, and the replayer, whose
// timer is then already due, fires it there.)
//
// The kick is not in the log, but the expiry is: a clock-virtual
// checkpoint, at most txTimerInstructions after the kick (the kick makes
// the vCPU recompute its budget, and a recorder's budget ends exactly at
// the next deadline). So an icount is a safe hold when no clock-virtual
// checkpoint falls within holdWindow instructions after it, which is
// known once the log has gone that far past it, and when it lies strictly
// inside an INSTRUCTION event: a replayer held there has read nothing
// after that event.

// txTimerInstructions is virtio-net's transmit timer (tx=timer, 150 µs) in
// guest instructions at IcountShift, rounded up as QEMU rounds deadlines.
const txTimerInstructions = (150_000 + 1<<IcountShift - 1) >> IcountShift

// holdWindow is how far past a hold no virtual timer may fire: the
// transmit timer and a margin.
const holdWindow = txTimerInstructions + 64

// holdHistory bounds what holdPoints remembers, in instructions before the
// end of the log: a hold further back than this is not looked for.
const holdHistory = 64 * holdWindow

// holdPoints finds the latest safe hold in a log as it is scanned. Feed it
// every event in order; Safe never moves back.
type holdPoints struct {
	icount uint64   // the log's icount so far
	ends   []uint64 // ends of recent INSTRUCTION events, ascending
	fires  []uint64 // icounts of recent clock-virtual checkpoints, ascending
	safe   uint64   // the latest safe hold found; 0: none yet
}

func (h *holdPoints) note(ev LogEvent) {
	switch ev.Kind {
	case KindCheckpointClockVirtual:
		h.fires = append(h.fires, ev.Icount)
	case KindInstruction:
		// Every event up to the icount before this one is known, and
		// none lies inside it: the timer fires below ev.Icount are all
		// in fires.
		h.icount = ev.Icount
		h.ends = append(h.ends, ev.Icount)
		h.find()
		h.forget()
	}
}

// find moves safe to the latest safe hold, if there is a later one.
func (h *holdPoints) find() {
	if h.icount <= holdWindow+1 {
		return
	}
	floor := max(h.safe, h.icount-min(h.icount, holdHistory))
	x := h.icount - 1 - holdWindow // the last icount whose window is known
	for x > floor {
		if y, ok := firstAfter(h.fires, x); ok && y <= x+holdWindow {
			// Every icount from y-holdWindow to x has y in its window.
			if y <= holdWindow+1 {
				return
			}
			x = y - holdWindow - 1
			continue
		}
		if _, end := slices.BinarySearch(h.ends, x); end {
			x--
			continue
		}
		h.safe = x
		return
	}
}

// forget drops what no later search will look at.
func (h *holdPoints) forget() {
	keep := max(h.safe, h.icount-min(h.icount, holdHistory))
	h.ends = dropBelow(h.ends, keep)
	h.fires = dropBelow(h.fires, keep)
}

// firstAfter is the first element of the ascending s above x.
func firstAfter(s []uint64, x uint64) (uint64, bool) {
	i, _ := slices.BinarySearch(s, x+1)
	if i == len(s) {
		return 0, false
	}
	return s[i], true
}

// dropBelow drops the elements of the ascending s below x.
func dropBelow(s []uint64, x uint64) []uint64 {
	i, _ := slices.BinarySearch(s, x)
	return s[:copy(s, s[i:])]
}
