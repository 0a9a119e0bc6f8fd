package replay

import (
	"math/rand/v2"
	"slices"
	"testing"
)

// logOf builds the events of a log: a number is an INSTRUCTION event of
// that many instructions, "fire" a clock-virtual checkpoint, "irq" an
// interrupt.
func logOf(items ...any) []LogEvent {
	var evs []LogEvent
	var icount uint64
	for _, it := range items {
		switch it := it.(type) {
		case int:
			icount += uint64(it)
			evs = append(evs, LogEvent{Kind: KindInstruction, Icount: icount})
		case string:
			kind := map[string]Kind{"fire": KindCheckpointClockVirtual, "irq": KindInterrupt}[it]
			evs = append(evs, LogEvent{Kind: kind, Icount: icount})
		}
	}
	return evs
}

func holdAfter(evs []LogEvent) uint64 {
	var h holdPoints
	for _, ev := range evs {
		h.note(ev)
	}
	return h.safe
}

func TestHoldPoints(t *testing.T) {
	const w = holdWindow
	for _, tc := range []struct {
		name string
		log  []LogEvent
		want uint64
	}{
		{"too short a log", logOf(w), 0},
		{"no timer near the end", logOf(10_000, "fire", 20_000), 30_000 - 1 - w},
		{"a timer fired just before the end", logOf(20_000, "fire", 2_000), 20_000 - w - 1},
		{"a timer fired exactly a window after", logOf(20_000, "fire", w+1), 20_000 - w - 1},
		{"a timer fired a window and one after", logOf(20_000, "fire", w+2), 20_001},
		{"a chain of transmit timers", logOf(20_000, "fire", txTimerInstructions, "fire", txTimerInstructions, "fire", 100), 20_000 - w - 1},
		{"not at the end of an instruction event", logOf(10_000, "irq", w+1), 9_999},
		{"an event end then a timer", logOf(10_000, "irq", 1, "fire", w+1), 10_000 - w},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := holdAfter(tc.log); got != tc.want {
				t.Errorf("safe hold %d, want %d", got, tc.want)
			}
		})
	}
}

// TestHoldPointsAgainstBruteForce checks random logs event by event
// against the definition: the latest icount, a window before the end at
// least, that is no INSTRUCTION event's end and has no timer firing within
// the window after it; and never moving back.
func TestHoldPointsAgainstBruteForce(t *testing.T) {
	rng := rand.New(rand.NewPCG(4, 2))
	for round := 0; round < 50; round++ {
		var h holdPoints
		var icount uint64
		var ends, fires []uint64
		for i := 0; i < 300; i++ {
			switch rng.IntN(4) {
			case 0:
				fires = append(fires, icount)
				h.note(LogEvent{Kind: KindCheckpointClockVirtual, Icount: icount})
				continue
			case 1:
				h.note(LogEvent{Kind: KindInterrupt, Icount: icount})
				continue
			}
			icount += 1 + uint64(rng.IntN([]int{40, 3000, 20_000}[rng.IntN(3)]))
			ends = append(ends, icount)
			prev := h.safe
			h.note(LogEvent{Kind: KindInstruction, Icount: icount})

			want := prev
			if icount > holdWindow+1 {
				floor := max(prev, icount-min(icount, holdHistory))
				for x := icount - 1 - holdWindow; x > floor; x-- {
					_, end := slices.BinarySearch(ends, x)
					fired := slices.ContainsFunc(fires, func(y uint64) bool { return y > x && y <= x+holdWindow })
					if !end && !fired {
						want = x
						break
					}
				}
			}
			if h.safe != want {
				t.Fatalf("round %d event %d (icount %d): safe hold %d, want %d", round, i, icount, h.safe, want)
			}
		}
	}
}
