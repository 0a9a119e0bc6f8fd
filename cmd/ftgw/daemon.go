package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net"
	"net/http"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sync/errgroup"

	"github.com/ftgw/ftgw/pkg/arbiter"
	"github.com/ftgw/ftgw/pkg/datapath"
	"github.com/ftgw/ftgw/pkg/lockstep"
	"github.com/ftgw/ftgw/pkg/outputcommit"
	"github.com/ftgw/ftgw/pkg/protect"
	"github.com/ftgw/ftgw/pkg/vip"
)

// daemon is one host's side of one protected VM. Where the host stands for
// the VM is its lifecycle (life, pkg/protect); lifecycle.go moves it. A host
// runs one for each VM it protects (host.go).
type daemon struct {
	cfg    Config // the host's, with this VM's log channel ports (vmConfig)
	vm     VMConfig
	slot   int // the VM's slot in the host's data path
	log    *slog.Logger
	uplink *net.Interface
	tap    *net.Interface

	dp    *datapath.Datapath
	owner *vip.Owner
	arb   arbiter.Arbiter
	life  *protect.Machine
	// lifeMu serializes the transitions that rewire the log channel and
	// the engine: a failover, a re-protection, a switchover, a rejoin.
	lifeMu sync.Mutex

	// The VM's engine (engine.go), which owns its input log, and the copy
	// of the VM it runs now: replaced when a snapshot rebuilds it, nil
	// while the host waits for one.
	eng    vmEngine
	copyMu sync.Mutex
	copy   vmCopy

	// Serving side: the Output Rule (gate) over the hold queue.
	hold       *outputcommit.HoldQueue
	gate       *outputcommit.Gate
	primaryPtr atomic.Pointer[lockstep.Primary] // replaced on re-protection
	ackClock   ackClock
	shipDelay  lockedHistogram
	// reprotectAt is the log position a new secondary was rebuilt at: the
	// pair is protected once it has acknowledged it.
	reprotectAt atomic.Uint64
	// takeoverAfter: a new secondary may not take over before it has the
	// log up to here (a real VM's rebaseHeader).
	takeoverAfter atomic.Uint64
	// Following side.
	secondaryPtr atomic.Pointer[lockstep.Secondary]

	// incarnation names the log this host writes or follows (lockstep's
	// Hello): drawn when its VM's log starts afresh (first boot, go-live),
	// adopted from the primary when following it. fromBoot: the log's
	// position 0 is the VM's boot.
	incarnation atomic.Uint64
	fromBoot    atomic.Bool

	runCtx   context.Context // and group: for what starts after start-up
	group    *errgroup.Group
	shipping atomic.Bool // the log goes to a secondary

	mu            sync.Mutex
	channel       *logChannel       // the one running, or nil
	failovers     map[string]uint64 // by cause
	lastFailover  *failoverPhases
	reprotecting  *reprotectStatus // the one under way, or the last one's failure
	lastReprotect *reprotectStatus // the last one that succeeded
}

// logChannel is one run of a log channel, to a primary or a secondary.
type logChannel struct {
	stop context.CancelFunc
	done chan struct{}
}

func ignoreCanceled(err error) error {
	if errors.Is(err, context.Canceled) {
		return nil
	}
	return err
}

// setUp takes the VM's slot in the host's data path, attaches its tap and
// boots, follows or rejoins the VM as the arbiter says.
func (d *daemon) setUp(ctx context.Context, h *host) error {
	var err error
	d.eng = newVMEngine(d)
	d.arb, d.uplink = h.arb, h.uplink
	if d.tap, err = ensureTap(d.vm.Tap); err != nil {
		return err
	}
	if d.dp, err = h.dp.AddVM(d.slot); err != nil {
		return err
	}
	if d.owner, err = vip.NewOwner(d.dp); err != nil {
		return err
	}
	// Standby until this host knows it may serve: the VM's frames are
	// neither delivered nor let out while its tap attaches.
	if err := d.publish(vip.RoleStandby, 0); err != nil {
		return err
	}
	if err := d.dp.AttachTap(d.tap); err != nil {
		return err
	}

	ev, epoch, owner, err := d.start(ctx)
	if err != nil {
		return err
	}
	switch ev {
	case protect.BootPrimary:
		return d.bootPrimary(ctx, epoch)
	case protect.BootSecondary:
		return d.bootSecondary(ctx)
	default:
		if err := d.publish(vip.RoleStandby, epoch); err != nil {
			return err
		}
		d.rejoin()
		if owner == d.cfg.Name {
			// This host served the VM before it restarted.
			d.group.Go(func() error { return d.announceRestart(ctx, epoch) })
		}
		return nil
	}
}

