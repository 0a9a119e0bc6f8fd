package arbiter

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

// etcdArbiter keeps, per VM:
//
//	/ftgw/vms/<vm>/claim  JSON {epoch, owner}; never leased, so an epoch
//	                      cannot vanish and be won a second time
//	/ftgw/vms/<vm>/owner  the winning host, on a lease this Arbiter keeps
//	                      alive; it disappears when the winner dies, is cut
//	                      off, closes its Arbiter or claims again and loses,
//	                      so operators can see whether the owner is alive;
//	                      it comes back when a cut-off winner that still
//	                      holds the claim reaches the cluster again
//
// A claim is one transaction: if the claim key is unchanged since we read it
// (same ModRevision, or still absent), put the new record and the owner key;
// else get the record that beat us.
type etcdArbiter struct {
	cfg      clientv3.Config
	leaseTTL int64 // seconds; a field so tests can shorten it
	// renewed, if set (tests), is told the outcome of each attempt that
	// got an answer to put a lost owner key back.
	renewed func(stands bool)

	dialMu sync.Mutex                      // one client is created at a time
	cli    atomic.Pointer[clientv3.Client] // nil until first used (see client)

	mu         sync.Mutex
	leases     map[string]ownerLease // by VM: the owner keys this Arbiter keeps
	closed     bool
	background sync.WaitGroup // owner key holders and revokes, waited for by Close
}

type ownerLease struct {
	stop context.CancelFunc // ends holdOwnerKey, which revokes the lease
}

// etcdRecord is the JSON under the claim key.
type etcdRecord struct {
	Epoch uint64 `json:"epoch"`
	Owner string `json:"owner"`
}

// ownerTTL is how long the owner key outlives its host's last keep-alive.
const ownerTTL = 5 // seconds

func claimKey(vm string) string { return "/ftgw/vms/" + vm + "/claim" }
func ownerKey(vm string) string { return "/ftgw/vms/" + vm + "/owner" }

func openEtcd(spec, list string, opts Options) (Arbiter, error) {
	if list == "" {
		return nil, fmt.Errorf("arbiter spec %q: no endpoints (want etcd:http://host:port[,...])", spec)
	}
	var endpoints []string
	scheme := ""
	for _, ep := range strings.Split(list, ",") {
		u, err := url.Parse(ep)
		if err != nil {
			return nil, fmt.Errorf("arbiter spec %q: endpoint %q: %w", spec, ep, err)
		}
		if u.Scheme != "http" && u.Scheme != "https" {
			return nil, fmt.Errorf("arbiter spec %q: endpoint %q: scheme must be http or https", spec, ep)
		}
		if u.Hostname() == "" || u.Port() == "" {
			return nil, fmt.Errorf("arbiter spec %q: endpoint %q: want host:port", spec, ep)
		}
		if (u.Path != "" && u.Path != "/") || u.RawQuery != "" || u.User != nil {
			return nil, fmt.Errorf("arbiter spec %q: endpoint %q: want only scheme://host:port", spec, ep)
		}
		if scheme != "" && u.Scheme != scheme {
			// The client takes the first endpoint's scheme for all.
			return nil, fmt.Errorf("arbiter spec %q: endpoints mix http and https", spec)
		}
		scheme = u.Scheme
		endpoints = append(endpoints, u.Scheme+"://"+u.Host)
	}
	if scheme == "http" && opts.EtcdTLS != nil {
		// The client would silently speak plain http.
		return nil, fmt.Errorf("arbiter spec %q: TLS options for http:// endpoints; use https://", spec)
	}
	if scheme == "http" && (opts.EtcdUsername != "" || opts.EtcdPassword != "") {
		return nil, fmt.Errorf("arbiter spec %q: a login over http:// would send the password in clear; use https://", spec)
	}
	if (opts.EtcdUsername == "") != (opts.EtcdPassword == "") {
		// The client ignores a username without a password, and so would
		// go on without logging in.
		return nil, fmt.Errorf("arbiter spec %q: an etcd login needs both a username and a password", spec)
	}
	cfg := clientv3.Config{
		Endpoints:   endpoints,
		DialTimeout: DefaultTimeout,
		TLS:         opts.EtcdTLS,
		Username:    opts.EtcdUsername,
		Password:    opts.EtcdPassword,
		// Failures come back to the caller as errors; the client's own
		// retry warnings would only repeat them on stderr.
		Logger: zap.NewNop(),
	}
	return &etcdArbiter{cfg: cfg, leaseTTL: ownerTTL, leases: map[string]ownerLease{}}, nil
}

