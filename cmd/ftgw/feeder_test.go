package main

import (
	"errors"
	"testing"

	"github.com/ftgw/ftgw/internal/tap"
	"github.com/ftgw/ftgw/internal/testutil"
)

// Hole 9 of the fault campaign, the standby's half: a frame its guest's tap
// refuses for good is errCopyCannotTake, on which the copy is dropped and
// rebuilt (copyTook); the log channel used to resend it forever. A tap
// that is only full is an error to retry.
func TestFeederTellsARefusalForGoodFromAFullTap(t *testing.T) {
	testutil.InNewNetns(t)
	ifc, err := ensureTap("ftgwf0")
	if err != nil {
		t.Fatal(err)
	}
	guest, err := tap.Open("ftgwf0") // the guest's end, never read
	if err != nil {
		t.Fatal(err)
	}
	defer guest.Close()
	f, err := newGuestFeeder(ifc)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	frame := func(n int) []byte {
		b := make([]byte, n)
		copy(b, []byte{0x02, 0x46, 0x54, 0x47, 0x00, 0x0a, 0x02, 0, 0, 0, 0, 1, 0x88, 0xb5})
		return b
	}

	if err := f.Feed(frame(100)); err != nil {
		t.Fatalf("an ordinary frame: %v", err)
	}
	for _, n := range []int{9000, 10} { // longer than the tap's MTU; a runt
		if err := f.Feed(frame(n)); !errors.Is(err, errCopyCannotTake) {
			t.Errorf("a frame of %d bytes: %v, want errCopyCannotTake", n, err)
		}
	}
	// Fill the tap's queue: the guest is behind, not gone.
	var full error
	for range tapQueueLen + 1 {
		if full = f.Feed(frame(100)); full != nil {
			break
		}
	}
	if full == nil || errors.Is(full, errCopyCannotTake) {
		t.Errorf("a full tap: %v, want an error to retry", full)
	}
}
