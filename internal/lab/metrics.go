package lab

import (
	"fmt"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/ftgw/ftgw/internal/netnsutil"
)

// Scrape reads the metrics of the daemon in namespace ns.
func Scrape(ns string) (map[string]*dto.MetricFamily, error) {
	url := fmt.Sprintf("http://127.0.0.1:%d/metrics", MetricsPort)
	resp, err := netnsutil.HTTPClient(ns, 5*time.Second).Get(url)
	if err != nil {
		return nil, fmt.Errorf("scrape %s: %w", ns, err)
	}
	defer resp.Body.Close()
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(resp.Body)
	if err != nil {
		return nil, fmt.Errorf("scrape %s: %w", ns, err)
	}
	return families, nil
}

// Metric returns the first metric of the family name whose labels include
// every one of want.
func Metric(families map[string]*dto.MetricFamily, name string, want map[string]string) (*dto.Metric, bool) {
next:
	for _, m := range families[name].GetMetric() {
		labels := map[string]string{}
		for _, l := range m.GetLabel() {
			labels[l.GetName()] = l.GetValue()
		}
		for k, v := range want {
			if labels[k] != v {
				continue next
			}
		}
		return m, true
	}
	return nil, false
}
