/* The demo guest's "hardware": deterministic vCPU workloads.  See guest.h. */
#define _GNU_SOURCE
#include <stdint.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <limits.h>
#include <pthread.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <errno.h>
#include <unistd.h>

#include "wire.h"
#include "stats.h"
#include "guest.h"
#include "common.h"

#define WORDS_PER_PAGE (PAGE / 8)
#define ZERO_EXTENT_PAGES 32
/* Only an access slower than this pays for a getrusage() (about 0.25 µs
 * here), which tells whether the thread slept during it.  Below it: cache
 * and TLB misses, and three in four copy-on-write faults.  No thread sleeps
 * and wakes again this fast (the quickest measured: 7 µs). */
#define STALL_THRESHOLD_NS 2000

static inline uint64_t splitmix(uint64_t x)
{
    x += 0x9E3779B97F4A7C15ULL;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}

static inline uint64_t xorshift(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;
    return x * 0x2545F4914F6CDD1DULL;
}

/* Uniform index in [0, n) from 32 random bits, without a division. */
static inline uint64_t below(uint64_t r32, uint64_t n)
{
    return (r32 * n) >> 32;
}

/* Timed accesses read the TSC directly: cheaper than clock_gettime(), and a
 * fault still shows in full (the access completes only after it). */
#if defined(__x86_64__) || defined(__i386__)
#include <x86intrin.h>
static inline uint64_t ticks(void) { return __rdtsc(); }
#else
static inline uint64_t ticks(void) { return mono_ns(); }
#endif

static double ns_per_tick = 1.0;
static uint64_t base_ns, base_tick;
static pthread_once_t calibrated = PTHREAD_ONCE_INIT;

static void calibrate(void)
{
    uint64_t t0 = mono_ns(), c0 = ticks(), t1;
    while ((t1 = mono_ns()) - t0 < 2000000) /* 2 ms, once per process, before a vCPU starts */
        ;
    uint64_t c1 = ticks();
    ns_per_tick = c1 > c0 ? (double)(t1 - t0) / (double)(c1 - c0) : 1.0;
    base_ns = t1;
    base_tick = c1;
}

static inline uint64_t tick_ns(uint64_t t)
{
    return base_ns + (uint64_t)((double)(t - base_tick) * ns_per_tick);
}

void guest_fill(uint64_t base, uint64_t first, uint64_t count, uint64_t seed, uint32_t zero_permille)
{
    for (uint64_t p = first; p < first + count; p++) {
        /* Zero-ness is decided per extent, as free memory in a real guest
         * comes in runs, not in single pages.  Zero pages are simply never
         * written: a fresh mapping reads as zero and costs no memory. */
        if (splitmix(~seed ^ (p / ZERO_EXTENT_PAGES)) % 1000 < zero_permille)
            continue;
        uint64_t h = splitmix(seed ^ (p << 16));
        uint64_t *w = (uint64_t *)(uintptr_t)(base + p * PAGE);
        for (uint64_t i = 0; i < WORDS_PER_PAGE; i++)
            w[i] = splitmix(h + i);
    }
}

void vcpu_init(vcpu_state_t *st, uint64_t seed, uint32_t index)
{
    st->prng = splitmix(seed * 0x100000001B3ULL + index) | 1; /* xorshift state must be nonzero */
    st->steps = 0;
    st->acc = 0;
}

/* Voluntary context switches of this thread so far.
 *
 * A slow access waited for the migration when the thread slept during it:
 * a userfaultfd fault queues the thread in handle_userfault() and schedules
 * until UFFDIO_COPY or UFFDIO_ZEROPAGE wakes it, a voluntary switch.  A
 * copy-on-write fault (a page placed as a zero page, then written) or the
 * first touch of anonymous memory allocates a page without sleeping; a
 * preemption is an involuntary switch.  Counting page faults instead
 * (ru_minflt + ru_majflt) also counted those copy-on-write faults as stalls.
 *
 * Measured on this machine (Linux 6.18, 2 cores; experiments/stall_nvcsw.c:
 * a vCPU thread writes one page at a time, getrusage(RUSAGE_THREAD) around
 * each write; several runs):
 *   uffd fault, placed 1 ms later   1000/1000 slow, nvcsw moved in all (p50 1.08 ms)
 *   uffd fault, placed at once      4000/4000 slow, nvcsw moved in 3993-4000 (p50 7.6 µs
 *                                   or 27-34 µs by run, fastest 7.1 µs); the few others
 *                                   did not get to sleep (page there first, or preempted)
 *   copy-on-write of a page placed by UFFDIO_ZEROPAGE   11785/50000 > 2 µs, 37 > 10 µs
 *                                   (p50 of those 29 µs), nvcsw moved in none
 *   first write to anonymous memory 1743/50000 > 2 µs, nvcsw moved in none
 *   copy-on-write + 2 busy threads  45/50000 > 10 µs, 33 of them preempted
 *                                   (nivcsw), nvcsw moved in none
 * A uffd fault shows in ru_minflt like a copy-on-write one (majflt stayed 0),
 * so the fault counters cannot tell them apart; nvcsw can.  And a uffd fault
 * served at once can take under 10 µs, the threshold used before. */
