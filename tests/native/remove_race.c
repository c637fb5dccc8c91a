/*
 * A VMM's removes against the placers: the race docs/architecture.md argues
 * away ("A VMM removes memory").  One process plays a VMM and its handler
 * over a real userfaultfd with UFFD_FEATURE_EVENT_REMOVE:
 *
 *   streamer      writes page frames of the image (every byte 0xAB), each from
 *                 the page the VMM removes next on, as fast as the placer takes them
 *   bulk placer   dst_bulk_placer: places them (zero pages where removed)
 *   fault reader  dst_fault_loop: reads the remove events, recording each range
 *   main          the VMM: MADV_DONTNEED of each page in turn (runs of 1-4
 *                 pages), each call waiting until the reader has read its event
 *
 * After a remove, the range reads as zeros: a placement that looked at the
 * removed ranges before the event was recorded, and copied after the kernel's
 * zap, would leave the image's bytes there.  At the end every present page of
 * every removed range must be all zeros.  Without the lock (the reader's
 * exclusive hold around read(), the placements' shared hold around their look
 * and their copy) such pages appear.
 *     remove_race [PAGES [SECONDS]]   exit 0: none; 1: some (or a loop failed)
 * (SECONDS bounds the removes; they end sooner once every page was removed.)
 * Built and run by tests/test_removes.py, and under TSan by scripts/sanitize.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <linux/userfaultfd.h>

#include "stats.h"
#include "uffd.h"
#include "wire.h"
#include "link.h"
#include "dataplane.h"
#include "common.h"

#define IDLE_MS 30000
#define RUN_PAGES 64 /* pages a stream frame carries */

