/*
 * What the native code measures with: one clock and one histogram layout,
 * shared by the data plane's loops (dataplane.h) and the vCPUs' stalls
 * (guest.h); migrate/metrics.py reads both.
 *
 * Read by the C compiler and by cffi's cdef parser: plain declarations only.
 */

/* Durations in log-linear buckets: 8 per power of two of nanoseconds. */
#define HIST_BUCKETS 512
typedef struct {
    uint64_t count;
    uint64_t total_ns;
    uint64_t max_ns;
    uint64_t buckets[HIST_BUCKETS];
} hist_t;

/* Adds one duration, by the histogram's only writer (see common.h). */
void hist_add(hist_t *h, uint64_t ns);

/* CLOCK_MONOTONIC in ns: the clock of every stamp. */
uint64_t mono_ns(void);
