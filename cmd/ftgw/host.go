package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"golang.org/x/sync/errgroup"

	"github.com/ftgw/ftgw/pkg/arbiter"
	"github.com/ftgw/ftgw/pkg/datapath"
	"github.com/ftgw/ftgw/pkg/lockstep"
	"github.com/ftgw/ftgw/pkg/protect"
)

// host is what one `ftgw run` shares among the VMs it protects: the data
// path (one set of programs on the uplink, a slot per VM), the arbiter, the
// metrics endpoint and the control socket. Each VM has a daemon of its own,
// with its own log channel, lifecycle and failovers: what happens to one VM
// moves no other.
type host struct {
	cfg     Config
	log     *slog.Logger
	dp      *datapath.Host
	uplink  *net.Interface
	arb     arbiter.Arbiter // nil without one
	daemons []*daemon       // in config order
}

// run serves cfg until ctx is done.
func run(ctx context.Context, cfg Config, log *slog.Logger, verbose bool) (err error) {
	h := &host{cfg: cfg, log: log}
	defer func() { err = errors.Join(err, h.close()) }()
	if err := h.open(verbose); err != nil {
		return err
	}

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	g, ctx := errgroup.WithContext(ctx)
	for i, vm := range cfg.VMs {
		d := newDaemon(cfg, i, log)
		d.runCtx, d.group = ctx, g
		h.daemons = append(h.daemons, d)
		log.Debug("vm", "name", vm.Name, "slot", i, "log_channel", d.cfg.Peer.Listen)
	}
	// Every VM boots or joins at once: a host with many VMs would
	// otherwise take the sum of their start-ups.
	var setUp errgroup.Group
	for _, d := range h.daemons {
		setUp.Go(func() error {
			if err := d.setUp(ctx, h); err != nil {
				return fmt.Errorf("vm %s: %w", d.vm.Name, err)
			}
			return nil
		})
	}
	if err := setUp.Wait(); err != nil {
		cancel()
		return errors.Join(err, ignoreCanceled(g.Wait()))
	}
	for _, d := range h.daemons {
		g.Go(func() error { return d.eng.run(ctx) })
		g.Go(func() error { return d.watch(ctx) })
		d.log.Info("serving", "state", d.state().String(), "first_boot_role", cfg.Role, "tap", d.vm.Tap, "slot", d.slot)
	}
	g.Go(func() error { return h.serveMetrics(ctx) })
	g.Go(func() error { return h.serveControl(ctx) })
	log.Info("host serving", "vms", len(h.daemons), "uplink", cfg.Uplink, "metrics", cfg.Metrics)
	<-ctx.Done()
	for _, d := range h.daemons {
		d.channelStop()
		d.stopCopy()
	}
	return ignoreCanceled(g.Wait())
}

// newDaemon is the daemon of cfg's i-th VM.
func newDaemon(cfg Config, i int, log *slog.Logger) *daemon {
	vm := cfg.VMs[i]
	d := &daemon{cfg: vmConfig(cfg, i), vm: vm, slot: i, log: log.With("vm", vm.Name), failovers: map[string]uint64{}}
	d.life = protect.NewMachine(nil, func(from, to protect.State, ev protect.Event) {
		d.log.Info("lifecycle", "from", from.String(), "event", ev.String(), "to", to.String())
	})
	return d
}

// vmConfig is the host's config as the daemon of its i-th VM sees it: the
// VM's log channel is the peer's on the configured ports plus i. One
// channel per VM keeps one VM's snapshot or backlog from delaying another's
// acks, and lets each VM's pair lose and regain contact on its own
// (docs/ARCHITECTURE.md, "Many VMs on a host").
func vmConfig(cfg Config, i int) Config {
	cfg.VMs = []VMConfig{cfg.VMs[i]}
	cfg.Peer.Address = shiftPort(cfg.Peer.Address, i)
	cfg.Peer.Listen = shiftPort(cfg.Peer.Listen, i)
	return cfg
}

// shiftPort adds n to the port of addr, which validate checked.
func shiftPort(addr string, n int) string {
	hostPart, port, _ := net.SplitHostPort(addr)
	p, _ := strconv.Atoi(port)
	return net.JoinHostPort(hostPart, strconv.Itoa(p+n))
}

