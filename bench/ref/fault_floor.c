/* fault_floor: the floor of one postcopy fault served over the network.
 *   usage: fault_floor [K=2000] [REGION_MIB=256] [SPINNERS=0] [KIND=anon]
 * KIND is the memory of both regions below (anon, memfd or hugetlb, mapped as
 * migrate-src --memory maps it), and its page is what a fault moves: 4 KiB,
 * or a whole 2 MiB page on hugetlb.
 * Threads:  source  - serves page requests on a TCP_NODELAY connection
 *                     (request: 8-byte page index, reply: one page)
 *           handler - polls the uffd, reads uffd_msg, requests the page,
 *                     receives it, UFFDIO_COPY (wakes the vCPU)
 *           vCPU    - (main thread) touches K random missing pages one after
 *                     another and times each access with CLOCK_MONOTONIC; when
 *                     K exceeds the region's pages (2 MiB pages: a 64 MiB
 *                     region has 32), it touches them in passes, the region
 *                     made missing again between passes (untimed)
 *           spinners - SPINNERS threads that only burn CPU for the whole run:
 *                     the load of a guest with as many vCPUs running flat out
 * Run twice: with an idle link, then "loaded" while a second connection in
 * the same process saturates with an ideal-placer stream (TCP receive +
 * UFFDIO_COPY into a second registered region), as the bulk channel would.
 * Prints {"fault_idle_us": {p50,p99,max}, "fault_loaded_us": {...},
 * "loaded_stream_gbps": ..., "spinners": N, "memory": KIND, "page_kib": ...}. */
#include "common.h"

#define RUN (256 * 1024)           /* bulk run, as ideal_placer's default (one page on hugetlb) */
#define BULK_LEN (256 * MIB)       /* bulk target, re-zapped on wrap-around (64 MiB on hugetlb) */

static enum mem_kind kind;
static size_t page_len, run_len, bulk_len;  /* the kind's page, bulk run and bulk target */
static size_t region_len;
static char *region;               /* the faulting "guest" */
static int uffd, src_lfd, bulk_lfd, src_port, bulk_port;
static volatile int stop_handler, stop_bulk;
static volatile uint64_t bulk_bytes;

static void *source(void *arg)     /* serves one page per 8-byte request */
{
    (void)arg;
    int fd = tcp_accept(src_lfd, 1);
    uint64_t idx, *page = aligned_alloc(PAGE, page_len);
    memset(page, 0xab, page_len);
    while (recv_all(fd, &idx, 8) == 8) {
        page[0] = idx;             /* stamped so the vCPU can check what it got */
        send_all(fd, page, page_len);
    }
    close(fd);
    return NULL;
}

static void *handler(void *arg)
{
    (void)arg;
    int fd = tcp_connect(src_port, 1);
    char *page = aligned_alloc(PAGE, page_len);
    memset(page, 0, page_len);     /* fault the receive buffer in now */
    struct uffd_msg msgs[16];
    struct pollfd p = { .fd = uffd, .events = POLLIN };
    while (!stop_handler) {
        /* A timeout so the thread notices stop_handler; faults wake it at once. */
        if (poll(&p, 1, 50) <= 0)
            continue;
        ssize_t n = read(uffd, msgs, sizeof msgs);
        if (n < 0 && (errno == EAGAIN || errno == EINTR))
            continue;
        if (n < 0)
            die("read uffd");
        for (size_t i = 0; i < n / sizeof msgs[0]; i++) {
            if (msgs[i].event != UFFD_EVENT_PAGEFAULT)
                continue;
            uint64_t addr = msgs[i].arg.pagefault.address & ~(page_len - 1);
            uint64_t idx = (addr - (uintptr_t)region) / page_len;
            send_all(fd, &idx, 8);
            if (recv_all(fd, page, page_len) != page_len)
                die("source closed");
            uffd_place_pages(uffd, (char *)addr, page, page_len, page_len, NULL);  /* EEXIST is harmless */
        }
    }
    close(fd);
    return NULL;
}

static void *bulk_sender(void *arg)
{
    (void)arg;
    char *buf = malloc(MIB);
    memset(buf, 0x5a, MIB);
    int fd = tcp_connect(bulk_port, 0);
    while (!stop_bulk)
        send_all(fd, buf, MIB);
    close(fd);                     /* EOF ends the bulk placer */
    free(buf);
    return NULL;
}

