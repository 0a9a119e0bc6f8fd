package main

import (
	"math"
	"runtime"
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/ftgw/ftgw/pkg/datapath"
	"github.com/ftgw/ftgw/pkg/lockstep"
	"github.com/ftgw/ftgw/pkg/protect"
	"github.com/ftgw/ftgw/pkg/vip"
)

// collector reads the data path's maps and the daemons' state at scrape
// time, so the hot paths keep no Prometheus state of their own. Every
// series but the host's own two is labelled with its VM.
type collector struct {
	daemons []*daemon
	errors  atomic.Uint64

	commitLatency, ackLatency, shipDelay, held, head, acked, logBytes, logRecords, suppressed, dropped,
	frames, channelErrors, rtt, role, epoch, collectionErrors,
	state, failovers, failoverPhase, unprotected,
	replayLag, throttles, throttled, buildInfo *prometheus.Desc
}

func newCollector(daemons []*daemon) *collector {
	vm := []string{"vm"}
	desc := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc("ftgw_"+name, help, append(vm, labels...), nil)
	}
	return &collector{
		daemons: daemons,
		commitLatency: desc("output_commit_latency_seconds",
			"Time from a guest frame's arrival on the tap to its release on the uplink; path is fast (nothing pending, sent at once) or held (waited for the secondary's ack).", "path"),
		ackLatency: desc("log_ack_latency_seconds",
			"Time from appending an input frame to the log until the secondary's ack covers it."),
		shipDelay: desc("log_ship_delay_seconds",
			"Time from an input frame's logging in the kernel to its hand-over to the log channel (the log ring's wakeup)."),
		held:       desc("held_frames", "Guest frames in the hold queue now."),
		head:       desc("log_head_position", "Last log position assigned to an input frame."),
		acked:      desc("log_acked_position", "Last log position the secondary acknowledged."),
		logBytes:   desc("log_bytes_total", "Bytes on the log channel, headers included.", "kind", "direction"),
		logRecords: desc("log_records_total", "Records on the log channel.", "kind", "direction"),
		suppressed: desc("suppressed_frames_total", "Guest outputs dropped because this host is not active."),
		dropped:    desc("dropped_frames_total", "Frames dropped, by reason.", "reason"),
		frames:     desc("datapath_frames_total", "Every data-path counter, by name.", "counter"),
		channelErrors: desc("log_channel_errors_total",
			"Log channel connections closed for a protocol or authentication error, by reason.", "reason"),
		rtt:   desc("log_rtt_seconds", "Last heartbeat round-trip time on the log channel."),
		role:  desc("role", "1 for this host's current role for the VM.", "role"),
		epoch: desc("epoch", "The VM's epoch as this host knows it."),
		state: desc("state", "1 for this host's state for the VM: joining, standby, protected, reprotecting, unprotected, arbitrating, draining, yielded or passive (pkg/protect).", "state"),
		failovers: desc("failovers_total",
			"Failovers this host took part in, by cause (primary_lost, secondary_lost, switchover), whether it won the arbiter or not.", "cause"),
		failoverPhase: desc("last_failover_seconds",
			"Phases of the last failover: detection (peer's last word to declared failed), arbitration, drain (a real VM's replay of the log it had received), go_live.", "phase"),
		unprotected: desc("unprotected_seconds_total", "Time this host served the VM with no secondary."),
		replayLag: desc("replay_lag_seconds",
			"Real VMs: how far the secondary's replay trails: on the primary, how long the VM has run since its log reached the instruction count the secondary last reported replaying (what the throttle bounds); on the secondary, in guest time, the log it has received minus what it has replayed."),
		throttles: desc("throttle_pauses_total", "Real VMs: times the primary paused its VM because the replay lag exceeded max_lag."),
		throttled: desc("throttled_seconds_total", "Real VMs: time the primary's VM spent paused by the lag throttle."),
		buildInfo: prometheus.NewDesc("ftgw_build_info",
			"1, labelled with the version and VCS revision of ftgw and the Go that built it.", []string{"version", "revision", "goversion"}, nil),
		collectionErrors: prometheus.NewDesc("ftgw_collection_errors_total",
			"Errors reading data-path state at scrape time.", nil, nil),
	}
}

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	prometheus.DescribeByCollect(c, ch)
}

// droppedBy maps data-path counters that are drops to their reason label.
var droppedBy = map[datapath.Counter]string{
	datapath.CounterRxLogFull:      "log_full",
	datapath.CounterRxTooLong:      "too_long",
	datapath.CounterRxStandby:      "standby_input",
	datapath.CounterRxMalformed:    "malformed_input",
	datapath.CounterRxGuestBehind:  "guest_behind",
	datapath.CounterTxHoldFull:     "hold_full",
	datapath.CounterTxNoHoldSocket: "no_hold_socket",
	datapath.CounterTxMalformed:    "malformed_output",
	datapath.CounterTxMetaFailed:   "hold_metadata",
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	for _, d := range c.daemons {
		c.collectVM(d, ch)
	}
	ch <- prometheus.MustNewConstMetric(c.collectionErrors, prometheus.CounterValue, float64(c.errors.Load()))
	version, revision := buildVersion()
	ch <- prometheus.MustNewConstMetric(c.buildInfo, prometheus.GaugeValue, 1, version, revision, runtime.Version())
}

