// Package replay drives the protected VM's QEMU through QMP, the QEMU
// Machine Protocol.
//
// The design names github.com/digitalocean/go-qemu for this; until that
// module can be fetched, qmp.go is a standard-library stand-in with the same
// shape as go-qemu's qmp.Monitor (Connect, Disconnect, Run, Events) so the
// real one can be swapped in later. One difference: Run here returns the
// value of the reply's "return" member, where go-qemu returns the whole reply
// object.
//
// # Protocol
//
// QMP is newline-delimited JSON over a stream socket (QEMU's
// -qmp unix:PATH,server=on,wait=off). On connect QEMU sends a greeting
// {"QMP": {...}}; the client must send {"execute":"qmp_capabilities"} and get
// {"return": {}} before anything else. A command is
// {"execute": NAME, "arguments": {...}, "id": ...}; its reply is
// {"return": ...} or {"error": {"class": ..., "desc": ...}} carrying the same
// id. Events {"event": ..., "data": ..., "timestamp": ...} can arrive at any
// time, interleaved with replies. QEMU serves one client per socket.
//
// # SocketMonitor
//
// One reader goroutine per connection decodes every message. Replies go to
// the Run call waiting for them; Run calls are serialised (one outstanding
// command), each gets an id of its own ("ftgw-N", replacing any id in the
// command), and a reply whose id does not match (the late answer to a Run
// that timed out) is dropped. Run gives up after the monitor's timeout with
// an error matching ErrTimeout; QMP errors come back as *Error (class and
// desc). Disconnect, or the connection dropping, wakes a waiting Run with
// ErrDisconnected or the read error. After Disconnect or a dropped
// connection (where Run keeps failing with the read error) Connect may be
// called again.
//
// Events go to every channel handed out by Events, in the order QEMU sent
// them. The reader never blocks on a subscriber: each channel has a buffer
// of EventBuffer events and an event that does not fit is dropped and
// counted (DroppedEvents), so a slow or absent reader of events can never
// stall command replies. An events channel is closed when its context ends
// or the connection ends.
//
// Errors are wrapped "verb noun: %w", for example
// "run command query-status: qmp: timed out after 5s waiting for reply".
package replay
