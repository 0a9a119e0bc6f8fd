/* ftgw-rr.so: preloaded into the primary's QEMU (LD_PRELOAD) to close the
 * Output Rule hole of QEMU's record/replay log.
 *
 * QEMU writes its replay log through stdio and never flushes it: the last few
 * KiB of log, the part that produced a transmit, may sit in QEMU's buffer
 * while the frame is already on the wire. The gateway stamps each transmit
 * with the log head, so the head must cover every log byte QEMU wrote before
 * the frame. This library makes that so:
 *
 *   - The replay log file (FTGW_LOG_PATH, QEMU's rrfile) is opened as a
 *     stdio cookie stream whose bytes go to the daemon's pipe (FTGW_LOG_FD).
 *     After each write reaches the pipe, the byte count is stored in the
 *     gateway's memory-mapped log state (FTGW_STATE_FD) as the head.
 *   - Before QEMU writes a frame to the VM's tap (FTGW_TAP_FD), the log is
 *     flushed. The frame's XDP stamp, read in the same syscall afterwards,
 *     therefore covers every log byte recorded before it.
 *
 * Positions are byte offsets in the stream of replay events, after QEMU's
 * file header (which QEMU writes last, at exit, and which is not sent),
 * starting at FTGW_LOG_BASE (default 0) so that a VM restarted from a
 * snapshot continues its host's positions.
 *
 * Without FTGW_LOG_PATH in the environment the library does nothing, unless
 * FTGW_TRACE_FD is set (below).
 *
 * FTGW_TRACE_FD (optional, with FTGW_TAP_FD): a shared memory file (struct
 * rr_trace, below) where the library notes, for each frame written to the
 * tap, when QEMU last read a frame from the tap before it and when the
 * flush started and ended. `ftgw bench` joins these with the client's and
 * the daemon's timestamps to break a request's time down. It is also set
 * for the bench's unprotected QEMU, which has no replay log: there the
 * library only takes the timestamps.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "../bpf/gateway.h"

static const char *log_path;
static int log_fd = -1;
static int tap_fd = -1;
static struct log_state *state;

static FILE *replay_log;

/* The trace shared with the daemon (FTGW_TRACE_FD). Layout, all fields
 * native-endian u64 (cmd/ftgw/reqtrace.go reads it):
 *   magic, count of entries ever written, then RR_TRACE_LEN entries.
 * An entry's seq (its index + 1) is stored last, with release order: a
 * reader that sees seq before and after reading the fields, unchanged,
 * has a whole entry. */
#define RR_TRACE_MAGIC 0x66746777727274ull /* "ftgwrrt" */
#define RR_TRACE_LEN 8192
struct rr_trace_entry {
	uint64_t seq;
	uint64_t input_ns;       /* the last tap read before this write */
	uint64_t flush_start_ns; /* the flush before the write (0 ns long without a log) */
	uint64_t flush_end_ns;
	uint64_t head;           /* the log head after the flush */
};
struct rr_trace {
	uint64_t magic;
	uint64_t count;
	struct rr_trace_entry e[RR_TRACE_LEN];
};
static struct rr_trace *trace;
static uint64_t last_input_ns; /* written by the thread that reads the tap */
/* The stream as QEMU sees it: a file whose event data starts where its first
 * seek put it. Bytes written at the end of the data are sent; a rewrite of
 * earlier bytes (the header, at exit) is dropped. */
static int64_t data_start = -1; /* file offset of the first event byte */
static int64_t file_pos;
static uint64_t sent;           /* event bytes in the pipe */
static uint64_t base;           /* FTGW_LOG_BASE */

static ssize_t (*real_write)(int, const void *, size_t);
static ssize_t (*real_read)(int, void *, size_t);
static ssize_t (*real_writev)(int, const struct iovec *, int);
static FILE *(*real_fopen64)(const char *, const char *);
static FILE *(*real_fopen)(const char *, const char *);

static void die(const char *what)
{
	fprintf(stderr, "ftgw-rr: %s: %s\n", what, strerror(errno));
	abort();
}

