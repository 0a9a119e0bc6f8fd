// Package grafana builds ftgw's Grafana dashboard with the Grafana
// Foundation SDK. ftgw-dashboard.json is its output, committed for
// operators to import; `go generate ./deploy/grafana` (or `make generate`)
// writes it again and TestCommittedDashboardIsFresh fails if it is stale.
package grafana

//go:generate go run generate.go

import (
	"encoding/json"
	"fmt"

	"github.com/grafana/grafana-foundation-sdk/go/cog"
	"github.com/grafana/grafana-foundation-sdk/go/common"
	"github.com/grafana/grafana-foundation-sdk/go/dashboard"
	"github.com/grafana/grafana-foundation-sdk/go/prometheus"
	"github.com/grafana/grafana-foundation-sdk/go/stat"
	"github.com/grafana/grafana-foundation-sdk/go/timeseries"
)

// The latency budgets of deploy/prometheus/ftgw-rules.yaml, drawn on the
// latency panels. Both are upper bounds of ftgw's histogram buckets (2^i
// ns), so the alerts' p99 comparison is exact; the rules' own test checks
// that, and this package's that the rules use these values.
const (
	LogAckBudgetSeconds       = float64(1<<19) / 1e9 // 0.52 ms: the log round trip
	OutputCommitBudgetSeconds = float64(1<<20) / 1e9 // 1.05 ms: what a client sees added
)

// UID is the dashboard's uid: importing it again replaces it.
const UID = "ftgw-vms"

// selector picks the series of the VMs and hosts the variables select.
const selector = `vm=~"$vm",instance=~"$instance"`

// JSON is the dashboard as Grafana imports it.
func JSON() ([]byte, error) {
	d, err := Dashboard()
	if err != nil {
		return nil, err
	}
	raw, err := json.MarshalIndent(d, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("marshal dashboard: %w", err)
	}
	return append(raw, '\n'), nil
}

// Dashboard builds the dashboard: one row per VM (the vm variable, repeated)
// with its hosts (the instance variable) side by side in each panel.
func Dashboard() (dashboard.Dashboard, error) {
	b := dashboard.NewDashboardBuilder("ftgw: protected VMs").
		Uid(UID).
		Description("Fault tolerance of each VM ftgw protects: state, output commit and log latency, drops, failovers and replay lag, per host. Alert rules: deploy/prometheus/ftgw-rules.yaml.").
		Tags([]string{"ftgw"}).
		Refresh("30s").
		Time("now-1h", "now").
		Timezone(common.TimeZoneBrowser).
		Tooltip(dashboard.DashboardCursorSyncCrosshair).
		WithVariable(dashboard.NewDatasourceVariableBuilder("datasource").
			Label("Prometheus").
			Type("prometheus")).
		WithVariable(labelVariable("vm", "VM", "label_values(ftgw_state, vm)")).
		WithVariable(labelVariable("instance", "Host", `label_values(ftgw_state{vm=~"$vm"}, instance)`)).
		WithRow(dashboard.NewRowBuilder("VM $vm").Repeat("vm"))

	for _, p := range panels() {
		b = b.WithPanel(p)
	}
	d, err := b.Build()
	if err != nil {
		return d, err
	}
	// Stable ids, unique within the dashboard, so that links to a panel
	// survive a regeneration.
	for i, p := range d.Panels {
		id := uint32(i + 1)
		switch {
		case p.RowPanel != nil:
			p.RowPanel.Id = id
		case p.Panel != nil:
			p.Panel.Id = &id
		}
	}
	return d, nil
}

func labelVariable(name, label, query string) *dashboard.QueryVariableBuilder {
	return dashboard.NewQueryVariableBuilder(name).
		Label(label).
		Datasource(datasource()).
		Query(dashboard.StringOrMap{String: cog.ToPtr(query)}).
		Definition(query).
		Refresh(dashboard.VariableRefreshOnTimeRangeChanged).
		Sort(dashboard.VariableSortAlphabeticalAsc).
		Multi(true).
		IncludeAll(true).
		// A regex for "every value" rather than Grafana's list of the values
		// it knows: a host that appears later is included.
		AllValue(".+")
}

