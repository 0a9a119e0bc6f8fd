/* Types shared by the gateway's BPF programs and the Go daemon (through
 * bpf2go -type). Changing a layout here changes the Go side on `make generate`. */
#pragma once

#include <linux/types.h>

/* The largest frame the log carries; the lockstep channel refuses larger ones too. */
#define MAX_FRAME 9216

/* The VMs one host protects at most: every per-VM map has this many slots. */
#define MAX_VMS 256

/* Fast-path commit latency buckets: bucket i counts latencies of fewer than
 * 2^i nanoseconds (the last bucket takes everything longer). */
#define LATENCY_BUCKETS 32

enum role {
	ROLE_NONE = 0,    /* not configured: the VM's frames are not touched */
	ROLE_STANDBY = 1, /* secondary: input comes from the log, output is suppressed */
	ROLE_ACTIVE = 2,  /* primary: input is logged, output obeys the Output Rule */
	ROLE_DRAINING = 3, /* primary handing over: no new input; the guest's last
			    * outputs still leave under the Output Rule */
};

/* Owner flags. */
#define OWNER_F_PASSTHROUGH 1 /* output commit off: outputs leave at once (benchmarks) */
#define OWNER_F_HOLD_ALL 2    /* every output goes through the hold queue (benchmarks) */
#define OWNER_F_ENGINE_LOGS 4 /* the VM engine logs its own input (QEMU's replay log):
			       * input is delivered in order but not put in the log ring,
			       * and the head is written by the engine, not by serialize_input */
#define OWNER_F_GUEST_PACED 8 /* the guest publishes how far it has taken its input
			       * (log_state.guest_taken): input is not logged while the guest
			       * is guest_budget frames behind, where its tap would drop it */

/* The one record every program reads to decide what a frame is and where it
 * goes. It is never modified in place: the daemon publishes a new inner map
 * holding the new record and swaps it into the outer slot in one update, so a
 * program sees either the old record or the new one, never a mix. */
struct owner_record {
	__u64 epoch;
	enum role role;
	__u32 vm_ip;   /* network byte order */
	__u8 vm_mac[6];
	__u16 flags;   /* OWNER_F_* */
};

/* Positions shared with the daemon through a memory-mapped array, each on its
 * own cache line because each has one writer on a different CPU. */
struct log_state {
	__u64 head;     /* the last position logged: written by serialize_input, or by the
			 * engine (OWNER_F_ENGINE_LOGS) */
	__u8 _pad0[56];
	__u64 acked;    /* written by the daemon: the secondary has every position <= acked */
	__u8 _pad1[56];
	__u64 held_in;  /* written by guest_egress: frames ever sent to the hold queue */
	__u8 _pad2[56];
	__u64 released; /* written by the daemon: held frames ever released or dropped */
	__u8 _pad3[56];
	__u64 lease_until; /* written by the daemon: CLOCK_MONOTONIC ns until which the
			    * secondary cannot have declared this host failed; acked output
			    * leaves only before it (passthrough needs no lease) */
	__u8 _pad4[56];
	__u64 guest_taken; /* written by the guest (OWNER_F_GUEST_PACED): the frames it has
			    * taken from its tap, counted as its state counts its input */
	__u8 _pad5[56];
	__u64 input_base;  /* written by the daemon: guest_taken - input_base is the log
			    * position the guest has taken its input up to */
	__u8 _pad6[56];
};

/* One replication-log entry in the log ring: the header, then the frame. */
struct log_record {
	__u64 position;
	__u64 logged_ns; /* bpf_ktime_get_ns() when the frame was logged */
	__u32 len;
	__u32 _reserved;
};

/* XDP metadata in front of a held frame, read by the hold queue. */
struct hold_meta {
	__u64 stamp;      /* log head when the guest sent the frame */
	__u64 arrival_ns; /* bpf_ktime_get_ns() when it arrived on the tap */
};

struct latency_hist {
	__u64 buckets[LATENCY_BUCKETS];
	__u64 sum_ns;
};

struct counter_value {
	__u64 packets;
	__u64 bytes;
};

/* Every frame the programs handle ends in exactly one of these (or passes to
 * the host stack uncounted). Metric labels come from this list; keep
 * COUNTER__LEN last. */
enum counter {
	COUNTER_RX_LOGGED,         /* input for the VM, logged and delivered */
	COUNTER_RX_ENGINE_LOGS,    /* input for the VM, delivered to an engine that logs it */
	COUNTER_RX_LOG_FULL,       /* input dropped: no room in the log ring */
	COUNTER_RX_TOO_LONG,       /* input dropped: larger than MAX_FRAME */
	COUNTER_RX_STANDBY,        /* input dropped: this host is not active */
	COUNTER_RX_MALFORMED,      /* uplink frame shorter than an Ethernet header */
	COUNTER_RX_GUEST_BEHIND,   /* input dropped before logging: the guest is too far behind */
	COUNTER_TX_FAST,           /* output sent at once: nothing pending */
	COUNTER_TX_HELD,           /* output queued until its stamp is acknowledged */
	COUNTER_TX_HOLD_FULL,      /* output dropped: hold queue full */
	COUNTER_TX_NO_HOLD_SOCKET, /* output dropped: no hold queue attached */
	COUNTER_TX_SUPPRESSED,     /* output dropped: this host is not active */
	COUNTER_TX_MALFORMED,      /* output dropped: shorter than an Ethernet header */
	COUNTER_TX_META_FAILED,    /* output dropped: no room for the hold metadata */
	COUNTER_TX_RELEASE_REFUSED, /* a released output dropped at the uplink (uplink_egress):
				     * past the lease, or the host no longer serves */
	COUNTER__LEN,
};
