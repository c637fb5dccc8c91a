/* Which slow guest accesses waited for the migration?  A "vCPU" thread times
 * single accesses and reads getrusage(RUSAGE_THREAD) around each one:
 *
 *   uffd-1ms   first touch of a page of a userfaultfd (MISSING) region; a
 *              handler thread reads the fault and places the page with
 *              UFFDIO_COPY 1 ms later (a fault served over a network);
 *   uffd-0     the same, placed as soon as the handler sees the fault;
 *   zero-cow   write to a page of a registered region that was placed with
 *              UFFDIO_ZEROPAGE (the destination's zero runs): copy-on-write
 *              of the shared zero page, no userfaultfd involvement;
 *   anon       first write to plain anonymous memory;
 *   zero-cow+spin  zero-cow with two busy threads on our two cores, so the
 *              vCPU is also preempted now and then.
 *
 * For each case: accesses, how many were slow (> argv[2] ns, default 10 µs),
 * and of those how many
 * moved nvcsw (voluntary context switches: the thread slept), nivcsw
 * (preempted), minflt, majflt.  handle_userfault() puts the thread to sleep
 * until UFFDIO_COPY wakes it, which is a voluntary switch; a copy-on-write or
 * first-touch anonymous fault allocates a page and never sleeps.
 *
 * build and run: gcc -O2 -pthread -o stall_nvcsw stall_nvcsw.c && ./stall_nvcsw [N [SLOW_NS]]
 * (needs userfaultfd: root, or vm.unprivileged_userfaultfd=1 / user-mode faults) */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL
static uint64_t SLOW_NS = 10000; /* argv[2] */

static uint64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000ull + t.tv_nsec;
}

static int open_uffd(void)
{
    int fd = syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY);
    if (fd < 0)
        fd = syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) { perror("userfaultfd"); exit(1); }
    struct uffdio_api api = { .api = UFFD_API };
    if (ioctl(fd, UFFDIO_API, &api)) { perror("UFFDIO_API"); exit(1); }
    return fd;
}

static void reg(int fd, char *p, size_t len)
{
    struct uffdio_register r = { .range = { (uintptr_t)p, len }, .mode = UFFDIO_REGISTER_MODE_MISSING };
    if (ioctl(fd, UFFDIO_REGISTER, &r)) { perror("UFFDIO_REGISTER"); exit(1); }
}

struct handler { int uffd; long delay_ns; volatile int stop; };

static void *handle(void *arg)
{
    struct handler *h = arg;
    static char page[PAGE];
    memset(page, 7, PAGE);
    while (!h->stop) {
        struct pollfd pfd = { h->uffd, POLLIN, 0 };
        if (poll(&pfd, 1, 20) <= 0)
            continue;
        struct uffd_msg msg;
        if (read(h->uffd, &msg, sizeof msg) != sizeof msg || msg.event != UFFD_EVENT_PAGEFAULT)
            continue;
        if (h->delay_ns) {
            struct timespec ts = { 0, h->delay_ns };
            nanosleep(&ts, NULL);
        }
        struct uffdio_copy c = { .dst = msg.arg.pagefault.address & ~(PAGE - 1), .src = (uintptr_t)page, .len = PAGE };
        if (ioctl(h->uffd, UFFDIO_COPY, &c) && errno != EEXIST) { perror("UFFDIO_COPY"); exit(1); }
    }
    return NULL;
}

static volatile int spinning;
static void *spin(void *arg) { (void)arg; while (spinning) ; return NULL; }

struct tally { long n, slow, nvcsw, nivcsw, minflt, majflt, slow_no_nvcsw, fast_nvcsw; uint64_t min_slept_ns; uint64_t slow_ns[4096]; };

