package arbiter

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

// etcdBinary is where Debian's etcd-server puts the server (scripts/setup.sh
// installs it).
const etcdBinary = "/usr/bin/etcd"

// etcdServer is a real single-member etcd on loopback ports, for one test.
type etcdServer struct {
	endpoint string
	cmd      *exec.Cmd
	done     chan struct{} // closed when the process has exited
	log      *syncBuffer

	stopOnce sync.Once
}

// startEtcd starts etcd with a fresh data dir and waits until it serves.
func startEtcd(t *testing.T) *etcdServer { return startEtcdWith(t, nil) }

// startEtcdWith starts etcd serving clients over TLS with pki's server
// certificate and requiring a client certificate from its CA, or over
// plain http with no pki.
func startEtcdWith(t *testing.T, pki *etcdPKI) *etcdServer {
	t.Helper()
	if _, err := os.Stat(etcdBinary); err != nil {
		t.Skipf("no %s: install Debian's etcd-server (scripts/setup.sh does) to run the etcd tests", etcdBinary)
	}
	scheme, hc := "http://", &http.Client{Timeout: time.Second}
	var tlsFlags []string
	if pki != nil {
		scheme = "https://"
		hc.Transport = &http.Transport{TLSClientConfig: pki.client}
		tlsFlags = []string{"--cert-file=" + pki.file("server.pem"), "--key-file=" + pki.file("server-key.pem"),
			"--trusted-ca-file=" + pki.file("ca.pem"), "--client-cert-auth"}
	}
	client := scheme + freeAddr(t)
	peer := "http://" + freeAddr(t)
	s := &etcdServer{endpoint: client, done: make(chan struct{}), log: &syncBuffer{}}
	// etcd 3.4 has no --unsafe-no-fsync; a tmpfs data dir would do the same
	// job, but the tests are quick enough on the ordinary temp dir.
	s.cmd = exec.Command(etcdBinary, append(tlsFlags,
		"--name=test",
		"--data-dir="+filepath.Join(t.TempDir(), "data"), // etcd makes it 0700
		"--listen-client-urls="+client,
		"--advertise-client-urls="+client,
		"--listen-peer-urls="+peer,
		"--initial-advertise-peer-urls="+peer,
		"--initial-cluster=test="+peer,
		"--logger=zap", "--log-outputs=stderr", "--log-level=warn",
	)...)
	s.cmd.Stdout, s.cmd.Stderr = s.log, s.log
	if err := s.cmd.Start(); err != nil {
		t.Fatalf("start etcd: %v", err)
	}
	go func() { s.cmd.Wait(); close(s.done) }()
	t.Cleanup(func() {
		s.stop()
		if t.Failed() {
			t.Logf("etcd output:\n%s", s.log)
		}
	})

	// Ready when /health says so; bounded, and early out if etcd died.
	deadline := time.Now().Add(20 * time.Second)
	for {
		resp, err := hc.Get(client + "/health")
		if err == nil {
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK && bytes.Contains(body, []byte(`"true"`)) {
				return s
			}
		}
		select {
		case <-s.done:
			t.Fatalf("etcd exited during startup:\n%s", s.log)
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("etcd not healthy after 20s (last error %v):\n%s", err, s.log)
		}
	}
}

// stop kills etcd as a crash would and waits for it.
func (s *etcdServer) stop() {
	s.stopOnce.Do(func() {
		s.cmd.Process.Kill()
		<-s.done
	})
}

// freeAddr returns a loopback address with a port nobody listens on now.
func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

func openEtcdTest(t *testing.T, endpoint string) *etcdArbiter {
	t.Helper()
	a, err := Open("etcd:" + endpoint)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { a.Close() })
	return a.(*etcdArbiter)
}

// rawClient looks at the keys behind the Arbiter's back.
func rawClient(t *testing.T, endpoint string) *clientv3.Client {
	t.Helper()
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{endpoint}, DialTimeout: 2 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	return cli
}

