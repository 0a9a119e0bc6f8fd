package main

import (
	"context"
	"testing"
)

// A path that carries up to capacity frames/s and loses the excess: the
// search must land just below capacity, count every trial, and report the
// full-blast loss as offered, delivered and lost.
func TestSearchZeroLoss(t *testing.T) {
	const blast, frames = 1_000_000.0, 20000
	for _, capacity := range []float64{2_000_000, 730_000, 120_000, 900} {
		trials := 0
		path := func(rate float64) (trialResult, error) {
			trials++
			if rate == 0 {
				rate = blast
			}
			delivered := uint64(frames)
			if rate > capacity {
				delivered = uint64(frames * capacity / rate)
			}
			return trialResult{offeredRate: rate, sent: frames, delivered: delivered}, nil
		}
		full, zero, found, n, err := searchZeroLoss(context.Background(), path)
		if err != nil {
			t.Fatal(err)
		}
		if n != trials || n > maxTrials {
			t.Errorf("capacity %.0f: reported %d trials, ran %d (at most %d)", capacity, n, trials, maxTrials)
		}
		if capacity >= blast {
			if !found || zero.offeredRate != blast || full.lost() != 0 {
				t.Errorf("capacity %.0f: zero-loss %v (found %v), full-blast lost %d; want the full blast, lossless", capacity, zero.offeredRate, found, full.lost())
			}
			continue
		}
		if full.lost() == 0 || full.sent != frames {
			t.Errorf("capacity %.0f: full blast lost %d of %d, want a loss", capacity, full.lost(), full.sent)
		}
		want := capacity * (1 - 2*searchResolution)
		if capacity < blast/(1<<(maxTrials-1)) {
			if found {
				t.Errorf("capacity %.0f: found %.0f, below what %d halvings reach", capacity, zero.offeredRate, maxTrials-1)
			}
			continue
		}
		if !found || zero.offeredRate > capacity || zero.offeredRate < want*0.9 {
			t.Errorf("capacity %.0f: zero-loss rate %.0f (found %v), want in [%.0f, %.0f]", capacity, zero.offeredRate, found, want*0.9, capacity)
		}
		if zero.lossRatio() > maxLoss {
			t.Errorf("capacity %.0f: the zero-loss trial lost %.4f%%", capacity, 100*zero.lossRatio())
		}
	}
}
