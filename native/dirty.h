/*
 * What the guest wrote, and discards, asked of the kernel's page tables
 * (Linux >= 6.7).  No userland bitmap on either side.
 *
 * Read by the C compiler and by cffi's cdef parser: plain declarations only
 * (the kernel declarations Debian 12's headers lack are in kernel.h, C only).
 *
 * Source: the guest region is registered with a userfaultfd of its own in
 * write-protect mode with UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED
 * and write-protected once.  The kernel then resolves each first write to a
 * protected page itself (no message to read; about 1 us for the guest) and
 * leaves the page marked written; one PAGEMAP_SCAN ioctl with
 * PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC returns the runs written since
 * the last scan and protects them again.
 *
 * Destination: a discard drops a run with MADV_DONTNEED (MADV_REMOVE on a
 * memfd): on a range
 * registered with a userfaultfd in MISSING mode its pages are missing again,
 * so the next access faults and the next UFFDIO_COPY places them.  How many
 * pages are present is asked of the kernel once, at switchover, after the
 * last discard.
 */

/* Source: the UFFDIO_API handshake asking for asynchronous write-protection
 * on uffd (a fresh one: the API call is once per descriptor), registration
 * of [addr, addr+len) in WP mode, and write-protection of all of it.
 * -EINVAL from the handshake means a kernel older than 6.7. */
int dirty_track(int uffd, uint64_t addr, uint64_t len, int memory);

/* Source: the runs of the npages-page region at addr written since the last
 * call (or since dirty_track), which are write-protected again.  Stores at
 * most max_runs runs (adjacent ones merged) and their total in *pages.
 * Returns the number of runs, or -errno.  No write is ever lost: a page is
 * protected again only if it is in runs; when the array fills up (the call
 * returns max_runs) the walk stops there, and every page written and not
 * taken stays marked written for the next call, which the caller must make.
 * (npages + 1) / 2 runs always suffice to take everything in one call. */
int64_t dirty_take(int pagemap_fd, uint64_t addr, uint64_t npages, uint32_t page_shift, struct wire_run *runs,
                   uint64_t max_runs, uint64_t *pages);

/* Destination: pages of [addr, addr+len) the kernel holds (present or
 * swapped out), in one walk: at switchover, the base the placement counters
 * then add to. */
int region_present_pages(int pagemap_fd, uint64_t addr, uint64_t len, uint32_t page_shift, uint64_t *present);

/* Destination: makes [addr, addr+len) absent again: MADV_DONTNEED on
 * anonymous memory, MADV_REMOVE on a memfd (enum memory_kind). */
int region_discard(uint64_t addr, uint64_t len, int memory);

/* The union of two sorted lists of disjoint runs (two scans' results), merged
 * into out, which holds at least na + nb runs or (npages + 1) / 2.  Returns
 * the number of runs; *pages gets their total. */
uint64_t runs_union(const struct wire_run *a, uint64_t na, const struct wire_run *b, uint64_t nb,
                    struct wire_run *out, uint64_t *pages);

/* The pages in both of two sorted lists of disjoint runs (written in each of
 * two scans' intervals: a working set without the pages written only once),
 * into out, which holds at least na + nb runs or (npages + 1) / 2.  Returns
 * the number of runs; *pages gets their total. */
uint64_t runs_intersect(const struct wire_run *a, uint64_t na, const struct wire_run *b,
                        uint64_t nb, struct wire_run *out, uint64_t *pages);
