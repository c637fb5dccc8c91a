/*
 * The demo guest: a memory region and deterministic vCPU workloads.
 *
 * Read by the C compiler and by cffi's cdef parser: plain declarations only.
 * Guest memory is touched only here, by threads that do not hold the GIL:
 * on the destination any access may sleep in a userfaultfd fault.
 */

/* A vCPU's whole CPU state: what migrate-src sends at switchover. */
typedef struct {
    uint64_t prng;   /* xorshift64* state */
    uint64_t steps;  /* accesses executed so far */
    uint64_t acc;    /* running hash of every value read: proves reads saw the right data */
} vcpu_state_t;

/* Accesses that waited for the migration, as the vCPU itself saw them: slow
 * accesses during which the thread slept in the kernel (see vcpu_run). */
#define QEMU_DIST_BUCKETS 24
typedef struct {
    hist_t hist; /* the durations (stats.h: the loops' histogram layout) */
    /* The same stalls in QEMU's postcopy-latency-dist layout (QEMU 10.1,
     * query-migrate): bucket N counts waits of [2^N, 2^(N+1)) µs, bucket 0
     * also holds those under 1 µs and the last one everything longer. */
    uint64_t qemu_dist[QEMU_DIST_BUCKETS];
    /* Slow accesses that did not wait for the migration (copy-on-write of a
     * page placed as a zero page, a first touch, a preemption): kept apart,
     * as they are no postcopy cost. */
    uint64_t slow_other;
    uint64_t slow_other_ns;
    /* While an access to a new page is under way: when it started and its
     * address (0 otherwise), for a watchdog to name a vCPU stuck in a fault. */
    uint64_t waiting_since_ns;
    uint64_t waiting_addr;
    /* Wall-clock time (CLOCK_REALTIME, ns) when the vCPU last stopped: where
     * downtime starts, as the guest itself saw it. */
    uint64_t stopped_at_ns;
    /* Steps executed so far, published every 1024 steps (64 when rate-limited) while the vCPU runs
     * (its CPU state is written back only when it stops): the guest's
     * progress during precopy, against before; where each vCPU was when the
     * last page arrived, for the link bench's working set. */
    uint64_t steps_live;
    /* When the first access of this vcpu_run completed (CLOCK_MONOTONIC, ns; 0 until then), while
     * armed: a restore's time to first guest step, faults included. */
    uint64_t first_step_ns;
    /* Nonzero while accesses are timed: only during postcopy can an access
     * stall, and reading a clock per access costs the workload its memory
     * parallelism (several times slower on random access), so a vCPU runs
     * untimed the rest of the time. */
    int armed;
} stall_stats_t;

enum workload { WL_UNIFORM = 0, WL_HOTSET = 1, WL_SEQUENTIAL = 2, WL_READMOSTLY = 3 };

/* Deterministic initial contents of pages [first, first+count) of a guest
 * whose memory starts at base; about zero_permille/1000 pages stay all-zero. */
void guest_fill(uint64_t base, uint64_t first, uint64_t count, uint64_t seed,
                uint32_t zero_permille);

/* Initial CPU state of vCPU index for a seed. */
void vcpu_init(vcpu_state_t *st, uint64_t seed, uint32_t index);

/* Runs the workload on pages [first, first+count) until *stop is set or
 * st->steps reaches max_steps.  rate is accesses per second (0: unlimited).
 * Accesses that waited for a page are timed into stalls.  When gate is not NULL the
 * vCPU first waits for gate_open(gate): threads are created ahead of time,
 * so a resume costs one wake-up, not a thread start.  Returns 0. */
int vcpu_run(uint64_t base, uint64_t first, uint64_t count, int workload,
             vcpu_state_t *st, uint64_t max_steps, uint64_t rate,
             int *stop, stall_stats_t *stalls, int *gate);

/* Lets every vCPU waiting on gate run. */
void gate_open(int *gate);

/* 64-bit digest of npages pages at base (a fast multiply-mix over words). */
uint64_t guest_digest(uint64_t base, uint64_t npages);

/* Copies npages pages from guest memory at src to dst and stores, for each
 * page, 1 if it is all zero: the source streams zero pages as zero runs. */
void guest_read_pages(uint64_t src, void *dst, uint64_t npages, uint8_t *is_zero);

/* Writes the size bytes of guest memory at base to fd from its current
 * position (a snapshot's memory file), resuming short writes.  Returns 0 or
 * -errno (-EIO if the file took nothing). */
int guest_save(uint64_t base, uint64_t size, int fd);