// bootPrimary boots the VM and serves it, protected, at epoch: the VM's
// first boot. Output commit is on from the VM's first instruction.
func (d *daemon) bootPrimary(ctx context.Context, epoch uint64) error {
	if err := d.ensureHoldQueue(); err != nil {
		return err
	}
	d.incarnation.Store(newIncarnation())
	d.fromBoot.Store(true)
	// The role stays standby (outputs dropped) until published active
	// below; the boot's log is read meanwhile.
	if err := d.eng.boot(ctx, true); err != nil {
		return err
	}
	if err := d.publish(vip.RoleActive, epoch); err != nil {
		return err
	}
	d.shipping.Store(true)
	d.fire(protect.BootPrimary)
	p, err := d.newPrimary(d.cfg.Peer.Address, 0, nil)
	if err != nil {
		return err
	}
	d.goChannel(p.Run)
	return nil
}

// bootSecondary boots this host's copy of the VM and follows the primary's
// log from boot.
func (d *daemon) bootSecondary(ctx context.Context) error {
	if err := d.eng.boot(ctx, false); err != nil {
		return err
	}
	d.fire(protect.BootSecondary)
	return d.follow(lockstep.SecondaryConfig{Boot: true})
}

// rejoin drops this host's copy of the VM, which is stale or fresh, and
// waits for the owner to rebuild it from a snapshot over the log channel.
// The owner finds it on its own: it dials this host while it serves alone.
func (d *daemon) rejoin() {
	d.eng.drop()
	d.takeoverAfter.Store(0) // the next copy says (install)
	if _, ok := d.fire(protect.Rejoin); !ok {
		return
	}
	if err := d.follow(lockstep.SecondaryConfig{}); err != nil {
		d.log.Error("join the VM's owner", "err", err)
	}
}

// copyTook passes on the outcome of delivering a log record to this
// standby's copy. A copy that refuses a record for good (errCopyCannotTake)
// no longer follows the log, and the channel would resend that record
// forever: it may no longer take over, and is dropped and rebuilt from the
// primary's snapshot. The primary holds the outputs that waited for it
// meanwhile; it is re-protected, or gives up on this host through the
// arbiter, which a copy that is joining never asks.
func (d *daemon) copyTook(err error) error {
	if err == nil || !errors.Is(err, errCopyCannotTake) {
		return err
	}
	d.takeoverAfter.Store(math.MaxUint64)
	s := d.secondary()
	go func() {
		d.lifeMu.Lock()
		defer d.lifeMu.Unlock()
		if d.state() != protect.Standby || d.secondary() != s {
			return
		}
		d.log.Error("this copy of the VM cannot take the primary's log: dropping it, to be rebuilt from a snapshot", "err", err)
		d.rejoin()
	}()
	return err
}

// follow starts the log channel of a host that follows the VM's owner,
// from what cfg says it holds.
func (d *daemon) follow(cfg lockstep.SecondaryConfig) error {
	d.channelStop() // and its listener
	tlsCfg, err := lockstep.ServerTLS(d.cfg.Peer.Cert, d.cfg.Peer.Key, d.cfg.Peer.CA, d.cfg.logChannelID())
	if err != nil {
		return err
	}
	cfg.Listen, cfg.TLS, cfg.VM = d.cfg.Peer.Listen, tlsCfg, d.vm.Name
	cfg.Heartbeat, cfg.Logger = d.cfg.Heartbeat, d.log
	cfg.Epoch = max(cfg.Epoch, d.owner.Current().Epoch)
	cfg.OnHandOver = d.onHandOver
	cfg.OnPrimaryRestarted = d.onPrimaryRestarted
	if err := d.eng.follow(&cfg); err != nil {
		return err
	}
	if deliver := cfg.OnFrame; deliver != nil {
		cfg.OnFrame = func(pos uint64, frame []byte) error { return d.copyTook(deliver(pos, frame)) }
	}
	if deliver := cfg.OnLog; deliver != nil {
		cfg.OnLog = func(pos uint64, chunk []byte) error { return d.copyTook(deliver(pos, chunk)) }
	}
	// The VM is rebuilt from the owner's snapshot when it cannot follow the
	// owner's log from what it holds.
	var s *lockstep.Secondary
	cfg.OnSnapshot = func(pos uint64, state []byte) error { return d.eng.install(s, pos, state) }
	// The listener may still be held by the channel this one replaces
	// for a moment after it stopped.
	for range 50 {
		if s, err = lockstep.NewSecondary(cfg); err == nil || !errors.Is(err, syscall.EADDRINUSE) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		return err
	}
	d.secondaryPtr.Store(s)
	d.goChannel(s.Run)
	return nil
}

