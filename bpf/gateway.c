//go:build ignore

/* The output-commit data path of the VMs a host protects.
 *
 *   uplink_ingress   XDP on the host's uplink: frames for a VM go to the
 *                    serializer; everything else goes to the host stack.
 *   serialize_input  XDP on one CPU of a CPUMAP: gives each input frame its
 *                    VM's next log position, mirrors it into that VM's log
 *                    ring and delivers it to the VM's tap, in that order, one
 *                    frame at a time.
 *   guest_egress     XDP on each VM's tap: stamps each output with the log head;
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

/* Every VM a host protects has a slot, 0 to MAX_VMS-1, chosen by the daemon;
 * each per-VM map below is indexed by it. The three index maps find a
 * frame's slot: by the tap it came from, by the destination (or source) MAC,
 * or, for ARP, by the IP asked for. A frame that no index names is not a
 * VM's and goes to the host stack untouched. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_VMS);
	__type(key, __u32); /* the tap's ifindex */
	__type(value, __u32);
} vm_by_tap SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_VMS);
	__type(key, __u64); /* the MAC in the first six bytes, zero-padded */
	__type(value, __u32);
} vm_by_mac SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_VMS);
	__type(key, __u32); /* network byte order */
	__type(value, __u32);
} vm_by_ip SEC(".maps");

/* The shape of the inner map. Declared as a map of its own too, because
 * clang emits the BTF of owner_record only for top-level map definitions;
 * the daemon never uses this instance. */
struct owner_slot {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct owner_record);
} owner_template SEC(".maps");

/* Owned by pkg/vip: a VM's slot holds a one-record inner map, replaced whole. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, MAX_VMS);
	__type(key, __u32);
	__array(values, struct owner_slot);
} owner SEC(".maps");

/* A VM's log positions: a map of its own, so that the daemon, the guest and
 * QEMU's preloaded library each memory-map exactly one VM's state at offset
 * 0. See struct log_state for who writes what. */
struct state_slot {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct log_state);
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, MAX_VMS);
	__type(key, __u32);
	__array(values, struct state_slot);
} state SEC(".maps");

/* Each VM's replication log on its way to the daemon, which ships it to the
 * secondary: one ring per VM, so one VM's burst never fills another's. The
 * size is set by the daemon before load. */
struct log_ring_slot {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4 << 20);
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, MAX_VMS);
	__type(key, __u32);
	__array(values, struct log_ring_slot);
} log_rings SEC(".maps");

/* One entry, at serializer_cpu, running serialize_input. The loader clamps
 * the size to the number of possible CPUs. */
struct {
	__uint(type, BPF_MAP_TYPE_CPUMAP);
	__uint(max_entries, 256);
	__type(key, __u32);
	__type(value, struct bpf_cpumap_val);
} serializer SEC(".maps");

/* Each VM's tap, by slot. */
struct {
	__uint(type, BPF_MAP_TYPE_DEVMAP);
	__uint(max_entries, MAX_VMS);
	__type(key, __u32);
	__type(value, __u32);
} to_guest SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_DEVMAP);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} to_uplink SEC(".maps");

/* Each VM's hold queue socket, bound to its tap, by slot. */
struct {
	__uint(type, BPF_MAP_TYPE_XSKMAP);
	__uint(max_entries, MAX_VMS);
	__type(key, __u32);
	__type(value, __u32);
} hold_xsks SEC(".maps");

/* Counter c of the VM in slot s is at s * COUNTER__LEN + c. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MAX_VMS * COUNTER__LEN);
	__type(key, __u32);
	__type(value, struct counter_value);
} counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MAX_VMS);
	__type(key, __u32);
	__type(value, struct latency_hist);
} fast_latency SEC(".maps");

/* Never used at run time. clang emits BTF only for the types of map
 * definitions and functions, and these are written by the kernel side and
 * read only by the daemon (or live in inner maps); bpf2go -type needs them
 * in the object. */
struct daemon_types {
	struct log_record log_record;
	struct hold_meta hold_meta;
	struct log_state log_state;
	enum counter counter;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct daemon_types);
} daemon_types SEC(".maps");

#define READ_ONCE(x) (*(volatile typeof(x) *)&(x))
#define WRITE_ONCE(x, v) (*(volatile typeof(x) *)&(x) = (v))

static __always_inline void count(__u32 slot, enum counter c, __u64 bytes)
{
	__u32 key = slot * COUNTER__LEN + c;
	struct counter_value *v = bpf_map_lookup_elem(&counters, &key);

	if (v) {
		v->packets++;
		v->bytes += bytes;
	}
}

static __always_inline struct log_state *log_state(__u32 slot)
{
	__u32 zero = 0;
	void *inner = bpf_map_lookup_elem(&state, &slot);

	if (!inner)
		return NULL;
	return bpf_map_lookup_elem(inner, &zero);
}

/* The record stays valid for the whole run of the program even if the
 * daemon swaps in a new one meanwhile (the inner map is freed after RCU). */
