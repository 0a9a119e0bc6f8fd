package main

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/ftgw/ftgw/pkg/arbiter"
	"github.com/ftgw/ftgw/pkg/datapath"
	"github.com/ftgw/ftgw/pkg/lockstep"
)

// Config is one host's side of a protected VM pair, read from YAML.
type Config struct {
	// Name of this host, as the arbiter records the VM's owner and as its
	// log channel certificate carries it (a DNS SAN); default the
	// hostname. The two hosts' names must differ: the arbiter and the log
	// channel tell them apart by name.
	Name string `yaml:"name"`
	// Role of this host on the VM's first boot: the primary boots it and
	// serves, the secondary boots its copy and follows. Later starts join
	// whichever host owns the VM then (the arbiter says), whatever this
	// says: a restarted host's copy is fresh.
	Role string `yaml:"role"`
	// Uplink is the host's interface towards the VM's clients.
	Uplink string `yaml:"uplink"`
	// VMs this host protects, up to 256. Both hosts list the same VMs in
	// the same order: a VM's place in the list picks its log channel.
	VMs []VMConfig `yaml:"vms"`
	// Peer is the other host's log channel. VM i of VMs (from 0) uses the
	// ports of Address and Listen plus i: one channel per VM.
	Peer PeerConfig `yaml:"peer"`
	// Metrics is the address of the Prometheus endpoint; default
	// 127.0.0.1:9477, since anyone who reaches it sees the VM's traffic
	// counts and the pair's state. ":9477" serves every interface.
	Metrics string `yaml:"metrics"`
	// Heartbeat is the interval of log-channel heartbeats.
	Heartbeat time.Duration `yaml:"heartbeat"`
	// FailureTimeout is how long the peer may be silent before it counts
	// as failed; a shorter outage only holds output.
	FailureTimeout time.Duration `yaml:"failure_timeout"`
	// Arbiter decides who serves after the pair loses contact:
	// "file:/shared/dir" or "etcd:http://host:2379" (https:// with Etcd's
	// TLS). Without one, a host never takes over or goes on alone:
	// failures only hold output.
	Arbiter string `yaml:"arbiter"`
	// Etcd is how an etcd: arbiter is reached when the cluster requires
	// TLS or a login.
	Etcd EtcdConfig `yaml:"etcd,omitempty"`
	// AnnounceCount gratuitous ARPs, AnnounceInterval apart, tell the LAN
	// where the VM is after a takeover.
	AnnounceCount    int           `yaml:"announce_count"`
	AnnounceInterval time.Duration `yaml:"announce_interval"`
	// HoldCapacity bounds the frames held at once; more are dropped.
	HoldCapacity int `yaml:"hold_capacity"`
	// SerializerCPU is the CPU that orders every input frame.
	SerializerCPU int `yaml:"serializer_cpu"`
	// PinLogReader runs the reader of the log ring on SerializerCPU.
	PinLogReader bool `yaml:"pin_log_reader"`
	// LogRingBytes sizes the kernel ring that carries the log to the daemon.
	LogRingBytes int `yaml:"log_ring_bytes"`
	// StateDir holds the guest's control socket.
	StateDir string `yaml:"state_dir"`
}

// VMConfig is one protected VM.
type VMConfig struct {
	Name string `yaml:"name"`
	IP   string `yaml:"ip"`
	MAC  string `yaml:"mac"`
	Tap  string `yaml:"tap"`
	// Engine runs the VM: "synthetic" (ftgw guest) or "qemu" (a real VM
	// under QEMU record/replay).
	Engine string `yaml:"engine"`
	// QEMU configures the "qemu" engine.
	QEMU QEMUConfig `yaml:"qemu"`
}

