package test

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ftgw/ftgw/deploy/grafana"
	"github.com/ftgw/ftgw/internal/lab"
	"github.com/ftgw/ftgw/internal/netnsutil"
	"github.com/ftgw/ftgw/internal/testutil"
)

// The SRE kit against a running pair: a real Prometheus scrapes both
// daemons and loads the alert rules, then every query of the committed
// Grafana dashboard must return data and every rule must evaluate.
//
// A real VM's lab exports every metric the dashboard draws, the replay lag
// included; a synthetic guest's lab has no replay, and its real-VM panels
// must stay empty rather than show something else.
func TestPrometheusOnTheRealVMLabAnswersEveryDashboardQuery(t *testing.T) {
	prom, _ := testutil.RequirePrometheus(t)
	qemuPairUp(t)
	checkSREKit(t, prom, nil)
}

func TestPrometheusOnTheSyntheticLabAnswersEveryDashboardQuery(t *testing.T) {
	prom, _ := testutil.RequirePrometheus(t)
	labUp(t)
	checkSREKit(t, prom, func(panel string) bool { return strings.Contains(panel, "(real VMs)") })
}

// checkSREKit runs Prometheus on the lab that is up, sends traffic, and
// checks the dashboard's queries (those of panels realVMOnly names must
// return nothing) and the rules.
func checkSREKit(t *testing.T, prometheusBin string, realVMOnly func(panel string) bool) {
	p := startPrometheus(t, prometheusBin)

	p.waitFor(t, 30*time.Second, "both daemons scraped", func() (bool, string) {
		up, err := p.query(`up{job="ftgw"} == 1`)
		return err == nil && len(up) == 2, fmt.Sprintf("up: %v %v", up, err)
	})
	// Traffic after the first scrapes, so that rates see it grow. Its
	// replies leave held or fast: the scrapes have seen them all once the
	// commit latency has counted that many more outputs.
	const outputs = `sum(ftgw_output_commit_latency_seconds_count{job="ftgw"})`
	before, err := p.query(outputs)
	if err != nil || len(before) != 1 {
		t.Fatalf("%s: %v %v", outputs, before, err)
	}
	c := kvClient(t)
	const writes = 200
	for i := range writes {
		if _, err := c.Put(fmt.Sprintf("sre%d", i%20), strconv.Itoa(i)); err != nil {
			t.Fatalf("PUT %d: %v", i, err)
		}
	}
	p.waitFor(t, 30*time.Second, "the writes' replies in Prometheus", func() (bool, string) {
		now, err := p.query(outputs)
		return err == nil && len(now) == 1 && now[0].value >= before[0].value+writes,
			fmt.Sprintf("outputs counted: %v, %v before the writes (%v)", now, before[0].value, err)
	})

	raw, err := os.ReadFile("../deploy/grafana/ftgw-dashboard.json")
	if err != nil {
		t.Fatal(err)
	}
	targets, vars, err := grafana.Parse(raw)
	if err != nil {
		t.Fatal(err)
	}

	// The variables' own queries list the lab's VM and both hosts.
	wantValues := map[string][]string{"vm": {lab.VMName}, "instance": {lab.NSPrimary, lab.NSSecondary}}
	labelValues := regexp.MustCompile(`^label_values\((.+),\s*(\w+)\)$`)
	for _, v := range vars {
		if v.Type != "query" {
			continue
		}
		m := labelValues.FindStringSubmatch(v.Query)
		if m == nil {
			t.Errorf("variable %s: query %q is not label_values(selector, label)", v.Name, v.Query)
			continue
		}
		values, err := p.labelValues(m[2], substitute(m[1]))
		if err != nil {
			t.Errorf("variable %s: %v", v.Name, err)
			continue
		}
		for _, want := range wantValues[v.Name] {
			if !slices.Contains(values, want) {
				t.Errorf("variable %s: %s lists %v, want %s among them", v.Name, v.Query, values, want)
			}
		}
		delete(wantValues, v.Name)
	}
	for name := range wantValues {
		t.Errorf("the dashboard has no variable %s", name)
	}

	if len(targets) == 0 {
		t.Fatal("the dashboard has no queries")
	}
	for _, tg := range targets {
		expr := substitute(tg.Expr)
		samples, err := p.query(expr)
		if err != nil {
			t.Errorf("%s: %s: %v", tg.Panel, expr, err)
			continue
		}
		if realVMOnly != nil && realVMOnly(tg.Panel) {
			if len(samples) != 0 {
				t.Errorf("%s: %s: %d series from a lab with no real VM: %v", tg.Panel, expr, len(samples), samples)
			}
			continue
		}
		finite := 0
		for _, s := range samples {
			if !math.IsNaN(s.value) && !math.IsInf(s.value, 0) {
				finite++
			}
		}
		if finite == 0 {
			t.Errorf("%s: %s: no data (%d series, none with a finite value)", tg.Panel, expr, len(samples))
			continue
		}
		t.Logf("%s: %d series, %d finite: %s: %v", tg.Panel, len(samples), finite, expr, samples[:min(len(samples), 4)])
	}

	// The server loaded every rule of the file; each ran without error,
	// and its expression also runs as a query of its own.
	p.waitFor(t, 30*time.Second, "every rule evaluated", func() (bool, string) {
		rules, err := p.rules()
		if err != nil {
			return false, err.Error()
		}
		for _, r := range rules {
			if r.LastEvaluation.IsZero() {
				return false, "not yet evaluated: " + r.Name
			}
		}
		return len(rules) > 0, fmt.Sprintf("%d rules", len(rules))
	})
	rules, err := p.rules()
	if err != nil {
		t.Fatal(err)
	}
	if len(rules) < 10 {
		t.Errorf("Prometheus loaded %d rules, want the 10 of ftgw-rules.yaml", len(rules))
	}
	for _, r := range rules {
		if r.Health != "ok" || r.LastError != "" {
			t.Errorf("rule %s: health %q, last error %q", r.Name, r.Health, r.LastError)
		}
		samples, err := p.query(r.Query)
		if err != nil {
			t.Errorf("rule %s: %s: %v", r.Name, r.Query, err)
			continue
		}
		t.Logf("rule %s (%s): %d series now", r.Name, r.State, len(samples))
	}
}

