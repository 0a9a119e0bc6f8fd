//go:build ignore

/* The output-commit data path of one protected VM.
 *
 *   uplink_ingress   XDP on the host's uplink: frames for the VM go to the
 *                    serializer; everything else goes to the host stack.
 *   serialize_input  XDP on one CPU of a CPUMAP: gives each input frame its
 *                    log position, mirrors it into the log ring and delivers
 *                    it to the VM's tap, in that order, one frame at a time.
 *   guest_egress     XDP on the VM's tap: stamps each output with the log head;
 *                    sends it straight out when nothing is pending, else holds
 *                    it in the AF_XDP hold queue until the secondary acks.
 *   uplink_egress    TC egress on the uplink: the kernel's own check of the
 *                    VM's frames the hold queue releases, at the moment they
 *                    leave (see there).
 *   xdp_pass         for veth peers that must have a program for redirects
 *                    into them to be delivered (a veth quirk, lab only).
 *   count_blast      on the bench's client: counts the guest's BLAST frames
 *                    and drops them there (bench only).
 *
 * See docs/ARCHITECTURE.md for the whole picture. */

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/pkt_cls.h>
#include <bpf_helpers.h>
#include <bpf_endian.h>

#include "gateway.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* Set by the daemon before load. */
volatile const __u32 serializer_cpu = 0;
volatile const __u64 hold_capacity = 1024;
/* How far ahead of a paced guest (OWNER_F_GUEST_PACED) input may be logged:
 * less than its tap's queue, which drops what does not fit. */
volatile const __u64 guest_budget = 2048;

/* The shape of the inner map. Declared as a map of its own too, because
 * clang emits the BTF of owner_record only for top-level map definitions;
 * the daemon never uses this instance. */
struct owner_slot {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct owner_record);
} owner_template SEC(".maps");

/* Owned by pkg/vip: slot 0 holds a one-record inner map, replaced whole. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, 1);
	__type(key, __u32);
	__array(values, struct owner_slot);
} owner SEC(".maps");

/* Memory-mapped by the daemon; see struct log_state for who writes what. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct log_state);
} state SEC(".maps");

/* The replication log on its way to the daemon, which ships it to the
 * secondary. Its size is set by the daemon before load. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4 << 20);
} log_ring SEC(".maps");

/* One entry, at serializer_cpu, running serialize_input. The loader clamps
 * the size to the number of possible CPUs. */
struct {
	__uint(type, BPF_MAP_TYPE_CPUMAP);
	__uint(max_entries, 256);
	__type(key, __u32);
	__type(value, struct bpf_cpumap_val);
} serializer SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_DEVMAP);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} to_guest SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_DEVMAP);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} to_uplink SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_XSKMAP);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} hold_xsks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, COUNTER__LEN);
	__type(key, enum counter);
	__type(value, struct counter_value);
} counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct latency_hist);
} fast_latency SEC(".maps");

/* Never used at run time. clang emits BTF only for the types of map
 * definitions and functions, and these two are written by the kernel side and
 * read only by the daemon; bpf2go -type needs them in the object. */
struct daemon_types {
	struct log_record log_record;
	struct hold_meta hold_meta;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct daemon_types);
} daemon_types SEC(".maps");

#define READ_ONCE(x) (*(volatile typeof(x) *)&(x))
#define WRITE_ONCE(x, v) (*(volatile typeof(x) *)&(x) = (v))

static __always_inline void count(enum counter c, __u64 bytes)
{
	__u32 key = c;
	struct counter_value *v = bpf_map_lookup_elem(&counters, &key);

	if (v) {
		v->packets++;
		v->bytes += bytes;
	}
}

static __always_inline struct log_state *log_state(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&state, &zero);
}

/* The record stays valid for the whole run of the program even if the
 * daemon swaps in a new one meanwhile (the inner map is freed after RCU). */
static __always_inline struct owner_record *current_owner(void)
{
	__u32 zero = 0;
	void *slot = bpf_map_lookup_elem(&owner, &zero);

	if (!slot)
		return NULL;
	return bpf_map_lookup_elem(slot, &zero);
}

