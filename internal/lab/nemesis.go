package lab

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"time"
)

// FaultKind is one kind of fault a nemesis schedule injects.
type FaultKind uint8

const (
	// FaultHostCrash kills every process of a host at once; its daemon
	// starts again, with its own config, when the schedule heals.
	FaultHostCrash FaultKind = iota
	// FaultDaemonKill SIGKILLs the daemon (its VM dies with it); it starts
	// again when the schedule heals.
	FaultDaemonKill
	// FaultDaemonCrashRestart SIGKILLs the daemon and starts it again at
	// once, as a supervisor would.
	FaultDaemonCrashRestart
	// FaultDaemonPause SIGSTOPs the daemon for Duration, then SIGCONTs it.
	FaultDaemonPause
	// FaultGuestPause SIGSTOPs the VM's process (the synthetic guest or
	// QEMU) for Duration.
	FaultGuestPause
	// FaultLinkCut takes the replication link down for Duration.
	FaultLinkCut
	// FaultLinkFlap takes the replication link down and up Flaps times.
	FaultLinkFlap
	// FaultAsymPartition drops, for Duration, what the target host sends
	// on the replication link; the other direction still flows.
	FaultAsymPartition
	// FaultArbiterPartition cuts the target host off from the arbiter for
	// Duration.
	FaultArbiterPartition
	// FaultArbiterStop makes the arbiter unavailable to both hosts for
	// Duration.
	FaultArbiterStop
	// FaultArbiterSlow delays every claim by up to Hold, for Duration.
	FaultArbiterSlow
	// FaultArbiterRestart: the arbiter is gone for a short Duration and
	// back.
	FaultArbiterRestart
	// FaultSwitchoverInterrupted starts a switchover on the primary and,
	// Delay later, hits a host as Variant says.
	FaultSwitchoverInterrupted
	// FaultReprotectInterrupted restarts the standby's daemon, so the
	// primary re-protects, and Delay after re-protection begins hits the
	// new secondary as Variant says.
	FaultReprotectInterrupted
	// FaultDuplicateName replaces the standby's daemon by one configured
	// with the other host's name; it must be refused.
	FaultDuplicateName

	numFaultKinds
)

// FaultKinds lists every kind, in order.
func FaultKinds() []FaultKind {
	kinds := make([]FaultKind, numFaultKinds)
	for i := range kinds {
		kinds[i] = FaultKind(i)
	}
	return kinds
}

var faultKindNames = [numFaultKinds]string{
	"host-crash", "daemon-kill", "crash-restart", "daemon-pause", "guest-pause",
	"link-cut", "link-flap", "asym-partition", "arbiter-partition", "arbiter-stop",
	"arbiter-slow", "arbiter-restart", "switchover-interrupted", "reprotect-interrupted",
	"duplicate-name",
}

// ParseFaultKinds reads a comma-separated list of kinds by name.
func ParseFaultKinds(list string) ([]FaultKind, error) {
	var kinds []FaultKind
	for _, name := range strings.Split(list, ",") {
		name = strings.TrimSpace(name)
		if name == "" {
			continue
		}
		i := slices.Index(faultKindNames[:], name)
		if i < 0 {
			return nil, fmt.Errorf("no fault %q: want some of %s", name, strings.Join(faultKindNames[:], ", "))
		}
		kinds = append(kinds, FaultKind(i))
	}
	return kinds, nil
}

func (k FaultKind) String() string {
	if k < numFaultKinds {
		return faultKindNames[k]
	}
	return fmt.Sprintf("fault(%d)", k)
}

// Targeted reports whether the kind hits one host, the one Target names.
func (k FaultKind) Targeted() bool {
	switch k {
	case FaultLinkCut, FaultLinkFlap, FaultArbiterStop, FaultArbiterSlow, FaultArbiterRestart,
		FaultSwitchoverInterrupted, FaultReprotectInterrupted, FaultDuplicateName:
		return false
	}
	return true
}

// Compound reports whether the kind is a sequence on a protected pair (a
// switchover, a re-protection, a replaced standby) that a fault then
// interrupts: it only starts a schedule, when the pair is protected.
func (k FaultKind) Compound() bool {
	switch k {
	case FaultSwitchoverInterrupted, FaultReprotectInterrupted, FaultDuplicateName:
		return true
	}
	return false
}

// Role is a host as the schedule found it: the protected primary, or its
// standby.
type Role uint8

const (
	RolePrimary Role = iota
	RoleSecondary
)

func (r Role) String() string {
	if r == RolePrimary {
		return "primary"
	}
	return "secondary"
}

