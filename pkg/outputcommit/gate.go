package outputcommit

import (
	"fmt"
	"sync"

	"github.com/ftgw/ftgw/pkg/datapath"
	"github.com/ftgw/ftgw/pkg/vip"
)

// Gate is the Output Rule for the VM on the host that serves it, in one
// place: the data path's acknowledged position (guest_egress lets a frame
// straight out when its stamp is covered and nothing waits before it), the
// hold queue (the frames that wait) and passthrough (the rule off, in the
// owner record and the queue alike). Its methods move them in the one order
// in which no frame overtakes another or leaves before its input is safe.
type Gate struct {
	dp    *datapath.Datapath
	hold  *HoldQueue
	owner *vip.Owner

	mu    sync.Mutex // orders Ack and Cover: the acked position only grows
	acked uint64
}

// NewGate is the gate of the VM whose data path, hold queue and owner
// record these are.
func NewGate(dp *datapath.Datapath, hold *HoldQueue, owner *vip.Owner) *Gate {
	return &Gate{dp: dp, hold: hold, owner: owner, acked: dp.Acked()}
}

// Ack records that the log up to pos is safe (the secondary acknowledged
// it) and lets out what waited for it.
func (g *Gate) Ack(pos uint64) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.acked = max(g.acked, pos)
	// The fast path first, so frames stamped <= pos that arrive after the
	// queue drains go straight out.
	g.dp.SetAcked(g.acked)
	g.hold.ReleaseUpTo(g.acked)
}

// Lease lets acknowledged output leave until untilNs (datapath.MonotonicNs):
// the data path's fast path and the hold queue alike. The serving host
// renews it each time the secondary echoes a heartbeat: it cannot declare
// this host failed before the echoed heartbeat's send time plus its failure
// timeout. Passthrough needs no lease.
func (g *Gate) Lease(untilNs uint64) {
	g.dp.SetLease(untilNs)
	g.hold.SetLease(untilNs)
}

// Discard drops every output still held for the VM, unsent: this host's
// copy stopped serving because another host holds a newer epoch, and what
// the stale copy produced must never leave, acknowledged or not.
func (g *Gate) Discard() { g.hold.Discard() }

// Acked is the position up to which the log is safe.
func (g *Gate) Acked() uint64 {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.acked
}

// Enforce turns the Output Rule on: from now on a frame stamped after the
// acked position waits for Ack. rec, published with it, is the owner record
// the host serves with.
func (g *Gate) Enforce(rec vip.Record) error {
	g.hold.SetPassthrough(false)
	rec.Passthrough, rec.HoldAll = false, false
	return g.owner.Publish(rec)
}

// Open turns the Output Rule off, for a host that serves alone: what waits
// leaves first, then every new frame at once. rec is the owner record the
// host serves with.
func (g *Gate) Open(rec vip.Record) error {
	// The queue first, so nothing the data path sends overtakes it.
	g.hold.SetPassthrough(true)
	rec.Passthrough, rec.HoldAll = true, false
	return g.owner.Publish(rec)
}

// Mode switches output commit for benchmarks, on the record being served:
// "commit" (the Output Rule), "passthrough" (off: outputs leave at once) or
// "hold-all" (every output through the hold queue, released as soon as its
// stamp is acknowledged).
func (g *Gate) Mode(mode string) error {
	rec := g.owner.Current()
	switch mode {
	case "commit":
		return g.Enforce(rec)
	case "passthrough":
		return g.Open(rec)
	case "hold-all":
		g.hold.SetPassthrough(false)
		rec.Passthrough, rec.HoldAll = false, true
		return g.owner.Publish(rec)
	}
	return fmt.Errorf("output mode %q: want commit, passthrough or hold-all", mode)
}