static void *bulk_placer(void *arg)
{
    (void)arg;
    /* Its own uffd and region, like a second guest RAM block: nothing faults
     * there, it only competes for CPU, memory bandwidth and the loopback. */
    int u = uffd_open();
    char *dst = uffd_region_kind(u, kind, bulk_len);
    char *buf = aligned_alloc(PAGE, run_len);
    int fd = tcp_accept(bulk_lfd, 0);
    for (size_t off = 0;; off = (off + run_len) % bulk_len) {
        if (recv_all(fd, buf, run_len) != run_len)
            break;
        if (!off && bulk_bytes)    /* wrapped: make the region missing again */
            kind_zap(kind, dst, bulk_len);
        uffd_place_pages(u, dst + off, buf, run_len, page_len, NULL);
        bulk_bytes += run_len;
    }
    close(fd);
    munmap(dst, bulk_len);
    close(u);
    return NULL;
}

/* Touch k random missing pages, distinct within each pass over the region
 * (a pass is every page; the region is made missing again between passes);
 * returns the sorted latencies in µs. */
static double *touch_pages(size_t k)
{
    size_t npages = region_len / page_len;
    uint32_t *order = malloc(npages * sizeof *order);
    double *lat = malloc(k * sizeof *lat);
    for (size_t i = 0; i < npages; i++)
        order[i] = i;
    for (size_t done = 0; done < k;) {
        size_t n = k - done < npages ? k - done : npages;
        if (done)                        /* a new pass: every page missing again */
            kind_zap(kind, region, region_len);
        for (size_t i = 0; i < n; i++) { /* partial Fisher-Yates */
            size_t j = i + (size_t)random() % (npages - i);
            uint32_t t = order[i]; order[i] = order[j]; order[j] = t;
        }
        for (size_t i = 0; i < n; i++) {
            volatile uint64_t *p = (volatile uint64_t *)(region + (size_t)order[i] * page_len);
            double t0 = now_s();
            uint64_t v = *p;             /* blocks in the kernel until placed */
            lat[done + i] = (now_s() - t0) * 1e6;
            if (v != order[i]) {
                fprintf(stderr, "page %u holds %lu\n", order[i], v);
                exit(1);
            }
        }
        done += n;
    }
    free(order);
    qsort(lat, k, sizeof *lat, cmp_double);
    return lat;
}

static void print_stats(const char *name, double *lat, size_t k)
{
    printf("\"%s\": {\"p50\": %.1f, \"p99\": %.1f, \"max\": %.1f, \"count\": %zu}",
           name, pct(lat, k, 50), pct(lat, k, 99), lat[k - 1], k);
}

int main(int argc, char **argv)
{
    size_t k = argc > 1 ? strtoul(argv[1], NULL, 10) : 2000;
    region_len = (argc > 2 ? strtoul(argv[2], NULL, 10) : 256) * MIB;
    int spinners = argc > 3 ? atoi(argv[3]) : 0;
    kind = argc > 4 ? kind_of(argv[4]) : KIND_ANON;
    page_len = kind_page(kind);
    run_len = page_len > RUN ? page_len : RUN;
    bulk_len = kind == KIND_HUGETLB ? 64 * MIB : BULK_LEN;
    if (!k || !region_len || region_len % page_len) {
        fprintf(stderr, "usage: fault_floor [K] [REGION_MIB, whole pages of KIND] [SPINNERS] [KIND]\n");
        return 2;
    }
    srandom(1);
    uffd = uffd_open();
    region = uffd_region_kind(uffd, kind, region_len);
    src_lfd = tcp_listen(&src_port);
    bulk_lfd = tcp_listen(&bulk_port);

    pthread_t ts, th, tb, tp;
    pthread_create(&ts, NULL, source, NULL);
    pthread_create(&th, NULL, handler, NULL);
    spinners_start(spinners);            /* before the warm-up: both phases run loaded */

    touch_pages(16);                     /* warm-up: connection, code, caches */
    kind_zap(kind, region, region_len);
    double *idle = touch_pages(k);

    /* Loaded: fresh missing pages, stream running at full speed first. */
    kind_zap(kind, region, region_len);
    pthread_create(&tp, NULL, bulk_placer, NULL);
    pthread_create(&tb, NULL, bulk_sender, NULL);
    while (bulk_bytes < 64 * MIB)
        usleep(1000);
    uint64_t b0 = bulk_bytes;
    double t0 = now_s();
    double *loaded = touch_pages(k);
    double bulk_gbps = (bulk_bytes - b0) / (now_s() - t0) / 1e9;
    stop_bulk = 1;
    pthread_join(tb, NULL);
    pthread_join(tp, NULL);

    stop_handler = 1;
    pthread_join(th, NULL);              /* closing its socket ends the source */
    pthread_join(ts, NULL);
    spinners_stop();

    printf("{");
    print_stats("fault_idle_us", idle, k);
    printf(", ");
    print_stats("fault_loaded_us", loaded, k);
    printf(", \"loaded_stream_gbps\": %.3f, \"spinners\": %d, \"memory\": \"%s\", \"page_kib\": %zu}\n",
           bulk_gbps, spinners, kind_name(kind), page_len / 1024);
    return 0;
}
