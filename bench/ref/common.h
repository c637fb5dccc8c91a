/* Shared helpers for the C reference programs in bench/ref.
 * These programs measure the physical limits our Python code is compared
 * against, so they do the simplest correct thing and nothing clever. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL
#define MIB (1024UL * 1024UL)

#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(0xAA, 0x00)
#endif

static inline void die(const char *what)
{
    fprintf(stderr, "%s: %s\n", what, strerror(errno));
    exit(1);
}

static inline double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* "4G", "256M", "64K" or plain bytes. */
static inline uint64_t parse_size(const char *s)
{
    char *end;
    uint64_t v = strtoull(s, &end, 10);
    switch (*end) {
    case 'G': case 'g': v <<= 10; /* fall through */
    case 'M': case 'm': v <<= 10; /* fall through */
    case 'K': case 'k': v <<= 10;
    }
    return v;
}

/* Listen on IPv4 address addr with a kernel-chosen port; returns the fd, sets *port. */
static inline int tcp_listen_on(const char *addr, int *port)
{
    struct sockaddr_in a = { .sin_family = AF_INET };
    socklen_t len = sizeof a;
    inet_pton(AF_INET, addr, &a.sin_addr);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0 || bind(fd, (void *)&a, sizeof a) || listen(fd, 4) ||
        getsockname(fd, (void *)&a, &len))
        die("listen");
    *port = ntohs(a.sin_port);
    return fd;
}

/* Listen on 127.0.0.1 with a kernel-chosen port; returns the fd, sets *port. */
static inline int tcp_listen(int *port)
{
    return tcp_listen_on("127.0.0.1", port);
}

static inline int tcp_connect(int port, int nodelay)
{
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port),
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0 || connect(fd, (void *)&a, sizeof a))
        die("connect");
    if (nodelay)
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &nodelay, sizeof nodelay);
    return fd;
}

/* This thread (only) moves to the network namespace at path (such as
 * /run/netns/x): the programs that run through an emulated link (bench/wan.py)
 * put each end in its own. */
static inline void join_netns(const char *path)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0 || setns(fd, CLONE_NEWNET))
        die(path);
    close(fd);
}

static inline int tcp_accept(int lfd, int nodelay)
{
    int fd = accept(lfd, NULL, NULL);
    if (fd < 0)
        die("accept");
    if (nodelay)
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &nodelay, sizeof nodelay);
    return fd;
}

static inline void send_all(int fd, const void *buf, size_t n)
{
    const char *p = buf;
    while (n) {
        ssize_t r = send(fd, p, n, MSG_NOSIGNAL);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            die("send");
        p += r, n -= r;
    }
}

/* Returns bytes received; fewer than n only at EOF. */
static inline size_t recv_all(int fd, void *buf, size_t n)
{
    char *p = buf;
    size_t got = 0;
    while (got < n) {
        ssize_t r = recv(fd, p + got, n - got, 0);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            die("recv");
        if (r == 0)
            break;
        got += r;
    }
    return got;
}

/* The syscall first (what the project uses), /dev/userfaultfd as fallback. */
static inline int uffd_open(void)
{
    int fd = syscall(__NR_userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY);
    if (fd < 0) {
        int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
        if (dev >= 0) {
            fd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
            close(dev);
        }
    }
    if (fd < 0) {
        fprintf(stderr, "userfaultfd unavailable: run as root, or sysctl "
                        "vm.unprivileged_userfaultfd=1, or allow /dev/userfaultfd\n");
        exit(1);
    }
    struct uffdio_api api = { .api = UFFD_API, .features = 0 };
    if (ioctl(fd, UFFDIO_API, &api))
        die("UFFDIO_API");
    return fd;
}

static inline void uffd_register(int uffd, void *addr, size_t len)
{
    struct uffdio_register reg = { .range = { (uintptr_t)addr, len },
                                   .mode = UFFDIO_REGISTER_MODE_MISSING };
    if (ioctl(uffd, UFFDIO_REGISTER, &reg))
        die("UFFDIO_REGISTER");
}

/* The guest memory kinds of migrate-src --memory, mapped as native/uffd.c's
 * region_map maps them: private anonymous memory; a memfd mapped shared
 * (shmem); a hugetlb memfd (MFD_HUGETLB, 2 MiB pages) mapped shared, without
 * MAP_NORESERVE (the whole region is reserved from the pool at mmap).  A
 * reference of a kind places and faults pages of that kind's size, so it is
 * compared with a migration of the same kind. */
enum mem_kind { KIND_ANON, KIND_MEMFD, KIND_HUGETLB };
#define HUGE_PAGE (2 * MIB)

/* "anon", "memfd" or "hugetlb" (exits 2 on anything else). */
static inline enum mem_kind kind_of(const char *s)
{
    if (!strcmp(s, "anon"))
        return KIND_ANON;
    if (!strcmp(s, "memfd"))
        return KIND_MEMFD;
    if (!strcmp(s, "hugetlb"))
        return KIND_HUGETLB;
    fprintf(stderr, "memory kind: anon, memfd or hugetlb, not %s\n", s);
    exit(2);
}