// QEMUConfig is the real VM, recorded on the primary and replayed on the
// secondary: a disk image, a kernel to boot directly, or both (`make guest`
// builds a kernel, an initramfs and an empty disk).
type QEMUConfig struct {
	// Disk is the VM's disk image (qcow2, raw, or anything qemu-img
	// reads), the same file on both hosts. When the VM first boots, each
	// host copies it into its state directory, and the VM writes only
	// that copy: the image itself is never changed. Without Kernel the
	// VM boots from it.
	Disk string `yaml:"disk"`
	// Kernel boots the VM directly, with Initrd and Cmdline.
	Kernel string `yaml:"kernel"`
	Initrd string `yaml:"initrd"`
	// Cmdline is the guest kernel's command line; default, for the
	// guest `make guest` builds, "console=ttyS0 quiet nohz=off panic=-1
	// ftgw.ip=<vm ip>/24" (and " ftgw.disk=/dev/vda2" with a disk: the
	// log on partition 2 of the disk `make guest` builds).
	// nohz=off keeps a periodic tick: an idle guest under record/replay
	// only takes in packets at its next timer.
	Cmdline  string `yaml:"cmdline"`
	MemoryMB int    `yaml:"memory_mb"`
	// Preload is ftgw-rr.so (preload/); default: beside the ftgw binary.
	Preload string `yaml:"preload"`
	// MaxLag bounds how far the secondary's replay may trail the primary's
	// execution; beyond it the primary is paused until the replay catches
	// up. Failover takes at least as long as the lag.
	MaxLag time.Duration `yaml:"max_lag"`
}

// guestDiskDevice is where the guest `make guest` builds keeps its
// key-value log when the VM has a disk (ftgw-init's ftgw.disk).
const guestDiskDevice = "/dev/vda2"

const (
	engineSynthetic = "synthetic"
	engineQEMU      = "qemu"
)

// PeerConfig is the log channel between the hosts. Either host may serve
// the VM, so each needs both ends: it dials the peer while it serves and
// accepts it while it follows.
type PeerConfig struct {
	// Name is the peer's name (its own config's name): the only host whose
	// certificate this host accepts at the other end of the log channel,
	// whichever end dials. Required: any other certificate from the CA
	// could otherwise feed or take the VM.
	Name string `yaml:"name"`
	// Address is the peer's log channel: where this host dials it.
	Address string `yaml:"address"`
	// Listen is this host's: where it accepts the peer.
	Listen string `yaml:"listen"`
	// CA signs both hosts' certificates; Cert, this host's, must carry
	// its name as a DNS SAN and allow client and server use.
	CA   string `yaml:"ca"`
	Cert string `yaml:"cert"`
	Key  string `yaml:"key"`
}

// logChannelID is who the log channel's two ends must be.
func (c *Config) logChannelID() lockstep.Identity {
	return lockstep.Identity{Self: c.Name, Peer: c.Peer.Name}
}

// EtcdConfig secures an etcd: arbiter's connection. Empty: plain http://
// endpoints and no login.
type EtcdConfig struct {
	// CA verifies the cluster's certificates (https:// endpoints);
	// default the system's roots.
	CA string `yaml:"ca,omitempty"`
	// Cert and Key are this host's client certificate, for a cluster
	// that requires one (etcd --client-cert-auth).
	Cert string `yaml:"cert,omitempty"`
	Key  string `yaml:"key,omitempty"`
	// Username logs in to etcd's authentication with the password in
	// PasswordFile (its first line). Never the password itself here: a
	// config file is read by more than the daemon (ftgw lab writes them
	// 0644).
	Username     string `yaml:"username,omitempty"`
	PasswordFile string `yaml:"password_file,omitempty"`
}

const (
	rolePrimary   = "primary"
	roleSecondary = "secondary"
)

func defaultConfig() Config {
	return Config{
		Metrics:          "127.0.0.1:9477",
		Heartbeat:        10 * time.Millisecond,
		FailureTimeout:   50 * time.Millisecond,
		AnnounceCount:    3,
		AnnounceInterval: 20 * time.Millisecond,
		HoldCapacity:     4096,
		SerializerCPU:    0,
		PinLogReader:     true,
		LogRingBytes:     8 << 20,
		StateDir:         "/run/ftgw",
	}
}

// loadConfig reads path over the defaults and validates the result.
func loadConfig(path string) (Config, error) {
	cfg := defaultConfig()
	raw, err := os.ReadFile(path)
	if err != nil {
		return cfg, fmt.Errorf("read config: %w", err)
	}
	dec := yaml.NewDecoder(bytes.NewReader(raw))
	dec.KnownFields(true)
	if err := dec.Decode(&cfg); err != nil {
		return cfg, fmt.Errorf("parse config %s: %w", path, err)
	}
	// A second document would be ignored silently: refuse it.
	var more yaml.Node
	if err := dec.Decode(&more); !errors.Is(err, io.EOF) {
		return cfg, fmt.Errorf("parse config %s: more than one YAML document (a second ---): put everything in one", path)
	}
	if err := cfg.validate(); err != nil {
		return cfg, fmt.Errorf("config %s: %w", path, err)
	}
	return cfg, nil
}