func (c *collector) collectVM(d *daemon, ch chan<- prometheus.Metric) {
	vm := d.vm.Name
	counter := func(desc *prometheus.Desc, v uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(desc, prometheus.CounterValue, float64(v), append([]string{vm}, labels...)...)
	}
	gauge := func(desc *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(desc, prometheus.GaugeValue, v, append([]string{vm}, labels...)...)
	}

	if counts, err := d.dp.Counters(); err != nil {
		c.errors.Add(1)
	} else {
		for i, n := range counts {
			counter(c.frames, n.Packets, datapath.Counter(i).String())
			if reason, ok := droppedBy[datapath.Counter(i)]; ok {
				counter(c.dropped, n.Packets, reason)
			}
		}
		counter(c.suppressed, counts[datapath.CounterTxSuppressed].Packets)
	}
	if fast, err := d.dp.FastLatency(); err != nil {
		c.errors.Add(1)
	} else {
		ch <- constHistogram(c.commitLatency, fast, vm, "fast")
	}
	if d.hold != nil {
		st := d.hold.Stats()
		ch <- constHistogram(c.commitLatency, st.Latency, vm, "held")
		gauge(c.held, float64(st.Held))
		counter(c.dropped, st.Lost, "hold_socket")
		counter(c.dropped, st.Discarded, "stale_copy")
	}
	gauge(c.head, float64(d.dp.Head()))
	gauge(c.acked, float64(d.dp.Acked()))

	// The live log channel: a promoted secondary keeps its stopped one.
	var ls *lockstep.Stats
	if p := d.primary(); p != nil && d.state().Serves() {
		st := p.Stats()
		ls = &st
		gauge(c.rtt, p.RTT().Seconds())
		ch <- constHistogram(c.ackLatency, d.ackClock.histogram(), vm)
		ch <- constHistogram(c.shipDelay, d.shipDelay.snapshot(), vm)
	} else if s := d.secondary(); s != nil {
		st := s.Stats()
		ls = &st
	}
	if ls != nil {
		for k := range lockstep.Kind(lockstep.KindLen) {
			if k == 0 {
				continue
			}
			counter(c.logBytes, ls.BytesSent[k], k.String(), "sent")
			counter(c.logBytes, ls.BytesReceived[k], k.String(), "received")
			counter(c.logRecords, ls.RecordsSent[k], k.String(), "sent")
			counter(c.logRecords, ls.RecordsReceived[k], k.String(), "received")
		}
		for reason, n := range ls.Errors {
			counter(c.channelErrors, n, lockstep.ErrReason(reason).String())
		}
	}

	rec := d.owner.Current()
	for _, r := range []vip.Role{vip.RoleNone, vip.RoleStandby, vip.RoleActive} {
		v := 0.0
		if rec.Role == r {
			v = 1
		}
		gauge(c.role, v, vip.RoleName(r))
	}
	gauge(c.epoch, float64(rec.Epoch))
	current := d.state()
	for st := range protect.StateLen {
		v := 0.0
		if st == current {
			v = 1
		}
		gauge(c.state, v, st.String())
	}
	ch <- prometheus.MustNewConstMetric(c.unprotected, prometheus.CounterValue, d.life.AloneFor().Seconds(), vm)
	d.eng.collect(c, ch)
	d.mu.Lock()
	for _, cause := range []string{causePrimaryLost, causeSecondaryLost, causeSwitchover} {
		counter(c.failovers, d.failovers[cause], cause)
	}
	if p := d.lastFailover; p != nil {
		gauge(c.failoverPhase, p.Detection.Seconds(), "detection")
		gauge(c.failoverPhase, p.Arbitration.Seconds(), "arbitration")
		gauge(c.failoverPhase, p.Drain.Seconds(), "drain")
		gauge(c.failoverPhase, p.GoLive.Seconds(), "go_live")
	}
	d.mu.Unlock()
}

// constHistogram turns a power-of-two nanosecond histogram into Prometheus
// buckets: bucket i holds latencies below 2^i ns, so its upper bound is
// 2^i ns (the last bucket is open-ended and only counts towards +Inf).
func constHistogram(desc *prometheus.Desc, h datapath.LatencyHistogram, labels ...string) prometheus.Metric {
	buckets := make(map[float64]uint64, len(h.Buckets))
	var cumulative, total uint64
	for i, n := range h.Buckets {
		total += n
		if i == len(h.Buckets)-1 {
			break
		}
		cumulative += n
		buckets[math.Ldexp(1, i)/1e9] = cumulative
	}
	return prometheus.MustNewConstHistogram(desc, total, float64(h.SumNs)/1e9, buckets, labels...)
}