// substitute fills in what Grafana would: the lab's VM, every host (the
// variables' "All"), and a rate window and range that cover the test.
func substitute(expr string) string {
	return strings.NewReplacer(
		"$__rate_interval", "5m",
		"$__range", "5m",
		"$vm", regexp.QuoteMeta(lab.VMName),
		"$instance", ".+",
	).Replace(expr)
}

// prometheusServer is a Prometheus running in the lab's client namespace.
type prometheusServer struct {
	base   string
	client *http.Client
}

// startPrometheus runs prometheus in the client namespace with the rules of
// deploy/prometheus, scraping both daemons every second. Their metrics
// listen on loopback in their own namespaces (as a deployment's default
// does), so a forwarder per daemon, listening on the client's loopback,
// reaches them there; each target is labelled with its host's name.
func startPrometheus(t *testing.T, bin string) *prometheusServer {
	t.Helper()
	dir := t.TempDir()
	rules, err := filepath.Abs("../deploy/prometheus/ftgw-rules.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var targets strings.Builder
	for _, ns := range []string{lab.NSPrimary, lab.NSSecondary} {
		addr := forwardMetrics(t, ns)
		fmt.Fprintf(&targets, "      - targets: [%q]\n        labels: {instance: %q}\n", addr, ns)
	}
	config := fmt.Sprintf(`global:
  scrape_interval: 1s
  scrape_timeout: 900ms
  evaluation_interval: 1s
rule_files:
  - %q
scrape_configs:
  - job_name: ftgw
    static_configs:
%s`, rules, targets.String())
	configPath := filepath.Join(dir, "prometheus.yml")
	if err := os.WriteFile(configPath, []byte(config), 0o644); err != nil {
		t.Fatal(err)
	}
	listen := freeLoopbackAddr(t, lab.NSClient)
	logPath := filepath.Join(dir, "prometheus.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer logFile.Close()
	cmd := exec.Command("ip", "netns", "exec", lab.NSClient, bin,
		"--config.file="+configPath,
		"--storage.tsdb.path="+filepath.Join(dir, "data"),
		"--web.listen-address="+listen)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-exited
		if t.Failed() {
			raw, _ := os.ReadFile(logPath)
			t.Logf("prometheus log:\n%s\nconfig:\n%s", tailLines(string(raw), 30), config)
		}
	})

	p := &prometheusServer{base: "http://" + listen, client: netnsutil.HTTPClient(lab.NSClient, 5*time.Second)}
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := p.client.Get(p.base + "/-/ready")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return p
			}
		}
		select {
		case err := <-exited:
			raw, _ := os.ReadFile(logPath)
			t.Fatalf("prometheus exited at start (%v):\n%s", err, tailLines(string(raw), 30))
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("prometheus not ready after 30s: %v", err)
		}
	}
}

