/* Thin userfaultfd layer: see uffd.h.  No policy lives here. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <linux/userfaultfd.h>

#include "wire.h"
#include "uffd.h"
#include "common.h"

int uffd_open(int *syscall_errno, int *device_errno)
{
    *syscall_errno = 0;
    *device_errno = 0;
    /* User-mode-only faults are all we need (guest memory is touched only
     * by user code) and are allowed whatever vm.unprivileged_userfaultfd says. */
    int fd = (int)syscall(__NR_userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY);
    if (fd >= 0)
        return fd;
    *syscall_errno = errno;
    int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev < 0) {
        *device_errno = errno;
        return -1;
    }
    fd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
    if (fd < 0)
        *device_errno = errno;
    close(dev);
    return fd < 0 ? -1 : fd;
}

int uffd_api(int fd, uint64_t *features)
{
    /* Thread ids in fault messages let a watchdog name the stuck vCPU. */
    return uffd_api_features(fd, UFFD_FEATURE_THREAD_ID, features);
}

int uffd_api_features(int fd, uint64_t want, uint64_t *features)
{
    struct uffdio_api api = { .api = UFFD_API, .features = want };
    if (ioctl(fd, UFFDIO_API, &api) < 0)
        return -errno;
    *features = api.features;
    return 0;
}

uint64_t uffd_vmm_features(int memory)
{
    uint64_t kind = memory == MEMORY_MEMFD ? UFFD_FEATURE_MISSING_SHMEM
                  : memory == MEMORY_HUGETLB ? UFFD_FEATURE_MISSING_HUGETLBFS : 0;
    return UFFD_FEATURE_EVENT_REMOVE | kind;
}

int uffd_register(int fd, uint64_t addr, uint64_t len)
{
    struct uffdio_register reg = {
        .range = { .start = addr, .len = len },
        .mode = UFFDIO_REGISTER_MODE_MISSING,
    };
    return ioctl(fd, UFFDIO_REGISTER, &reg) < 0 ? -errno : 0;
}

/* Whether the page at addr is present, from one 8-byte read of pagemap
 * (pagemap_fd, or /proc/self/pagemap when it is -1). */
static int page_present(uint64_t addr, int pagemap_fd)
{
    uint64_t entry = 0;
    int fd = pagemap_fd >= 0 ? pagemap_fd : open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 1; /* cannot tell: trust the kernel's -EEXIST */
    ssize_t n = pread(fd, &entry, sizeof entry, (off_t)(addr / PAGE * sizeof entry));
    if (fd != pagemap_fd)
        close(fd);
    return n != (ssize_t)sizeof entry || entry >> 62;
}

/* One placement ioctl over a range: on -EAGAIN the kernel reports how far it
 * got in *done (negative errno otherwise), so the loop resumes there; on
 * -EEXIST the first page is already present and is skipped. */
static int place(int fd, int zero, uint64_t dst, const char *src, uint64_t len, uint64_t page,
                 uint64_t *placed, uint64_t *existed, int pagemap_fd)
{
    uint64_t off = 0;
    while (off < len) {
        int64_t done;
        int rc;
        if (zero) {
            struct uffdio_zeropage z = { .range = { .start = dst + off, .len = len - off } };
            rc = ioctl(fd, UFFDIO_ZEROPAGE, &z);
            done = z.zeropage;
        } else {
            struct uffdio_copy c = { .dst = dst + off, .src = (uint64_t)(uintptr_t)(src + off),
                                     .len = len - off, .mode = 0 };
            rc = ioctl(fd, UFFDIO_COPY, &c);
            done = c.copy;
        }
        if (rc == 0) {
            *placed += len - off;
            return 0;
        }
        int err = errno;
        if (done > 0) {
            *placed += (uint64_t)done;
            off += (uint64_t)done;
        }
        /* A hugetlb page the pool cannot supply answers -EEXIST too (only
         * under MAP_NORESERVE, which region_map never uses), as does one in
         * the file but not mapped here (dropped by MADV_DONTNEED, which no
         * discard uses): belt and braces, as taking either for a page
         * already placed would leave its vCPU waiting, or reading old bytes. */
        if (err == EEXIST && page > PAGE && !page_present(dst + off, pagemap_fd))
            return -ENOSPC;
        if (err == EEXIST) {
            *existed += page;
            off += page;
        } else if (err != EAGAIN || done <= 0) {
            /* -EAGAIN with nothing placed: the memory's layout is changing
             * (a VMM's madvise waits for its handler to read UFFD_EVENT_REMOVE);
             * calling again at once would spin until the event is read. */
            return -err;
        }
    }
    return 0;
}

