package arbiter

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

// etcdPKI is a CA with a server certificate for 127.0.0.1 and a client
// certificate, written to dir as ca.pem, server.pem, server-key.pem,
// client.pem and client-key.pem.
type etcdPKI struct {
	dir    string
	client *tls.Config // trusts the CA, presents the client certificate
}

func (p *etcdPKI) file(name string) string { return filepath.Join(p.dir, name) }

func newEtcdPKI(t *testing.T) *etcdPKI {
	t.Helper()
	dir := t.TempDir()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "etcd test CA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		t.Fatal(err)
	}
	writePEM := func(name, typ string, der []byte) {
		if err := os.WriteFile(filepath.Join(dir, name), pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	writePEM("ca.pem", "CERTIFICATE", caDER)
	for i, c := range []struct {
		file  string
		usage x509.ExtKeyUsage
		ips   []net.IP
	}{
		{"server", x509.ExtKeyUsageServerAuth, []net.IP{net.IPv4(127, 0, 0, 1)}},
		// Its common name is no etcd user: a client that presents it and
		// no login is nobody (etcd takes the CN as the user name then).
		{"client", x509.ExtKeyUsageClientAuth, nil},
	} {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		der, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{
			SerialNumber: big.NewInt(int64(2 + i)),
			Subject:      pkix.Name{CommonName: "etcd test " + c.file},
			IPAddresses:  c.ips,
			NotBefore:    caTmpl.NotBefore,
			NotAfter:     caTmpl.NotAfter,
			KeyUsage:     x509.KeyUsageDigitalSignature,
			ExtKeyUsage:  []x509.ExtKeyUsage{c.usage},
		}, ca, &key.PublicKey, caKey)
		if err != nil {
			t.Fatal(err)
		}
		keyDER, err := x509.MarshalPKCS8PrivateKey(key)
		if err != nil {
			t.Fatal(err)
		}
		writePEM(c.file+".pem", "CERTIFICATE", der)
		writePEM(c.file+"-key.pem", "PRIVATE KEY", keyDER)
	}
	p := &etcdPKI{dir: dir}
	cert, err := tls.LoadX509KeyPair(p.file("client.pem"), p.file("client-key.pem"))
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AddCert(ca)
	p.client = &tls.Config{RootCAs: roots, Certificates: []tls.Certificate{cert}}
	return p
}

// Users of the secured cluster. ftgw may read and write /ftgw/ only.
const (
	rootPassword = "root-secret"
	ftgwUser     = "ftgw"
	ftgwPassword = "ftgw-secret"
)