/* Touches npages pages (a write to each), timing each access with its rusage deltas. */
static void touch(char *p, size_t npages, struct tally *t)
{
    memset(t, 0, sizeof *t);
    for (size_t i = 0; i < npages; i++) {
        struct rusage a, b;
        getrusage(RUSAGE_THREAD, &a);
        uint64_t t0 = now_ns();
        *(volatile char *)(p + i * PAGE) = 1;
        uint64_t dt = now_ns() - t0;
        getrusage(RUSAGE_THREAD, &b);
        long vcs = b.ru_nvcsw - a.ru_nvcsw;
        t->n++;
        if (vcs && (!t->min_slept_ns || dt < t->min_slept_ns))
            t->min_slept_ns = dt;
        if (dt > SLOW_NS) {
            if (t->slow < 4096)
                t->slow_ns[t->slow] = dt;
            t->slow++;
            t->nvcsw += vcs > 0;
            t->nivcsw += b.ru_nivcsw > a.ru_nivcsw;
            t->minflt += b.ru_minflt > a.ru_minflt;
            t->majflt += b.ru_majflt > a.ru_majflt;
            t->slow_no_nvcsw += vcs == 0;
        } else if (vcs) {
            t->fast_nvcsw++;
        }
    }
}

static int cmp(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static void report(const char *name, struct tally *t)
{
    long k = t->slow < 4096 ? t->slow : 4096;
    qsort(t->slow_ns, k, sizeof t->slow_ns[0], cmp);
    printf("%-14s %6ld accesses, %6ld slow (p50 %6.1f us); of the slow: nvcsw moved %5ld, nivcsw %4ld, "
           "minflt %5ld, majflt %ld; fast with nvcsw %ld; fastest with nvcsw %.1f us\n",
           name, t->n, t->slow, k ? t->slow_ns[k / 2] / 1e3 : 0.0, t->nvcsw, t->nivcsw, t->minflt, t->majflt,
           t->fast_nvcsw, t->min_slept_ns / 1e3);
}

struct job { char *p; size_t n; struct tally *t; };
static void *run_touch(void *arg) { struct job *j = arg; touch(j->p, j->n, j->t); return NULL; }

/* The vCPU is a thread of its own, as in the guest. */
static void vcpu(char *p, size_t n, struct tally *t)
{
    struct job j = { p, n, t };
    pthread_t th;
    pthread_create(&th, NULL, run_touch, &j);
    pthread_join(th, NULL);
}

static void uffd_case(const char *name, size_t n, long delay_ns)
{
    static struct tally t;
    int fd = open_uffd();
    char *p = mmap(NULL, n * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    reg(fd, p, n * PAGE);
    struct handler h = { fd, delay_ns, 0 };
    pthread_t th;
    pthread_create(&th, NULL, handle, &h);
    vcpu(p, n, &t);
    h.stop = 1;
    pthread_join(th, NULL);
    report(name, &t);
    munmap(p, n * PAGE);
    close(fd);
}

static void zero_cow_case(const char *name, size_t n, int spinners)
{
    static struct tally t;
    int fd = open_uffd();
    char *p = mmap(NULL, n * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    reg(fd, p, n * PAGE);
    struct uffdio_zeropage z = { .range = { (uintptr_t)p, n * PAGE } };
    if (ioctl(fd, UFFDIO_ZEROPAGE, &z)) { perror("UFFDIO_ZEROPAGE"); exit(1); }
    pthread_t sp[2];
    spinning = 1;
    for (int i = 0; i < spinners; i++)
        pthread_create(&sp[i], NULL, spin, NULL);
    vcpu(p, n, &t);
    spinning = 0;
    for (int i = 0; i < spinners; i++)
        pthread_join(sp[i], NULL);
    report(name, &t);
    munmap(p, n * PAGE);
    close(fd);
}

static void anon_case(const char *name, size_t n)
{
    static struct tally t;
    char *p = mmap(NULL, n * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    vcpu(p, n, &t);
    report(name, &t);
    munmap(p, n * PAGE);
}

int main(int argc, char **argv)
{
    size_t n = argc > 1 ? strtoul(argv[1], NULL, 0) : 1000;
    if (argc > 2)
        SLOW_NS = strtoull(argv[2], NULL, 0);
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("slow: > %.1f us\n", SLOW_NS / 1e3);
    uffd_case("uffd-1ms", n, 1000000);
    uffd_case("uffd-0", n * 4, 0);
    zero_cow_case("zero-cow", n * 50, 0);
    anon_case("anon", n * 50);
    zero_cow_case("zero-cow+spin", n * 50, 2);
    return 0;
}
