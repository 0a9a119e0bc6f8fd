package lab

import (
	"fmt"
	"testing"
	"time"
)

// Over enough schedules every kind of fault comes up, on both hosts where
// it hits one, with pauses both shorter and longer than the failure
// timeout, and every variant of the interrupted switchover and
// re-protection.
func TestSchedulesCoverEveryFault(t *testing.T) {
	for _, ft := range []time.Duration{50 * time.Millisecond, time.Second} {
		seen := map[string]int{}
		sizes := map[int]int{}
		for seed := range uint64(4) {
			for i := range 50 {
				s := NewSchedule(ScheduleRand(seed, i), i, ft)
				sizes[len(s.Faults)]++
				for _, f := range s.Faults {
					seen[f.Kind.String()]++
					if f.Kind.Targeted() {
						seen[fmt.Sprintf("%s/%s", f.Kind, f.Target)]++
					}
					switch f.Kind {
					case FaultDaemonPause, FaultGuestPause:
						if f.Long != (f.Duration > ft) {
							t.Errorf("%s: long %v but %s against a failure timeout of %s", f, f.Long, f.Duration, ft)
						}
						seen[fmt.Sprintf("%s/long=%v", f.Kind, f.Long)]++
					case FaultSwitchoverInterrupted, FaultReprotectInterrupted:
						seen[fmt.Sprintf("%s/variant=%d", f.Kind, f.Variant)]++
					case FaultLinkFlap:
						if f.Flaps < 2 {
							t.Errorf("%s: %d flaps", f, f.Flaps)
						}
					}
				}
			}
		}
		var want []string
		for _, k := range FaultKinds() {
			want = append(want, k.String())
			if k.Targeted() {
				want = append(want, k.String()+"/primary", k.String()+"/secondary")
			}
		}
		for _, k := range []FaultKind{FaultDaemonPause, FaultGuestPause} {
			want = append(want, k.String()+"/long=true", k.String()+"/long=false")
		}
		for v := range numSwitchoverVariants {
			want = append(want, fmt.Sprintf("%s/variant=%d", FaultSwitchoverInterrupted, v))
		}
		for v := range numReprotectVariants {
			want = append(want, fmt.Sprintf("%s/variant=%d", FaultReprotectInterrupted, v))
		}
		for _, w := range want {
			if seen[w] == 0 {
				t.Errorf("failure timeout %s: no %s in 200 schedules", ft, w)
			}
		}
		for n := 1; n <= 3; n++ {
			if sizes[n] == 0 {
				t.Errorf("no schedule of %d faults", n)
			}
		}
		if len(sizes) != 3 {
			t.Errorf("schedule sizes %v, want 1 to 3 faults", sizes)
		}
	}
}

// A schedule never takes both hosts down: two lost copies lose the VM by
// design, which would hide the losses that are bugs.
func TestScheduleTakesOneHostDown(t *testing.T) {
	for seed := range uint64(10) {
		for i := range 100 {
			s := NewSchedule(ScheduleRand(seed, i), i, 50*time.Millisecond)
			var down []Role
			for j, f := range s.Faults {
				if f.Kind.Compound() && j > 0 {
					t.Errorf("seed %d schedule %d: %s is not first: %s", seed, i, f, s)
				}
				if r, ok := f.HostDown(); ok {
					down = append(down, r)
				}
			}
			for _, r := range down {
				if r != down[0] {
					t.Fatalf("seed %d schedule %d takes both hosts down: %s", seed, i, s)
				}
			}
		}
	}
}

func TestScheduleReproducible(t *testing.T) {
	for i := range 20 {
		a := NewSchedule(ScheduleRand(42, i), i, time.Second)
		b := NewSchedule(ScheduleRand(42, i), i, time.Second)
		if a.String() != b.String() || a.Settle != b.Settle {
			t.Fatalf("schedule %d drawn twice from seed 42: %q then %q", i, a, b)
		}
	}
	if NewSchedule(ScheduleRand(1, 0), 0, time.Second).String() == NewSchedule(ScheduleRand(2, 0), 0, time.Second).String() &&
		NewSchedule(ScheduleRand(1, 1), 1, time.Second).String() == NewSchedule(ScheduleRand(2, 1), 1, time.Second).String() {
		t.Error("seeds 1 and 2 draw the same schedules")
	}
}

func TestFaultString(t *testing.T) {
	for _, tt := range []struct {
		f    Fault
		want string
	}{
		{Fault{Kind: FaultHostCrash, Target: RolePrimary, Duration: 1500 * time.Millisecond}, "host-crash(primary 1.5s)"},
		{Fault{Kind: FaultDaemonPause, Target: RoleSecondary, Long: true, Duration: 300 * time.Millisecond}, "daemon-pause(secondary long 300ms)"},
		{Fault{Kind: FaultLinkFlap, Flaps: 4, Duration: 20 * time.Millisecond}, "link-flap(4 x 20ms)"},
		{Fault{Kind: FaultLinkCut, Duration: 200 * time.Millisecond}, "link-cut(200ms)"},
		{Fault{Kind: FaultDuplicateName}, "duplicate-name"},
		{Fault{Kind: FaultSwitchoverInterrupted, Variant: SwitchoverCrashStandby, Delay: 7 * time.Millisecond}, "switchover-interrupted(crash standby host +7ms)"},
	} {
		if got := tt.f.String(); got != tt.want {
			t.Errorf("%#v: %q, want %q", tt.f, got, tt.want)
		}
	}
}

func TestScheduleOfKinds(t *testing.T) {
	kinds, err := ParseFaultKinds("duplicate-name, link-flap")
	if err != nil {
		t.Fatal(err)
	}
	for i := range 50 {
		for _, f := range NewScheduleOf(ScheduleRand(3, i), i, time.Second, kinds).Faults {
			if f.Kind != FaultDuplicateName && f.Kind != FaultLinkFlap {
				t.Fatalf("schedule of duplicate-name and link-flap has %s", f)
			}
		}
	}
	if _, err := ParseFaultKinds("host-crash,meteor"); err == nil {
		t.Error("an unknown fault parses")
	}
}