// Variants of FaultSwitchoverInterrupted: what hits, right after the
// switchover starts.
const (
	SwitchoverKillStandby  = iota // SIGKILL the standby's daemon (the new primary)
	SwitchoverCrashStandby        // crash the standby's host
	numSwitchoverVariants
)

// Variants of FaultReprotectInterrupted: what hits the new secondary while
// it is being rebuilt.
const (
	ReprotectCrashSecondary = iota // crash its host
	ReprotectKillSecondary         // SIGKILL its daemon
	numReprotectVariants
)

// Fault is one fault of a schedule.
type Fault struct {
	Kind FaultKind
	// Target is the host a Targeted kind hits; for FaultAsymPartition, the
	// host whose sending is dropped.
	Target Role
	// After is how long after the previous fault's injection (or the
	// schedule's start) this one comes.
	After time.Duration
	// Duration is how long a pause, cut, partition or arbiter outage
	// lasts; for a crash or kill, how long the host stays down.
	Duration time.Duration
	// Long marks a pause longer than the failure timeout.
	Long bool
	// Flaps is FaultLinkFlap's number of down/up cycles, each down for
	// Duration.
	Flaps int
	// Hold is FaultArbiterSlow's delay of each claim.
	Hold time.Duration
	// Delay is how long after the switchover or the re-protection starts
	// the interruption hits.
	Delay   time.Duration
	Variant int
}

// TakesHostDown reports whether the fault can, on its own, take its
// host's copy of the VM away for longer than the failure timeout: such
// faults in one schedule all hit one host, so a schedule never asks more
// of the pair than a single failure at a time (two lost hosts lose the VM
// by design, not by a bug).
func (f Fault) TakesHostDown() bool {
	switch f.Kind {
	case FaultHostCrash, FaultDaemonKill, FaultDaemonCrashRestart:
		return true
	case FaultDaemonPause, FaultGuestPause:
		return f.Long
	}
	return false
}

// HostDown is the role of the host that a TakesHostDown fault takes down;
// the interrupted switchover and re-protection and the duplicate name hit
// the standby.
func (f Fault) HostDown() (Role, bool) {
	switch f.Kind {
	case FaultSwitchoverInterrupted, FaultReprotectInterrupted, FaultDuplicateName:
		return RoleSecondary, true
	}
	if f.TakesHostDown() {
		return f.Target, true
	}
	return 0, false
}

func (f Fault) String() string {
	var b strings.Builder
	b.WriteString(f.Kind.String())
	if f.Kind.Targeted() {
		fmt.Fprintf(&b, "(%s", f.Target)
	} else {
		b.WriteString("(")
	}
	ms := func(d time.Duration) string { return d.Round(time.Millisecond).String() }
	switch f.Kind {
	case FaultDaemonPause, FaultGuestPause:
		length := "short"
		if f.Long {
			length = "long"
		}
		fmt.Fprintf(&b, " %s %s", length, ms(f.Duration))
	case FaultLinkFlap:
		fmt.Fprintf(&b, "%d x %s", f.Flaps, ms(f.Duration))
	case FaultArbiterSlow:
		fmt.Fprintf(&b, "%s hold %s", ms(f.Duration), ms(f.Hold))
	case FaultSwitchoverInterrupted:
		fmt.Fprintf(&b, "%s +%s", [...]string{"kill standby daemon", "crash standby host"}[f.Variant], ms(f.Delay))
	case FaultReprotectInterrupted:
		fmt.Fprintf(&b, "%s +%s", [...]string{"crash new secondary host", "kill new secondary daemon"}[f.Variant], ms(f.Delay))
	case FaultDuplicateName:
	default:
		if f.Kind.Targeted() {
			b.WriteString(" ")
		}
		b.WriteString(ms(f.Duration))
	}
	b.WriteString(")")
	return strings.ReplaceAll(b.String(), "()", "")
}

// Schedule is one nemesis schedule: faults injected one after another on a
// protected pair under load, healed together.
type Schedule struct {
	Index          int
	FailureTimeout time.Duration
	Faults         []Fault
	// Settle is how long the faults act, after the last one is
	// injected, before everything heals.
	Settle time.Duration
}

func (s Schedule) String() string {
	names := make([]string, len(s.Faults))
	for i, f := range s.Faults {
		names[i] = f.String()
		if i > 0 {
			names[i] = fmt.Sprintf("+%s %s", f.After.Round(time.Millisecond), names[i])
		}
	}
	return strings.Join(names, ", ")
}

// Kinds counts the schedule's faults by kind.
func (s Schedule) Kinds() map[FaultKind]int {
	counts := map[FaultKind]int{}
	for _, f := range s.Faults {
		counts[f.Kind]++
	}
	return counts
}