// validate names the field at fault in every error.
func (c *Config) validate() error {
	var errs []error
	bad := func(field, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", field, fmt.Sprintf(format, args...)))
	}
	switch c.Role {
	case rolePrimary, roleSecondary:
	default:
		bad("role", "%q: want %q or %q", c.Role, rolePrimary, roleSecondary)
	}
	if _, _, err := net.SplitHostPort(c.Peer.Address); err != nil {
		bad("peer.address", "%q: want host:port of the peer's log channel, which this host dials while it serves (%v)", c.Peer.Address, err)
	}
	if _, _, err := net.SplitHostPort(c.Peer.Listen); err != nil {
		bad("peer.listen", "%q: want host:port this host accepts its peer on while it follows (%v)", c.Peer.Listen, err)
	}
	if c.Uplink == "" {
		bad("uplink", "missing")
	}
	for _, f := range []struct{ field, path string }{{"peer.ca", c.Peer.CA}, {"peer.cert", c.Peer.Cert}, {"peer.key", c.Peer.Key}} {
		if f.path == "" {
			bad(f.field, "missing: the log channel is mutual TLS")
		} else if _, err := os.Stat(f.path); err != nil {
			bad(f.field, "%v", err)
		}
	}
	if _, _, err := net.SplitHostPort(c.Metrics); err != nil {
		bad("metrics", "%q: want host:port (%v)", c.Metrics, err)
	}
	if c.Name == "" {
		if host, err := os.Hostname(); err == nil {
			c.Name = host
		}
	}
	if err := lockstep.CheckHostName(c.Name); err != nil {
		bad("name", "%v (default: the hostname)", err)
	}
	if c.Peer.Name == "" {
		bad("peer.name", "missing: the peer's name, which its certificate must carry; the log channel accepts no other host")
	} else if err := lockstep.CheckHostName(c.Peer.Name); err != nil {
		bad("peer.name", "%v", err)
	} else if strings.EqualFold(c.Peer.Name, c.Name) {
		bad("peer.name", "%q is this host's own name: each host needs its own name (and certificate), or the arbiter could tell both they won", c.Peer.Name)
	}
	if c.Heartbeat <= 0 {
		bad("heartbeat", "%s: must be positive", c.Heartbeat)
	}
	// Halved rather than doubling the heartbeat, which overflows for
	// heartbeats of over 146 years and let any timeout pass.
	if c.FailureTimeout/2 < c.Heartbeat {
		bad("failure_timeout", "%s: must be at least two heartbeats of %s", c.FailureTimeout, c.Heartbeat)
	}
	if c.Arbiter != "" && !strings.HasPrefix(c.Arbiter, "file:") && !strings.HasPrefix(c.Arbiter, "etcd:") {
		bad("arbiter", "%q: want file:/dir or etcd:http://host:port", c.Arbiter)
	}
	errs = append(errs, c.Etcd.validate(c.Arbiter)...)
	if c.AnnounceCount < 1 || c.AnnounceInterval < 0 {
		bad("announce_count", "%d every %s: want at least one announcement", c.AnnounceCount, c.AnnounceInterval)
	}
	if c.HoldCapacity < 1 || c.HoldCapacity > 1<<16 {
		bad("hold_capacity", "%d: want 1 to 65536", c.HoldCapacity)
	}
	if c.LogRingBytes < os.Getpagesize() || c.LogRingBytes&(c.LogRingBytes-1) != 0 {
		bad("log_ring_bytes", "%d: want a power of two of at least %d", c.LogRingBytes, os.Getpagesize())
	}
	if c.SerializerCPU < 0 {
		bad("serializer_cpu", "%d: must not be negative", c.SerializerCPU)
	}
	if len(c.VMs) < 1 || len(c.VMs) > datapath.MaxVMs {
		bad("vms", "%d VMs: want 1 to %d", len(c.VMs), datapath.MaxVMs)
	}
	for _, f := range []struct{ field, addr string }{{"peer.address", c.Peer.Address}, {"peer.listen", c.Peer.Listen}} {
		if _, port, err := net.SplitHostPort(f.addr); err == nil {
			if p, err := strconv.Atoi(port); err != nil || p < 1 || p+len(c.VMs)-1 > 65535 {
				bad(f.field, "port %q: want 1 to %d, so that each of the %d VMs has its log channel port (this one plus its place in vms)", port, 65535-max(len(c.VMs)-1, 0), len(c.VMs))
			}
		}
	}
	// Each VM needs its own of these: two VMs behind one MAC or IP would
	// take each other's frames, two on one tap each other's outputs.
	seen := map[string]int{}
	unique := func(i int, field, value string) {
		if value == "" {
			return
		}
		key := field + "=" + value
		if j, dup := seen[key]; dup {
			bad(fmt.Sprintf("vms[%d].%s", i, field), "%q: vms[%d] has it too; each VM needs its own", value, j)
			return
		}
		seen[key] = i
	}
	for i := range c.VMs {
		vm := &c.VMs[i]
		unique(i, "name", vm.Name)
		unique(i, "ip", vm.IP)
		if mac, err := net.ParseMAC(vm.MAC); err == nil {
			unique(i, "mac", mac.String())
		}
		unique(i, "tap", vm.Tap)
	}
	for i := range c.VMs {
		vm := &c.VMs[i]
		field := fmt.Sprintf("vms[%d]", i)
		if !vmName.MatchString(vm.Name) {
			// It names files, sockets and QEMU's comma-separated options.
			bad(field+".name", "%q: want 1 to 63 letters, digits, '.', '_' or '-', starting with a letter or digit", vm.Name)
		}
		if ip, err := netip.ParseAddr(vm.IP); err != nil || !ip.Is4() {
			bad(field+".ip", "%q: want an IPv4 address", vm.IP)
		}
		if mac, err := net.ParseMAC(vm.MAC); err != nil || len(mac) != 6 {
			bad(field+".mac", "%q: want a 6-byte MAC address", vm.MAC)
		}
		if vm.Tap == "" {
			bad(field+".tap", "missing")
		}
		switch vm.Engine {
		case "":
			vm.Engine = engineSynthetic
		case engineSynthetic:
		case engineQEMU:
			errs = append(errs, vm.QEMU.validate(field+".qemu", vm.IP)...)
		default:
			bad(field+".engine", "%q: want %q or %q", vm.Engine, engineSynthetic, engineQEMU)
		}
	}
	return errors.Join(errs...)
}