func datasource() common.DataSourceRef {
	return common.DataSourceRef{Type: cog.ToPtr("prometheus"), Uid: cog.ToPtr("${datasource}")}
}

// query is one PromQL target; sel in expr is replaced by the variables'
// selector.
func query(expr, legend string) *prometheus.DataqueryBuilder {
	return prometheus.NewDataqueryBuilder().
		Datasource(datasource()).
		Expr(expr).
		LegendFormat(legend)
}

// quantile is the q-quantile of a histogram of ftgw's, by host and by.
func quantile(q float64, metric, by string) string {
	return fmt.Sprintf("histogram_quantile(%g, sum by (%s) (rate(%s_bucket{%s}[$__rate_interval])))", q, by, metric, selector)
}

func panels() []cog.Builder[dashboard.Panel] {
	sel := func(metric string) string { return metric + "{" + selector + "}" }
	return []cog.Builder[dashboard.Panel]{
		stat.NewPanelBuilder().
			Title("State and role").
			Description("Each host's state for the VM (protected, unprotected: serving alone, reprotecting: a new standby catching up, standby, joining, arbitrating, draining, yielded, passive) and its role.").
			Datasource(datasource()).
			WithTarget(query("max by (instance, state) ("+sel("ftgw_state")+") == 1", "{{instance}}: {{state}}")).
			WithTarget(query("max by (instance, role) ("+sel("ftgw_role")+") == 1", "{{instance}}: {{role}}")).
			TextMode(common.BigValueTextModeName).
			ColorMode(common.BigValueColorModeNone).
			GraphMode(common.BigValueGraphModeNone).
			ReduceOptions(lastValue()).
			Height(6).Span(12),
		stat.NewPanelBuilder().
			Title("Epoch").
			Description("The VM's epoch as each host knows it: it grows with every failover and switchover.").
			Datasource(datasource()).
			WithTarget(query("max by (instance) ("+sel("ftgw_epoch")+")", "{{instance}}")).
			ColorMode(common.BigValueColorModeNone).
			GraphMode(common.BigValueGraphModeArea).
			ReduceOptions(lastValue()).
			Decimals(0).
			Height(6).Span(4),
		stat.NewPanelBuilder().
			Title("Failovers in range").
			Description("Failovers each host took part in during the dashboard's time range, by cause (primary_lost, secondary_lost, switchover).").
			Datasource(datasource()).
			WithTarget(query("sum by (instance, cause) (increase("+sel("ftgw_failovers_total")+"[$__range]))", "{{instance}} {{cause}}")).
			ColorMode(common.BigValueColorModeNone).
			GraphMode(common.BigValueGraphModeNone).
			ReduceOptions(lastValue()).
			Decimals(0).
			Height(6).Span(4),
		stat.NewPanelBuilder().
			Title("Unprotected in range").
			Description("Time each host served the VM with no standby ready to take over, during the dashboard's time range.").
			Datasource(datasource()).
			WithTarget(query("sum by (instance) (increase("+sel("ftgw_unprotected_seconds_total")+"[$__range]))", "{{instance}}")).
			Unit("s").
			ColorMode(common.BigValueColorModeNone).
			GraphMode(common.BigValueGraphModeNone).
			ReduceOptions(lastValue()).
			Height(6).Span(4),

		latencyPanel("Output commit latency", "Guest frame's arrival on the tap to its release on the uplink. held: waited for the secondary's ack; fast: nothing pending, sent at once. The dashed line is the alert's p99 budget (both paths together).", OutputCommitBudgetSeconds).
			WithTarget(query(quantile(0.5, "ftgw_output_commit_latency_seconds", "instance, path, le"), "{{instance}} {{path}} p50")).
			WithTarget(query(quantile(0.99, "ftgw_output_commit_latency_seconds", "instance, path, le"), "{{instance}} {{path}} p99")).
			WithTarget(query(quantile(0.99, "ftgw_output_commit_latency_seconds", "instance, le"), "{{instance}} p99, both paths")),
		latencyPanel("Log ack latency", "Input frame appended to the log until the secondary's ack covers it: what every held output waits for. The dashed line is the alert's p99 budget.", LogAckBudgetSeconds).
			WithTarget(query(quantile(0.5, "ftgw_log_ack_latency_seconds", "instance, le"), "{{instance}} p50")).
			WithTarget(query(quantile(0.99, "ftgw_log_ack_latency_seconds", "instance, le"), "{{instance}} p99")),
		graph("Log channel RTT", "Heartbeat round trip on the log channel, as the serving host last measured it. The design target for the output commit's added latency is 1.5 x this + 20 µs.", "s").
			WithTarget(query(sel("ftgw_log_rtt_seconds"), "{{instance}}")),

		graph("Held frames", "Guest outputs waiting in the hold queue for an ack (hold_capacity bounds them; beyond it they are dropped as hold_full).", "short").
			WithTarget(query(sel("ftgw_held_frames"), "{{instance}}")),
		graph("Drops by reason", "Frames dropped per second. Outputs: hold_full, no_hold_socket, hold_metadata, hold_socket, malformed_output; input: log_full, guest_behind, too_long, malformed_input, standby_input; stale_copy: a fenced host's held outputs, dropped by design.", "pps").
			WithTarget(query("sum by (instance, reason) (rate("+sel("ftgw_dropped_frames_total")+"[$__rate_interval]))", "{{instance}} {{reason}}")),
		graph("Failovers", "Failovers each host took part in, by cause.", "short").
			WithTarget(query("sum by (instance, cause) (increase("+sel("ftgw_failovers_total")+"[$__rate_interval]))", "{{instance}} {{cause}}")).
			DrawStyle(common.GraphDrawStyleBars),

		graph("Time served unprotected", "Share of the time each host served the VM with no standby ready to take over (unprotected or reprotecting).", "percentunit").
			WithTarget(query("sum by (instance) (rate("+sel("ftgw_unprotected_seconds_total")+"[$__rate_interval]))", "{{instance}}")).
			Min(0).Max(1),
		graph("Replay lag (real VMs)", "How far the secondary's replay trails: on the primary, how long the VM has run since the log the secondary replayed (the throttle pauses the VM beyond max_lag); on the secondary, the log received and not replayed, in guest time. Synthetic VMs have none.", "s").
			WithTarget(query(sel("ftgw_replay_lag_seconds"), "{{instance}} lag")).
			WithTarget(query(sel("ftgw_replay_max_lag_seconds"), "{{instance}} max_lag")),
		graph("Lag throttle (real VMs)", "Share of the time the primary's VM was paused by the lag throttle so that its secondary's replay could catch up.", "percentunit").
			WithTarget(query("rate("+sel("ftgw_throttled_seconds_total")+"[$__rate_interval])", "{{instance}}")).
			Min(0).Max(1),
	}
}

func lastValue() *common.ReduceDataOptionsBuilder {
	return common.NewReduceDataOptionsBuilder().Calcs([]string{"lastNotNull"}).Values(false)
}

func graph(title, description, unit string) *timeseries.PanelBuilder {
	return timeseries.NewPanelBuilder().
		Title(title).
		Description(description).
		Datasource(datasource()).
		Unit(unit).
		Legend(common.NewVizLegendOptionsBuilder().
			DisplayMode(common.LegendDisplayModeList).
			Placement(common.LegendPlacementBottom).
			ShowLegend(true)).
		Height(8).Span(8)
}

// latencyPanel draws a dashed line at budget.
func latencyPanel(title, description string, budget float64) *timeseries.PanelBuilder {
	return graph(title, description, "s").
		Min(0).
		Thresholds(dashboard.NewThresholdsConfigBuilder().
			Mode(dashboard.ThresholdsModeAbsolute).
			Steps([]dashboard.Threshold{
				{Value: nil, Color: "green"},
				{Value: cog.ToPtr(budget), Color: "red"},
			})).
		ThresholdsStyle(common.NewGraphThresholdsStyleConfigBuilder().
			Mode(common.GraphThresholdsStyleModeDashed))
}
