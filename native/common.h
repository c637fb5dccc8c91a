/*
 * What every native file shares, C only (cffi never reads this file): the
 * page size and the largest frame as the code writes them, and counters with
 * one writer and many readers.  The clock and the histogram: stats.h.
 *
 * A loop's or a vCPU's statistics are written by that thread alone and read
 * by others while it runs: Python's progress line and watchdog (through cffi,
 * one aligned 8-byte load each), tests/native/tsan_plane.c's monitor (with
 * __atomic loads).  A plain "+=" there is a data race in C's memory model:
 * the compiler may keep the counter in a register, tear or merge the stores,
 * and ThreadSanitizer reports it.  One writer needs no read-modify-write
 * instruction, only a store that is atomic: relaxed, as no reader orders
 * anything else by a counter (x86-64: a plain mov, the same code as before).
 *
 * Counters whose readers decide something by them (the pages placed, which
 * say when every page is present; the pages asked and answered, which say
 * whether a silence is a lost link) are added to with sequentially
 * consistent read-modify-writes instead: see add() in dataplane.c.
 */
#ifndef UFFD_MIGRATE_COMMON_H
#define UFFD_MIGRATE_COMMON_H

#include <stdint.h>

/* The base page (wire.h): the workload's unit, pagemap's entry, and the wire
 * page of anonymous and memfd guests (a hugetlb guest's wire page is 2 MiB:
 * the loops take its shift at run time).  64 bits wide so that page
 * arithmetic never overflows an int. */
#define PAGE ((uint64_t)WIRE_PAGE_SIZE)
/* The largest frame on the wire: a header and a largest payload. */
#define FRAME_MAX (WIRE_FRAME_SIZE + (uint64_t)WIRE_MAX_PAYLOAD)

/* *c += n, by the counter's only writer. */
static inline void counter_add(uint64_t *c, uint64_t n)
{
    __atomic_store_n(c, __atomic_load_n(c, __ATOMIC_RELAXED) + n, __ATOMIC_RELAXED);
}

/* *c = max(*c, v), by the counter's only writer. */
static inline void counter_max(uint64_t *c, uint64_t v)
{
    if (v > __atomic_load_n(c, __ATOMIC_RELAXED))
        __atomic_store_n(c, v, __ATOMIC_RELAXED);
}

#endif
