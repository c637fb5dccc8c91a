/* ideal_placer: the ceiling of the postcopy bulk stream.
 *   usage: ideal_placer [MIB=1024] [RUN_KIB=256] [SPINNERS=0] [KIND=anon]
 * A sender thread streams a region of MIB MiB over loopback TCP; the main
 * thread receives it in runs of RUN_KIB KiB (each received fully into a
 * buffer) and places every run with one UFFDIO_COPY into a region of memory
 * KIND (anon, memfd or hugetlb: as migrate-src --memory maps it) registered
 * MISSING with userfaultfd; on hugetlb a run is whole 2 MiB pages (RUN_KIB a
 * multiple of 2048), as the wire carries them.  That is exactly the destination's
 * placer with no framing, no interpreter and no faults competing.  SPINNERS
 * threads burn CPU for the whole run: the load of a guest with as many vCPUs
 * running flat out, which a migration's placer competes with.
 * Prints {"placer_gbps": ..., "spinners": N, "memory": KIND, "page_kib": ..., ...}. */
#include "common.h"

static size_t region_len;
static int port;

static void *sender(void *arg)
{
    (void)arg;
    /* A real source region, fully populated before the clock starts, so that
     * the sender reads memory like migrate-src does rather than one hot buffer. */
    char *src = mmap(NULL, region_len, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (src == MAP_FAILED)
        die("mmap source");
    for (size_t off = 0; off < region_len; off += PAGE)
        memset(src + off, (int)(off / PAGE) | 1, 64); /* nonzero, varies per page */
    int fd = tcp_connect(port, 0);
    send_all(fd, src, region_len);
    close(fd);
    munmap(src, region_len);
    return NULL;
}

int main(int argc, char **argv)
{
    size_t mib = argc > 1 ? strtoul(argv[1], NULL, 10) : 1024;
    size_t run = (argc > 2 ? strtoul(argv[2], NULL, 10) : 256) * 1024;
    int spinners = argc > 3 ? atoi(argv[3]) : 0;
    enum mem_kind kind = argc > 4 ? kind_of(argv[4]) : KIND_ANON;
    size_t page = kind_page(kind);
    if (!mib || !run || run % page || (mib * MIB) % page) {
        fprintf(stderr, "usage: ideal_placer [MIB] [RUN_KIB, whole pages of KIND] [SPINNERS] [KIND]\n");
        return 2;
    }
    region_len = mib * MIB;

    int uffd = uffd_open();
    char *dst = uffd_region_kind(uffd, kind, region_len);
    char *buf = aligned_alloc(PAGE, run);
    memset(buf, 0, run);                   /* fault the bounce buffer in now */

    int lfd = tcp_listen(&port);
    spinners_start(spinners);
    pthread_t t;
    pthread_create(&t, NULL, sender, NULL);
    int fd = tcp_accept(lfd, 0);

    /* The clock starts at the first byte: the sender's region setup is not
     * part of the stream. */
    double t0 = 0;
    uint64_t placed = 0, eexist = 0;
    for (size_t off = 0; off < region_len; off += run) {
        size_t n = region_len - off < run ? region_len - off : run;
        if (recv_all(fd, buf, n) != n) {
            fprintf(stderr, "short stream at %zu\n", off);
            return 1;
        }
        if (!off)
            t0 = now_s();
        placed += uffd_place_pages(uffd, dst + off, buf, n, page, &eexist);
    }
    double dt = now_s() - t0;
    pthread_join(t, NULL);
    spinners_stop();

    /* Spot-check: placed pages are readable without faulting and hold the data. */
    if (placed != region_len || dst[region_len - PAGE] != (char)((region_len / PAGE - 1) | 1)) {
        fprintf(stderr, "placement mismatch: %lu of %zu bytes\n", placed, region_len);
        return 1;
    }
    printf("{\"placer_gbps\": %.3f, \"bytes\": %lu, \"run_kib\": %zu, \"seconds\": %.4f, "
           "\"eexist\": %lu, \"spinners\": %d, \"memory\": \"%s\", \"page_kib\": %zu}\n",
           placed / dt / 1e9, placed, run / 1024, dt, eexist, spinners, kind_name(kind), page / 1024);
    return 0;
}