static uint64_t voluntary_switches(void)
{
    struct rusage ru;
    getrusage(RUSAGE_THREAD, &ru);
    return (uint64_t)ru.ru_nvcsw;
}

/* Bucket of QEMU's postcopy-latency-dist: floor(log2(µs)), 0 for < 2 µs,
 * the last bucket for anything longer than it. */
static unsigned qemu_bucket_of(uint64_t ns)
{
    uint64_t us = ns / 1000;
    unsigned b = us ? 63 - (unsigned)__builtin_clzll(us) : 0;
    return b < QEMU_DIST_BUCKETS ? b : QEMU_DIST_BUCKETS - 1;
}

static void record_stall(stall_stats_t *s, uint64_t ns)
{
    hist_add(&s->hist, ns);
    counter_add(&s->qemu_dist[qemu_bucket_of(ns)], 1);
}

void gate_open(int *gate)
{
    __atomic_store_n(gate, 1, __ATOMIC_RELEASE);
    syscall(SYS_futex, gate, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
}

static void gate_wait(int *gate)
{
    while (!__atomic_load_n(gate, __ATOMIC_ACQUIRE))
        syscall(SYS_futex, gate, FUTEX_WAIT_PRIVATE, 0, NULL, NULL, 0);
}

int vcpu_run(uint64_t base, uint64_t first, uint64_t count, int workload,
             vcpu_state_t *st, uint64_t max_steps, uint64_t rate,
             int *stop, stall_stats_t *stalls, int *gate)
{
    pthread_once(&calibrated, calibrate);
    const uint64_t threshold = (uint64_t)(STALL_THRESHOLD_NS / ns_per_tick);
    __atomic_store_n(&stalls->first_step_ns, 0, __ATOMIC_RELAXED);
    if (gate)
        gate_wait(gate);
    if (count == 0)
        return 0;
    uint64_t *mem = (uint64_t *)(uintptr_t)(base + first * PAGE);
    uint64_t hot = count / 10 ? count / 10 : 1;
    uint64_t prng = st->prng, steps = st->steps, acc = st->acc;
    __atomic_store_n(&stalls->steps_live, steps, __ATOMIC_RELAXED);
    uint64_t start = mono_ns(), start_steps = steps, last = 0, last_page = UINT64_MAX;
    /* Only the first access to a page can fault, so only accesses that change
     * page are timed (one clock read each, reusing the previous one when the
     * step before was timed too).  A slow access is a stall when this thread
     * slept during it (see voluntary_switches); switches is the count before
     * it, re-read after anything else that sleeps (the rate's naps). */
    int armed = __atomic_load_n(&stalls->armed, __ATOMIC_RELAXED);
    uint64_t switches = armed ? voluntary_switches() : 0;

    while (steps < max_steps && !__atomic_load_n(stop, __ATOMIC_RELAXED)) {
        uint64_t r = xorshift(&prng);
        uint64_t pick = r >> 32, ctl = (r >> 9) & 0xff, page, word = r & (WORDS_PER_PAGE - 1);
        int write;
        switch (workload) {
        case WL_HOTSET: /* 90% of accesses to the first 10% of the slice */
            page = below(pick, ctl < 230 ? hot : count);
            write = ctl & 1;
            break;
        case WL_SEQUENTIAL:
            page = (steps / WORDS_PER_PAGE) % count;
            word = steps % WORDS_PER_PAGE;
            write = ctl & 1;
            break;
        case WL_READMOSTLY:
            page = below(pick, count);
            write = ctl < 13; /* about 5% writes */
            break;
        default: /* WL_UNIFORM */
            page = below(pick, count);
            write = ctl >= 64; /* 75% writes */
            break;
        }
        if ((steps & 1023) == 0) {
            int now_armed = __atomic_load_n(&stalls->armed, __ATOMIC_RELAXED);
            if (now_armed && !armed)
                switches = voluntary_switches();
            armed = now_armed;
            __atomic_store_n(&stalls->steps_live, steps, __ATOMIC_RELAXED);
        }
        int timed = armed && page != last_page;
        uint64_t *w = mem + page * WORDS_PER_PAGE + word;
        if (timed) {
            if (last == 0)
                last = ticks();
            __atomic_store_n(&stalls->waiting_addr, (uint64_t)(uintptr_t)w, __ATOMIC_RELAXED);
            __atomic_store_n(&stalls->waiting_since_ns, tick_ns(last), __ATOMIC_RELAXED);
        }
        if (write)
            *w = r ^ steps;
        else
            acc = (acc ^ *w) * 0x100000001B3ULL;
        steps++;
        if (timed) {
            uint64_t t = ticks();
            __atomic_store_n(&stalls->waiting_since_ns, 0, __ATOMIC_RELAXED);
            if (!__atomic_load_n(&stalls->first_step_ns, __ATOMIC_RELAXED)) /* the first access is always timed */
                __atomic_store_n(&stalls->first_step_ns, tick_ns(t), __ATOMIC_RELAXED);
            if (t - last > threshold) {
                uint64_t v = voluntary_switches(), ns = (uint64_t)((double)(t - last) * ns_per_tick);
                if (v != switches) {
                    record_stall(stalls, ns);
                } else {
                    counter_add(&stalls->slow_other, 1);
                    counter_add(&stalls->slow_other_ns, ns);
                }
                switches = v;
            }
            last = t;
            last_page = page;
        } else if (armed) {
            last = 0;
        }
        if (rate && (steps & 63) == 0) {
            __atomic_store_n(&stalls->steps_live, steps, __ATOMIC_RELAXED); /* slow guests publish sooner */
            /* Sleep off any lead over the rate, in short naps so that a stop
             * request is seen promptly even at a few accesses per second. */
            uint64_t due = start + (steps - start_steps) * 1000000000ULL / rate, t;
            int napped = 0;
            while ((t = mono_ns()) < due && !__atomic_load_n(stop, __ATOMIC_RELAXED)) {
                uint64_t nap = due - t < 10000000ULL ? due - t : 10000000ULL;
                struct timespec ts = { 0, (long)nap };
                nanosleep(&ts, NULL);
                last = 0;
                napped = 1;
            }
            if (napped && armed)
                switches = voluntary_switches();
        }
    }
    st->prng = prng;
    st->steps = steps;
    st->acc = acc;
    __atomic_store_n(&stalls->steps_live, steps, __ATOMIC_RELAXED);
    /* On this host's monotonic clock: the destination gets the time since the stop, never a time of
     * day to compare with its own. */
    __atomic_store_n(&stalls->stopped_at_ns, mono_ns(), __ATOMIC_RELAXED);
    return 0;
}

uint64_t guest_digest(uint64_t base, uint64_t npages)
{
    const uint64_t *w = (const uint64_t *)(uintptr_t)base;
    uint64_t n = npages * WORDS_PER_PAGE;
    /* Four independent lanes keep the multiplier busy; the lane order makes
     * the digest position-sensitive. */
    uint64_t h[4] = { 1, 2, 3, 4 };
    for (uint64_t i = 0; i < n; i += 4)
        for (int l = 0; l < 4; l++)
            h[l] = (h[l] ^ w[i + l]) * 0x9E3779B97F4A7C15ULL + (h[l] >> 29);
    return splitmix(h[0] ^ splitmix(h[1] ^ splitmix(h[2] ^ splitmix(h[3] ^ npages))));
}

void guest_read_pages(uint64_t src, void *dst, uint64_t npages, uint8_t *is_zero)
{
    const uint64_t *s = (const uint64_t *)(uintptr_t)src;
    uint64_t *d = dst;
    for (uint64_t p = 0; p < npages; p++, s += WORDS_PER_PAGE, d += WORDS_PER_PAGE) {
        uint64_t any = 0;
        for (uint64_t i = 0; i < WORDS_PER_PAGE; i++)
            any |= d[i] = s[i];
        is_zero[p] = any == 0;
    }
}

int guest_save(uint64_t base, uint64_t size, int fd)
{
    const char *p = (const char *)(uintptr_t)base;
    while (size) {
        ssize_t n = write(fd, p, size < (1u << 30) ? size : (1u << 30));
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -errno;
        if (n == 0)
            return -EIO;
        p += n;
        size -= (uint64_t)n;
    }
    return 0;
}
