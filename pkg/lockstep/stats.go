package lockstep

import (
	"errors"
	"fmt"
	"sync/atomic"
	"time"
)

// ErrReason says why a connection ended (or an append failed). Stats counts
// one per event.
type ErrReason uint8

const (
	ReasonBadMagic ErrReason = iota
	ReasonChecksum
	ReasonTooLong
	ReasonUnknownKind
	ReasonTruncated
	ReasonOutOfOrder
	ReasonAckBeyondHead
	ReasonAckBackwards
	ReasonVersion
	ReasonWrongVM
	ReasonUnexpected
	ReasonAuth        // TLS handshake refused: missing or foreign certificate, or not TLS at all
	ReasonIO          // network error, timeout (also in the TLS handshake), or the peer closed the connection
	ReasonBacklogFull // AppendFrame refused: MaxUnacked bytes already wait for an ack
	ReasonDeliver     // SecondaryConfig.OnFrame returned an error
	ReasonStaleEpoch  // the peer's epoch is older than one already seen: it lost a failover
	ReasonIncarnation // the peer's log is another incarnation at the same epoch
	ReasonLacksLog    // the secondary does not hold the log and no snapshot can rebuild it
	ReasonSnapshot    // a snapshot arrived cut, too long or corrupt
	ReasonRestarted   // the primary announced that its daemon restarted
	ReasonLen         // number of reasons; not a reason
)

var reasonNames = [ReasonLen]string{
	ReasonBadMagic:      "bad_magic",
	ReasonChecksum:      "checksum",
	ReasonTooLong:       "too_long",
	ReasonUnknownKind:   "unknown_kind",
	ReasonTruncated:     "truncated",
	ReasonOutOfOrder:    "out_of_order",
	ReasonAckBeyondHead: "ack_beyond_head",
	ReasonAckBackwards:  "ack_backwards",
	ReasonVersion:       "version",
	ReasonWrongVM:       "wrong_vm",
	ReasonUnexpected:    "unexpected",
	ReasonAuth:          "auth",
	ReasonIO:            "io",
	ReasonBacklogFull:   "backlog_full",
	ReasonDeliver:       "deliver",
	ReasonStaleEpoch:    "stale_epoch",
	ReasonIncarnation:   "incarnation",
	ReasonLacksLog:      "lacks_log",
	ReasonSnapshot:      "snapshot",
	ReasonRestarted:     "primary_restarted",
}

func (r ErrReason) String() string {
	if r < ReasonLen {
		return reasonNames[r]
	}
	return fmt.Sprintf("ErrReason(%d)", uint8(r))
}

// errDeliver marks errors returned by OnFrame, which may wrap anything.
var errDeliver = errors.New("frame not delivered")

// reasonOf maps an error to the reason it is counted under. Auth and deliver
// come first because those errors wrap arbitrary causes.
func reasonOf(err error) ErrReason {
	for _, c := range []struct {
		err    error
		reason ErrReason
	}{
		{ErrAuth, ReasonAuth},
		{ErrStaleEpoch, ReasonStaleEpoch},
		{ErrIncarnation, ReasonIncarnation},
		{ErrPeerLacksLog, ReasonLacksLog},
		{ErrSnapshot, ReasonSnapshot},
		{ErrPrimaryRestarted, ReasonRestarted},
		{errDeliver, ReasonDeliver},
		{ErrBadMagic, ReasonBadMagic},
		{ErrChecksum, ReasonChecksum},
		{ErrTooLong, ReasonTooLong},
		{ErrUnknownKind, ReasonUnknownKind},
		{ErrTruncated, ReasonTruncated},
		{ErrOutOfOrder, ReasonOutOfOrder},
		{ErrAckBeyondHead, ReasonAckBeyondHead},
		{ErrAckBackwards, ReasonAckBackwards},
		{ErrVersion, ReasonVersion},
		{ErrWrongVM, ReasonWrongVM},
		{ErrUnexpected, ReasonUnexpected},
		{ErrBacklogFull, ReasonBacklogFull},
	} {
		if errors.Is(err, c.err) {
			return c.reason
		}
	}
	return ReasonIO
}

// Stats is a snapshot of a Primary's or Secondary's counters. Per-kind
// arrays are indexed by Kind (index 0 is unused); bytes include the header.
type Stats struct {
	RecordsSent, RecordsReceived [KindLen]uint64
	BytesSent, BytesReceived     [KindLen]uint64
	Errors                       [ReasonLen]uint64 // indexed by ErrReason
	Connects, Disconnects        uint64            // connections that completed / ended after the Hello exchange
	Duplicates                   uint64            // secondary: RXFrames at or below Received, skipped
}

// counters is the live, atomic form of Stats.
type counters struct {
	recSent, recRecv, bytesSent, bytesRecv [KindLen]atomic.Uint64
	errors                                 [ReasonLen]atomic.Uint64
	connects, disconnects, duplicates      atomic.Uint64
	// lastHeard is when the peer last sent a valid record on an admitted
	// connection (monoNow), for failure detection: log traffic counts as
	// liveness as much as heartbeats do. A peer that is refused at its
	// Hello is not alive for the VM, however often it comes back.
	lastHeard atomic.Uint64
}

// heard notes that the peer of an admitted connection spoke.
func (c *counters) heard() { c.lastHeard.Store(monoNow()) }

func (c *counters) sent(k Kind, n int) {
	if k < KindLen {
		c.recSent[k].Add(1)
		c.bytesSent[k].Add(uint64(n))
	}
}

func (c *counters) received(r Record) {
	if r.Kind < KindLen {
		c.recRecv[r.Kind].Add(1)
		c.bytesRecv[r.Kind].Add(uint64(HeaderLen + len(r.Payload)))
	}
}

// fail counts err under its reason and returns the reason for logging.
func (c *counters) fail(err error) ErrReason {
	r := reasonOf(err)
	c.errors[r].Add(1)
	return r
}

func (c *counters) snapshot() Stats {
	var s Stats
	for k := range KindLen {
		s.RecordsSent[k] = c.recSent[k].Load()
		s.RecordsReceived[k] = c.recRecv[k].Load()
		s.BytesSent[k] = c.bytesSent[k].Load()
		s.BytesReceived[k] = c.bytesRecv[k].Load()
	}
	for r := range ReasonLen {
		s.Errors[r] = c.errors[r].Load()
	}
	s.Connects = c.connects.Load()
	s.Disconnects = c.disconnects.Load()
	s.Duplicates = c.duplicates.Load()
	return s
}

// sinceHeard is how long the peer has been silent; before it was ever heard,
// since the process started (lastHeard is 0 then).
func (c *counters) sinceHeard() time.Duration {
	return time.Duration(monoNow() - c.lastHeard.Load())
}