func (d *daemon) publish(role vip.Role, epoch uint64) error {
	return d.owner.Publish(d.ownerRecord(role, epoch))
}

// ownerRecord is the VM's record in role at epoch, with output commit on.
func (d *daemon) ownerRecord(role vip.Role, epoch uint64) vip.Record {
	return vip.Record{Epoch: epoch, Role: role, IP: d.vm.addr(), MAC: d.vm.hwAddr(), EngineLogs: !d.eng.dataPathLogs(), GuestPaced: d.eng.dataPathLogs()}
}

// setOutputMode switches output commit for benchmarks: "commit" (the
// Output Rule), "passthrough" (off: outputs leave at once) or "hold-all"
// (every output through the hold queue, released as soon as its stamp is
// acknowledged).
func (d *daemon) setOutputMode(mode string) error {
	if st := d.state(); d.gate == nil || !st.Serves() {
		// A host that does not serve the VM must never let its output
		// out, whatever a benchmark asks.
		return fmt.Errorf("output mode: this host is %s: it does not serve the VM", st)
	}
	return d.gate.Mode(mode)
}

// primary is the log channel to the secondary, or nil on a host that has
// none.
func (d *daemon) primary() *lockstep.Primary { return d.primaryPtr.Load() }

// secondary is the log channel from the primary, or nil on a host that
// never followed one.
func (d *daemon) secondary() *lockstep.Secondary { return d.secondaryPtr.Load() }

// newPrimary makes the log channel to a secondary at addr that holds the log
// up to startHead; with snapshot, one that holds none of it can be rebuilt.
func (d *daemon) newPrimary(addr string, startHead uint64, snapshot func(ctx context.Context, rebase func(uint64) error) ([]byte, error)) (*lockstep.Primary, error) {
	tlsCfg, err := lockstep.ClientTLS(d.cfg.Peer.Cert, d.cfg.Peer.Key, d.cfg.Peer.CA, d.cfg.logChannelID())
	if err != nil {
		return nil, err
	}
	p, err := lockstep.NewPrimary(lockstep.PrimaryConfig{
		Addr: addr, TLS: tlsCfg, VM: d.vm.Name, Epoch: d.owner.Current().Epoch, StartHead: startHead,
		Incarnation: d.incarnation.Load(), FromBoot: d.fromBoot.Load(),
		Heartbeat: d.cfg.Heartbeat, Logger: d.log,
		OnFenced:       d.onFenced,
		Snapshot:       snapshot,
		OnPeerLacksLog: d.onPeerLacksLog,
		OnProgress:     d.eng.peerProgress,
		OnPeerHeard:    d.renewLease,
		OnAck: func(pos uint64) {
			d.ackClock.ack(pos)
			d.gate.Ack(d.eng.ackedStamp(pos))
		},
	})
	if err != nil {
		return nil, err
	}
	d.primaryPtr.Store(p)
	return p, nil
}

// renewLease extends the time acknowledged output may leave: the secondary
// had this host's heartbeat sent at sentAt, so it cannot take over before
// sentAt plus the failure timeout (both hosts must have the same one). A
// host paused or cut off for longer releases nothing until it hears from
// its secondary again, or learns it was fenced.
//
// The clock is read before the heartbeat's age: a pause between the two
// then ages the heartbeat and shortens the lease, never lengthens it.
func (d *daemon) renewLease(sentAt time.Time) {
	now := datapath.MonotonicNs()
	if left := d.cfg.FailureTimeout - time.Since(sentAt); left > 0 {
		d.gate.Lease(now + uint64(left))
	}
}

// logCannotCarry: the log channel refused input the VM has taken in
// already (a backlog the secondary never acknowledged, a frame too long): a
// secondary that misses it would diverge silently, so it no longer counts
// as the VM's copy. Shipping stops, outputs keep waiting, and the failover
// path decides who serves; the secondary is rebuilt afterwards.
func (d *daemon) logCannotCarry(pos uint64, err error) {
	if !d.shipping.Swap(false) {
		return
	}
	d.log.Error("the log cannot carry what the VM took in: the secondary is lost", "position", pos, "err", err)
	if st := d.state(); st == protect.Protected || st == protect.Reprotecting {
		go d.peerLost(d.runCtx, st, causeSecondaryLost, 0)
	}
}