#define CHECK(cond)                                                                          \
    do {                                                                                     \
        if (!(cond)) {                                                                       \
            fprintf(stderr, "remove_race: %s:%d: failed: %s\n", __FILE__, __LINE__, #cond); \
            exit(1);                                                                         \
        }                                                                                    \
    } while (0)

static dst_plane_t plane;
static link_t bulk, requests;
static rxbuf_t bulk_rx;
static int stream_fd, stop_stream;
static uint64_t cursor; /* the next page the VMM removes: where the stream's frames start */
static int placer_stop, reader_stop, placer_rc, reader_rc;
static const char *placer_why, *reader_why;

static void *placer(void *arg)
{
    (void)arg;
    const dst_placer_t c = { &plane, &bulk, &bulk_rx, 1u << WIRE_PAGES | 1u << WIRE_ZEROS, IDLE_MS };
    placer_rc = dst_bulk_placer(&c, placer_stop, &placer_why);
    return NULL;
}

static void *reader(void *arg)
{
    (void)arg;
    reader_rc = dst_fault_loop(&plane, &requests, IDLE_MS, 1, reader_stop, &reader_why);
    return NULL;
}

/* The source's stream, frames of RUN_PAGES pages of 0xAB, each from where
 * the VMM removes next: so that placements and removes meet. */
static void *streamer(void *arg)
{
    (void)arg;
    static uint8_t frame[WIRE_FRAME_SIZE + RUN_PAGES * PAGE];
    memset(frame + WIRE_FRAME_SIZE, 0xAB, RUN_PAGES * PAGE);
    while (!__atomic_load_n(&stop_stream, __ATOMIC_RELAXED)) {
        uint64_t start = __atomic_load_n(&cursor, __ATOMIC_RELAXED);
        uint32_t count = plane.pages - start < RUN_PAGES ? (uint32_t)(plane.pages - start) : RUN_PAGES;
        struct wire_frame f = { .kind = WIRE_PAGES, .count = count, .start = start };
        memcpy(frame, &f, sizeof f);
        size_t len = WIRE_FRAME_SIZE + (size_t)count * PAGE, off = 0;
        while (off < len) {
            ssize_t n = send(stream_fd, frame + off, len - off, MSG_NOSIGNAL);
            if (n < 0)
                return NULL; /* the placer's end closed: the end */
            off += (size_t)n;
        }
    }
    return NULL;
}

static int present(uint64_t addr, int pagemap)
{
    uint64_t entry = 0;
    CHECK(pread(pagemap, &entry, sizeof entry, (off_t)(addr / PAGE * sizeof entry)) == sizeof entry);
    return entry >> 63;
}

int main(int argc, char **argv)
{
    uint64_t pages = argc > 1 ? strtoull(argv[1], NULL, 0) : 16384;
    double seconds = argc > 2 ? atof(argv[2]) : 2.0;
    CHECK(pages >= RUN_PAGES);

    int se, de, uffd = uffd_open(&se, &de);
    uint64_t features;
    CHECK(uffd >= 0);
    CHECK(uffd_api_features(uffd, UFFD_FEATURE_EVENT_REMOVE, &features) == 0);
    CHECK(features & UFFD_FEATURE_EVENT_REMOVE);
    uint64_t base = region_map(pages * PAGE, MEMORY_ANON);
    CHECK(base);
    CHECK(uffd_register(uffd, base, pages * PAGE) == 0);

    plane.uffd = uffd;
    plane.pagemap_fd = -1;
    plane.nregions = 1;
    plane.region[0] = (region_t){ base, 0, pages };
    plane.pages = pages;
    plane.page_shift = WIRE_PAGE_SHIFT;
    plane.memory = MEMORY_ANON;
    plane.done_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    CHECK(plane.done_fd >= 0 && plane_track_removes(&plane) == 0);

    int fds[2], req[2];
    CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) == 0);
    CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, req) == 0);
    stream_fd = fds[0];
    CHECK(fcntl(fds[1], F_SETFL, O_NONBLOCK) == 0);
    bulk.fd = fds[1];
    requests.fd = req[0];
    bulk_rx = (rxbuf_t){ malloc(2 * FRAME_MAX), 2 * FRAME_MAX, 0, 0 };
    CHECK(bulk_rx.data);
    placer_stop = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    reader_stop = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);

    pthread_t threads[3];
    CHECK(pthread_create(&threads[0], NULL, placer, NULL) == 0);
    CHECK(pthread_create(&threads[1], NULL, reader, NULL) == 0);
    CHECK(pthread_create(&threads[2], NULL, streamer, NULL) == 0);

    /* The VMM: removes every page once, in runs of 1-4, as fast as the reader takes their events, for
     * at most the time given. */
    struct timespec t0, now;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    uint64_t removes = 0, seed = 0x9E3779B97F4A7C15ull;
    for (uint64_t first = 0; first < pages;) {
        seed ^= seed << 13, seed ^= seed >> 7, seed ^= seed << 17;
        uint64_t count = 1 + seed % 4 < pages - first ? 1 + seed % 4 : pages - first;
        CHECK(madvise((void *)(uintptr_t)(base + first * PAGE), count * PAGE, MADV_DONTNEED) == 0);
        removes++;
        first += count;
        __atomic_store_n(&cursor, first < pages - RUN_PAGES ? first : 0, __ATOMIC_RELAXED);
        /* Until the placer is at work again (at most 10 ms): the next remove meets its placements,
         * rather than finding it waiting for the last event to be read. */
        uint64_t placed = __atomic_load_n(&plane.bulk.pages, __ATOMIC_RELAXED);
        for (int i = 0; i < 1000 && __atomic_load_n(&plane.bulk.pages, __ATOMIC_RELAXED) == placed; i++)
            nanosleep(&(struct timespec){ 0, 10000 }, NULL);
        clock_gettime(CLOCK_MONOTONIC, &now);
        if (now.tv_sec - t0.tv_sec + (now.tv_nsec - t0.tv_nsec) / 1e9 > seconds)
            break;
    }

    __atomic_store_n(&stop_stream, 1, __ATOMIC_RELAXED);
    CHECK(eventfd_write(placer_stop, 1) == 0 && eventfd_write(reader_stop, 1) == 0);
    CHECK(pthread_join(threads[0], NULL) == 0 && pthread_join(threads[1], NULL) == 0);
    shutdown(fds[1], SHUT_RDWR); /* the streamer, blocked in send(), ends */
    CHECK(pthread_join(threads[2], NULL) == 0);
    if (placer_rc != LOOP_STOPPED || reader_rc != LOOP_STOPPED) {
        fprintf(stderr, "remove_race: placer ended %d (%s), reader %d (%s)\n", placer_rc,
                placer_why ? placer_why : "", reader_rc, reader_why ? reader_why : "");
        return 1;
    }

    /* Every present page of a removed range must read as zeros. */
    static struct wire_run runs[PLANE_REMOVES_MAX];
    int n = plane_removed_runs(&plane, runs, PLANE_REMOVES_MAX), pagemap = open("/proc/self/pagemap", O_RDONLY);
    CHECK(pagemap >= 0);
    uint64_t stale = 0, zero = 0, absent = 0, removed = 0;
    for (int i = 0; i < n; i++)
        for (uint64_t p = runs[i].start; p < runs[i].start + runs[i].count; p++, removed++) {
            const uint8_t *mem = (const uint8_t *)(uintptr_t)(base + p * PAGE);
            if (!present(base + p * PAGE, pagemap)) {
                absent++;
                continue;
            }
            int clean = 1;
            for (uint64_t b = 0; b < PAGE && clean; b++)
                clean = !mem[b];
            clean ? zero++ : stale++;
        }
    printf("remove_race: %llu removes (%llu events read) over %llu pages while %llu pages were placed; "
           "of %llu removed pages: %llu zero, %llu absent, %llu with the image's bytes\n",
           (unsigned long long)removes, (unsigned long long)plane.remove_events, (unsigned long long)pages,
           (unsigned long long)plane.bulk.pages,
           (unsigned long long)removed, (unsigned long long)zero, (unsigned long long)absent,
           (unsigned long long)stale);
    return stale || plane.remove_events != removes ? 1 : 0;
}
