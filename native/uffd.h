/*
 * Thin userfaultfd layer for uffd-migrate.
 *
 * This header is read twice: by the C compiler (through build_ffi.py's
 * set_source) and by cffi's cdef parser, so it holds plain declarations only.
 * Every function returns 0 (or a count) on success and -errno on failure.
 */

/* Opens a non-blocking userfaultfd: the syscall first (user-mode faults only,
 * allowed even when vm.unprivileged_userfaultfd=0), then /dev/userfaultfd.
 * Returns the fd, or -1 with both errnos stored for a readable hint. */
int uffd_open(int *syscall_errno, int *device_errno);

/* UFFDIO_API handshake asking for thread ids; *features gets what the
 * kernel offers. */
int uffd_api(int fd, uint64_t *features);

/* UFFDIO_API handshake asking for the features in want (a VMM stand-in asks
 * what Firecracker asks: UFFD_FEATURE_EVENT_REMOVE, and the kind's MISSING
 * feature); *features gets what the kernel offers.  -EINVAL: a feature in
 * want is not offered. */
int uffd_api_features(int fd, uint64_t want, uint64_t *features);

/* What Firecracker's UFFDIO_API asks for guest memory of a kind (enum
 * memory_kind, below): UFFD_FEATURE_EVENT_REMOVE (its balloon's
 * MADV_DONTNEED), plus MISSING_SHMEM or MISSING_HUGETLBFS for those kinds. */
uint64_t uffd_vmm_features(int memory);

/* The guest's memory: private anonymous 4 KiB pages; a memfd (shared
 * memory, as a VMM shares it with device back-ends), 4 KiB pages; or a
 * hugetlb memfd, 2 MiB pages. */
enum memory_kind { MEMORY_ANON = 0, MEMORY_MEMFD = 1, MEMORY_HUGETLB = 2 };

/* Registers [addr, addr+len) in MISSING mode. */
int uffd_register(int fd, uint64_t addr, uint64_t len);

/* Places len bytes from src at dst (aligned to page, the memory's page
 * size), one ioctl per stretch of absent pages.  Pages already present are
 * skipped and counted (in bytes, *existed): that is the fault/stream race the
 * kernel resolves for us, not an error.  -ENOSPC: -EEXIST for a huge page
 * that pagemap says is not mapped (the pool could not supply it).  -EAGAIN:
 * the memory's layout is changing (an event such as UFFD_EVENT_REMOVE is not
 * read yet); *placed + *existed say how far it got.  pagemap_fd
 * is /proc/PID/pagemap of the process that owns dst (-1: this one). */
int uffd_copy(int fd, uint64_t dst, const void *src, uint64_t len, uint64_t page,
              uint64_t *placed, uint64_t *existed, int pagemap_fd);

/* The same for zero pages: UFFDIO_ZEROPAGE, which hugetlb refuses (-EINVAL),
 * so huge pages (page > 4 KiB) are copied from a static zero page instead. */
int uffd_zeropage(int fd, uint64_t dst, uint64_t len, uint64_t page,
                  uint64_t *placed, uint64_t *existed, int pagemap_fd);

/* Non-blocking read of up to max pagefault messages.  Returns the number of
 * faults stored in addrs/tids (0 when none is pending), or -errno. */
int uffd_read_faults(int fd, uint64_t *addrs, uint32_t *tids, int max);

/* A guest's memory of the given kind (enum memory_kind), len bytes (a
 * multiple of 2 MiB for hugetlb), and its release.  memfd and hugetlb are a
 * memfd mapped MAP_SHARED; hugetlb without MAP_NORESERVE, so that a pool
 * too small fails here (ENOMEM) and never later, where UFFDIO_COPY into an
 * empty pool answers -EEXIST as if the page were there.  Returns the address,
 * or 0 with errno set. */
uint64_t region_map(uint64_t len, int memory);
int region_unmap(uint64_t addr, uint64_t len);

/* A memory image file (fd), len bytes, mapped read-only and private: what
 * migrate-src --memory-file serves.  Returns the address, or 0 with errno set. */
uint64_t image_map(int fd, uint64_t len);

/* Absent pages (of 1 << page_shift bytes) of the npages-page region at addr, from page first on, as
 * runs (start page, count), asked of the kernel's page tables through
 * pagemap_fd (/proc/PID/pagemap of the process that owns addr): after a lost link they are exactly what is still
 * missing, with no record kept in userland.  Stores at most max_runs runs
 * and sets *next to the page to continue from (npages when done).  Returns
 * the number of runs stored, or -errno. */
int region_absent_runs(int pagemap_fd, uint64_t addr, uint64_t first, uint64_t npages, uint32_t page_shift,
                       uint64_t *starts, uint64_t *counts, int max_runs,
                       uint64_t *next);