int uffd_copy(int fd, uint64_t dst, const void *src, uint64_t len, uint64_t page,
              uint64_t *placed, uint64_t *existed, int pagemap_fd)
{
    *placed = *existed = 0;
    return place(fd, 0, dst, src, len, page, placed, existed, pagemap_fd);
}

/* The source of a zero huge page: hugetlb has no shared zero page and no
 * UFFDIO_ZEROPAGE, and a 2 MiB UFFDIO_COPY from here takes about 100 us
 * (experiments/huge_place.c).  Never written (bss: no space in the file). */
static char huge_zeros[1u << WIRE_HUGE_SHIFT] __attribute__((aligned(4096)));

int uffd_zeropage(int fd, uint64_t dst, uint64_t len, uint64_t page, uint64_t *placed, uint64_t *existed,
                  int pagemap_fd)
{
    *placed = *existed = 0;
    if (page == PAGE)
        return place(fd, 1, dst, NULL, len, page, placed, existed, pagemap_fd);
    for (uint64_t off = 0; off < len; off += page) {
        int rc = place(fd, 0, dst + off, huge_zeros, page, page, placed, existed, pagemap_fd);
        if (rc < 0)
            return rc;
    }
    return 0;
}

int uffd_read_faults(int fd, uint64_t *addrs, uint32_t *tids, int max)
{
    struct uffd_msg msgs[WIRE_MAX_REQUEST_RUNS];
    if (max > WIRE_MAX_REQUEST_RUNS)
        max = WIRE_MAX_REQUEST_RUNS;
    ssize_t n = read(fd, msgs, sizeof(msgs[0]) * (size_t)max);
    if (n < 0)
        return errno == EAGAIN ? 0 : -errno;
    int count = 0;
    for (ssize_t i = 0; i < n / (ssize_t)sizeof(msgs[0]); i++) {
        if (msgs[i].event != UFFD_EVENT_PAGEFAULT)
            continue;
        addrs[count] = msgs[i].arg.pagefault.address;
        tids[count] = msgs[i].arg.pagefault.feat.ptid;
        count++;
    }
    return count;
}

uint64_t region_map(uint64_t len, int memory)
{
    if (memory == MEMORY_ANON) {
        void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        return p == MAP_FAILED ? 0 : (uint64_t)(uintptr_t)p;
    }
    if (memory != MEMORY_MEMFD && memory != MEMORY_HUGETLB) {
        errno = EINVAL;
        return 0;
    }
    int fd = memfd_create("uffd-migrate guest", MFD_CLOEXEC | (memory == MEMORY_HUGETLB ? MFD_HUGETLB : 0));
    if (fd < 0)
        return 0;
    void *p = MAP_FAILED;
    if (ftruncate(fd, (off_t)len) == 0) /* the mapping keeps the file; no descriptor is needed after */
        p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    int err = errno;
    close(fd);
    errno = err;
    return p == MAP_FAILED ? 0 : (uint64_t)(uintptr_t)p;
}

uint64_t image_map(int fd, uint64_t len)
{
    void *p = mmap(NULL, len, PROT_READ, MAP_PRIVATE, fd, 0);
    return p == MAP_FAILED ? 0 : (uint64_t)(uintptr_t)p;
}

int region_unmap(uint64_t addr, uint64_t len)
{
    return munmap((void *)(uintptr_t)addr, len) < 0 ? -errno : 0;
}

int region_absent_runs(int fd, uint64_t addr, uint64_t first, uint64_t npages, uint32_t page_shift,
                       uint64_t *starts, uint64_t *counts, int max_runs,
                       uint64_t *next)
{
    enum { BATCH = 8192 };
    static __thread uint64_t entries[BATCH];
    /* pagemap has an entry per 4 KiB on every kind: a page's first tells. */
    const uint64_t stride = 1ull << (page_shift - WIRE_PAGE_SHIFT);
    int runs = 0;
    uint64_t p = first;
    while (p < npages) {
        uint64_t want = (npages - p) * stride < BATCH ? (npages - p) * stride : BATCH;
        ssize_t got = pread(fd, entries, want * 8, (off_t)((addr / PAGE + p * stride) * 8));
        if (got <= 0)
            return got < 0 ? -errno : -EIO;
        for (uint64_t i = 0; i < (uint64_t)got / 8; i += stride, p++) {
            /* bit 63: present; bit 62: swapped (then the data exists too) */
            if (entries[i] >> 62)
                continue;
            if (runs && starts[runs - 1] + counts[runs - 1] == p) {
                counts[runs - 1]++;
            } else if (runs == max_runs) {
                *next = p;
                return runs;
            } else {
                starts[runs] = p;
                counts[runs++] = 1;
            }
        }
    }
    *next = npages;
    return runs;
}
