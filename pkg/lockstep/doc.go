// Package lockstep is the log channel between the primary and the secondary
// host of a fault-tolerant VM.
//
// The primary gives every frame received for the protected VM a position
// (1, 2, 3, ... with no gaps), keeps it in memory and streams it to the
// secondary, which delivers the frames in order and acknowledges the highest
// contiguous position it has. The primary holds each of the VM's outputs
// until the ack reaches the position the output was stamped with (package
// outputcommit); OnAck is how it learns. Unacked frames are kept (up to
// MaxUnacked bytes) so they can be resent after a reconnect.
//
// # Transport
//
// One TCP connection with mutual TLS 1.3, dialed by the primary. Both sides
// need a certificate from the same CA that carries their host name
// (GenerateLabPKI, ServerTLS, ClientTLS), and each accepts only the peer its
// Identity names, never a certificate that also carries its own name; a
// refused handshake (missing, foreign or another host's certificate, or
// bytes that are not TLS) is counted as "auth" by the side that refuses it,
// while a handshake that times out or is cut off counts as "io". (With TLS
// 1.3 the refused primary only learns of it on its first read, as an io
// error naming the TLS alert.) The secondary serves one primary at a time:
// a newer connection that passes TLS and the Hello check replaces the
// current one.
//
// # Records
//
// Every record is a 32-byte header and a payload, all big-endian:
//
//	off  0  u32  magic 0x4654474c ("FTGL")
//	off  4  u8   kind: 1 Hello, 2 RXFrame, 3 Heartbeat, 4 Ack, 5 QEMULog, 6 Progress,
//	             7 Snapshot, 8 SnapshotEnd, 9 HandOver
//	off  5  u8   flags, 0
//	off  6  u16  reserved, 0
//	off  8  u32  payload length, at most MaxPayload (65536)
//	off 12  u32  CRC32C (Castagnoli) of header bytes 0..11 and 16..31, then the payload
//	off 16  u64  position
//	off 24  u64  epoch
//
// A reader rejects a record with a wrong magic (ErrBadMagic), a length over
// MaxPayload before reading the payload (ErrTooLong), a CRC mismatch
// (ErrChecksum), a kind outside 1..9 or nonzero flags/reserved bits
// (ErrUnknownKind: the sender speaks a variant we do not), or an end of
// stream inside a record (ErrTruncated). Any protocol error closes the
// connection, is logged and counted by reason in Stats.Errors, and the
// primary redials (10ms backoff doubling to 1s).
//
// # Kinds
//
// Hello (first record each way): payload u16 version (Version = 2), u16
// VM-name length, VM name, u64 log incarnation, u8 flags (1: FromBoot, the
// primary's log starts at the VM's boot; 2: NeedSnapshot, the secondary
// cannot follow the log from what it holds; 4: Restarted, below). The incarnation names the
// log: a host draws a new one whenever the VM's log starts afresh on it (0:
// none yet). The primary speaks first with position = its head; the
// secondary decides how it can follow:
//
//   - its own incarnation: it resumes, answering with position = its highest
//     contiguous received position, and the primary resends everything after
//     it;
//   - none, with its VM at its boot state, and a FromBoot log: it adopts the
//     log and follows it from 0;
//   - another incarnation at the very epoch it follows: refused with
//     ErrIncarnation and no answer (a primary that restarted with a fresh
//     VM; its log would graft another history onto the acknowledged one);
//   - otherwise (a fresh host, or a newer owner's log): it answers with
//     NeedSnapshot and drops what it held, which may no longer take over.
//
// The primary rebuilds a secondary that needs a snapshot, or whose position
// is below what was acked (it restarted), from PrimaryConfig.Snapshot: the
// VM's state as Snapshot records (payload: a piece of it, position = the
// log position P it was taken at), then SnapshotEnd (u64 length, SHA-256);
// the log goes on from P+1. A secondary refuses a cut, over-long
// (MaxSnapshot) or corrupt state with ErrSnapshot, and acks P once its VM
// runs from it. Without Snapshot the primary refuses such a secondary with
// ErrPeerLacksLog and tells OnPeerLacksLog. The secondary answers even when
// the version (ErrVersion) or VM (ErrWrongVM) does not match, so that both
// sides log the mismatch, then closes. On the primary, a secondary position
// beyond the head is ErrAckBeyondHead. The Hello position is not an ack: the
// secondary sends a separate Ack right after its Hello unless acks are held
// (SetAckHold) or it waits for a snapshot.
//
// A connection counts as admitted, and its peer as alive, only past the
// Hellos: a secondary counts its primary connected from the first record
// after them (a ping, or the snapshot). A peer refused at its Hello,
// however often it comes back, never looks alive.
//
// A Hello flagged Restarted (4) comes from AnnounceRestart, not a primary:
// the host that served the VM at that epoch restarted and lost its copy.
// The secondary that follows that epoch tells OnPrimaryRestarted, answers
// and closes (ErrPrimaryRestarted).
//
// HandOver (primary → secondary): a planned switchover. The primary has
// stopped serving at its epoch; the secondary may take the VM over once it
// holds the log up to position (SecondaryConfig.OnHandOver).
//
// RXFrame (primary → secondary): position = the frame's log position,
// payload = the raw Ethernet frame (AppendFrame refuses frames over MaxFrame,
// 9216 bytes). The secondary needs position = received+1 (else
// ErrOutOfOrder); positions it already has, which a resend can overlap, are
// skipped and counted as Stats.Duplicates.
//
// QEMULog (primary → secondary): position as for RXFrame, payload = the
// next chunk of the VM engine's own log (QEMU's replay log, which carries the
// VM's input itself), at most MaxPayload bytes. A primary sends either
// RXFrames or QEMULogs; the secondary hands chunks to OnLog in position
// order and refuses a kind it has no handler for.
//
// Progress (secondary → primary): position = the guest instruction count
// the secondary's replay has reached; sent with each heartbeat once
// SetProgress was called. The primary throttles its VM on how far its own
// count is ahead (PrimaryConfig.OnProgress).
//
// Ack (secondary → primary): position = highest contiguous position
// received. The secondary sends one after each batch, i.e. when its
// bufio.Reader has nothing more buffered, if the position moved. On the
// primary an ack above the head is ErrAckBeyondHead, one below the last ack
// ErrAckBackwards.
//
// Heartbeat (both ways): payload u64 send time (the sender's monotonic ns),
// u64 echo. Each side pings every Heartbeat (default 10ms); a connection
// with nothing received for Timeout (default 100 heartbeats) is dead. The
// echo yields the link RTT, which is only meaningful if pings are answered at
// once, and answers must not be answered in turn or the two sides would
// ping-pong forever. Both are achieved without a flag:
//
//   - An answer echoes the send time of the ping it answers; a ping echoes
//     the send time of the last peer ping we answered.
//   - The answer and the update of "last peer ping answered" happen under
//     the write lock, so on the wire an answer always precedes any ping that
//     carries the same echo.
//   - Hence, on receipt, an echo greater than any echo seen before on this
//     connection is an answer to one of our pings: RTT = now - echo, no
//     reply. Anything else is a ping: answer it immediately.
//
// A kind sent in the wrong direction, a second Hello, or a kind this end has
// no handler for is refused (ErrUnexpected).
//
// Epoch is stamped on every record (PrimaryConfig.Epoch; the secondary echoes
// the primary's). A secondary refuses a primary older than the newest epoch
// it admitted (ErrStaleEpoch, answered with that epoch so the primary knows
// it is fenced); LogEpoch is the epoch of the log it holds, the one it names
// to claim the VM.
//
// # Latency
//
// AppendFrame only copies the frame into the log under a mutex and wakes the
// connection's single writer goroutine, which drains everything queued into
// a bufio.Writer and flushes once; there are no timers on the path and Go
// disables Nagle. Likewise the secondary acks once per batch read.
package lockstep
