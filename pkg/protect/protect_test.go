package protect

import (
	"errors"
	"strings"
	"testing"
	"time"
)

// TestTransitions is the lifecycle's specification, written out apart from
// the implementation's table: every allowed transition is listed, and every
// pair not listed must be refused with the state unchanged.
func TestTransitions(t *testing.T) {
	allowed := []struct {
		from State
		ev   Event
		to   State
	}{
		// First boot, restart, joining.
		{Joining, BootPrimary, Protected},
		{Joining, BootSecondary, Standby},
		{Joining, Rejoin, Joining},
		{Joining, SnapshotInstalled, Standby},
		{Joining, Fenced, Joining},
		// The standby.
		{Standby, SnapshotInstalled, Standby},
		{Standby, PeerLost, Arbitrating},
		{Standby, TakeOver, Arbitrating},
		{Standby, Rejoin, Joining},
		{Standby, Fenced, Passive},
		// The protected primary.
		{Protected, PeerLost, Arbitrating},
		{Protected, HandOver, Draining},
		{Protected, Fenced, Passive},
		// Re-protection.
		{Unprotected, PeerJoined, Reprotecting},
		{Unprotected, Fenced, Passive},
		{Reprotecting, PeerCaughtUp, Protected},
		{Reprotecting, ReprotectFailed, Arbitrating},
		{Reprotecting, PeerLost, Arbitrating},
		{Reprotecting, Fenced, Passive},
		// The arbiter.
		{Arbitrating, Won, Unprotected},
		{Arbitrating, Lost, Passive},
		{Arbitrating, Fenced, Passive},
		// Switchover.
		{Draining, HandOverAborted, Protected},
		{Draining, HandedOver, Yielded},
		{Draining, Fenced, Passive},
		{Yielded, Rejoin, Joining},
		{Yielded, PeerLost, Arbitrating},
		{Yielded, Fenced, Passive},
		// Losers.
		{Passive, Rejoin, Joining},
		{Passive, Fenced, Passive},
	}
	want := map[[2]uint8]State{}
	for _, a := range allowed {
		want[[2]uint8{uint8(a.from), uint8(a.ev)}] = a.to
	}
	for s := range StateLen {
		for ev := range EventLen {
			got, err := Next(s, ev)
			to, ok := want[[2]uint8{uint8(s), uint8(ev)}]
			switch {
			case ok && (err != nil || got != to):
				t.Errorf("%s --%s-->: got %s, %v; want %s", s, ev, got, err, to)
			case !ok && (!errors.Is(err, ErrTransition) || got != s):
				t.Errorf("%s --%s-->: got %s, %v; want refused, state kept", s, ev, got, err)
			}
		}
	}
}

// The safety rules, state by state: who may serve, who never claims.
func TestNoStateThatLacksTheVMServes(t *testing.T) {
	for s := range StateLen {
		serves := s == Protected || s == Reprotecting || s == Unprotected || s == Draining
		if s.Serves() != serves {
			t.Errorf("%s.Serves() = %v, want %v", s, s.Serves(), serves)
		}
		// Joining holds no copy: no event but the owner's snapshot or a
		// first boot may take it anywhere else.
		if s == Joining {
			for ev := range EventLen {
				to, err := Next(s, ev)
				if err == nil && to.Serves() && ev != BootPrimary {
					t.Errorf("joining --%s--> %s serves without the VM's state", ev, to)
				}
				if err == nil && to == Arbitrating {
					t.Errorf("joining --%s--> arbitrating: a host with no copy claims the VM", ev)
				}
			}
		}
	}
}

func TestStartEvent(t *testing.T) {
	tests := []struct {
		name    string
		epoch   uint64
		primary bool
		want    Event
	}{
		{"first boot, primary", 0, true, BootPrimary},
		{"first boot, secondary", 0, false, BootSecondary},
		// A restarted primary whose arbiter record names itself: its VM is
		// fresh, the standby holds the acknowledged state.
		{"restarted primary", 4, true, Rejoin},
		{"restarted secondary", 4, false, Rejoin},
	}
	for _, tt := range tests {
		if got := StartEvent(tt.epoch, tt.primary); got != tt.want {
			t.Errorf("%s: StartEvent(%d, %v) = %s, want %s", tt.name, tt.epoch, tt.primary, got, tt.want)
		}
	}
}