// validate checks the files exist; arbiterOptions reads them when the
// daemon starts. Whether the endpoints' scheme fits (TLS only for https://)
// is arbiter.OpenWith's to say.
func (e EtcdConfig) validate(arbiterSpec string) []error {
	var errs []error
	bad := func(field, format string, args ...any) {
		errs = append(errs, fmt.Errorf("etcd.%s: %s", field, fmt.Sprintf(format, args...)))
	}
	if e == (EtcdConfig{}) {
		return nil
	}
	if !strings.HasPrefix(arbiterSpec, "etcd:") {
		return []error{fmt.Errorf("etcd: set, but the arbiter is %q: it only applies to an etcd: arbiter", arbiterSpec)}
	}
	if (e.Cert == "") != (e.Key == "") {
		bad("cert", "cert and key go together (a client certificate and its key)")
	}
	if (e.Username == "") != (e.PasswordFile == "") {
		bad("username", "username and password_file go together")
	}
	for _, f := range []struct{ field, path string }{{"ca", e.CA}, {"cert", e.Cert}, {"key", e.Key}} {
		if f.path == "" {
			continue
		}
		if _, err := os.Stat(f.path); err != nil {
			bad(f.field, "%v", err)
		}
	}
	if e.PasswordFile != "" {
		if fi, err := os.Stat(e.PasswordFile); err != nil {
			bad("password_file", "%v", err)
		} else if fi.Mode().Perm()&0o004 != 0 {
			bad("password_file", "%s is readable by everyone (mode %v): chmod o-r it", e.PasswordFile, fi.Mode().Perm())
		}
	}
	return errs
}