// ScheduleRand is the random source of schedule index under seed: each
// schedule has its own, so one schedule of a campaign can be generated
// again alone.
func ScheduleRand(seed uint64, index int) *rand.Rand {
	return rand.New(rand.NewPCG(seed, uint64(index)))
}

// NewSchedule draws a schedule of 1 to 3 faults for a pair whose failure
// timeout is ft. Every kind is equally likely, a compound one only first;
// the faults that can take a host down all hit the same host (see
// Fault.TakesHostDown; the nemesis also checks the pair as it stands).
func NewSchedule(rng *rand.Rand, index int, ft time.Duration) Schedule {
	return NewScheduleOf(rng, index, ft, FaultKinds())
}

// NewScheduleOf is NewSchedule drawing only from kinds (none: every kind).
func NewScheduleOf(rng *rand.Rand, index int, ft time.Duration, kinds []FaultKind) Schedule {
	if len(kinds) == 0 {
		kinds = FaultKinds()
	}
	s := Schedule{Index: index, FailureTimeout: ft}
	n := 1 + rng.IntN(3)
	downHost, haveDown := Role(0), false
	killed := false // a crash or kill took downHost down: pausing it does nothing
	// Bounded: a draw that would take the other host down is drawn again.
	for attempt := 0; len(s.Faults) < n && attempt < 100; attempt++ {
		f := newFault(rng, ft, kinds[rng.IntN(len(kinds))])
		if f.Kind.Compound() && len(s.Faults) > 0 {
			continue
		}
		if len(s.Faults) > 0 {
			f.After = between(rng, 0, 2*ft+200*time.Millisecond)
		}
		if role, down := f.HostDown(); down {
			switch {
			case !haveDown:
				downHost, haveDown = role, true
			case role != downHost && f.Kind.Targeted():
				f.Target = downHost
			case role != downHost:
				continue // it hits the standby, and the primary is down already
			}
			if killed && (f.Kind == FaultDaemonPause || f.Kind == FaultGuestPause) {
				continue // nothing left to pause before the host's restart
			}
			killed = killed || f.Kind == FaultHostCrash || f.Kind == FaultDaemonKill
		} else if haveDown && f.Kind.Targeted() {
			// The other host is the one left to hit: cut off from the
			// arbiter or paused while it should take over.
			f.Target = 1 - downHost
		}
		s.Faults = append(s.Faults, f)
	}
	s.Settle = between(rng, 4*ft, 8*ft+time.Second)
	return s
}

func newFault(rng *rand.Rand, ft time.Duration, kind FaultKind) Fault {
	f := Fault{Kind: kind, Target: Role(rng.IntN(2))}
	// At least a floor: 50ms timeouts would make "long" outages too short
	// to see the pair react.
	longOutage := between(rng, max(ft, 100*time.Millisecond), max(5*ft, 500*time.Millisecond))
	switch f.Kind {
	case FaultHostCrash, FaultDaemonKill:
		f.Duration = between(rng, 0, 4*ft+time.Second)
	case FaultDaemonPause, FaultGuestPause:
		f.Long = rng.IntN(2) == 1
		if f.Long {
			f.Duration = between(rng, 2*ft, 6*ft)
		} else {
			f.Duration = between(rng, ft/5, ft*4/5)
		}
	case FaultLinkCut, FaultAsymPartition, FaultArbiterPartition, FaultArbiterStop:
		f.Duration = longOutage
	case FaultLinkFlap:
		f.Flaps = 3 + rng.IntN(6)
		// Some flaps shorter than the failure timeout, some longer.
		f.Duration = between(rng, ft/4, 2*ft)
	case FaultArbiterSlow:
		f.Duration = longOutage + 2*ft
		f.Hold = between(rng, ft/2, min(max(2*ft, 300*time.Millisecond), 1500*time.Millisecond))
	case FaultArbiterRestart:
		f.Duration = between(rng, 50*time.Millisecond, max(ft, 300*time.Millisecond))
	case FaultSwitchoverInterrupted:
		f.Variant = rng.IntN(numSwitchoverVariants)
		f.Delay = between(rng, 0, 30*time.Millisecond)
	case FaultReprotectInterrupted:
		f.Variant = rng.IntN(numReprotectVariants)
		f.Delay = between(rng, 0, 200*time.Millisecond)
	}
	return f
}

// between draws a duration in [lo, hi).
func between(rng *rand.Rand, lo, hi time.Duration) time.Duration {
	if hi <= lo {
		return lo
	}
	return lo + time.Duration(rng.Int64N(int64(hi-lo)))
}