func TestEtcd(t *testing.T) {
	start := time.Now()
	srv := startEtcd(t)
	t.Logf("etcd ready in %v", time.Since(start).Round(time.Millisecond))
	testArbiter(t, func() Arbiter { return openEtcdTest(t, srv.endpoint) })

	t.Run("Keys", func(t *testing.T) {
		cli := rawClient(t, srv.endpoint)
		a := openEtcdTest(t, srv.endpoint)
		mustClaim(t, a, "vm-keys", "a", 0, Claim{Epoch: 1, Owner: "a", Won: true})
		claim := getKey(t, cli, claimKey("vm-keys"))
		if claim == nil || string(claim.Value) != `{"epoch":1,"owner":"a"}` || claim.Lease != 0 {
			t.Errorf("claim key = %v; want {epoch 1, owner a} without a lease", claim)
		}
		// A record nobody can read is an error, but not "unavailable".
		if _, err := cli.Put(testContext(t), claimKey("vm-bad"), "{garbage"); err != nil {
			t.Fatal(err)
		}
		if _, err := a.TryClaim(testContext(t), "vm-bad", "a", 0); err == nil || errors.Is(err, ErrUnavailable) {
			t.Errorf("TryClaim on a corrupt record: %v; want a decode error", err)
		}
	})

	t.Run("OwnerLease", func(t *testing.T) {
		const ttl = 2 // seconds; etcd's minimum with default timing
		cli := rawClient(t, srv.endpoint)
		a := openEtcdTest(t, srv.endpoint)
		b := openEtcdTest(t, srv.endpoint)
		a.leaseTTL, b.leaseTTL = ttl, ttl

		mustClaim(t, a, "vm-lease", "a", 0, Claim{Epoch: 1, Owner: "a", Won: true})
		// Kept alive past its TTL while a is open.
		time.Sleep(ttl*time.Second + time.Second)
		if o := getKey(t, cli, ownerKey("vm-lease")); o == nil || string(o.Value) != "a" || o.Lease == 0 {
			t.Fatalf("owner key %v after the TTL; want a, leased", o)
		}

		// b takes over: the owner key moves to b's lease, and a's Close
		// (which revokes a's old lease) must not remove it.
		mustClaim(t, b, "vm-lease", "b", 1, Claim{Epoch: 2, Owner: "b", Won: true})
		if err := a.Close(); err != nil {
			t.Fatal(err)
		}
		if o := getKey(t, cli, ownerKey("vm-lease")); o == nil || string(o.Value) != "b" {
			t.Fatalf("owner key %v after the old owner closed; want b", o)
		}

		// Closing the winner removes the owner key (revoked at once; the
		// TTL would do it too) but never the record.
		if err := b.Close(); err != nil {
			t.Fatal(err)
		}
		waitGone(t, cli, ownerKey("vm-lease"), ttl*time.Second+2*time.Second)
		mustCurrent(t, openEtcdTest(t, srv.endpoint), "vm-lease", Claim{Epoch: 2, Owner: "b"})

		// A host that claims again and loses stops looking like the owner.
		c := openEtcdTest(t, srv.endpoint)
		c.leaseTTL = ttl
		mustClaim(t, c, "vm-lease2", "c", 0, Claim{Epoch: 1, Owner: "c", Won: true})
		mustClaim(t, c, "vm-lease2", "c", 7, Claim{Epoch: 1, Owner: "c"})
		waitGone(t, cli, ownerKey("vm-lease2"), ttl*time.Second+2*time.Second)
	})
}

// TestEtcdServerDown: once the cluster is gone, calls fail promptly with
// ErrUnavailable instead of hanging a failover.
func TestEtcdServerDown(t *testing.T) {
	t.Parallel() // mostly waiting for timeouts
	srv := startEtcd(t)
	a := openEtcdTest(t, srv.endpoint)
	mustClaim(t, a, "vm-down", "a", 0, Claim{Epoch: 1, Owner: "a", Won: true})
	srv.stop()
	checkUnavailable(t, a, "vm-down")
}

// TestEtcdUnreachable: Open does not need the cluster, and calls against
// one that never answers fail promptly with ErrUnavailable. No etcd needed.
func TestEtcdUnreachable(t *testing.T) {
	t.Parallel() // mostly waiting for timeouts
	a, err := Open("etcd:http://" + freeAddr(t))
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { a.Close() })
	checkUnavailable(t, a, "vm1")
}

// checkUnavailable requires TryClaim and Current to fail with ErrUnavailable
// within DefaultTimeout plus a margin, and Close not to hang.
func checkUnavailable(t *testing.T, a Arbiter, vm string) {
	t.Helper()
	limit := DefaultTimeout + 2*time.Second
	start := time.Now()
	c, err := a.TryClaim(context.Background(), vm, "a", 1)
	if !errors.Is(err, ErrUnavailable) || c.Won {
		t.Errorf("TryClaim = %+v, %v; want ErrUnavailable", c, err)
	}
	if d := time.Since(start); d > limit {
		t.Errorf("TryClaim took %v; want under %v", d, limit)
	}
	t.Logf("TryClaim failed after %v: %v", time.Since(start).Round(time.Millisecond), err)

	start = time.Now()
	if _, err := a.Current(context.Background(), vm); !errors.Is(err, ErrUnavailable) {
		t.Errorf("Current: %v; want ErrUnavailable", err)
	}
	if d := time.Since(start); d > limit {
		t.Errorf("Current took %v; want under %v", d, limit)
	}

	// A caller's shorter deadline is honoured too.
	start = time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	if _, err := a.TryClaim(ctx, vm, "a", 1); !errors.Is(err, ErrUnavailable) {
		t.Errorf("TryClaim with a 200ms deadline: %v; want ErrUnavailable", err)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("TryClaim with a 200ms deadline took %v", d)
	}

	start = time.Now()
	a.Close()
	if d := time.Since(start); d > limit {
		t.Errorf("Close took %v; want under %v", d, limit)
	}
}

func getKey(t *testing.T, cli *clientv3.Client, key string) *kv {
	t.Helper()
	resp, err := cli.Get(testContext(t), key)
	if err != nil {
		t.Fatalf("get %s: %v", key, err)
	}
	if len(resp.Kvs) == 0 {
		return nil
	}
	return &kv{Value: resp.Kvs[0].Value, Lease: resp.Kvs[0].Lease}
}

type kv struct {
	Value []byte
	Lease int64
}

func (k *kv) String() string {
	if k == nil {
		return "<absent>"
	}
	return fmt.Sprintf("%q (lease %x)", k.Value, k.Lease)
}

// waitGone polls until key is absent, for at most limit.
func waitGone(t *testing.T, cli *clientv3.Client, key string, limit time.Duration) {
	t.Helper()
	start := time.Now()
	for getKey(t, cli, key) != nil {
		if time.Since(start) > limit {
			t.Fatalf("%s still present after %v", key, limit)
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("%s gone after %v", key, time.Since(start).Round(time.Millisecond))
}