// client returns the etcd client, creating it on first use. Without a
// login, creating one connects nothing (gRPC dials lazily); with one, it
// logs in, which needs the cluster. Either way a host can start while the
// cluster is down, and each call fails with ErrUnavailable until it is back.
// caller is the context before DefaultTimeout, for unavailable.
func (a *etcdArbiter) client(caller, ctx context.Context) (*clientv3.Client, error) {
	if cli := a.cli.Load(); cli != nil {
		return cli, nil
	}
	a.dialMu.Lock()
	defer a.dialMu.Unlock()
	if cli := a.cli.Load(); cli != nil {
		return cli, nil
	}
	// A login waits for the cluster up to DialTimeout, whatever ctx says.
	cfg := a.cfg
	if deadline, ok := ctx.Deadline(); ok {
		cfg.DialTimeout = min(cfg.DialTimeout, time.Until(deadline))
	}
	if cfg.DialTimeout <= 0 { // which would be no timeout at all
		return nil, unavailable(caller, "connect to etcd", context.DeadlineExceeded)
	}
	cli, err := clientv3.New(cfg)
	if err != nil {
		return nil, unavailable(caller, "connect to etcd", err)
	}
	a.mu.Lock()
	closed := a.closed
	a.mu.Unlock()
	if closed {
		// Close may already have looked for a client to close.
		cli.Close()
		return nil, fmt.Errorf("connect to etcd: %w", errClosed)
	}
	a.cli.Store(cli)
	return cli, nil
}

var errClosed = errors.New("arbiter closed")

func (a *etcdArbiter) TryClaim(ctx context.Context, vm, host string, known uint64) (Claim, error) {
	if err := checkClaim(vm, host, known); err != nil {
		return Claim{}, err
	}
	caller := ctx
	ctx, cancel := withTimeout(ctx)
	defer cancel()

	// Whatever happens now, this host's previous owner lease for vm ends:
	// either it wins again and puts the owner key on a fresh lease, or it
	// lost and must halt, so it must no longer look like the live owner.
	// It is revoked only on return, so that a host winning again never
	// shows a gap in the owner key.
	defer a.endLease(a.takeLease(vm))

	cli, err := a.client(caller, ctx)
	if err != nil {
		return Claim{}, fmt.Errorf("claim vm %s: %w", vm, err)
	}
	cur, rev, err := a.get(caller, ctx, cli, vm)
	if err != nil {
		return Claim{}, fmt.Errorf("claim vm %s: %w", vm, err)
	}
	var then []clientv3.Op
	switch {
	case cur.Epoch == known:
		rec, err := json.Marshal(etcdRecord{Epoch: known + 1, Owner: host})
		if err != nil {
			return Claim{}, fmt.Errorf("encode claim: %w", err)
		}
		then = append(then, clientv3.OpPut(claimKey(vm), string(rec)))
	case cur.Epoch == known+1 && cur.Owner == host:
		// A retry of a claim this host already won (package doc, Retries):
		// only the owner key is renewed, under the same compare.
	default:
		return Claim{Epoch: cur.Epoch, Owner: cur.Owner}, nil
	}

	grant, err := cli.Grant(ctx, a.leaseTTL)
	if err != nil {
		return Claim{}, unavailable(caller, "claim vm "+vm+": grant owner lease", err)
	}
	then = append(then, clientv3.OpPut(ownerKey(vm), host, clientv3.WithLease(grant.ID)))

	// Compare on what we read: the record is unchanged since, so the epoch
	// is still what we just compared against known.
	unchanged := clientv3.Compare(clientv3.ModRevision(claimKey(vm)), "=", rev)
	if rev == 0 {
		unchanged = clientv3.Compare(clientv3.Version(claimKey(vm)), "=", 0)
	}
	resp, err := cli.Txn(ctx).
		If(unchanged).
		Then(then...).
		Else(clientv3.OpGet(claimKey(vm))).
		Commit()
	if err != nil {
		a.revokeLater(cli, grant.ID)
		return Claim{}, unavailable(caller, "claim vm "+vm, err)
	}
	if !resp.Succeeded {
		a.revokeLater(cli, grant.ID)
		kvs := resp.Responses[0].GetResponseRange().GetKvs()
		if len(kvs) == 0 {
			return Claim{}, fmt.Errorf("claim vm %s: record vanished", vm)
		}
		rec, err := decodeRecord(kvs[0].Value)
		if err != nil {
			return Claim{}, fmt.Errorf("claim vm %s: %w", vm, err)
		}
		return Claim{Epoch: rec.Epoch, Owner: rec.Owner}, nil
	}

	won := Claim{Epoch: known + 1, Owner: host, Won: true}
	claimRev := rev // a retry: the claim key is the one read
	if cur.Epoch == known {
		claimRev = resp.Header.Revision // the claim key was put by this transaction
	}
	if !a.keepAlive(cli, ownerClaim{vm: vm, host: host, claimRev: claimRev}, grant.ID) {
		// Closed meanwhile: the claim stands, but nobody keeps the owner key.
		a.revokeLater(cli, grant.ID)
	}
	return won, nil
}

