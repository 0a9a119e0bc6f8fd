package arbiter

import (
	"context"
	"encoding/json"
	"fmt"
	"net/url"
	"strings"
	"sync"

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
//	                      so operators can see whether the owner is alive
//
// A claim is one transaction: if the claim key is unchanged since we read it
// (same ModRevision, or still absent), put the new record and the owner key;
// else get the record that beat us.
type etcdArbiter struct {
	cli      *clientv3.Client
	leaseTTL int64 // seconds; a field so tests can shorten it

	mu      sync.Mutex
	leases  map[string]ownerLease // by VM: the owner keys this Arbiter keeps alive
	closed  bool
	revokes sync.WaitGroup // background revokes, waited for by Close
}

type ownerLease struct {
	id   clientv3.LeaseID
	stop context.CancelFunc // ends the KeepAlive
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

func openEtcd(spec, list string) (Arbiter, error) {
	if list == "" {
		return nil, fmt.Errorf("arbiter spec %q: no endpoints (want etcd:http://host:port[,...])", spec)
	}
	var endpoints []string
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
		endpoints = append(endpoints, u.Scheme+"://"+u.Host)
	}
	// New does not connect (gRPC dials lazily), so a host can start while the
	// cluster is down; each call then fails with ErrUnavailable.
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:   endpoints,
		DialTimeout: DefaultTimeout,
		// Failures come back to the caller as errors; the client's own
		// retry warnings would only repeat them on stderr.
		Logger: zap.NewNop(),
	})
	if err != nil {
		return nil, fmt.Errorf("arbiter spec %q: create etcd client: %w", spec, err)
	}
	return &etcdArbiter{cli: cli, leaseTTL: ownerTTL, leases: map[string]ownerLease{}}, nil
}

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

	cur, rev, err := a.get(caller, ctx, vm)
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

	grant, err := a.cli.Grant(ctx, a.leaseTTL)
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
	resp, err := a.cli.Txn(ctx).
		If(unchanged).
		Then(then...).
		Else(clientv3.OpGet(claimKey(vm))).
		Commit()
	if err != nil {
		a.revokeLater(grant.ID)
		return Claim{}, unavailable(caller, "claim vm "+vm, err)
	}
	if !resp.Succeeded {
		a.revokeLater(grant.ID)
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
	if !a.keepAlive(vm, grant.ID) {
		// Closed meanwhile: the claim stands, but nobody keeps the owner key.
		a.revokeLater(grant.ID)
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
	rec, _, err := a.get(caller, ctx, vm)
	if err != nil {
		return Claim{}, fmt.Errorf("read vm %s: %w", vm, err)
	}
	return Claim{Epoch: rec.Epoch, Owner: rec.Owner}, nil
}

// get reads the record and the ModRevision to compare against (0: absent).
// caller is the context before DefaultTimeout, for unavailable.
func (a *etcdArbiter) get(caller, ctx context.Context, vm string) (etcdRecord, int64, error) {
	resp, err := a.cli.Get(ctx, claimKey(vm))
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
	return rec, nil
}

// keepAlive keeps the owner lease for vm alive until endLease or Close. It
// reports false if the Arbiter is already closed.
func (a *etcdArbiter) keepAlive(vm string, id clientv3.LeaseID) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.closed {
		return false
	}
	ctx, stop := context.WithCancel(context.Background())
	ch, err := a.cli.KeepAlive(ctx, id)
	if err != nil {
		stop()
		return false
	}
	// The channel must be drained or the client logs that it is full; it
	// closes when stop is called or the lease is lost.
	go func() {
		for range ch {
		}
	}()
	if old, ok := a.leases[vm]; ok {
		// Another TryClaim for vm by this Arbiter won meanwhile; keep one.
		old.stop()
		a.revokes.Go(func() { a.revoke(old.id) })
	}
	a.leases[vm] = ownerLease{id: id, stop: stop}
	return true
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

// endLease stops keeping a lease alive and revokes it in the background (if
// the owner key is still on it, the key disappears now rather than after
// the TTL).
func (a *etcdArbiter) endLease(l ownerLease, ok bool) {
	if ok {
		l.stop()
		a.revokeLater(l.id)
	}
}

// revokeLater revokes without making the caller wait: a revoke that fails
// (cluster unreachable) only means the lease runs out its TTL instead.
func (a *etcdArbiter) revokeLater(id clientv3.LeaseID) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.closed {
		return // the client is closing; the lease runs out its TTL
	}
	a.revokes.Go(func() { a.revoke(id) })
}

func (a *etcdArbiter) revoke(id clientv3.LeaseID) {
	ctx, cancel := context.WithTimeout(context.Background(), DefaultTimeout)
	defer cancel()
	a.cli.Revoke(ctx, id) // best effort, see revokeLater
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

	ctx, cancel := context.WithTimeout(context.Background(), DefaultTimeout)
	defer cancel()
	var wg sync.WaitGroup
	for _, l := range leases {
		l.stop()
		wg.Go(func() { a.cli.Revoke(ctx, l.id) })
	}
	wg.Wait()
	a.revokes.Wait()
	if err := a.cli.Close(); err != nil {
		return fmt.Errorf("close etcd client: %w", err)
	}
	return nil
}