func (h *host) open(verbose bool) error {
	// The log channel's certificates are loaded at each role change; a
	// wrong one would otherwise only show as connections the peer refuses.
	if _, err := lockstep.ServerTLS(h.cfg.Peer.Cert, h.cfg.Peer.Key, h.cfg.Peer.CA, h.cfg.logChannelID()); err != nil {
		return fmt.Errorf("log channel: %w", err)
	}
	var err error
	if h.cfg.Arbiter != "" {
		opts, err := h.cfg.Etcd.arbiterOptions()
		if err != nil {
			return err
		}
		if h.arb, err = arbiter.OpenWith(h.cfg.Arbiter, opts); err != nil {
			return err
		}
	}
	if h.uplink, err = net.InterfaceByName(h.cfg.Uplink); err != nil {
		return fmt.Errorf("uplink %s: %w", h.cfg.Uplink, err)
	}
	dpCfg := datapath.DefaultConfig
	dpCfg.HoldCapacity = h.cfg.HoldCapacity
	dpCfg.SerializerCPU = h.cfg.SerializerCPU
	dpCfg.LogRingBytes = h.cfg.LogRingBytes
	if h.dp, err = datapath.LoadHost(dpCfg, nil); err != nil {
		if verbose {
			return err
		}
		return errors.New(firstLine(err.Error()) + " (run with --verbose for the verifier log)")
	}
	// Frames for a VM pass to the host stack until its daemon publishes
	// the VM's owner record.
	return h.dp.AttachUplink(h.uplink)
}

func (h *host) close() error {
	var errs []error
	for _, d := range h.daemons {
		errs = append(errs, d.close())
	}
	if h.arb != nil {
		errs = append(errs, h.arb.Close())
	}
	if h.dp != nil {
		errs = append(errs, h.dp.Close())
	}
	return errors.Join(errs...)
}

func (h *host) serveMetrics(ctx context.Context) error {
	reg := prometheus.NewRegistry()
	reg.MustRegister(newCollector(h.daemons))
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	ln, err := net.Listen("tcp", h.cfg.Metrics)
	if err != nil {
		return fmt.Errorf("serve metrics: %w", err)
	}
	return serveHTTP(ctx, ln, mux)
}

// controlPath is the host's control socket: status for `ftgw lab status`
// and output modes for `ftgw bench`. A unix socket, so only local root can
// switch the Output Rule off.
func controlPath(stateDir string) string { return filepath.Join(stateDir, "control.sock") }

// serveControl serves the control socket. Every endpoint but /vms is about
// one VM, named by the vm query or form value; without it, the first VM
// in the config (the only one on most hosts).
func (h *host) serveControl(ctx context.Context) error {
	mux := http.NewServeMux()
	perVM := func(serve func(d *daemon, w http.ResponseWriter, r *http.Request)) http.HandlerFunc {
		return func(w http.ResponseWriter, r *http.Request) {
			d, err := h.daemon(r.FormValue("vm"))
			if err != nil {
				http.Error(w, err.Error(), http.StatusNotFound)
				return
			}
			serve(d, w, r)
		}
	}
	mux.HandleFunc("GET /vms", func(w http.ResponseWriter, r *http.Request) {
		all := make([]Status, len(h.daemons))
		for i, d := range h.daemons {
			all[i] = d.status()
		}
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(all)
	})
	mux.HandleFunc("GET /status", perVM(func(d *daemon, w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(d.status())
	}))
	mux.HandleFunc("POST /output-mode", perVM(func(d *daemon, w http.ResponseWriter, r *http.Request) {
		if err := d.setOutputMode(r.FormValue("mode")); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		d.log.Info("output mode", "mode", r.FormValue("mode"))
	}))
	mux.HandleFunc("POST /switchover", perVM((*daemon).serveSwitchover))
	mux.HandleFunc("GET /trace", perVM((*daemon).serveTrace))
	path := controlPath(h.cfg.StateDir)
	os.Remove(path)
	ln, err := net.Listen("unix", path)
	if err != nil {
		return fmt.Errorf("serve control: %w", err)
	}
	// Root only, whatever the umask: it can switch the Output Rule off.
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return fmt.Errorf("serve control: %w", err)
	}
	return serveHTTP(ctx, ln, mux)
}

// daemon is the daemon of the VM called name; "" is the first VM's.
func (h *host) daemon(name string) (*daemon, error) {
	if name == "" {
		return h.daemons[0], nil
	}
	i := slices.IndexFunc(h.daemons, func(d *daemon) bool { return d.vm.Name == name })
	if i < 0 {
		names := make([]string, len(h.daemons))
		for i, d := range h.daemons {
			names[i] = d.vm.Name
		}
		return nil, fmt.Errorf("no VM %q on this host; it protects %v", name, names)
	}
	return h.daemons[i], nil
}
