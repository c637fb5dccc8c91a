/* The clock and the duration histogram of every native file.  See stats.h. */
#include <stdint.h>
#include <time.h>

#include "stats.h"
#include "common.h"

uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* Bucket b < 8 holds b ns; above, 8 sub-buckets per power of two (the top
 * three bits after the leading one), the last bucket everything longer.
 * migrate/metrics.py's bucket_of() is the same function. */
static unsigned hist_bucket(uint64_t ns)
{
    if (ns < 8)
        return (unsigned)ns;
    unsigned msb = 63 - (unsigned)__builtin_clzll(ns);
    unsigned b = msb * 8 + (unsigned)((ns >> (msb - 3)) & 7);
    return b < HIST_BUCKETS ? b : HIST_BUCKETS - 1;
}

void hist_add(hist_t *h, uint64_t ns)
{
    counter_add(&h->count, 1);
    counter_add(&h->total_ns, ns);
    counter_max(&h->max_ns, ns);
    counter_add(&h->buckets[hist_bucket(ns)], 1);
}