static __always_inline struct owner_record *current_owner(__u32 slot)
{
	__u32 zero = 0;
	void *inner = bpf_map_lookup_elem(&owner, &slot);

	if (!inner)
		return NULL;
	return bpf_map_lookup_elem(inner, &zero);
}

static __always_inline __u64 mac_key(const __u8 *mac)
{
	__u64 key = 0;

	__builtin_memcpy(&key, mac, ETH_ALEN);
	return key;
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

/* The slot of the VM a frame from the uplink is for: frames to its MAC, and
 * ARP requests asking for its IP (they are broadcast, and the VM must see
 * them to be found). The index only finds the slot; the VM's owner record,
 * which the daemon publishes after the index, has the last word. */
static __always_inline int vm_for_frame(struct ethhdr *eth, void *data_end, __u32 *slot,
					struct owner_record **own)
{
	__u64 mac = mac_key(eth->h_dest);
	__u32 *found = bpf_map_lookup_elem(&vm_by_mac, &mac);
	__u32 target = 0;

	if (!found) {
		if (eth->h_proto != bpf_htons(ETH_P_ARP))
			return 0;
		struct arp_ipv4 *arp = (void *)(eth + 1);
		if ((void *)(arp + 1) > data_end)
			return 0;
		if (arp->ar_hrd != bpf_htons(ARPHRD_ETHER) || arp->ar_pro != bpf_htons(ETH_P_IP) ||
		    arp->ar_hln != ETH_ALEN || arp->ar_pln != 4)
			return 0;
		__builtin_memcpy(&target, arp->tpa, sizeof(target));
		found = bpf_map_lookup_elem(&vm_by_ip, &target);
		if (!found)
			return 0;
	}
	*slot = *found;
	*own = current_owner(*slot);
	if (!*own || (*own)->role == ROLE_NONE)
		return 0;
	return mac_equal(eth->h_dest, (*own)->vm_mac) || target == (*own)->vm_ip;
}

SEC("xdp")
int uplink_ingress(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u64 len = data_end - data;
	struct ethhdr *eth = data;
	struct owner_record *own;
	__u32 slot;

	/* Too short to be anyone's: the host stack counts it. */
	if ((void *)(eth + 1) > data_end)
		return XDP_PASS;
	if (!vm_for_frame(eth, data_end, &slot, &own))
		return XDP_PASS;

	if (own->role != ROLE_ACTIVE) {
		count(slot, COUNTER_RX_STANDBY, len);
		return XDP_DROP;
	}
	if (len > MAX_FRAME) {
		count(slot, COUNTER_RX_TOO_LONG, len);
		return XDP_DROP;
	}

	/* Frames arriving on several CPUs (or uplink queues) at once would take
	 * log positions in one order and reach the tap in another; a replica fed
	 * the log would then diverge. One CPU does both steps for every frame. */
	return bpf_redirect_map(&serializer, serializer_cpu, XDP_DROP);
}

/* The ring's reservations must be of constant size, so a frame takes the
 * smallest of a few slot sizes that fits it. */
static __always_inline int log_into(struct xdp_md *ctx, __u32 vm, void *ring,
				    struct log_state *st, __u64 len, const __u32 size)
{
	struct log_record *rec = bpf_ringbuf_reserve(ring, sizeof(*rec) + size, 0);

	if (!rec) {
		count(vm, COUNTER_RX_LOG_FULL, len);
		return -1;
	}
	/* Restate the bound where the verifier can see it next to the copy. */
	asm volatile("" : "+r"(len));
	if (len < 1 || len > size ||
	    bpf_xdp_load_bytes(ctx, 0, (void *)(rec + 1), len)) {
		bpf_ringbuf_discard(rec, 0);
		count(vm, COUNTER_RX_MALFORMED, len);
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

static __always_inline int log_frame(struct xdp_md *ctx, __u32 vm, struct log_state *st, __u64 len)
{
	void *ring = bpf_map_lookup_elem(&log_rings, &vm);

	if (!ring) {
		count(vm, COUNTER_RX_LOG_FULL, len);
		return -1;
	}
	if (len <= 128)
		return log_into(ctx, vm, ring, st, len, 128);
	if (len <= 256)
		return log_into(ctx, vm, ring, st, len, 256);
	if (len <= 512)
		return log_into(ctx, vm, ring, st, len, 512);
	if (len <= 1024)
		return log_into(ctx, vm, ring, st, len, 1024);
	if (len <= 1536)
		return log_into(ctx, vm, ring, st, len, 1536);
	if (len <= 2048)
		return log_into(ctx, vm, ring, st, len, 2048);
	if (len <= 4096)
		return log_into(ctx, vm, ring, st, len, 4096);
	if (len <= MAX_FRAME)
		return log_into(ctx, vm, ring, st, len, MAX_FRAME);
	count(vm, COUNTER_RX_TOO_LONG, len);
	return -1;
}

SEC("xdp/cpumap")
int serialize_input(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u64 len = data_end - data;
	struct ethhdr *eth = data;
	struct owner_record *own;
	__u32 slot;

	/* uplink_ingress found the VM; the frame itself is all a CPUMAP passes
	 * on, so find it again. */
	if ((void *)(eth + 1) > data_end || !vm_for_frame(eth, data_end, &slot, &own))
		return XDP_DROP;
	/* The role may have changed since uplink_ingress looked. */
	if (own->role != ROLE_ACTIVE) {
		count(slot, COUNTER_RX_STANDBY, len);
		return XDP_DROP;
	}

	/* QEMU records the frame in its replay log when the guest takes it;
	 * the order of delivery is still this CPU's. */
	if (own->flags & OWNER_F_ENGINE_LOGS) {
		count(slot, COUNTER_RX_ENGINE_LOGS, len);
		return bpf_redirect_map(&to_guest, slot, XDP_DROP);
	}

	struct log_state *st = log_state(slot);
	if (!st)
		return XDP_ABORTED;

	/* The tap drops what its queue cannot take, after the frame was logged:
	 * the secondary's guest would take a frame this one never saw. A paced
	 * guest is kept within guest_budget frames of the log's head instead;
	 * what would go further is dropped unlogged, as the network drops. */
	if ((own->flags & OWNER_F_GUEST_PACED) &&
	    READ_ONCE(st->head) - (READ_ONCE(st->guest_taken) - READ_ONCE(st->input_base)) >= guest_budget) {
		count(slot, COUNTER_RX_GUEST_BEHIND, len);
		return XDP_DROP;
	}

	/* A frame the log does not hold must never reach the guest. */
	if (log_frame(ctx, slot, st, len))
		return XDP_DROP;

	count(slot, COUNTER_RX_LOGGED, len);
	return bpf_redirect_map(&to_guest, slot, XDP_DROP);
}

static __always_inline void observe_fast_latency(__u32 slot, __u64 ns)
{
	struct latency_hist *h = bpf_map_lookup_elem(&fast_latency, &slot);

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
	__u32 ifindex = ctx->ingress_ifindex;
	__u32 *found = bpf_map_lookup_elem(&vm_by_tap, &ifindex);

	/* A tap no VM was given to: nothing of it may leave. */
	if (!found)
		return XDP_DROP;
	__u32 slot = *found;

	if (data + sizeof(struct ethhdr) > data_end) {
		count(slot, COUNTER_TX_MALFORMED, len);
		return XDP_DROP;
	}

	/* Output leaves only from the active host (or one draining its last
	 * outputs before a planned handover). */
	struct owner_record *own = current_owner(slot);
	if (!own || (own->role != ROLE_ACTIVE && own->role != ROLE_DRAINING)) {
		count(slot, COUNTER_TX_SUPPRESSED, len);
		return XDP_DROP;
	}

	struct log_state *st = log_state(slot);
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
		count(slot, COUNTER_TX_FAST, len);
		observe_fast_latency(slot, bpf_ktime_get_ns() - arrival);
		return bpf_redirect_map(&to_uplink, 0, XDP_DROP);
	}

	if (pending >= hold_capacity) {
		count(slot, COUNTER_TX_HOLD_FULL, len);
		return XDP_DROP;
	}
	if (!bpf_map_lookup_elem(&hold_xsks, &slot)) {
		count(slot, COUNTER_TX_NO_HOLD_SOCKET, len);
		return XDP_DROP;
	}
	if (bpf_xdp_adjust_meta(ctx, -(int)sizeof(struct hold_meta))) {
		count(slot, COUNTER_TX_META_FAILED, len);
		return XDP_DROP;
	}

	struct hold_meta *meta = (void *)(long)ctx->data_meta;
	data = (void *)(long)ctx->data;
	if ((void *)(meta + 1) > data) {
		count(slot, COUNTER_TX_META_FAILED, len);
		return XDP_DROP;
	}
	meta->stamp = stamp;
	meta->arrival_ns = arrival;

	__sync_fetch_and_add(&st->held_in, 1);
	count(slot, COUNTER_TX_HELD, len);
	return bpf_redirect_map(&hold_xsks, slot, XDP_DROP);
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
	__u64 mac = mac_key(eth->h_source);
	__u32 *found = bpf_map_lookup_elem(&vm_by_mac, &mac);
	if (!found)
		return TC_ACT_OK;
	__u32 slot = *found;
	struct owner_record *own = current_owner(slot);
	if (!own || own->role == ROLE_NONE || !mac_equal(eth->h_source, own->vm_mac))
		return TC_ACT_OK;
	struct log_state *st = log_state(slot);
	if (st && (own->role == ROLE_ACTIVE || own->role == ROLE_DRAINING) &&
	    ((own->flags & OWNER_F_PASSTHROUGH) || bpf_ktime_get_ns() < READ_ONCE(st->lease_until)))
		return TC_ACT_OK;
	count(slot, COUNTER_TX_RELEASE_REFUSED, skb->len);
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