static __always_inline int mac_equal(const __u8 *a, const __u8 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3] &&
	       a[4] == b[4] && a[5] == b[5];
}

/* linux/if_arp.h drags in libc headers; the ARP layout is all we need. */
#define ARPHRD_ETHER 1

struct arp_ipv4 {
	__be16 ar_hrd;
	__be16 ar_pro;
	__u8 ar_hln;
	__u8 ar_pln;
	__be16 ar_op;
	__u8 sha[ETH_ALEN];
	__u8 spa[4];
	__u8 tha[ETH_ALEN];
	__u8 tpa[4];
};

/* Frames to the VM's MAC, and ARP requests asking for its IP (they are
 * broadcast, and the VM must see them to be found). */
static __always_inline int frame_for_vm(struct ethhdr *eth, void *data_end,
					const struct owner_record *own)
{
	if (mac_equal(eth->h_dest, own->vm_mac))
		return 1;
	if (eth->h_proto != bpf_htons(ETH_P_ARP))
		return 0;

	struct arp_ipv4 *arp = (void *)(eth + 1);
	if ((void *)(arp + 1) > data_end)
		return 0;
	if (arp->ar_hrd != bpf_htons(ARPHRD_ETHER) || arp->ar_pro != bpf_htons(ETH_P_IP) ||
	    arp->ar_hln != ETH_ALEN || arp->ar_pln != 4)
		return 0;

	__u32 target;
	__builtin_memcpy(&target, arp->tpa, sizeof(target));
	return target == own->vm_ip;
}

SEC("xdp")
int uplink_ingress(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u64 len = data_end - data;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > data_end) {
		count(COUNTER_RX_MALFORMED, len);
		return XDP_PASS;
	}

	struct owner_record *own = current_owner();
	if (!own || own->role == ROLE_NONE || !frame_for_vm(eth, data_end, own))
		return XDP_PASS;

	if (own->role != ROLE_ACTIVE) {
		count(COUNTER_RX_STANDBY, len);
		return XDP_DROP;
	}
	if (len > MAX_FRAME) {
		count(COUNTER_RX_TOO_LONG, len);
		return XDP_DROP;
	}

	/* Frames arriving on several CPUs (or uplink queues) at once would take
	 * log positions in one order and reach the tap in another; a replica fed
	 * the log would then diverge. One CPU does both steps for every frame. */
	return bpf_redirect_map(&serializer, serializer_cpu, XDP_DROP);
}

/* The ring's reservations must be of constant size, so a frame takes the
 * smallest of a few slot sizes that fits it. */
static __always_inline int log_into(struct xdp_md *ctx, struct log_state *st,
				    __u64 len, const __u32 slot)
{
	struct log_record *rec = bpf_ringbuf_reserve(&log_ring, sizeof(*rec) + slot, 0);

	if (!rec) {
		count(COUNTER_RX_LOG_FULL, len);
		return -1;
	}
	/* Restate the bound where the verifier can see it next to the copy. */
	asm volatile("" : "+r"(len));
	if (len < 1 || len > slot ||
	    bpf_xdp_load_bytes(ctx, 0, (void *)(rec + 1), len)) {
		bpf_ringbuf_discard(rec, 0);
		count(COUNTER_RX_MALFORMED, len);
		return -1;
	}

	/* Only this program, on one CPU, writes the head: no atomics needed, but
	 * readers on other CPUs must see a whole value. */
	__u64 position = st->head + 1;
	rec->position = position;
	rec->logged_ns = bpf_ktime_get_ns();
	rec->len = len;
	rec->_reserved = 0;
	WRITE_ONCE(st->head, position);
	bpf_ringbuf_submit(rec, 0);
	return 0;
}

