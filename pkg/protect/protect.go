// Package protect is the protection lifecycle of one VM on one host: where
// the host stands for the VM (State), what moves it (Event), and the rules
// that keep a VM's acknowledged output from ever being lost across restarts,
// failovers and switchovers. It decides; the daemon carries the decisions
// out (the owner map, the log channel, the VM engine).
//
// The life of a pair:
//
//	first boot:  primary  ──BootPrimary──▶ Protected ◀──PeerCaughtUp── Reprotecting
//	             secondary ──BootSecondary─▶ Standby                         ▲
//	restart, or an owner elsewhere: ──Rejoin──▶ Joining ──SnapshotInstalled──▶ Standby
//	peer lost:   Protected, Reprotecting, Standby ──PeerLost──▶ Arbitrating ──Won──▶ Unprotected ──PeerJoined──┘
//	                                                                          ──Lost──▶ Passive ──Rejoin──▶ Joining
//	switchover:  Protected ──HandOver──▶ Draining ──HandedOver──▶ Yielded ──Rejoin──▶ Joining
//	             Standby ──TakeOver──▶ Arbitrating               Yielded ──PeerLost──▶ Arbitrating
//
// Two rules carry the safety argument:
//   - A host that starts while the arbiter already names an owner for the
//     VM (StartEvent) never serves on its own: its copy of the VM is fresh
//     and lacks what clients have seen. It joins, and is rebuilt from the
//     owner's snapshot.
//   - A standby takes over only with a log a primary admitted
//     (MayTakeOver), and only through the arbiter.
package protect

import (
	"errors"
	"fmt"
	"sync"
	"time"
)

// State is where a host stands for one VM.
type State uint8

const (
	// Joining: a fresh host with no copy of the VM: it waits for the
	// owner's snapshot. It serves nothing and never claims the VM.
	Joining State = iota
	// Standby: follows the owner's log; its copy may take over.
	Standby
	// Protected: serves; every output waits for the standby's ack.
	Protected
	// Reprotecting: serves; a new standby, rebuilt from a snapshot,
	// catches up, and outputs of input after the snapshot wait for it.
	Reprotecting
	// Unprotected: serves alone, outputs leave at once; it takes the
	// first standby that joins.
	Unprotected
	// Arbitrating: the peer is lost (or a switchover takes over) and the
	// arbiter decides who serves; nothing is released meanwhile.
	Arbitrating
	// Draining: a switchover's primary takes no input and lets the
	// outputs of what it took leave under the Output Rule.
	Draining
	// Passive: another host serves at a newer epoch: this host releases
	// nothing, and its copy of the VM is stale.
	Passive
	// Yielded: a switchover's old primary that handed over. It releases
	// nothing and keeps its drained copy, which is exactly what the
	// standby goes live from, until the arbiter shows the standby claimed
	// the VM (then it rejoins). A standby that dies before it claims
	// would otherwise leave no copy at all: this host claims it back.
	Yielded
	StateLen // number of states; not a state
)

var stateNames = [StateLen]string{
	Joining:      "joining",
	Standby:      "standby",
	Protected:    "protected",
	Reprotecting: "reprotecting",
	Unprotected:  "unprotected",
	Arbitrating:  "arbitrating",
	Draining:     "draining",
	Passive:      "passive",
	Yielded:      "yielded",
}

func (s State) String() string {
	if s < StateLen {
		return stateNames[s]
	}
	return fmt.Sprintf("State(%d)", uint8(s))
}

// Serves reports whether the host in state s is the one the VM's clients
// reach: its owner record is active (draining while it hands over).
func (s State) Serves() bool {
	return s == Protected || s == Reprotecting || s == Unprotected || s == Draining
}

// Alone reports whether the VM has no standby that could take over: the
// time spent so is the unprotected window.
func (s State) Alone() bool { return s == Unprotected || s == Reprotecting }

// Event is what moves a host from one state to another.
type Event uint8

const (
	BootPrimary       Event = iota // the VM's first boot, this host claimed it
	BootSecondary                  // the VM's first boot, this host follows from boot
	Rejoin                         // the VM has an owner elsewhere: drop this copy and join
	SnapshotInstalled              // the owner's snapshot is this host's copy now
	PeerLost                       // the peer is silent, stuck, or lost its copy
	Won                            // the arbiter gave this host the next epoch
	Lost                           // another host holds the epoch
	Fenced                         // a newer epoch was seen: stop releasing at once
	PeerJoined                     // a new standby took a snapshot; the Output Rule holds again
	PeerCaughtUp                   // the new standby holds everything it needs to take over
	ReprotectFailed                // the new standby stopped making progress
	HandOver                       // switchover: stop taking input, drain
	HandOverAborted                // the drain timed out: serve again
	HandedOver                     // drained and fenced: the standby may take over
	TakeOver                       // switchover: the standby claims the next epoch
	EventLen                       // number of events; not an event
)

var eventNames = [EventLen]string{
	BootPrimary:       "boot_primary",
	BootSecondary:     "boot_secondary",
	Rejoin:            "rejoin",
	SnapshotInstalled: "snapshot_installed",
	PeerLost:          "peer_lost",
	Won:               "won",
	Lost:              "lost",
	Fenced:            "fenced",
	PeerJoined:        "peer_joined",
	PeerCaughtUp:      "peer_caught_up",
	ReprotectFailed:   "reprotect_failed",
	HandOver:          "hand_over",
	HandOverAborted:   "hand_over_aborted",
	HandedOver:        "handed_over",
	TakeOver:          "take_over",
}