// arbiterOptions loads what EtcdConfig names.
func (e EtcdConfig) arbiterOptions() (arbiter.Options, error) {
	var opts arbiter.Options
	if e.CA != "" || e.Cert != "" {
		tc := &tls.Config{MinVersion: tls.VersionTLS12}
		if e.CA != "" {
			caPEM, err := os.ReadFile(e.CA)
			if err != nil {
				return opts, fmt.Errorf("etcd.ca: %w", err)
			}
			tc.RootCAs = x509.NewCertPool()
			if !tc.RootCAs.AppendCertsFromPEM(caPEM) {
				return opts, fmt.Errorf("etcd.ca: no certificate in %s", e.CA)
			}
		}
		if e.Cert != "" {
			cert, err := tls.LoadX509KeyPair(e.Cert, e.Key)
			if err != nil {
				return opts, fmt.Errorf("etcd.cert: %w", err)
			}
			tc.Certificates = []tls.Certificate{cert}
		}
		opts.EtcdTLS = tc
	}
	if e.Username != "" {
		raw, err := os.ReadFile(e.PasswordFile)
		if err != nil {
			return opts, fmt.Errorf("etcd.password_file: %w", err)
		}
		password, _, _ := strings.Cut(string(raw), "\n")
		password = strings.TrimSuffix(password, "\r")
		if password == "" {
			return opts, fmt.Errorf("etcd.password_file: %s: empty first line", e.PasswordFile)
		}
		opts.EtcdUsername, opts.EtcdPassword = e.Username, password
	}
	return opts, nil
}

// vmName is what a VM may be called.
var vmName = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$`)

func (vm VMConfig) addr() netip.Addr         { return netip.MustParseAddr(vm.IP) }
func (vm VMConfig) hwAddr() net.HardwareAddr { mac, _ := net.ParseMAC(vm.MAC); return mac }

// validate fills in the defaults and names the field at fault in every error.
func (q *QEMUConfig) validate(field, ip string) []error {
	var errs []error
	if q.Disk == "" && q.Kernel == "" {
		errs = append(errs, fmt.Errorf("%s: neither disk nor kernel: the VM has nothing to boot (make guest builds build/guest/disk.qcow2 and build/guest/vmlinuz)", field))
	}
	if q.Kernel == "" && (q.Initrd != "" || q.Cmdline != "") {
		errs = append(errs, fmt.Errorf("%s: initrd and cmdline need a kernel: a VM that boots from its disk takes its own", field))
	}
	for _, f := range []struct {
		name string
		path string
	}{{"disk", q.Disk}, {"kernel", q.Kernel}, {"initrd", q.Initrd}} {
		if f.path == "" {
			continue
		}
		if st, err := os.Stat(f.path); err != nil {
			errs = append(errs, fmt.Errorf("%s.%s: %v", field, f.name, err))
		} else if !st.Mode().IsRegular() {
			errs = append(errs, fmt.Errorf("%s.%s: %s is not a file", field, f.name, f.path))
		}
	}
	if q.Kernel != "" && q.Cmdline == "" {
		q.Cmdline = "console=ttyS0 quiet nohz=off panic=-1 ftgw.ip=" + ip + "/24"
		if q.Disk != "" {
			q.Cmdline += " ftgw.disk=" + guestDiskDevice
		}
	}
	if q.MemoryMB == 0 {
		q.MemoryMB = 256
	}
	if q.MemoryMB < 64 {
		errs = append(errs, fmt.Errorf("%s.memory_mb: %d: want at least 64", field, q.MemoryMB))
	}
	if q.Preload == "" {
		if self, err := os.Executable(); err == nil {
			q.Preload = filepath.Join(filepath.Dir(self), preloadName)
		}
	}
	if _, err := os.Stat(q.Preload); err != nil {
		errs = append(errs, fmt.Errorf("%s.preload: %v (make build builds it)", field, err))
	}
	if q.MaxLag == 0 {
		q.MaxLag = time.Second
	}
	if q.MaxLag < 10*time.Millisecond {
		errs = append(errs, fmt.Errorf("%s.max_lag: %s: want at least 10ms", field, q.MaxLag))
	}
	return errs
}
