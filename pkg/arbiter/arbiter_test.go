package arbiter

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// testArbiter is the behaviour every backend shares. openBackend returns a new
// Arbiter on the same backend each call (as another host would have).
// Subtests use their own VM names.
func testArbiter(t *testing.T, openBackend func() Arbiter) {
	// Each subtest closes what it opened, so that its owner leases end with
	// it rather than piling up until the whole test ends.
	open := func(t *testing.T) Arbiter {
		a := openBackend()
		t.Cleanup(func() { a.Close() })
		return a
	}

	t.Run("NeverClaimed", func(t *testing.T) {
		a, b := open(t), open(t)
		ctx := testContext(t)
		cur, err := a.Current(ctx, "vm-new")
		if err != nil || cur != (Claim{}) {
			t.Fatalf("Current of a new VM = %+v, %v; want zero", cur, err)
		}
		mustClaim(t, a, "vm-new", "a", 0, Claim{Epoch: 1, Owner: "a", Won: true})
		mustClaim(t, b, "vm-new", "b", 0, Claim{Epoch: 1, Owner: "a"})
		mustCurrent(t, b, "vm-new", Claim{Epoch: 1, Owner: "a"})
	})

	t.Run("Takeover", func(t *testing.T) {
		a, b := open(t), open(t)
		mustClaim(t, a, "vm-take", "a", 0, Claim{Epoch: 1, Owner: "a", Won: true})
		mustClaim(t, b, "vm-take", "b", 1, Claim{Epoch: 2, Owner: "b", Won: true})
		// a still believes epoch 1: stale, loses.
		mustClaim(t, a, "vm-take", "a", 1, Claim{Epoch: 2, Owner: "b"})
		// An epoch from the future loses too.
		mustClaim(t, a, "vm-take", "a", 5, Claim{Epoch: 2, Owner: "b"})
		mustClaim(t, a, "vm-take", "a", 0, Claim{Epoch: 2, Owner: "b"})
		mustCurrent(t, a, "vm-take", Claim{Epoch: 2, Owner: "b"})
		// And the owner can hand over again.
		mustClaim(t, a, "vm-take", "a", 2, Claim{Epoch: 3, Owner: "a", Won: true})
	})

	t.Run("RetryByWinner", func(t *testing.T) {
		// A winner whose answer was lost asks again with the same known.
		a, b := open(t), open(t)
		mustClaim(t, a, "vm-retry", "a", 0, Claim{Epoch: 1, Owner: "a", Won: true})
		mustClaim(t, a, "vm-retry", "a", 0, Claim{Epoch: 1, Owner: "a", Won: true})
		mustClaim(t, b, "vm-retry", "b", 0, Claim{Epoch: 1, Owner: "a"})
		mustCurrent(t, b, "vm-retry", Claim{Epoch: 1, Owner: "a"})
	})

	t.Run("IndependentVMs", func(t *testing.T) {
		a, b := open(t), open(t)
		mustClaim(t, a, "vm-x", "a", 0, Claim{Epoch: 1, Owner: "a", Won: true})
		mustClaim(t, b, "vm-y", "b", 0, Claim{Epoch: 1, Owner: "b", Won: true})
		mustClaim(t, b, "vm-y", "b", 1, Claim{Epoch: 2, Owner: "b", Won: true})
		mustCurrent(t, a, "vm-x", Claim{Epoch: 1, Owner: "a"})
		mustCurrent(t, a, "vm-y", Claim{Epoch: 2, Owner: "b"})
	})

	t.Run("Race", func(t *testing.T) {
		const hosts, rounds = 8, 20
		arbs := make([]Arbiter, hosts)
		for i := range arbs {
			arbs[i] = open(t)
		}
		var last Claim
		for round := range rounds {
			got := raceRound(t, arbs, "vm-race", last.Epoch)
			last = checkRound(t, round, last.Epoch, got)
		}
		mustCurrent(t, arbs[0], "vm-race", Claim{Epoch: rounds, Owner: last.Owner})
	})

	t.Run("BadNames", func(t *testing.T) {
		a := open(t)
		ctx := testContext(t)
		for _, vm := range []string{"", "a/b", "..", ".", "x\n", strings.Repeat("v", maxNameLen+1)} {
			if c, err := a.TryClaim(ctx, vm, "a", 0); err == nil || errors.Is(err, ErrUnavailable) {
				t.Errorf("TryClaim(vm %q) = %+v, %v; want a name error", vm, c, err)
			}
			if c, err := a.Current(ctx, vm); err == nil || errors.Is(err, ErrUnavailable) {
				t.Errorf("Current(vm %q) = %+v, %v; want a name error", vm, c, err)
			}
		}
		if c, err := a.TryClaim(ctx, "vm-ok", "", 0); err == nil {
			t.Errorf("TryClaim(host \"\") = %+v; want an error", c)
		}
		mustCurrent(t, a, "vm-ok", Claim{})
	})
}