static __always_inline int log_frame(struct xdp_md *ctx, struct log_state *st, __u64 len)
{
	if (len <= 128)
		return log_into(ctx, st, len, 128);
	if (len <= 256)
		return log_into(ctx, st, len, 256);
	if (len <= 512)
		return log_into(ctx, st, len, 512);
	if (len <= 1024)
		return log_into(ctx, st, len, 1024);
	if (len <= 1536)
		return log_into(ctx, st, len, 1536);
	if (len <= 2048)
		return log_into(ctx, st, len, 2048);
	if (len <= 4096)
		return log_into(ctx, st, len, 4096);
	if (len <= MAX_FRAME)
		return log_into(ctx, st, len, MAX_FRAME);
	count(COUNTER_RX_TOO_LONG, len);
	return -1;
}

SEC("xdp/cpumap")
int serialize_input(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u64 len = data_end - data;

	/* The role may have changed since uplink_ingress looked. */
	struct owner_record *own = current_owner();
	if (!own || own->role != ROLE_ACTIVE) {
		count(COUNTER_RX_STANDBY, len);
		return XDP_DROP;
	}
	if (len < sizeof(struct ethhdr)) {
		count(COUNTER_RX_MALFORMED, len);
		return XDP_DROP;
	}

	/* QEMU records the frame in its replay log when the guest takes it;
	 * the order of delivery is still this CPU's. */
	if (own->flags & OWNER_F_ENGINE_LOGS) {
		count(COUNTER_RX_ENGINE_LOGS, len);
		return bpf_redirect_map(&to_guest, 0, XDP_DROP);
	}

	struct log_state *st = log_state();
	if (!st)
		return XDP_ABORTED;

	/* The tap drops what its queue cannot take, after the frame was logged:
	 * the secondary's guest would take a frame this one never saw. A paced
	 * guest is kept within guest_budget frames of the log's head instead;
	 * what would go further is dropped unlogged, as the network drops. */
	if ((own->flags & OWNER_F_GUEST_PACED) &&
	    READ_ONCE(st->head) - (READ_ONCE(st->guest_taken) - READ_ONCE(st->input_base)) >= guest_budget) {
		count(COUNTER_RX_GUEST_BEHIND, len);
		return XDP_DROP;
	}

	/* A frame the log does not hold must never reach the guest. */
	if (log_frame(ctx, st, len))
		return XDP_DROP;

	count(COUNTER_RX_LOGGED, len);
	return bpf_redirect_map(&to_guest, 0, XDP_DROP);
}

static __always_inline void observe_fast_latency(__u64 ns)
{
	__u32 zero = 0;
	struct latency_hist *h = bpf_map_lookup_elem(&fast_latency, &zero);

	if (!h)
		return;

	/* Bit length of ns: the bucket whose bound 2^i exceeds it. */
	__u64 v = ns;
	__u32 bits = 0;
	if (v >> 32) { bits += 32; v >>= 32; }
	if (v >> 16) { bits += 16; v >>= 16; }
	if (v >> 8) { bits += 8; v >>= 8; }
	if (v >> 4) { bits += 4; v >>= 4; }
	if (v >> 2) { bits += 2; v >>= 2; }
	if (v >> 1) { bits += 1; v >>= 1; }
	bits += v;
	if (bits >= LATENCY_BUCKETS)
		bits = LATENCY_BUCKETS - 1;

	h->buckets[bits]++;
	h->sum_ns += ns;
}

