// Package arbiter is the tie-breaker that keeps a split primary/secondary pair
// from both serving a VM, like VMware FT's atomic test-and-set on shared
// storage.
//
// # Epochs
//
// For every VM the arbiter keeps one record: an epoch and the host that won
// it. Epoch 0 means nobody ever claimed the VM. Each successful claim moves
// the epoch from known to known+1 and names the winner; epochs never go
// backwards, so an epoch names one reign of one host.
//
// # Claiming
//
// When the primary and the secondary lose contact, neither can tell whether
// the other is dead or merely cut off. Before the secondary goes live, or
// before the primary goes on alone, the host calls TryClaim with the epoch it
// last agreed on with its peer (known). The arbiter compares and sets
// atomically: the call wins only if the epoch is still exactly known, that
// is, if nobody claimed since. Both hosts of a pair pass the same known, so at
// most one of them wins; a host whose known is stale (someone already won a
// later epoch) or from the future loses.
//
// The loser must halt (stay or become passive): the winner now serves the VM
// and a second live copy would let the guest's state and its network output
// diverge, which is the one thing fault tolerance must never do. A host that
// cannot reach the arbiter gets an error wrapping ErrUnavailable and must act
// as the loser too: without an answer it cannot know that it won.
//
// # Retries
//
// A claim whose answer was lost (a timeout after the arbiter committed it)
// leaves the record naming a host that believes it lost. So that the pair does
// not end with nobody serving, a host that calls TryClaim again with the same
// known and finds the record at known+1 in its own name is told it won. That
// is safe: the record names exactly one owner per epoch, and only that host
// can be told it won that epoch. Host names must therefore be unique.
//
// # Backends
//
// Open picks one from a spec: "file:/dir" (one file per VM in a directory
// both hosts see, guarded by flock) or "etcd:http://host:2379,..." (an etcd
// transaction per claim, plus a leased owner key that shows operators whether
// the owner is alive). OpenWith adds TLS and a login for etcd ("etcd:https://...").
package arbiter

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"math"
	"strings"
	"time"
)

// Claim is the arbiter's record for one VM after a call.
type Claim struct {
	Epoch uint64 // 0: never claimed
	Owner string // host name that won Epoch
	Won   bool   // whether this call won it
}

// Arbiter is an atomic test-and-set per VM. Its methods are safe for
// concurrent use.
type Arbiter interface {
	// TryClaim makes host the owner of vm at epoch known+1, if and only if the
	// arbiter's epoch for vm is still exactly known (nobody claimed since the
	// caller last agreed on it). known=0 claims a VM never claimed. Otherwise
	// nothing changes and Won is false. Either way it returns the record after
	// the call. (The one exception is the retry described in the package doc:
	// a record already at known+1 owned by host reports Won.)
	TryClaim(ctx context.Context, vm, host string, known uint64) (Claim, error)
	// Current reads the record for vm.
	Current(ctx context.Context, vm string) (Claim, error)
	Close() error
}

// ErrUnavailable is wrapped by errors from an arbiter that could not be
// reached or did not answer in time. Callers must treat it as "not won".
var ErrUnavailable = errors.New("arbiter unavailable")

// DefaultTimeout bounds every call whose context has no earlier deadline, so
// that an unreachable arbiter turns into ErrUnavailable promptly instead of
// stalling a failover.
const DefaultTimeout = 2 * time.Second

// Options are what a backend needs besides its spec. The zero value suits
// file: and an etcd cluster without TLS or authentication.
type Options struct {
	// EtcdTLS secures https:// etcd endpoints: the CA to trust (RootCAs;
	// nil: the system's) and this host's client certificate, if the
	// cluster requires one. Nil with https://: the system's roots and no
	// client certificate.
	EtcdTLS *tls.Config
	// EtcdUsername and EtcdPassword log in to etcd's authentication
	// (https:// only: the password would otherwise cross the network in
	// clear).
	EtcdUsername, EtcdPassword string
}

// Open parses a spec: "file:/path/to/dir" or
// "etcd:http://127.0.0.1:2379[,http://...]". Errors name what is wrong with
// the spec ("arbiter spec %q: ...").
func Open(spec string) (Arbiter, error) { return OpenWith(spec, Options{}) }

// OpenWith is Open with opts: "etcd:https://..." with TLS or a login.
func OpenWith(spec string, opts Options) (Arbiter, error) {
	scheme, rest, ok := strings.Cut(spec, ":")
	if !ok {
		return nil, fmt.Errorf("arbiter spec %q: missing scheme (want file:/dir or etcd:http://host:port)", spec)
	}
	switch scheme {
	case "file":
		if opts != (Options{}) {
			return nil, fmt.Errorf("arbiter spec %q: etcd options for a file: arbiter", spec)
		}
		return openFile(spec, rest)
	case "etcd":
		return openEtcd(spec, rest, opts)
	default:
		return nil, fmt.Errorf("arbiter spec %q: unknown scheme %q (want file or etcd)", spec, scheme)
	}
}

// maxNameLen keeps "<vm>.claim" and its temp files well under the 255-byte
// file name limit, and etcd keys short.
const maxNameLen = 128

// checkVM rejects names that could escape the claim directory or the key
// prefix, or that two backends would spell differently.
func checkVM(vm string) error {
	if vm == "" {
		return errors.New("check vm name: empty")
	}
	if len(vm) > maxNameLen {
		return fmt.Errorf("check vm name %.16q...: longer than %d bytes", vm, maxNameLen)
	}
	if vm == "." || vm == ".." {
		return fmt.Errorf("check vm name %q: not a name", vm)
	}
	for _, r := range vm {
		if r == '/' || r == '\\' || r < 0x20 || r == 0x7f {
			return fmt.Errorf("check vm name %q: contains %q", vm, r)
		}
	}
	return nil
}

// checkClaim validates TryClaim's arguments.
func checkClaim(vm, host string, known uint64) error {
	if err := checkVM(vm); err != nil {
		return err
	}
	if host == "" {
		return errors.New("check host name: empty")
	}
	if len(host) > 255 {
		return fmt.Errorf("check host name %.16q...: longer than 255 bytes", host)
	}
	for _, r := range host {
		if r < 0x20 || r == 0x7f {
			return fmt.Errorf("check host name %q: contains %q", host, r)
		}
	}
	if known == math.MaxUint64 {
		return errors.New("check epoch: no epoch after the largest")
	}
	return nil
}

// withTimeout applies DefaultTimeout unless ctx already ends sooner.
// checkStored refuses a stored claim that no claim writes: epoch 0 reads
// as "never claimed", and would let a restarting host boot the VM afresh
// (protect.StartEvent) beside the one that serves it. A record that is
// there but unreadable is an error to fix, never a VM without an owner.
func checkStored(epoch uint64, owner string) error {
	if epoch == 0 || owner == "" {
		return fmt.Errorf("corrupt claim record: epoch %d, owner %q: a claim has both", epoch, owner)
	}
	return nil
}

func withTimeout(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, DefaultTimeout)
}

// unavailable wraps err as ErrUnavailable unless the caller itself cancelled
// (then it is not the arbiter's fault, and the caller knows why).
func unavailable(caller context.Context, what string, err error) error {
	if errors.Is(caller.Err(), context.Canceled) {
		return fmt.Errorf("%s: %w", what, caller.Err())
	}
	return fmt.Errorf("%s: %w: %w", what, ErrUnavailable, err)
}