// raceRound has every Arbiter claim vm with the same known at once.
func raceRound(t *testing.T, arbs []Arbiter, vm string, known uint64) []Claim {
	t.Helper()
	ctx := testContext(t)
	got := make([]Claim, len(arbs))
	errs := make([]error, len(arbs))
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i, a := range arbs {
		wg.Go(func() {
			<-start
			got[i], errs[i] = a.TryClaim(ctx, vm, fmt.Sprintf("host-%d", i), known)
		})
	}
	close(start)
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("host-%d TryClaim(known=%d): %v", i, known, err)
		}
	}
	return got
}

// checkRound requires exactly one winner at known+1 and everyone agreeing on
// it; it returns the winner's claim.
func checkRound(t *testing.T, round int, known uint64, got []Claim) Claim {
	t.Helper()
	var winners []Claim
	for _, c := range got {
		if c.Won {
			winners = append(winners, c)
		}
	}
	if len(winners) != 1 {
		t.Fatalf("round %d: %d winners, want 1: %+v", round, len(winners), got)
	}
	w := winners[0]
	if w.Epoch != known+1 {
		t.Fatalf("round %d: winner %+v, want epoch %d", round, w, known+1)
	}
	for _, c := range got {
		if c.Epoch != w.Epoch || c.Owner != w.Owner {
			t.Fatalf("round %d: results disagree: %+v", round, got)
		}
	}
	return w
}

func mustClaim(t *testing.T, a Arbiter, vm, host string, known uint64, want Claim) {
	t.Helper()
	got, err := a.TryClaim(testContext(t), vm, host, known)
	if err != nil || got != want {
		t.Fatalf("TryClaim(%s, %s, known=%d) = %+v, %v; want %+v", vm, host, known, got, err, want)
	}
}

func mustCurrent(t *testing.T, a Arbiter, vm string, want Claim) {
	t.Helper()
	got, err := a.Current(testContext(t), vm)
	if err != nil || got != want {
		t.Fatalf("Current(%s) = %+v, %v; want %+v", vm, got, err, want)
	}
}

// testContext bounds one step of a test.
func testContext(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestOpenErrors(t *testing.T) {
	dir := t.TempDir()
	notDir := filepath.Join(dir, "plain")
	if err := os.WriteFile(notDir, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ spec, want string }{
		{"", "missing scheme"},
		{"/var/lib/ftgw", "missing scheme"},
		{"nfs:/x", `unknown scheme "nfs"`},
		{"file:", "empty directory"},
		{"file:" + filepath.Join(dir, "missing"), "no such file"},
		{"file:" + notDir, "not a directory"},
		{"etcd:", "no endpoints"},
		{"etcd:127.0.0.1:2379", "endpoint"},
		{"etcd:ftp://127.0.0.1:2379", "scheme must be http or https"},
		{"etcd:http://", "want host:port"},
		{"etcd:http://127.0.0.1", "want host:port"},
		{"etcd:http://127.0.0.1:2379,", "endpoint"},
		{"etcd:http://127.0.0.1:2379/v3", "only scheme://host:port"},
		{"etcd:http://[::1", "endpoint"},
	} {
		a, err := Open(tc.spec)
		if err == nil {
			a.Close()
			t.Errorf("Open(%q) succeeded; want an error containing %q", tc.spec, tc.want)
			continue
		}
		prefix := fmt.Sprintf("arbiter spec %q: ", tc.spec)
		if !strings.HasPrefix(err.Error(), prefix) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Open(%q) = %q; want %q...%q", tc.spec, err, prefix, tc.want)
		}
	}
}
