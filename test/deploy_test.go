package test

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/ftgw/ftgw/internal/lab"
	"github.com/ftgw/ftgw/internal/netnsutil"
	"github.com/ftgw/ftgw/pkg/guest"
	"github.com/ftgw/ftgw/pkg/lockstep"
)

// A deployment as an operator builds one: two hosts that share nothing but
// the network and an etcd arbiter in a third namespace; each host has its
// own configuration, keys and state directory; daemons are started only with
// `ftgw run`. Nothing of `ftgw lab` runs but the namespaces and cables.

const etcdBinary = "/usr/bin/etcd" // Debian's etcd-server (scripts/setup.sh)

// deployHost is one host of the deployment.
type deployHost struct {
	ns, dir string
}

func (h deployHost) config() string  { return filepath.Join(h.dir, "ftgw.yaml") }
func (h deployHost) control() string { return filepath.Join(h.dir, "state", "control.sock") }

func (h deployHost) status() (map[string]any, error) { return statusAt(h.control()) }

func (h deployHost) guest(t *testing.T) guest.State {
	t.Helper()
	st, err := guest.QueryState(filepath.Join(h.dir, "state", lab.VMName+"-guest.sock"))
	if err != nil {
		t.Fatalf("guest of %s: %v", h.ns, err)
	}
	return st
}

// start runs `ftgw run` on the host, as its init system would.
func (h deployHost) start(t *testing.T) {
	t.Helper()
	log, err := os.OpenFile(filepath.Join(h.dir, "ftgw.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer log.Close()
	cmd := exec.Command("ip", "netns", "exec", h.ns, ftgwBin, "run", "--config", h.config())
	cmd.Stdout, cmd.Stderr = log, log
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go cmd.Wait()
}

// waitState waits until the host's daemon reports state (and returns its
// status).
func (h deployHost) waitState(t *testing.T, state string, timeout time.Duration) map[string]any {
	t.Helper()
	var s map[string]any
	waitFor(t, timeout, h.ns+" "+state, func() bool {
		var err error
		s, err = h.status()
		return err == nil && s["state"] == state
	})
	return s
}

// startEtcdIn runs a single-member etcd in namespace ns, serving clients on
// host, and waits until it is healthy.
func startEtcdIn(t *testing.T, ns, host string) string {
	t.Helper()
	if _, err := os.Stat(etcdBinary); err != nil {
		t.Skipf("no %s: install Debian's etcd-server (scripts/setup.sh does)", etcdBinary)
	}
	client := "http://" + net.JoinHostPort(host, "2379")
	peer := "http://127.0.0.1:2380"
	var log bytes.Buffer
	cmd := exec.Command("ip", "netns", "exec", ns, etcdBinary, "--name=arbiter",
		"--data-dir="+filepath.Join(t.TempDir(), "etcd"),
		"--listen-client-urls="+client, "--advertise-client-urls="+client,
		"--listen-peer-urls="+peer, "--initial-advertise-peer-urls="+peer, "--initial-cluster=arbiter="+peer,
		"--logger=zap", "--log-outputs=stderr", "--log-level=warn")
	cmd.Stdout, cmd.Stderr = &log, &log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		if t.Failed() {
			t.Logf("etcd:\n%s", log.String())
		}
	})
	waitFor(t, 20*time.Second, "etcd to be healthy", func() bool {
		// Dialled on this thread, in the host's namespace: an
		// http.Client would dial from another goroutine, outside it.
		healthy := false
		netnsutil.Do(lab.NSPrimary, func() error {
			conn, err := net.DialTimeout("tcp", net.JoinHostPort(host, "2379"), time.Second)
			if err != nil {
				return err
			}
			defer conn.Close()
			conn.SetDeadline(time.Now().Add(time.Second))
			fmt.Fprintf(conn, "GET /health HTTP/1.0\r\nHost: %s\r\n\r\n", host)
			body, _ := io.ReadAll(conn)
			healthy = bytes.Contains(body, []byte("200 OK")) && bytes.Contains(body, []byte(`"true"`))
			return nil
		})
		return healthy
	})
	return client
}