// forwardMetrics listens on the client namespace's loopback and forwards
// each connection to the metrics of the daemon in namespace ns.
func forwardMetrics(t *testing.T, ns string) string {
	t.Helper()
	var ln net.Listener
	inClient(t, func() (err error) {
		ln, err = net.Listen("tcp", "127.0.0.1:0")
		return err
	})
	t.Cleanup(func() { ln.Close() })
	target := net.JoinHostPort("127.0.0.1", strconv.Itoa(lab.MetricsPort))
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer conn.Close()
				var daemon net.Conn
				if err := netnsutil.Do(ns, func() (err error) {
					daemon, err = net.DialTimeout("tcp", target, 2*time.Second)
					return err
				}); err != nil {
					return
				}
				defer daemon.Close()
				go func() {
					io.Copy(daemon, conn)
					daemon.Close()
				}()
				io.Copy(conn, daemon)
			}()
		}
	}()
	return ln.Addr().String()
}

// freeLoopbackAddr is an address on ns's loopback that nothing listens on.
func freeLoopbackAddr(t *testing.T, ns string) string {
	t.Helper()
	var addr string
	if err := netnsutil.Do(ns, func() error {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return err
		}
		addr = ln.Addr().String()
		return ln.Close()
	}); err != nil {
		t.Fatal(err)
	}
	return addr
}

// waitFor polls cond, which says why it does not hold yet, until it holds
// or the timeout passes.
func (p *prometheusServer) waitFor(t *testing.T, timeout time.Duration, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		ok, why := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s: %s", timeout, what, why)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

type apiResponse struct {
	Status string          `json:"status"`
	Error  string          `json:"error"`
	Data   json.RawMessage `json:"data"`
}

func (p *prometheusServer) get(path string, params url.Values, data any) error {
	resp, err := p.client.Get(p.base + path + "?" + params.Encode())
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	var r apiResponse
	if err := json.NewDecoder(resp.Body).Decode(&r); err != nil {
		return fmt.Errorf("%s: HTTP %s: %w", path, resp.Status, err)
	}
	if r.Status != "success" {
		return fmt.Errorf("%s: %s: %s", path, r.Status, r.Error)
	}
	return json.Unmarshal(r.Data, data)
}

type sample struct {
	labels map[string]string
	value  float64
}

func (s sample) String() string { return fmt.Sprintf("%v=%g", s.labels, s.value) }

// query evaluates expr now; its result must be an instant vector.
func (p *prometheusServer) query(expr string) ([]sample, error) {
	var data struct {
		ResultType string `json:"resultType"`
		Result     []struct {
			Metric map[string]string `json:"metric"`
			Value  [2]any            `json:"value"`
		} `json:"result"`
	}
	if err := p.get("/api/v1/query", url.Values{"query": {expr}}, &data); err != nil {
		return nil, err
	}
	if data.ResultType != "vector" {
		return nil, fmt.Errorf("result type %s, want vector", data.ResultType)
	}
	var out []sample
	for _, r := range data.Result {
		s, _ := r.Value[1].(string)
		v, err := strconv.ParseFloat(s, 64)
		if err != nil {
			return nil, fmt.Errorf("value %v: %w", r.Value[1], err)
		}
		out = append(out, sample{labels: r.Metric, value: v})
	}
	return out, nil
}

func (p *prometheusServer) labelValues(label, match string) ([]string, error) {
	var values []string
	err := p.get("/api/v1/label/"+label+"/values", url.Values{"match[]": {match}}, &values)
	return values, err
}

type loadedRule struct {
	Name           string    `json:"name"`
	Query          string    `json:"query"`
	Health         string    `json:"health"`
	LastError      string    `json:"lastError"`
	State          string    `json:"state"`
	LastEvaluation time.Time `json:"lastEvaluation"`
}

func (p *prometheusServer) rules() ([]loadedRule, error) {
	var data struct {
		Groups []struct {
			Rules []loadedRule `json:"rules"`
		} `json:"groups"`
	}
	if err := p.get("/api/v1/rules", nil, &data); err != nil {
		return nil, err
	}
	var out []loadedRule
	for _, g := range data.Groups {
		out = append(out, g.Rules...)
	}
	return out, nil
}