// enableAuth creates the users and turns etcd's authentication on, then
// returns a root client to look at the keys with.
func enableAuth(t *testing.T, endpoint string, tc *tls.Config) *clientv3.Client {
	t.Helper()
	admin, err := clientv3.New(clientv3.Config{Endpoints: []string{endpoint}, TLS: tc, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	ctx := testContext(t)
	steps := []func() error{
		func() error { _, err := admin.UserAdd(ctx, "root", rootPassword); return err },
		func() error { _, err := admin.UserGrantRole(ctx, "root", "root"); return err },
		func() error { _, err := admin.RoleAdd(ctx, ftgwUser); return err },
		func() error {
			_, err := admin.RoleGrantPermission(ctx, ftgwUser, "/ftgw/", clientv3.GetPrefixRangeEnd("/ftgw/"), clientv3.PermissionType(clientv3.PermReadWrite))
			return err
		},
		func() error { _, err := admin.UserAdd(ctx, ftgwUser, ftgwPassword); return err },
		func() error { _, err := admin.UserGrantRole(ctx, ftgwUser, ftgwUser); return err },
		func() error { _, err := admin.AuthEnable(ctx); return err },
	}
	for i, step := range steps {
		if err := step(); err != nil {
			t.Fatalf("enable auth, step %d: %v", i, err)
		}
	}
	root, err := clientv3.New(clientv3.Config{Endpoints: []string{endpoint}, TLS: tc, Username: "root", Password: rootPassword,
		DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { root.Close() })
	return root
}

func openWithTest(t *testing.T, spec string, opts Options) Arbiter {
	t.Helper()
	a, err := OpenWith(spec, opts)
	if err != nil {
		t.Fatalf("OpenWith: %v", err)
	}
	t.Cleanup(func() { a.Close() })
	return a
}

// TestEtcdTLSAndLogin: against a cluster that requires TLS with a client
// certificate and a login, the arbiter with both claims; without either,
// or with a wrong password or CA, it never wins.
func TestEtcdTLSAndLogin(t *testing.T) {
	pki := newEtcdPKI(t)
	srv := startEtcdWith(t, pki)
	root := enableAuth(t, srv.endpoint, pki.client)
	spec := "etcd:" + srv.endpoint

	a := openWithTest(t, spec, Options{EtcdTLS: pki.client, EtcdUsername: ftgwUser, EtcdPassword: ftgwPassword})
	mustClaim(t, a, "vm-secure", "host-a", 0, Claim{Epoch: 1, Owner: "host-a", Won: true})
	mustCurrent(t, a, "vm-secure", Claim{Epoch: 1, Owner: "host-a"})
	if o := getKey(t, root, ownerKey("vm-secure")); o == nil || string(o.Value) != "host-a" || o.Lease == 0 {
		t.Errorf("owner key %v; want host-a, leased", o)
	}

	noCert := pki.client.Clone()
	noCert.Certificates = nil
	otherCA := newEtcdPKI(t).client
	for _, tc := range []struct {
		name string
		opts Options
	}{
		{"no login", Options{EtcdTLS: pki.client}},
		{"wrong password", Options{EtcdTLS: pki.client, EtcdUsername: ftgwUser, EtcdPassword: "guess"}},
		{"no client certificate", Options{EtcdTLS: noCert, EtcdUsername: ftgwUser, EtcdPassword: ftgwPassword}},
		{"another CA", Options{EtcdTLS: otherCA, EtcdUsername: ftgwUser, EtcdPassword: ftgwPassword}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel() // the refused ones mostly wait for DefaultTimeout
			b := openWithTest(t, spec, tc.opts)
			if c, err := b.TryClaim(testContext(t), "vm-secure", "host-b", 1); err == nil || c.Won {
				t.Errorf("TryClaim = %+v, %v; want refused", c, err)
			} else {
				t.Logf("refused: %v", err)
			}
		})
	}
	t.Cleanup(func() {
		// After the refused ones (parallel subtests end first): nobody else
		// won, and the record is still a's.
		if rec := getKey(t, root, claimKey("vm-secure")); rec == nil || string(rec.Value) != `{"epoch":1,"owner":"host-a"}` {
			t.Errorf("claim record %v after the refused claims; want a's", rec)
		}
	})
}

// TestEtcdOwnerKeyComesBack: an owner whose lease is lost while it still
// holds the claim puts its owner key back on a new lease; once someone else
// claimed, it leaves the key alone.
func TestEtcdOwnerKeyComesBack(t *testing.T) {
	const ttl = 2 // seconds; etcd's minimum with default timing
	srv := startEtcd(t)
	cli := rawClient(t, srv.endpoint)
	a := openEtcdTest(t, srv.endpoint)
	a.leaseTTL = ttl
	renewed := make(chan bool, 10)
	a.renewed = func(stands bool) { renewed <- stands }

	mustClaim(t, a, "vm-back", "a", 0, Claim{Epoch: 1, Owner: "a", Won: true})
	first := getKey(t, cli, ownerKey("vm-back"))
	if first == nil || first.Lease == 0 {
		t.Fatalf("owner key %v; want one on a lease", first)
	}
	// The lease is lost as if the cluster had not heard from a for its TTL.
	if _, err := cli.Revoke(testContext(t), clientv3.LeaseID(first.Lease)); err != nil {
		t.Fatal(err)
	}
	if stands := waitRenewed(t, renewed); !stands {
		t.Fatal("a's claim stands, but its owner key was not put back")
	}
	again := getKey(t, cli, ownerKey("vm-back"))
	if again == nil || string(again.Value) != "a" || again.Lease == 0 || again.Lease == first.Lease {
		t.Fatalf("owner key %v after its lease was lost; want a, on a new lease (the old one was %x)", again, first.Lease)
	}

	// b wins the next epoch while a is cut off; a's lease runs out and it
	// must not take the key back.
	b := openEtcdTest(t, srv.endpoint)
	b.leaseTTL = ttl
	mustClaim(t, b, "vm-back", "b", 1, Claim{Epoch: 2, Owner: "b", Won: true})
	if _, err := cli.Revoke(testContext(t), clientv3.LeaseID(again.Lease)); err != nil {
		t.Fatal(err)
	}
	if stands := waitRenewed(t, renewed); stands {
		t.Fatal("a put its owner key back after b won")
	}
	if o := getKey(t, cli, ownerKey("vm-back")); o == nil || string(o.Value) != "b" {
		t.Errorf("owner key %v; want b's", o)
	}
}

// waitRenewed waits for an attempt to put a lost owner key back: the
// keep-alive notices a lost lease within a third of its TTL.
func waitRenewed(t *testing.T, renewed <-chan bool) bool {
	t.Helper()
	select {
	case stands := <-renewed:
		return stands
	case <-time.After(15 * time.Second):
		t.Fatal("no attempt to put the owner key back")
		return false
	}
}

// TestOpenWithErrors: options the client would ignore, or use unsafely,
// are refused before anything is dialed.
func TestOpenWithErrors(t *testing.T) {
	t.Parallel() // mostly waiting for a timeout
	for _, tc := range []struct {
		spec string
		opts Options
		want string
	}{
		{"etcd:http://127.0.0.1:2379", Options{EtcdTLS: &tls.Config{}}, "TLS options for http://"},
		{"etcd:http://127.0.0.1:2379", Options{EtcdUsername: "u", EtcdPassword: "p"}, "password in clear"},
		{"etcd:https://127.0.0.1:2379", Options{EtcdUsername: "u"}, "both a username and a password"},
		{"etcd:https://127.0.0.1:2379,http://127.0.0.2:2379", Options{}, "mix http and https"},
		{"file:" + t.TempDir(), Options{EtcdUsername: "u", EtcdPassword: "p"}, "etcd options for a file: arbiter"},
	} {
		a, err := OpenWith(tc.spec, tc.opts)
		if err == nil {
			a.Close()
			t.Errorf("OpenWith(%q, %+v) succeeded; want an error containing %q", tc.spec, tc.opts, tc.want)
			continue
		}
		if !strings.Contains(err.Error(), tc.want) {
			t.Errorf("OpenWith(%q) = %q; want %q", tc.spec, err, tc.want)
		}
	}
	// A login is not tried before the first call: a host starts while the
	// cluster is down.
	a, err := OpenWith("etcd:https://"+freeAddr(t), Options{EtcdUsername: "u", EtcdPassword: "p"})
	if err != nil {
		t.Fatalf("OpenWith with a login and no cluster: %v", err)
	}
	defer a.Close()
	if _, err := a.Current(testContext(t), "vm1"); !errors.Is(err, ErrUnavailable) {
		t.Errorf("Current with no cluster: %v; want ErrUnavailable", err)
	}
}
