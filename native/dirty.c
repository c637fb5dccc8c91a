/* Dirty tracking (source) and discards (destination) through the kernel's page tables: see dirty.h. */
#define _GNU_SOURCE
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/ioctl.h>
#include <sys/mman.h>

#include "kernel.h"
#include "wire.h"
#include "dirty.h"
#include "common.h"
#include "uffd.h"

/* Regions one PAGEMAP_SCAN call may return; the walk resumes at walk_end. */
#define SCAN_VEC 512

int dirty_track(int uffd, uint64_t addr, uint64_t len, int memory)
{
    /* WP_UNPOPULATED: pages never touched (the guest's zero pages) are
     * protected too, through pte markers, so their first write is seen.
     * Shared memory and huge pages need WP_HUGETLBFS_SHMEM besides. */
    struct uffdio_api api = { .api = UFFD_API,
                              .features = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED |
                                          (memory == MEMORY_ANON ? 0 : UFFD_FEATURE_WP_HUGETLBFS_SHMEM) };
    if (ioctl(uffd, UFFDIO_API, &api) < 0)
        return -errno;
    struct uffdio_register reg = { .range = { addr, len }, .mode = UFFDIO_REGISTER_MODE_WP };
    if (ioctl(uffd, UFFDIO_REGISTER, &reg) < 0)
        return -errno;
    struct uffdio_writeprotect wp = { .range = { addr, len }, .mode = UFFDIO_WRITEPROTECT_MODE_WP };
    return ioctl(uffd, UFFDIO_WRITEPROTECT, &wp) < 0 ? -errno : 0;
}

/* One walk of [addr, addr+len) for pages matching the masks; calls back
 * with each region found (addresses), resuming where a full vec stopped.
 * room, when not NULL, is how many more regions the caller can keep (its
 * callback counts it down): no call asks the kernel for more, and the walk
 * ends when it is 0.  With PM_SCAN_WP_MATCHING the kernel protects again
 * exactly the regions it returns and leaves the rest marked, so a region
 * the caller could not keep would be a write lost for good. */
typedef int (*region_fn)(void *ctx, uint64_t start, uint64_t end);

static int scan(int pagemap_fd, uint64_t addr, uint64_t len, uint64_t flags, uint64_t mask,
                uint64_t anyof, region_fn fn, void *ctx, const uint64_t *room)
{
    struct page_region vec[SCAN_VEC];
    uint64_t cur = addr, end = addr + len;
    while (cur < end) {
        uint64_t vec_len = room && *room < SCAN_VEC ? *room : SCAN_VEC;
        if (vec_len == 0)
            return 0; /* the caller is full: the rest stays marked for its next walk */
        struct pm_scan_arg a = {
            .size = sizeof a, .flags = flags, .start = cur, .end = end,
            .vec = (uint64_t)(uintptr_t)vec, .vec_len = vec_len,
            .category_mask = mask, .category_anyof_mask = anyof, .return_mask = mask | anyof,
        };
        long n = ioctl(pagemap_fd, PAGEMAP_SCAN, &a);
        if (n < 0)
            return -errno;
        for (long i = 0; i < n; i++) {
            int rc = fn(ctx, vec[i].start, vec[i].end);
            if (rc)
                return rc;
        }
        if (a.walk_end <= cur)
            return -EIO; /* no progress: never seen, but never loop on it */
        cur = a.walk_end;
    }
    return 0;
}

typedef struct {
    uint64_t base;
    uint32_t shift; /* of the wire page */
    struct wire_run *runs;
    uint64_t n, room, pages;
} take_t;

static int take_region(void *ctx, uint64_t start, uint64_t end)
{
    take_t *t = ctx;
    uint64_t first = (start - t->base) >> t->shift, count = (end - start) >> t->shift;
    if (t->n && t->runs[t->n - 1].start + t->runs[t->n - 1].count == first) {
        t->runs[t->n - 1].count += count;
    } else {
        if (t->room == 0)
            return -EIO; /* never: scan asks for no more regions than room */
        t->runs[t->n++] = (struct wire_run){ first, count };
        t->room--;
    }
    t->pages += count;
    return 0;
}

int64_t dirty_take(int pagemap_fd, uint64_t addr, uint64_t npages, uint32_t page_shift, struct wire_run *runs,
                   uint64_t max_runs, uint64_t *pages)
{
    take_t t = { addr, page_shift, runs, 0, max_runs, 0 };
    /* CHECK_WPASYNC: a range not registered for async write-protection is
     * an error, never silently reported clean. */
    int rc = scan(pagemap_fd, addr, npages << page_shift, PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
                  PAGE_IS_WRITTEN, 0, take_region, &t, &t.room);
    *pages = t.pages;
    return rc < 0 ? rc : (int64_t)t.n;
}

static int count_region(void *ctx, uint64_t start, uint64_t end)
{
    *(uint64_t *)ctx += end - start;
    return 0;
}

int region_present_pages(int pagemap_fd, uint64_t addr, uint64_t len, uint32_t page_shift, uint64_t *present)
{
    uint64_t bytes = 0;
    int rc = scan(pagemap_fd, addr, len, 0, 0, PAGE_IS_PRESENT | PAGE_IS_SWAPPED, count_region, &bytes, NULL);
    *present = bytes >> page_shift;
    return rc;
}

int region_discard(uint64_t addr, uint64_t len, int memory)
{
    /* On a memfd (shmem or hugetlb) MADV_DONTNEED only unmaps: the page
     * stays in the file, the next UFFDIO_COPY meets -EEXIST and the guest
     * would read the old bytes without a fault.  MADV_REMOVE frees it
     * (experiments/discard_memfd.c); anonymous memory refuses it. */
    int advice = memory == MEMORY_ANON ? MADV_DONTNEED : MADV_REMOVE;
    return madvise((void *)(uintptr_t)addr, len, advice) < 0 ? -errno : 0;
}

uint64_t runs_union(const struct wire_run *a, uint64_t na, const struct wire_run *b, uint64_t nb,
                    struct wire_run *out, uint64_t *pages)
{
    uint64_t i = 0, j = 0, n = 0, total = 0;
    while (i < na || j < nb) {
        const struct wire_run *r = (j == nb || (i < na && a[i].start <= b[j].start)) ? &a[i++] : &b[j++];
        uint64_t end = r->start + r->count;
        if (n && r->start <= out[n - 1].start + out[n - 1].count) {
            uint64_t last = out[n - 1].start + out[n - 1].count;
            if (end > last) {
                total += end - last;
                out[n - 1].count = end - out[n - 1].start;
            }
        } else {
            out[n++] = *r;
            total += r->count;
        }
    }
    *pages = total;
    return n;
}

uint64_t runs_intersect(const struct wire_run *a, uint64_t na, const struct wire_run *b,
                        uint64_t nb, struct wire_run *out, uint64_t *pages)
{
    uint64_t i = 0, j = 0, n = 0, total = 0;
    while (i < na && j < nb) {
        uint64_t a_end = a[i].start + a[i].count, b_end = b[j].start + b[j].count;
        uint64_t lo = a[i].start > b[j].start ? a[i].start : b[j].start;
        uint64_t hi = a_end < b_end ? a_end : b_end;
        if (lo < hi) {
            out[n++] = (struct wire_run){ lo, hi - lo };
            total += hi - lo;
        }
        if (a_end < b_end)
            i++;
        else
            j++;
    }
    *pages = total;
    return n;
}