func (a *etcdArbiter) Current(ctx context.Context, vm string) (Claim, error) {
	if err := checkVM(vm); err != nil {
		return Claim{}, err
	}
	caller := ctx
	ctx, cancel := withTimeout(ctx)
	defer cancel()
	cli, err := a.client(caller, ctx)
	if err != nil {
		return Claim{}, fmt.Errorf("read vm %s: %w", vm, err)
	}
	rec, _, err := a.get(caller, ctx, cli, vm)
	if err != nil {
		return Claim{}, fmt.Errorf("read vm %s: %w", vm, err)
	}
	return Claim{Epoch: rec.Epoch, Owner: rec.Owner}, nil
}

// get reads the record and the ModRevision to compare against (0: absent).
// caller is the context before DefaultTimeout, for unavailable.
func (a *etcdArbiter) get(caller, ctx context.Context, cli *clientv3.Client, vm string) (etcdRecord, int64, error) {
	resp, err := cli.Get(ctx, claimKey(vm))
	if err != nil {
		return etcdRecord{}, 0, unavailable(caller, "get record", err)
	}
	if len(resp.Kvs) == 0 {
		return etcdRecord{}, 0, nil
	}
	rec, err := decodeRecord(resp.Kvs[0].Value)
	return rec, resp.Kvs[0].ModRevision, err
}

func decodeRecord(b []byte) (etcdRecord, error) {
	var rec etcdRecord
	if err := json.Unmarshal(b, &rec); err != nil {
		return etcdRecord{}, fmt.Errorf("decode claim record: %w", err)
	}
	if err := checkStored(rec.Epoch, rec.Owner); err != nil {
		return etcdRecord{}, err
	}
	return rec, nil
}

// ownerClaim is a claim this Arbiter won, whose owner key it keeps.
type ownerClaim struct {
	vm, host string
	claimRev int64 // the claim key's ModRevision as won: unchanged while it stands
}

// keepAlive keeps the owner key of c on a live lease, from lease id, until
// endLease or Close. It reports false if the Arbiter is already closed.
func (a *etcdArbiter) keepAlive(cli *clientv3.Client, c ownerClaim, id clientv3.LeaseID) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.closed {
		return false
	}
	ctx, stop := context.WithCancel(context.Background())
	a.background.Go(func() { a.holdOwnerKey(ctx, cli, c, id) })
	if old, ok := a.leases[c.vm]; ok {
		// Another TryClaim for vm by this Arbiter won meanwhile; keep one.
		old.stop()
	}
	a.leases[c.vm] = ownerLease{stop: stop}
	return true
}

// Bounds of the wait between attempts to put a lost owner key back.
const (
	minRenewBackoff = 100 * time.Millisecond
	maxRenewBackoff = 5 * time.Second
)