// Must-show 1: crash the primary host, restart its daemon (it becomes the
// new secondary by itself), crash the new primary: every acknowledged write
// survives, judged by porcupine over several clients overwriting few keys.
func TestTwoHostsWithEtcdShareNothing(t *testing.T) {
	ftgw(nil, "lab", "down", "--dir", labDir)
	if err := lab.Build(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ftgw(nil, "lab", "down", "--dir", labDir) })
	etcd := startEtcdIn(t, lab.NSClient, lab.ClientIP.Addr().String())

	// One CA; each host keeps its own copy of it and its own key, whose
	// certificate carries the host's name.
	ca := t.TempDir()
	if err := lockstep.GenerateLabPKI(ca, "host-a", "host-b"); err != nil {
		t.Fatal(err)
	}
	hosts := []deployHost{{ns: lab.NSPrimary, dir: t.TempDir()}, {ns: lab.NSSecondary, dir: t.TempDir()}}
	for i, h := range hosts {
		role, cert, self, peer := "primary", "primary", lab.ReplPrimary, lab.ReplSecond
		if i == 1 {
			role, cert, self, peer = "secondary", "secondary", lab.ReplSecond, lab.ReplPrimary
		}
		pki := filepath.Join(h.dir, "pki")
		os.MkdirAll(pki, 0o700)
		for _, f := range []string{"ca.pem", cert + ".pem", cert + "-key.pem"} {
			raw, err := os.ReadFile(filepath.Join(ca, f))
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(pki, f), raw, 0o600); err != nil {
				t.Fatal(err)
			}
		}
		cfg := fmt.Sprintf(`# host %d of a deployment that shares nothing but the network and etcd
name: host-%c
role: %s
uplink: eth0
vms:
  - name: %s
    ip: %s
    mac: "%s"
    tap: tap0
peer:
  name: host-%c
  address: %s
  listen: %s
  ca: %s/ca.pem
  cert: %s/%s.pem
  key: %s/%s-key.pem
arbiter: etcd:%s
failure_timeout: 100ms
metrics: 127.0.0.1:9477
state_dir: %s/state
`, i+1, 'a'+i, role, lab.VMName, lab.VMIP, lab.VMMAC, 'b'-i,
			net.JoinHostPort(peer.Addr().String(), strconv.Itoa(lab.LogPort)), net.JoinHostPort(self.Addr().String(), strconv.Itoa(lab.LogPort)),
			pki, pki, cert, pki, cert, etcd, h.dir)
		if err := os.WriteFile(h.config(), []byte(cfg), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	a, b := hosts[0], hosts[1]
	t.Cleanup(func() {
		if t.Failed() {
			for _, h := range hosts {
				raw, _ := os.ReadFile(filepath.Join(h.dir, "ftgw.log"))
				t.Logf("%s daemon log:\n%s", h.ns, tailLines(string(raw), 30))
			}
		}
	})
	b.start(t)
	b.waitState(t, "standby", 20*time.Second)
	a.start(t)
	a.waitState(t, "protected", 20*time.Second)

	l := startLoad(t)
	waitAcked(t, l, 300)

	// 1. The primary host crashes: the secondary takes over.
	first := crashHost(t, a.ns)
	s := b.waitState(t, "unprotected", 10*time.Second)
	t.Logf("first failover: %s serves at epoch %v", b.ns, s["epoch"])
	waitAcked(t, l, l.Acked()+300)

	// 2. The crashed host's daemon starts again: it joins by itself.
	restarted := time.Now()
	a.start(t)
	b.waitState(t, "protected", 20*time.Second)
	a.waitState(t, "standby", 10*time.Second)
	t.Logf("%s is %s's secondary again %s after its daemon started", a.ns, b.ns, time.Since(restarted).Round(time.Millisecond))
	waitAcked(t, l, l.Acked()+300)
	// The two copies of the VM, compared with the clients paused.
	if err := l.Pause(5 * time.Second); err != nil {
		t.Fatal(err)
	}
	var ga, gb guest.State
	waitFor(t, 10*time.Second, "the secondary's guest to consume the log", func() bool {
		ga, gb = a.guest(t), b.guest(t)
		return ga.Frames == gb.Frames
	})
	if ga.Digest != gb.Digest || ga.Puts != gb.Puts {
		t.Errorf("the copies differ: %s %d puts %.12s, %s %d puts %.12s", a.ns, ga.Puts, ga.Digest, b.ns, gb.Puts, gb.Digest)
	}
	t.Logf("both copies at %d puts, digest %.12s", gb.Puts, gb.Digest)
	l.Resume()

	// 3. The new primary crashes: the rebuilt secondary takes over.
	second := crashHost(t, b.ns)
	s = a.waitState(t, "unprotected", 10*time.Second)
	if s["epoch"].(float64) != 3 {
		t.Errorf("%s serves at epoch %v after the second failover, want 3", a.ns, s["epoch"])
	}
	waitAcked(t, l, l.Acked()+300)
	h := l.Stop()
	checkHistory(t, h, first)
	res := checkHistory(t, h, second)
	t.Logf("two failovers through etcd: %d ops, %d acked, %d indeterminate; client gap after the second %s",
		res.Ops, res.Acked, res.Indeterminate, res.LongestGap.Round(time.Millisecond))
}