// onPeerLacksLog: the secondary that connected holds none of the log the
// held output waits on (its daemon restarted). It will never acknowledge
// it: a failure, now, not after the failure timeout.
func (d *daemon) onPeerLacksLog() {
	st := d.state()
	if st != protect.Protected && st != protect.Reprotecting {
		return
	}
	d.log.Warn("the secondary restarted and lacks the log")
	go d.peerLost(d.runCtx, st, causeSecondaryLost, 0)
}

// goChannel runs a log channel until channelStop, after stopping the one
// before it. It returns the channel's context.
func (d *daemon) goChannel(run func(context.Context) error) context.Context {
	d.channelStop()
	ctx, stop := context.WithCancel(d.runCtx)
	c := &logChannel{stop: stop, done: make(chan struct{})}
	d.mu.Lock()
	d.channel = c
	d.mu.Unlock()
	d.group.Go(func() error {
		defer close(c.done)
		return run(ctx)
	})
	return ctx
}

// channelStop ends the running log channel and waits (briefly) for it:
// the peer is gone or replaced. Never call it from the channel itself.
func (d *daemon) channelStop() {
	d.mu.Lock()
	c := d.channel
	d.channel = nil
	d.mu.Unlock()
	if c == nil {
		return
	}
	c.stop()
	select {
	case <-c.done:
	case <-time.After(5 * time.Second):
		d.log.Warn("the log channel did not stop within 5s")
	}
}

// ensureHoldQueue opens the hold queue and its gate: a host that serves
// needs them.
func (d *daemon) ensureHoldQueue() error {
	if d.hold != nil {
		return nil
	}
	hold, err := outputcommit.Open(d.dp, outputcommit.Config{
		Tap: d.tap, Uplink: d.uplink, Capacity: d.cfg.HoldCapacity, Logger: d.log,
	})
	if err != nil {
		return err
	}
	d.hold, d.gate = hold, outputcommit.NewGate(d.dp, hold, d.owner)
	d.group.Go(func() error { return d.hold.Run(d.runCtx) })
	return nil
}

func (d *daemon) close() error {
	var errs []error
	if c := d.currentCopy(); c != nil {
		errs = append(errs, c.Stop())
	}
	if d.hold != nil {
		errs = append(errs, d.hold.Close())
	}
	if d.eng != nil {
		errs = append(errs, d.eng.close())
	}
	if d.dp != nil {
		errs = append(errs, d.dp.Close())
	}
	return errors.Join(errs...)
}

// Status is what /status serves and `ftgw lab status` shows.
type Status struct {
	VM    string `json:"vm"`
	Host  string `json:"host"`
	State string `json:"state"`
	Role  string `json:"role"`
	Epoch uint64 `json:"epoch"`
	// Incarnation names the log this host writes or follows (hex).
	Incarnation string  `json:"incarnation"`
	Head        uint64  `json:"head"`
	Acked       uint64  `json:"acked"`
	Received    uint64  `json:"received,omitempty"`
	Held        int     `json:"held"`
	Connected   bool    `json:"connected"`
	RTTMicros   float64 `json:"log_rtt_us"`
	// LastFailover is the last failover this host took part in.
	LastFailover *failoverPhases `json:"last_failover,omitempty"`
	// UnprotectedSeconds is how long this host has served the VM alone.
	UnprotectedSeconds float64 `json:"unprotected_seconds"`
	// Replay is a replaying secondary's progress (qemu engine).
	Replay *replayProgress `json:"replay,omitempty"`
	// Reprotect is a re-protection under way, or why the last one failed.
	Reprotect *reprotectStatus `json:"reprotect,omitempty"`
	// LastReprotect is the last re-protection that succeeded.
	LastReprotect *reprotectStatus `json:"last_reprotect,omitempty"`
}

// reprotectStatus: the new secondary must acknowledge the log up to
// TakeoverAfter (and a real VM's must replay to within max_lag) before the
// pair is protected.
type reprotectStatus struct {
	TakeoverAfter uint64 `json:"takeover_after"`
	// A real VM: how long it paused while its state was saved for the
	// new secondary, and the size of that state.
	PausedSeconds    float64 `json:"paused_seconds,omitempty"`
	ImageBytes       int     `json:"image_bytes,omitempty"`
	DiskBytes        int     `json:"disk_bytes,omitempty"`
	Acked            uint64  `json:"acked"`
	ReplayLagSeconds float64 `json:"replay_lag_seconds,omitempty"`
	Error            string  `json:"error,omitempty"`
}