// holdOwnerKey keeps lease id alive until ctx ends, then revokes the lease
// it holds (the owner key disappears at once rather than after the TTL).
// The lease can be lost while this host still holds the claim: the cluster
// was out of reach for longer than the TTL, or an operator revoked it. The
// owner key went with it, and a serving host would look dead to whoever
// reads it, for good. So the key is put back on a new lease, once the
// cluster answers, as long as the claim is still the one won. Losing the
// key never endangers a claim: epochs are decided on the claim key alone.
func (a *etcdArbiter) holdOwnerKey(ctx context.Context, cli *clientv3.Client, c ownerClaim, id clientv3.LeaseID) {
	defer func() { a.revoke(cli, id) }() // the lease held last
	for {
		if ch, err := cli.KeepAlive(ctx, id); err == nil {
			// The channel must be drained or the client logs that it is
			// full; it closes when ctx ends or the lease is lost.
			for range ch {
			}
		}
		backoff := minRenewBackoff
		for {
			select {
			case <-ctx.Done():
				return
			case <-time.After(backoff):
			}
			renewed, stands, err := a.renewOwnerKey(ctx, cli, c)
			if err == nil && a.renewed != nil {
				a.renewed(stands)
			}
			if err == nil && !stands {
				return // another claim since: the key is not ours to put
			}
			if err == nil {
				a.revoke(cli, id) // lost, most likely; if not, it holds nothing now
				id = renewed
				break
			}
			backoff = min(2*backoff, maxRenewBackoff)
		}
	}
}

// renewOwnerKey puts c's owner key on a new lease if c's claim still
// stands; stands reports whether it did.
func (a *etcdArbiter) renewOwnerKey(ctx context.Context, cli *clientv3.Client, c ownerClaim) (id clientv3.LeaseID, stands bool, err error) {
	ctx, cancel := withTimeout(ctx)
	defer cancel()
	grant, err := cli.Grant(ctx, a.leaseTTL)
	if err != nil {
		return 0, false, err
	}
	resp, err := cli.Txn(ctx).
		If(clientv3.Compare(clientv3.ModRevision(claimKey(c.vm)), "=", c.claimRev)).
		Then(clientv3.OpPut(ownerKey(c.vm), c.host, clientv3.WithLease(grant.ID))).
		Commit()
	if err != nil || !resp.Succeeded {
		a.revoke(cli, grant.ID)
		return 0, false, err
	}
	return grant.ID, true, nil
}

// takeLease removes this Arbiter's owner lease for vm from those it keeps
// alive (ok is false if there is none).
func (a *etcdArbiter) takeLease(vm string) (l ownerLease, ok bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	l, ok = a.leases[vm]
	delete(a.leases, vm)
	return l, ok
}

// endLease stops keeping an owner key; its holder revokes the lease in the
// background (if the owner key is still on it, the key disappears now
// rather than after the TTL).
func (a *etcdArbiter) endLease(l ownerLease, ok bool) {
	if ok {
		l.stop()
	}
}

// revokeLater revokes without making the caller wait: a revoke that fails
// (cluster unreachable) only means the lease runs out its TTL instead.
func (a *etcdArbiter) revokeLater(cli *clientv3.Client, id clientv3.LeaseID) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.closed {
		return // the client is closing; the lease runs out its TTL
	}
	a.background.Go(func() { a.revoke(cli, id) })
}

func (a *etcdArbiter) revoke(cli *clientv3.Client, id clientv3.LeaseID) {
	ctx, cancel := context.WithTimeout(context.Background(), DefaultTimeout)
	defer cancel()
	cli.Revoke(ctx, id) // best effort, see revokeLater
}

// Close revokes this Arbiter's owner leases (their keys disappear at once)
// and closes the client. It waits at most about DefaultTimeout.
func (a *etcdArbiter) Close() error {
	a.mu.Lock()
	if a.closed {
		a.mu.Unlock()
		return nil
	}
	a.closed = true
	leases := a.leases
	a.leases = nil
	a.mu.Unlock()

	for _, l := range leases {
		l.stop() // each holder revokes its lease as it ends, all at once
	}
	a.background.Wait()
	// A client being created now sees closed and closes itself.
	a.dialMu.Lock()
	cli := a.cli.Load()
	a.dialMu.Unlock()
	if cli == nil {
		return nil
	}
	if err := cli.Close(); err != nil {
		return fmt.Errorf("close etcd client: %w", err)
	}
	return nil
}
