// Package netnsutil runs code inside named network namespaces (the ones
// `ip netns` manages under /run/netns).
package netnsutil

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"runtime"
	"time"

	"github.com/vishvananda/netns"
)

// Do runs fn on a thread that is inside the named namespace. Sockets fn
// opens stay in that namespace after Do returns; goroutines fn starts do not
// inherit it.
func Do(name string, fn func() error) error {
	ns, err := netns.GetFromName(name)
	if err != nil {
		return fmt.Errorf("open netns %s: %w", name, err)
	}
	defer ns.Close()
	return doIn(ns, name, fn)
}

// doIn runs fn on a thread inside ns, called name in errors.
func doIn(ns netns.NsHandle, name string, fn func() error) error {
	errc := make(chan error, 1)
	// A fresh goroutine, so a failure to switch back can retire its
	// thread without harming the caller's.
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			errc <- fmt.Errorf("get current netns: %w", err)
			return
		}
		defer orig.Close()
		if err := netns.Set(ns); err != nil {
			errc <- fmt.Errorf("enter netns %s: %w", name, err)
			return
		}
		err = fn()
		if netns.Set(orig) == nil {
			runtime.UnlockOSThread()
		}
		errc <- err
	}()
	return <-errc
}

// Private is a network namespace of its own, with no name in /run/netns:
// nothing else enters it, and it vanishes once it is closed and nothing
// in it holds it any more (a tap's fd, a socket, a process), even if the
// program that made it dies first.
type Private struct{ ns netns.NsHandle }

// NewPrivate creates a private network namespace; the calling thread stays
// where it was.
func NewPrivate() (*Private, error) {
	type result struct {
		ns  netns.NsHandle
		err error
	}
	done := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			done <- result{err: fmt.Errorf("get current netns: %w", err)}
			return
		}
		defer orig.Close()
		ns, err := netns.New() // and moves this thread into it
		if err != nil {
			netns.Set(orig)
			runtime.UnlockOSThread()
			done <- result{err: fmt.Errorf("create netns: %w", err)}
			return
		}
		if netns.Set(orig) == nil {
			runtime.UnlockOSThread()
		}
		done <- result{ns: ns}
	}()
	r := <-done
	if r.err != nil {
		return nil, r.err
	}
	return &Private{ns: r.ns}, nil
}

// Do runs fn on a thread inside the namespace, as the package's Do does.
func (p *Private) Do(fn func() error) error { return doIn(p.ns, "private", fn) }

// Close lets the namespace go once nothing in it holds it.
func (p *Private) Close() error { return p.ns.Close() }

// HTTPClient returns an HTTP client whose connections are made inside the
// named namespace. (Its transport dials from goroutines of its own, so
// wrapping a plain client's calls in Do would not do.)
func HTTPClient(name string, timeout time.Duration) *http.Client {
	return &http.Client{
		Timeout: timeout,
		Transport: &http.Transport{
			DisableKeepAlives: true,
			DialContext: func(ctx context.Context, network, addr string) (conn net.Conn, err error) {
				err = Do(name, func() error {
					var d net.Dialer
					conn, err = d.DialContext(ctx, network, addr)
					return err
				})
				return conn, err
			},
		},
	}
}