// replayProgress: the log has arrived up to LogIcount guest instructions,
// and the replay has executed ReplayedIcount of them.
type replayProgress struct {
	LogIcount      uint64 `json:"log_icount"`
	LogBytes       int64  `json:"log_bytes"`
	RelayPending   int    `json:"relay_pending_bytes"`
	ReplayedIcount uint64 `json:"replayed_icount"`
}

func (d *daemon) status() Status {
	rec := d.owner.Current()
	st := d.state()
	s := Status{VM: d.vm.Name, Host: d.cfg.Name, State: st.String(), Role: vip.RoleName(rec.Role), Epoch: rec.Epoch,
		Head: d.dp.Head(), Acked: d.dp.Acked(), Incarnation: fmt.Sprintf("%016x", d.incarnation.Load())}
	d.mu.Lock()
	s.LastFailover = d.lastFailover
	if d.reprotecting != nil {
		rp := *d.reprotecting
		s.Reprotect = &rp
	}
	if d.lastReprotect != nil {
		rp := *d.lastReprotect
		s.LastReprotect = &rp
	}
	d.mu.Unlock()
	if rp := s.Reprotect; rp != nil && rp.Error == "" && d.primary() != nil {
		rp.Acked = d.primary().Acked()
	}
	s.UnprotectedSeconds = d.life.AloneFor().Seconds()
	d.eng.status(&s)
	if d.hold != nil {
		s.Held = d.hold.Stats().Held
	}
	// The channel of the role this host has now.
	if p := d.primary(); p != nil && st.Serves() {
		s.Connected = p.Connected()
		s.RTTMicros = float64(p.RTT()) / float64(time.Microsecond)
	} else if sec := d.secondary(); sec != nil {
		// A standby follows its primary's epoch and log.
		s.Epoch = max(s.Epoch, sec.PeerEpoch())
		s.Received = sec.Received()
		s.Connected = sec.Connected()
		s.RTTMicros = float64(sec.RTT()) / float64(time.Microsecond)
		s.Incarnation = fmt.Sprintf("%016x", sec.Incarnation())
	}
	return s
}

func serveHTTP(ctx context.Context, ln net.Listener, h http.Handler) error {
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		<-ctx.Done()
		srv.Close()
	}()
	if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("serve %s: %w", ln.Addr(), err)
	}
	return nil
}

const tapQueueLen = 4096

// ensureTap creates the VM's tap if it is missing, as a persistent device so
// the data path can attach before the VM engine opens it. Its queue is long
// because a frame the tap drops after it was logged is one the secondary's
// copy gets and the primary's does not.
func ensureTap(name string) (*net.Interface, error) {
	if _, err := netlink.LinkByName(name); err != nil {
		tap := &netlink.Tuntap{
			LinkAttrs: netlink.LinkAttrs{Name: name},
			Mode:      netlink.TUNTAP_MODE_TAP,
			Flags:     netlink.TUNTAP_NO_PI | netlink.TUNTAP_ONE_QUEUE,
		}
		if err := netlink.LinkAdd(tap); err != nil {
			return nil, fmt.Errorf("create tap %s: %w", name, err)
		}
		// netlink keeps the creating fds open; the device is persistent.
		for _, f := range tap.Fds {
			f.Close()
		}
	}
	link, err := netlink.LinkByName(name)
	if err != nil {
		return nil, fmt.Errorf("tap %s: %w", name, err)
	}
	// The VM's input is the log and nothing else. A host stack with IPv6
	// on the tap sends router solicitations and MLD reports into it, input
	// the secondary never sees.
	if err := os.WriteFile("/proc/sys/net/ipv6/conf/"+name+"/disable_ipv6", []byte("1"), 0o644); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("disable ipv6 on tap %s: %w", name, err)
	}
	if err := netlink.LinkSetTxQLen(link, tapQueueLen); err != nil {
		return nil, fmt.Errorf("set queue length of tap %s: %w", name, err)
	}
	if err := netlink.LinkSetUp(link); err != nil {
		return nil, fmt.Errorf("bring up tap %s: %w", name, err)
	}
	return net.InterfaceByName(name)
}

func firstLine(s string) string {
	for i, c := range s {
		if c == '\n' {
			return s[:i]
		}
	}
	return s
}