SEC("xdp")
int guest_egress(struct xdp_md *ctx)
{
	__u64 arrival = bpf_ktime_get_ns();
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u64 len = data_end - data;

	if (data + sizeof(struct ethhdr) > data_end) {
		count(COUNTER_TX_MALFORMED, len);
		return XDP_DROP;
	}

	/* Output leaves only from the active host (or one draining its last
	 * outputs before a planned handover). */
	struct owner_record *own = current_owner();
	if (!own || (own->role != ROLE_ACTIVE && own->role != ROLE_DRAINING)) {
		count(COUNTER_TX_SUPPRESSED, len);
		return XDP_DROP;
	}

	struct log_state *st = log_state();
	if (!st)
		return XDP_ABORTED;

	/* The stamp covers every input logged so far, so every input that can
	 * have influenced this frame. */
	__u64 stamp = READ_ONCE(st->head);
	__u64 pending = READ_ONCE(st->held_in) - READ_ONCE(st->released);

	/* While anything is held, later frames queue behind it: order per VM.
	 * An acked frame leaves at once only under the lease: past it, the
	 * secondary may have taken over, and this host (paused, cut off) must
	 * not release for the VM beside it. */
	if (pending == 0 && !(own->flags & OWNER_F_HOLD_ALL) &&
	    ((own->flags & OWNER_F_PASSTHROUGH) ||
	     (stamp <= READ_ONCE(st->acked) && arrival < READ_ONCE(st->lease_until)))) {
		count(COUNTER_TX_FAST, len);
		observe_fast_latency(bpf_ktime_get_ns() - arrival);
		return bpf_redirect_map(&to_uplink, 0, XDP_DROP);
	}

	if (pending >= hold_capacity) {
		count(COUNTER_TX_HOLD_FULL, len);
		return XDP_DROP;
	}
	__u32 zero = 0;
	if (!bpf_map_lookup_elem(&hold_xsks, &zero)) {
		count(COUNTER_TX_NO_HOLD_SOCKET, len);
		return XDP_DROP;
	}
	if (bpf_xdp_adjust_meta(ctx, -(int)sizeof(struct hold_meta))) {
		count(COUNTER_TX_META_FAILED, len);
		return XDP_DROP;
	}

	struct hold_meta *meta = (void *)(long)ctx->data_meta;
	data = (void *)(long)ctx->data;
	if ((void *)(meta + 1) > data) {
		count(COUNTER_TX_META_FAILED, len);
		return XDP_DROP;
	}
	meta->stamp = stamp;
	meta->arrival_ns = arrival;

	__sync_fetch_and_add(&st->held_in, 1);
	count(COUNTER_TX_HELD, len);
	return bpf_redirect_map(&hold_xsks, 0, XDP_DROP);
}

/* The hold queue releases frames through a packet socket on the uplink, and
 * checks the lease before it does. That check cannot be the last word: a
 * daemon stopped (SIGSTOP, a stall) after it and before the send would send
 * when it resumes, past the lease, beside a secondary that took over. The
 * send goes through this program inside the same system call, which a
 * signal cannot split: the VM's frames leave only while the host serves and
 * holds the lease, or serves alone. guest_egress's redirects do not pass
 * here; they are checked there. */
SEC("tc")
int uplink_egress(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > data_end)
		return TC_ACT_OK;
	struct owner_record *own = current_owner();
	if (!own || own->role == ROLE_NONE || !mac_equal(eth->h_source, own->vm_mac))
		return TC_ACT_OK;
	struct log_state *st = log_state();
	if (st && (own->role == ROLE_ACTIVE || own->role == ROLE_DRAINING) &&
	    ((own->flags & OWNER_F_PASSTHROUGH) || bpf_ktime_get_ns() < READ_ONCE(st->lease_until)))
		return TC_ACT_OK;
	count(COUNTER_TX_RELEASE_REFUSED, skb->len);
	return TC_ACT_SHOT;
}

SEC("xdp")
int xdp_pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}

/* Bench only: the guest's BLAST frames (EtherType 0x88b5) that reached the
 * client. Counting them by type, not by the interface's received packets,
 * keeps a stray ARP from hiding a lost frame; dropping them at once keeps
 * the client's own stack from being what limits the rate measured. */
#define BLAST_ETHERTYPE 0x88b5

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} blast_received SEC(".maps");

SEC("xdp")
int count_blast(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	__u32 zero = 0;

	if ((void *)(eth + 1) > data_end || eth->h_proto != bpf_htons(BLAST_ETHERTYPE))
		return XDP_PASS;
	__u64 *n = bpf_map_lookup_elem(&blast_received, &zero);
	if (n)
		(*n)++;
	return XDP_DROP;
}