func TestMayTakeOver(t *testing.T) {
	tests := []struct {
		name            string
		holdsLog        bool
		received, after uint64
		want            bool
	}{
		{"admitted standby", true, 100, 0, true},
		{"restarted standby, never admitted", false, 0, 0, false},
		{"new standby still receiving what the primary served alone", true, 40, 41, false},
		{"new standby that received it all", true, 41, 41, true},
	}
	for _, tt := range tests {
		if got := MayTakeOver(tt.holdsLog, tt.received, tt.after); got != tt.want {
			t.Errorf("%s: MayTakeOver = %v, want %v", tt.name, got, tt.want)
		}
	}
}

// Whole lives, as the daemon drives them, each with its unprotected window.
func TestLives(t *testing.T) {
	tests := []struct {
		name   string
		events []Event
		want   State
		alone  time.Duration // one second passes before each event
	}{
		{"primary, secondary restarts and rejoins", []Event{BootPrimary, PeerLost, Won, PeerJoined, PeerCaughtUp}, Protected, 2 * time.Second},
		{"secondary takes over, then re-protected", []Event{BootSecondary, PeerLost, Won, PeerJoined, PeerCaughtUp}, Protected, 2 * time.Second},
		{"restarted host joins and is rebuilt", []Event{Rejoin, SnapshotInstalled}, Standby, 0},
		{"loser of a link cut rejoins", []Event{BootPrimary, PeerLost, Lost, Rejoin, SnapshotInstalled}, Standby, 0},
		{"switchover", []Event{BootPrimary, HandOver, HandedOver, Rejoin}, Joining, 0},
		{"switchover whose standby died before it claimed: claimed back", []Event{BootPrimary, HandOver, HandedOver, PeerLost, Won}, Unprotected, 0},
		{"abandoned re-protection asks the arbiter", []Event{BootSecondary, PeerLost, Won, PeerJoined, ReprotectFailed, Won}, Unprotected, 2 * time.Second},
	}
	for _, tt := range tests {
		clock := time.Unix(0, 0)
		m := NewMachine(func() time.Time { return clock }, nil)
		for _, ev := range tt.events {
			clock = clock.Add(time.Second)
			if _, err := m.Fire(ev); err != nil {
				t.Fatalf("%s: %v", tt.name, err)
			}
		}
		if m.State() != tt.want {
			t.Errorf("%s: ended %s, want %s", tt.name, m.State(), tt.want)
		}
		if got := m.AloneFor(); got != tt.alone {
			t.Errorf("%s: alone for %s, want %s", tt.name, got, tt.alone)
		}
	}
}

func TestFireIfRefusesAStaleDecision(t *testing.T) {
	var changes []string
	m := NewMachine(nil, func(from, to State, ev Event) { changes = append(changes, from.String()+">"+to.String()) })
	m.Fire(BootPrimary)
	m.Fire(PeerLost)
	// A watcher that read Protected before the transition must not act.
	if _, err := m.FireIf(Protected, PeerLost); !errors.Is(err, ErrTransition) {
		t.Errorf("FireIf on a stale state: %v, want ErrTransition", err)
	}
	if got := strings.Join(changes, " "); got != "joining>protected protected>arbitrating" {
		t.Errorf("changes %q", got)
	}
}

func TestNames(t *testing.T) {
	for s := range StateLen {
		if strings.HasPrefix(s.String(), "State(") {
			t.Errorf("state %d has no name", s)
		}
	}
	for ev := range EventLen {
		if strings.HasPrefix(ev.String(), "Event(") {
			t.Errorf("event %d has no name", ev)
		}
	}
}