func (e Event) String() string {
	if e < EventLen {
		return eventNames[e]
	}
	return fmt.Sprintf("Event(%d)", uint8(e))
}

// ErrTransition: the event does not apply in the host's state (a late
// callback, or a command for another role). Nothing changed.
var ErrTransition = errors.New("no such transition")

// transitions is the whole lifecycle: from each state, the state each event
// leads to. What is not here is refused.
var transitions = map[State]map[Event]State{
	Joining: {
		BootPrimary:       Protected,
		BootSecondary:     Standby,
		Rejoin:            Joining,
		SnapshotInstalled: Standby,
		Fenced:            Joining,
	},
	Standby: {
		SnapshotInstalled: Standby, // rebuilt by a newer owner
		PeerLost:          Arbitrating,
		TakeOver:          Arbitrating,
		Rejoin:            Joining,
		Fenced:            Passive,
	},
	Protected: {
		PeerLost: Arbitrating,
		HandOver: Draining,
		Fenced:   Passive,
	},
	Reprotecting: {
		PeerCaughtUp: Protected,
		// Giving up on the new standby goes through the arbiter: it may
		// already count as the owner's copy, so serving alone again at
		// the same epoch could make two hosts serve.
		ReprotectFailed: Arbitrating,
		PeerLost:        Arbitrating,
		Fenced:          Passive,
	},
	Unprotected: {
		PeerJoined: Reprotecting,
		Fenced:     Passive,
	},
	Arbitrating: {
		Won:    Unprotected,
		Lost:   Passive,
		Fenced: Passive,
	},
	Draining: {
		HandOverAborted: Protected,
		HandedOver:      Yielded,
		Fenced:          Passive,
	},
	Yielded: {
		Rejoin: Joining, // the standby claimed the VM
		// The standby never claimed it: the arbiter decides, at the
		// epoch this host handed over.
		PeerLost: Arbitrating,
		Fenced:   Passive,
	},
	Passive: {
		Rejoin: Joining,
		Fenced: Passive,
	},
}

// Next is the state event leads to from s, or ErrTransition.
func Next(s State, ev Event) (State, error) {
	if to, ok := transitions[s][ev]; ok {
		return to, nil
	}
	return s, fmt.Errorf("%s in state %s: %w", ev, s, ErrTransition)
}

// StartEvent is how a host starts for a VM, from what the arbiter holds for
// it (epoch 0: never claimed) and the role the host's configuration gives
// it for the VM's first boot. Only a first boot starts a copy from scratch:
// once the VM has an owner, whoever that is, a starting host's copy is
// fresh and lacks what clients have seen, so it joins, even if the
// arbiter names this very host (its daemon restarted).
func StartEvent(arbiterEpoch uint64, primary bool) Event {
	switch {
	case arbiterEpoch != 0:
		return Rejoin
	case primary:
		return BootPrimary
	default:
		return BootSecondary
	}
}

// MayTakeOver reports whether a standby whose primary is lost may ask the
// arbiter for the VM: only with a log a primary admitted (holdsLog), and
// all of it up to takeoverAfter, past which the primary's outputs waited
// for this standby (before it, a new standby was still receiving what the
// primary had served alone).
func MayTakeOver(holdsLog bool, received, takeoverAfter uint64) bool {
	return holdsLog && received >= takeoverAfter
}

// Machine is one VM's lifecycle on this host: its state, and the time the
// VM has been served with no standby ready.
type Machine struct {
	mu          sync.Mutex
	state       State
	since       time.Time     // when state began
	aloneBefore time.Duration // time Alone, before the current state
	now         func() time.Time
	onChange    func(from, to State, ev Event)
}

// NewMachine starts in Joining: nothing served, nothing claimed. now is the
// clock (time.Now if nil); onChange, if set, is told of every transition,
// under the machine's lock (keep it short; it must not call the machine).
func NewMachine(now func() time.Time, onChange func(from, to State, ev Event)) *Machine {
	if now == nil {
		now = time.Now
	}
	return &Machine{state: Joining, since: now(), now: now, onChange: onChange}
}

// State is the host's state now.
func (m *Machine) State() State {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.state
}

// Fire applies ev and returns the new state, or ErrTransition with the
// state unchanged.
func (m *Machine) Fire(ev Event) (State, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.fireLocked(ev)
}

// FireIf applies ev only if the host is still in state from: for a
// transition decided on a state read earlier, which another goroutine may
// have changed since.
func (m *Machine) FireIf(from State, ev Event) (State, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.state != from {
		return m.state, fmt.Errorf("%s: the host is %s, not %s: %w", ev, m.state, from, ErrTransition)
	}
	return m.fireLocked(ev)
}

func (m *Machine) fireLocked(ev Event) (State, error) {
	to, err := Next(m.state, ev)
	if err != nil {
		return m.state, err
	}
	now := m.now()
	if m.state.Alone() {
		m.aloneBefore += now.Sub(m.since)
	}
	from := m.state
	m.state, m.since = to, now
	if m.onChange != nil {
		m.onChange(from, to, ev)
	}
	return to, nil
}

// AloneFor is the total time this host has served the VM with no standby
// ready to take over.
func (m *Machine) AloneFor() time.Duration {
	m.mu.Lock()
	defer m.mu.Unlock()
	total := m.aloneBefore
	if m.state.Alone() {
		total += m.now().Sub(m.since)
	}
	return total
}
