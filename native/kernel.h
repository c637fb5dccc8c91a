/*
 * Kernel interfaces newer than Debian 12's headers (linux-libc-dev 6.1).
 *
 * C only (cffi never reads this file).  Each block applies only when the
 * installed headers lack it, and carries the values of the Linux uapi headers
 * where they were introduced, in Linux 6.7:
 *   include/uapi/linux/userfaultfd.h  UFFD_FEATURE_WP_UNPOPULATED (6.4),
 *                                     UFFD_FEATURE_WP_ASYNC (6.7)
 *   include/uapi/linux/fs.h           PAGEMAP_SCAN, struct pm_scan_arg,
 *                                     struct page_region, PAGE_IS_*, PM_SCAN_*
 * A kernel older than 6.7 answers EINVAL (UFFDIO_API) or ENOTTY (the ioctl),
 * which migrate/dirty.py turns into a hint.
 */
#ifndef UFFD_MIGRATE_KERNEL_H
#define UFFD_MIGRATE_KERNEL_H

#include <stdint.h>
#include <sys/ioctl.h>
#include <linux/fs.h>
#include <linux/userfaultfd.h>

#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1 << 13)
#endif
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1 << 15)
#endif

#ifndef PAGEMAP_SCAN
struct page_region {
    uint64_t start;
    uint64_t end;
    uint64_t categories;
};

struct pm_scan_arg {
    uint64_t size;
    uint64_t flags;
    uint64_t start;
    uint64_t end;
    uint64_t walk_end;
    uint64_t vec;
    uint64_t vec_len;
    uint64_t max_pages;
    uint64_t category_inverted;
    uint64_t category_mask;
    uint64_t category_anyof_mask;
    uint64_t return_mask;
};

#define PAGEMAP_SCAN _IOWR('f', 16, struct pm_scan_arg)

#define PAGE_IS_WPALLOWED (1 << 0)
#define PAGE_IS_WRITTEN (1 << 1)
#define PAGE_IS_FILE (1 << 2)
#define PAGE_IS_PRESENT (1 << 3)
#define PAGE_IS_SWAPPED (1 << 4)

#define PM_SCAN_WP_MATCHING (1 << 0)   /* write-protect the pages matched */
#define PM_SCAN_CHECK_WPASYNC (1 << 1) /* fail on a page without async write-protection */
#endif

_Static_assert(sizeof(struct pm_scan_arg) == 96, "struct pm_scan_arg layout");
_Static_assert(sizeof(struct page_region) == 24, "struct page_region layout");

#endif