static int env_fd(const char *name)
{
	const char *v = getenv(name);
	if (!v)
		return -1;
	return atoi(v);
}

/* Other libraries' constructors may write before ours runs. */
static void resolve(void)
{
	if (real_write)
		return;
	real_writev = dlsym(RTLD_NEXT, "writev");
	real_read = dlsym(RTLD_NEXT, "read");
	real_fopen64 = dlsym(RTLD_NEXT, "fopen64");
	real_fopen = dlsym(RTLD_NEXT, "fopen");
	__atomic_store_n(&real_write, dlsym(RTLD_NEXT, "write"), __ATOMIC_RELEASE);
}

__attribute__((constructor)) static void init(void)
{
	resolve();
	int trace_fd = env_fd("FTGW_TRACE_FD");
	if (trace_fd >= 0) {
		trace = mmap(NULL, sizeof(*trace), PROT_READ | PROT_WRITE, MAP_SHARED, trace_fd, 0);
		if (trace == MAP_FAILED)
			die("mmap the request trace");
		close(trace_fd);
		tap_fd = env_fd("FTGW_TAP_FD");
		trace->magic = RR_TRACE_MAGIC;
	}
	log_path = getenv("FTGW_LOG_PATH");
	if (!log_path)
		return;
	log_fd = env_fd("FTGW_LOG_FD");
	tap_fd = env_fd("FTGW_TAP_FD");
	int state_fd = env_fd("FTGW_STATE_FD");
	const char *b = getenv("FTGW_LOG_BASE");
	base = b ? strtoull(b, NULL, 10) : 0;
	if (log_fd < 0 || tap_fd < 0 || state_fd < 0) {
		errno = EINVAL;
		die("FTGW_LOG_FD, FTGW_TAP_FD and FTGW_STATE_FD must be set");
	}
	long page = sysconf(_SC_PAGESIZE);
	size_t len = (sizeof(struct log_state) + page - 1) / page * page;
	state = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, state_fd, 0);
	if (state == MAP_FAILED)
		die("mmap the gateway's log state");
	close(state_fd);
	__atomic_store_n(&state->head, base, __ATOMIC_RELEASE);
}

static ssize_t log_write(void *cookie, const char *buf, size_t n)
{
	(void)cookie;
	if (data_start < 0)
		data_start = file_pos;
	int64_t end = data_start + (int64_t)sent;
	if (file_pos != end) {
		/* Not at the end of the data: QEMU rewriting its header. */
		file_pos += n;
		return n;
	}
	for (size_t done = 0; done < n;) {
		ssize_t w = real_write(log_fd, buf + done, n - done);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			/* The daemon is gone; QEMU must not run on unlogged. */
			die("write the replay log to the daemon");
		}
		done += w;
	}
	sent += n;
	file_pos += n;
	/* Published only once the bytes are in the pipe: a stamp never
	 * promises log the daemon cannot read. */
	__atomic_store_n(&state->head, base + sent, __ATOMIC_RELEASE);
	return n;
}

static int log_seek(void *cookie, off64_t *off, int whence)
{
	(void)cookie;
	int64_t end = (data_start < 0 ? 0 : data_start) + (int64_t)sent;
	int64_t to;
	switch (whence) {
	case SEEK_SET:
		to = *off;
		break;
	case SEEK_CUR:
		to = file_pos + *off;
		break;
	case SEEK_END:
		to = end + *off;
		break;
	default:
		errno = EINVAL;
		return -1;
	}
	if (to < 0) {
		errno = EINVAL;
		return -1;
	}
	/* QEMU's first seek skips the header it writes at exit: the data
	 * starts there. */
	if (data_start < 0 && sent == 0)
		data_start = to;
	file_pos = to;
	*off = to;
	return 0;
}

static FILE *open_log(void)
{
	if (replay_log) {
		errno = EBUSY;
		return NULL;
	}
	cookie_io_functions_t io = {.write = log_write, .seek = log_seek};
	replay_log = fopencookie(NULL, "w", io);
	return replay_log;
}

static int is_log(const char *path, const char *mode)
{
	return log_path && path && strcmp(path, log_path) == 0 && mode[0] == 'w';
}

