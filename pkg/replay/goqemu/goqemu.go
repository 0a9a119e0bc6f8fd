// Package goqemu runs go-qemu's typed QMP commands (its qmp/raw package,
// qemu.Domain) over ftgw's own QMP client, replay.SocketMonitor.
//
// The design names github.com/digitalocean/go-qemu, and ftgw keeps its own
// client all the same, because go-qemu's qmp.SocketMonitor is wrong for a
// daemon that drives QEMU under record/replay:
//
//   - Run waits for its reply with no timeout. A replayer that reads past the
//     log it has blocks inside QEMU with its monitor frozen (pkg/replay), and
//     a daemon whose QMP call never returns can neither fail over nor stop.
//   - Its reader hands events to the channel Events returned, blocking until
//     someone reads it: a caller that asked for events and stopped reading
//     stalls every later reply.
//   - It reads the monitor with a bufio.Scanner of the default 64 KiB limit:
//     a longer reply (query-qmp-schema, a large query-block) ends the reader,
//     and the monitor with it, for good.
//
// replay.SocketMonitor has a timeout per command, drops and counts events
// nobody reads, and reads replies of any size. Monitor gives it go-qemu's
// qmp.Monitor interface, so go-qemu's generated commands can be used where
// they help; this package is the only one that imports go-qemu.
package goqemu

import (
	"context"

	"github.com/digitalocean/go-qemu/qmp"

	"github.com/ftgw/ftgw/pkg/replay"
)

// Monitor is a replay.SocketMonitor as a go-qemu qmp.Monitor.
type Monitor struct {
	*replay.SocketMonitor
}

var _ qmp.Monitor = Monitor{}

// Run returns the whole reply, {"return": ...}, which go-qemu's commands
// unwrap themselves; replay.SocketMonitor returns the "return" member only.
// A QMP error reply stays an error (*replay.Error).
func (m Monitor) Run(command []byte) ([]byte, error) {
	out, err := m.SocketMonitor.Run(command)
	if err != nil {
		return nil, err
	}
	if len(out) == 0 {
		out = []byte("{}")
	}
	return append(append([]byte(`{"return":`), out...), '}'), nil
}

// Events converts the monitor's events to go-qemu's type (the same fields).
// Like the monitor's own, the channel closes when ctx ends or the
// connection does.
func (m Monitor) Events(ctx context.Context) (<-chan qmp.Event, error) {
	in, err := m.SocketMonitor.Events(ctx)
	if err != nil {
		return nil, err
	}
	out := make(chan qmp.Event, replay.EventBuffer)
	go func() {
		defer close(out)
		for e := range in {
			select {
			case out <- qmp.Event(e):
			case <-ctx.Done():
				return
			}
		}
	}()
	return out, nil
}
