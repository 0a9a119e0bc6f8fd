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
