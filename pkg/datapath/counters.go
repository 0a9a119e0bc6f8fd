package datapath

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// Counter names, used as metric labels. The order follows enum counter in
// bpf/gateway.h; TestCounterNames keeps them in step.
var counterNames = [...]string{
	gatewayCounterCOUNTER_RX_LOGGED:          "rx_logged",
	gatewayCounterCOUNTER_RX_ENGINE_LOGS:     "rx_engine_logs",
	gatewayCounterCOUNTER_RX_LOG_FULL:        "rx_log_full",
	gatewayCounterCOUNTER_RX_TOO_LONG:        "rx_too_long",
	gatewayCounterCOUNTER_RX_STANDBY:         "rx_standby",
	gatewayCounterCOUNTER_RX_MALFORMED:       "rx_malformed",
	gatewayCounterCOUNTER_RX_GUEST_BEHIND:    "rx_guest_behind",
	gatewayCounterCOUNTER_TX_FAST:            "tx_fast",
	gatewayCounterCOUNTER_TX_HELD:            "tx_held",
	gatewayCounterCOUNTER_TX_HOLD_FULL:       "tx_hold_full",
	gatewayCounterCOUNTER_TX_NO_HOLD_SOCKET:  "tx_no_hold_socket",
	gatewayCounterCOUNTER_TX_SUPPRESSED:      "tx_suppressed",
	gatewayCounterCOUNTER_TX_MALFORMED:       "tx_malformed",
	gatewayCounterCOUNTER_TX_META_FAILED:     "tx_meta_failed",
	gatewayCounterCOUNTER_TX_RELEASE_REFUSED: "tx_release_refused",
}

// Counter values.
const (
	CounterRxLogged         = gatewayCounterCOUNTER_RX_LOGGED
	CounterRxEngineLogs     = gatewayCounterCOUNTER_RX_ENGINE_LOGS
	CounterRxLogFull        = gatewayCounterCOUNTER_RX_LOG_FULL
	CounterRxTooLong        = gatewayCounterCOUNTER_RX_TOO_LONG
	CounterRxStandby        = gatewayCounterCOUNTER_RX_STANDBY
	CounterRxMalformed      = gatewayCounterCOUNTER_RX_MALFORMED
	CounterRxGuestBehind    = gatewayCounterCOUNTER_RX_GUEST_BEHIND
	CounterTxFast           = gatewayCounterCOUNTER_TX_FAST
	CounterTxHeld           = gatewayCounterCOUNTER_TX_HELD
	CounterTxHoldFull       = gatewayCounterCOUNTER_TX_HOLD_FULL
	CounterTxNoHoldSocket   = gatewayCounterCOUNTER_TX_NO_HOLD_SOCKET
	CounterTxSuppressed     = gatewayCounterCOUNTER_TX_SUPPRESSED
	CounterTxMalformed      = gatewayCounterCOUNTER_TX_MALFORMED
	CounterTxMetaFailed     = gatewayCounterCOUNTER_TX_META_FAILED
	CounterTxReleaseRefused = gatewayCounterCOUNTER_TX_RELEASE_REFUSED
	NumCounters             = int(gatewayCounterCOUNTER__LEN)
)

func (c Counter) String() string {
	if int(c) < len(counterNames) && counterNames[c] != "" {
		return counterNames[c]
	}
	return fmt.Sprintf("counter(%d)", uint32(c))
}

// Count is one counter summed over CPUs.
type Count struct{ Packets, Bytes uint64 }

// Counters reads every counter, summed over CPUs.
func (d *Datapath) Counters() ([NumCounters]Count, error) {
	var out [NumCounters]Count
	var perCPU []gatewayCounterValue
	for c := range Counter(NumCounters) {
		if err := d.host.objs.Counters.Lookup(d.slot*uint32(NumCounters)+uint32(c), &perCPU); err != nil {
			return out, fmt.Errorf("read counter %s: %w", c, err)
		}
		for _, v := range perCPU {
			out[c].Packets += v.Packets
			out[c].Bytes += v.Bytes
		}
	}
	return out, nil
}

// LatencyHistogram is the fast path's commit latency, summed over CPUs:
// Buckets[i] counts latencies below 2^i ns (the last takes all longer ones).
type LatencyHistogram struct {
	Buckets [LatencyBuckets]uint64
	SumNs   uint64
}

// Observe adds one latency of ns nanoseconds.
func (h *LatencyHistogram) Observe(ns uint64) {
	bits := 0
	for v := ns; v > 0; v >>= 1 {
		bits++
	}
	h.Buckets[min(bits, LatencyBuckets-1)]++
	h.SumNs += ns
}

// MonotonicNs is the clock bpf_ktime_get_ns reads (CLOCK_MONOTONIC), so
// user-space times compare with the programs' stamps.
func MonotonicNs() uint64 {
	var ts unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	return uint64(ts.Nano())
}

// FastLatency reads the fast path's commit-latency histogram.
func (d *Datapath) FastLatency() (LatencyHistogram, error) {
	var out LatencyHistogram
	var perCPU []gatewayLatencyHist
	if err := d.host.objs.FastLatency.Lookup(d.slot, &perCPU); err != nil {
		return out, fmt.Errorf("read fast latency: %w", err)
	}
	for _, h := range perCPU {
		for i, n := range h.Buckets {
			out.Buckets[i] += n
		}
		out.SumNs += h.SumNs
	}
	return out, nil
}