FILE *fopen64(const char *path, const char *mode)
{
	resolve();
	return is_log(path, mode) ? open_log() : real_fopen64(path, mode);
}

FILE *fopen(const char *path, const char *mode)
{
	resolve();
	return is_log(path, mode) ? open_log() : real_fopen(path, mode);
}

/* What the flushes cost, reported at exit: how many there were, how many
 * found log bytes to send, the time spent in them, and how that time is
 * spread (flush_log2[i] counts flushes of 2^i to 2^(i+1) ns). */
static uint64_t flushes, flushes_sent, flush_ns, flush_log2[64];

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* note_tap_write adds one entry to the trace. Tap writes come from one
 * thread at a time (QEMU's lock). */
static void note_tap_write(uint64_t flush_start, uint64_t flush_end)
{
	uint64_t n = trace->count;
	struct rr_trace_entry *e = &trace->e[n % RR_TRACE_LEN];
	__atomic_store_n(&e->seq, 0, __ATOMIC_RELAXED);
	__atomic_thread_fence(__ATOMIC_RELEASE);
	e->input_ns = __atomic_load_n(&last_input_ns, __ATOMIC_RELAXED);
	e->flush_start_ns = flush_start;
	e->flush_end_ns = flush_end;
	e->head = state ? __atomic_load_n(&state->head, __ATOMIC_ACQUIRE) : 0;
	__atomic_store_n(&e->seq, n + 1, __ATOMIC_RELEASE);
	__atomic_store_n(&trace->count, n + 1, __ATOMIC_RELEASE);
}

/* Everything recorded so far reaches the pipe (and the head) before the
 * frame reaches the tap. fflush takes the stream's lock, so a vCPU thread
 * appending events meanwhile is not torn. */
static void flush_before_tap(int fd)
{
	if (fd != tap_fd || tap_fd < 0)
		return;
	if (!replay_log) {
		if (trace) {
			uint64_t t = now_ns();
			note_tap_write(t, t);
		}
		return;
	}
	uint64_t before = sent, start = now_ns();
	if (fflush(replay_log) != 0)
		die("flush the replay log");
	/* Tap writes come from one thread at a time (QEMU's lock), so
	 * plain counters do. */
	uint64_t end = now_ns(), took = end - start;
	if (trace)
		note_tap_write(start, end);
	flush_ns += took;
	flush_log2[took ? 63 - __builtin_clzll(took) : 0]++;
	flushes++;
	if (sent != before)
		flushes_sent++;
}

/* The time under which a share of the flushes took (to a power of two). */
static uint64_t flush_quantile(double q)
{
	uint64_t seen = 0;
	for (int i = 0; i < 64; i++) {
		seen += flush_log2[i];
		if (seen >= q * flushes)
			return 2ull << i;
	}
	return 0;
}

__attribute__((destructor)) static void report_flushes(void)
{
	if (flushes)
		fprintf(stderr, "ftgw-rr: %" PRIu64 " flushes before tap writes, %" PRIu64
			" of them sent log bytes; %" PRIu64 " ns in all, mean %" PRIu64
			" ns, p50 < %" PRIu64 " ns, p99 < %" PRIu64 " ns\n",
			flushes, flushes_sent, flush_ns, flush_ns / flushes,
			flush_quantile(0.5), flush_quantile(0.99));
}

ssize_t write(int fd, const void *buf, size_t n)
{
	resolve();
	flush_before_tap(fd);
	return real_write(fd, buf, n);
}

ssize_t writev(int fd, const struct iovec *iov, int iovcnt)
{
	resolve();
	flush_before_tap(fd);
	return real_writev(fd, iov, iovcnt);
}

/* QEMU's tap backend reads each frame with read(2) (net/tap-linux.c). */
ssize_t read(int fd, void *buf, size_t n)
{
	resolve();
	ssize_t r = real_read(fd, buf, n);
	if (trace && fd == tap_fd && r > 0)
		__atomic_store_n(&last_input_ns, now_ns(), __ATOMIC_RELAXED);
	return r;
}