static inline const char *kind_name(enum mem_kind k)
{
    return k == KIND_HUGETLB ? "hugetlb" : k == KIND_MEMFD ? "memfd" : "anon";
}

/* The kind's page: what one fault asks for and one placement places. */
static inline size_t kind_page(enum mem_kind k)
{
    return k == KIND_HUGETLB ? HUGE_PAGE : PAGE;
}

static inline char *kind_map(enum mem_kind k, size_t len)
{
    void *p;
    if (k == KIND_ANON) {
        p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    } else {
        int fd = memfd_create("bench-ref", MFD_CLOEXEC | (k == KIND_HUGETLB ? MFD_HUGETLB : 0));
        if (fd < 0 || ftruncate(fd, (off_t)len))
            die("memfd_create");
        p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        close(fd);
    }
    if (p == MAP_FAILED)
        die(k == KIND_HUGETLB ? "mmap hugetlb (too few free huge pages? /proc/sys/vm/nr_hugepages)" : "mmap");
    return p;
}

/* Makes [p, p + len) missing again: MADV_DONTNEED only unmaps a memfd's
 * pages (they stay in the file), so shared memory takes MADV_REMOVE, as the
 * destination's discards do. */
static inline void kind_zap(enum mem_kind k, char *p, size_t len)
{
    if (madvise(p, len, k == KIND_ANON ? MADV_DONTNEED : MADV_REMOVE))
        die("madvise zap");
}

/* A fresh region of kind k registered for MISSING faults. */
static inline char *uffd_region_kind(int uffd, enum mem_kind k, size_t len)
{
    char *p = kind_map(k, len);
    uffd_register(uffd, p, len);
    return p;
}

/* A fresh anonymous region registered for MISSING faults. */
static inline char *uffd_region(int uffd, size_t len)
{
    return uffd_region_kind(uffd, KIND_ANON, len);
}

/* Place len bytes of pages of `page` bytes at dst; returns the bytes this
 * call actually placed.  A range that meets an existing page fails with
 * EAGAIN and copy = bytes placed before it; retrying at that page fails with
 * EEXIST: skip the page.  EAGAIN with copy <= 0 means the mm changed under
 * us: retry as is. */
static inline size_t uffd_place_pages(int uffd, char *dst, const char *src, size_t len, size_t page,
                                      uint64_t *eexist)
{
    size_t placed = 0;
    while (len) {
        struct uffdio_copy c = { .dst = (uintptr_t)dst, .src = (uintptr_t)src, .len = len };
        if (ioctl(uffd, UFFDIO_COPY, &c) == 0) {
            placed += len;
            break;
        }
        size_t step;
        if (errno == EAGAIN) {
            if (c.copy <= 0)
                continue;
            step = c.copy;
            placed += step;
        } else if (errno == EEXIST) {
            step = page;
            if (eexist)
                ++*eexist;
        } else {
            die("UFFDIO_COPY");
        }
        dst += step, src += step, len -= step;
    }
    return placed;
}

/* uffd_place_pages of 4 KiB pages. */
static inline size_t uffd_place(int uffd, char *dst, const char *src, size_t len, uint64_t *eexist)
{
    return uffd_place_pages(uffd, dst, src, len, PAGE, eexist);
}

static inline int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Busy spinner threads: the load a guest's vCPUs put on the machine, so a
 * reference measured next to them is fair to a migration whose guest runs
 * as many vCPUs flat out.  They only burn CPU (no memory traffic) and run
 * until spinners_stop(). */
#define MAX_SPINNERS 64
static volatile int spinners_quit;
static pthread_t spinner_threads[MAX_SPINNERS];
static int spinner_count;

static void *spinner(void *arg)
{
    (void)arg;
    volatile uint64_t n = 0;
    while (!spinners_quit)
        n++;
    return NULL;
}

static inline void spinners_start(int n)
{
    if (n < 0 || n > MAX_SPINNERS) {
        fprintf(stderr, "spinners: 0..%d\n", MAX_SPINNERS);
        exit(2);
    }
    spinners_quit = 0;
    for (spinner_count = 0; spinner_count < n; spinner_count++) {
        int e = pthread_create(&spinner_threads[spinner_count], NULL, spinner, NULL);
        if (e) {
            errno = e;
            die("pthread_create spinner");
        }
    }
}

static inline void spinners_stop(void)
{
    spinners_quit = 1;
    while (spinner_count)
        pthread_join(spinner_threads[--spinner_count], NULL);
}

/* Nearest-rank percentile of a sorted array. */
static inline double pct(const double *v, size_t n, double p)
{
    size_t k = (size_t)(p / 100.0 * n + 0.999999);
    return v[k ? k - 1 : 0];
}
