/*
 * The data plane's threads together, for ThreadSanitizer: one process plays
 * both sides of a postcopy migration over socketpairs and a real userfaultfd,
 * with the threads the real processes run (native/dataplane.c), each loop
 * stopped as its trio owner stops it, through its own stop eventfd.
 *
 *   source       streamer        src_stream_runs, window after window (paced),
 *                                taking the request server's notes between
 *                                windows, then a control frame (SourceDone's place)
 *                request server  src_request_server: requests -> replies
 *   destination  bulk placer     dst_bulk_placer on the bulk stream: ends at the control frame
 *                reply placer    dst_reply_placer on the replies
 *                fault reader    dst_fault_loop: uffd -> requests
 *                vCPU            vcpu_run (native/guest.c) on the first half of the guest
 *                reader          reads the second half in a scrambled order, each
 *                                page compared with the source's
 *   main         what Python's progress line and watchdog read while all of that
 *                runs (migrate/destination.py _watch_progress, migrate/guest.py
 *                stalls() and stuck(), migrate/source.py's progress), with
 *                __atomic loads; then the stops, the joins and the checks
 *
 * Every other migration runs over TLS (a self-signed certificate made at
 * start; keys updated every 256 KiB), as with --tls-cert.
 * Built by scripts/sanitize with -fsanitize=thread together with the sources of native/;
 * a report is a failure (TSAN_OPTIONS=halt_on_error=1).  Without TSan it is an
 * ordinary test of the same contract (a page lost, a loop ending otherwise
 * than as asked, counters that do not add up: exit 1).
 *     tsan_plane [PAGES [ROUNDS]]
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stddef.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "stats.h"
#include "uffd.h"
#include "guest.h"
#include "wire.h"
#include "link.h"
#include "dataplane.h"
#include "dirty.h"
#include "common.h"
#include "selfsigned.h"

#define WINDOW 64 /* pages the streamer sends between two looks at the notes */
#define IDLE_MS 30000

#define CHECK(cond)                                                                          \
    do {                                                                                     \
        if (!(cond)) {                                                                       \
            fprintf(stderr, "tsan_plane: %s:%d: failed: %s\n", __FILE__, __LINE__, #cond);   \
            exit(1);                                                                         \
        }                                                                                    \
    } while (0)

static uint64_t pages;
static uint64_t src_base, dst_base;

/* -- one loop a thread, as migrate/loops.py runs them ---------------------- */

typedef struct {
    pthread_t thread;
    int stop_fd;
    int rc;
    const char *why;
    void *(*body)(void *);
    void *arg;
} loop_t;

static void start(loop_t *l, void *(*body)(void *), void *arg)
{
    l->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    CHECK(l->stop_fd >= 0);
    l->why = NULL;
    l->body = body;
    l->arg = arg;
    CHECK(pthread_create(&l->thread, NULL, body, l) == 0);
}

/* Stops the loop through its eventfd (NULL: it ends by itself), waits for it. */
static int finish(loop_t *l, int stop)
{
    if (stop)
        CHECK(eventfd_write(l->stop_fd, 1) == 0);
    CHECK(pthread_join(l->thread, NULL) == 0);
    close(l->stop_fd);
    return l->rc;
}

static void expect(const char *name, loop_t *l, int rc)
{
    if (l->rc != rc) {
        fprintf(stderr, "tsan_plane: %s ended with %d (%s), expected %d\n", name, l->rc,
                l->why ? l->why : "", rc);
        exit(1);
    }
}

/* -- the destination -------------------------------------------------------- */

typedef struct {
    dst_plane_t plane;
    link_t bulk, requests, replies; /* bulk and replies read, requests written */
    rxbuf_t bulk_rx, replies_rx;
    uint32_t accept;                /* the stream's and the replies' mask (state.py) */
    stall_stats_t stalls;
    vcpu_state_t vcpu;
    int vcpu_stop, gate;
    uint64_t read_ok;               /* pages the reader compared (its own) */
} dst_t;

static dst_t dst;

static void *placer(void *arg)
{
    loop_t *l = arg;
    const dst_placer_t c = { &dst.plane, &dst.bulk, &dst.bulk_rx, dst.accept, IDLE_MS };
    l->rc = dst_bulk_placer(&c, l->stop_fd, &l->why);
    return NULL;
}

static void *reply_placer(void *arg)
{
    loop_t *l = arg;
    const dst_placer_t c = { &dst.plane, &dst.replies, &dst.replies_rx, dst.accept, IDLE_MS };
    l->rc = dst_reply_placer(&c, l->stop_fd, &l->why);
    return NULL;
}

static void *fault_reader(void *arg)
{
    loop_t *l = arg;
    l->rc = dst_fault_loop(&dst.plane, &dst.requests, IDLE_MS, 2, l->stop_fd, &l->why);
    return NULL;
}

static void *vcpu(void *arg)
{
    (void)arg;
    vcpu_run(dst_base, 0, pages / 2, WL_UNIFORM, &dst.vcpu, UINT64_MAX, 0, &dst.vcpu_stop, &dst.stalls,
             &dst.gate);
    return NULL;
}

/* Reads the second half of the guest in a scrambled order: each first read
 * faults, and must then see exactly the source's page. */
static void *reader(void *arg)
{
    (void)arg;
    uint64_t half = pages / 2, n = pages - half, ok = 0;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t p = half + (n % 7919 ? (i * 7919) % n : i); /* 7919 is prime: a permutation */
        const char *d = (const char *)(uintptr_t)(dst_base + p * PAGE);
        const char *s = (const char *)(uintptr_t)(src_base + p * PAGE);
        ok += memcmp(d, s, PAGE) == 0;
    }
    __atomic_store_n(&dst.read_ok, ok, __ATOMIC_RELEASE);
    return NULL;
}

/* -- the source --------------------------------------------------------------- */

typedef struct {
    link_t bulk, requests, replies; /* bulk and replies written, requests read */
    rxbuf_t requests_rx;
    send_stats_t stream, served;
    note_ring_t notes;
    pacer_t pace;
    uint64_t noted;                 /* runs taken from the notes (the streamer's) */
} src_t;

static src_t src;

static void *server(void *arg)
{
    loop_t *l = arg;
    const src_server_t c = { { src_base, pages, WIRE_PAGE_SHIFT, &src.replies, IDLE_MS, NULL, &src.served }, &src.requests,
                             &src.requests_rx, &src.notes };
    l->rc = src_request_server(&c, l->stop_fd, &l->why);
    return NULL;
}

/* Sends len bytes whole on l, plaintext or TLS, waiting when it must. */
static void send_whole(link_t *l, const void *buf, size_t len)
{
    while (len) {
        int want = POLLOUT;
        const char *why = NULL;
        int64_t n = link_send(l, buf, len, &want, &why);
        if (n > 0) {
            buf = (const char *)buf + n;
            len -= (size_t)n;
            continue;
        }
        CHECK(n == -EAGAIN);
        struct pollfd pfd = { l->fd, (short)want, 0 };
        poll(&pfd, 1, 1000);
    }
}

/* The streamer: windows in a scrambled order (as after a lost link, or with
 * prepaging), the notes taken between two, then the end of the stream. */
static void *streamer(void *arg)
{
    loop_t *l = arg;
    uint64_t windows = (pages + WINDOW - 1) / WINDOW;
    struct wire_run noted[256];
    const src_sender_t c = { src_base, pages, WIRE_PAGE_SHIFT, &src.bulk, IDLE_MS, &src.pace, &src.stream };
    for (uint64_t i = 0; i < windows; i++) {
        uint64_t w = (i * 13) % windows;
        if (windows % 13 == 0)
            w = i;
        struct wire_run run = { w * WINDOW, pages - w * WINDOW < WINDOW ? pages - w * WINDOW : WINDOW };
        l->rc = src_stream_runs(&c, &run, 1, 0, l->stop_fd, &l->why);
        if (l->rc)
            return NULL;
        int n;
        while ((n = notes_take(&src.notes, noted, 256)) > 0)
            src.noted += (uint64_t)n;
    }
    /* A control frame: where SourceDone would be (the placer hands it to Python). */
    struct {
        struct wire_frame f;
        uint8_t body[3];
    } __attribute__((packed)) done = { { .kind = WIRE_CONTROL, .count = 3 }, { 0x92, 0x0a, 0x00 } };
    send_whole(&src.bulk, &done, sizeof done);
    l->rc = 0;
    return NULL;
}

/* -- what Python reads while the threads run ------------------------------- */

static uint64_t peek(const uint64_t *p)
{
    return __atomic_load_n(p, __ATOMIC_RELAXED);
}

static uint64_t watched;

/* Every counter of a statistics struct, as "read by anyone" (dataplane.h) allows. */
static uint64_t peek_all(const void *stats, size_t size)
{
    uint64_t sum = 0;
    for (size_t i = 0; i < size / sizeof(uint64_t); i++)
        sum += peek((const uint64_t *)stats + i);
    return sum;
}

static void watch(void)
{
    const dst_plane_t *d = &dst.plane;
    /* destination.py: placed_pages, eexist, faults per second; and the rest of every loop's counters. */
    uint64_t placed = d->present_base + peek(&d->bulk.pages) + peek(&d->urgent.pages) - d->placed_base;
    CHECK(placed <= pages);
    watched += peek_all(&d->bulk, sizeof d->bulk) + peek_all(&d->urgent, sizeof d->urgent) +
               peek_all(&d->faults, sizeof d->faults);
    /* guest.py: stalls() for the stall median, live steps, the watchdog's stuck(). */
    watched += peek_all(&dst.stalls, offsetof(stall_stats_t, armed));
    /* source.py's progress: the stream's and the request server's counters, the notes dropped. */
    watched += peek_all(&src.stream, sizeof src.stream) + peek_all(&src.served, sizeof src.served) +
               peek(&src.notes.dropped);
}

/* -- a migration -------------------------------------------------------------- */

static void pair(int fds[2])
{
    /* Non-blocking, as the processes' sockets are: a TLS read must answer WANT_READ, never block. */
    CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, fds) == 0);
}

/* TLS on every connection, as over --tls-cert: the destination's ends are
 * clients, the source's servers; the handshakes run here, before any thread
 * uses a link (each link then has one user, as in the processes). */
static void *server_ctx, *client_ctx;

static void tls_pair(link_t *client, link_t *server)
{
    const char *why = NULL;
    CHECK(tls_attach(client, client_ctx, "127.0.0.1", &why) == 0);
    CHECK(tls_attach(server, server_ctx, NULL, &why) == 0);
    int want, client_done = 0, server_done = 0;
    for (int i = 0; i < 1000 && !(client_done && server_done); i++) {
        if (!client_done) {
            int rc = tls_handshake(client, &want, &why);
            CHECK(rc == 0 || rc == -EAGAIN);
            client_done = rc == 0;
        }
        if (!server_done) {
            int rc = tls_handshake(server, &want, &why);
            CHECK(rc == 0 || rc == -EAGAIN);
            server_done = rc == 0;
        }
    }
    CHECK(client_done && server_done);
}

static void migrate_once(uint64_t seed, int tls)
{
    memset(&dst, 0, sizeof dst);
    memset(&src, 0, sizeof src);
    /* The source's guest, stopped. */
    src_base = region_map(pages * PAGE, MEMORY_ANON);
    CHECK(src_base);
    guest_fill(src_base, 0, pages, seed, 200);
    /* The destination's, empty, registered. */
    int e1, e2, uffd = uffd_open(&e1, &e2);
    if (uffd < 0) {
        fprintf(stderr, "tsan_plane: no userfaultfd (%s; /dev/userfaultfd: %s)\n", strerror(e1), strerror(e2));
        exit(1);
    }
    uint64_t features;
    CHECK(uffd_api(uffd, &features) == 0);
    dst.plane.uffd = uffd;
    dst.plane.pages = pages;
    dst.plane.page_shift = WIRE_PAGE_SHIFT;
    dst_base = region_map(pages * PAGE, MEMORY_ANON);
    CHECK(dst_base);
    CHECK(uffd_register(uffd, dst_base, pages * PAGE) == 0);
    /* Described as two regions, as a VMM's memory may be: frames across the boundary are placed in two stretches. */
    dst.plane.pagemap_fd = -1;
    dst.plane.nregions = 2;
    dst.plane.region[0] = (region_t){ dst_base, 0, pages / 3 };
    dst.plane.region[1] = (region_t){ dst_base + pages / 3 * PAGE, pages / 3, pages - pages / 3 };
    dst.plane.done_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    CHECK(dst.plane.done_fd >= 0);
    dst.accept = 1u << WIRE_PAGES | 1u << WIRE_ZEROS | 1u << WIRE_CONTROL;
    /* Receive buffers as migrate/protocol/connection.py sizes them. */
    uint64_t dst_cap = 2 * FRAME_MAX, src_cap = 2 * (WIRE_FRAME_SIZE + WIRE_MAX_CONTROL);
    dst.bulk_rx = (rxbuf_t){ malloc(dst_cap), dst_cap, 0, 0 };
    dst.replies_rx = (rxbuf_t){ malloc(dst_cap), dst_cap, 0, 0 };
    src.requests_rx = (rxbuf_t){ malloc(src_cap), src_cap, 0, 0 };
    CHECK(dst.bulk_rx.data && dst.replies_rx.data && src.requests_rx.data);
    int bulk[2], requests[2], replies[2];
    pair(bulk);
    pair(requests);
    pair(replies);
    src.bulk.fd = bulk[0];
    dst.bulk.fd = bulk[1];
    dst.requests.fd = requests[0];
    src.requests.fd = requests[1];
    src.replies.fd = replies[0];
    dst.replies.fd = replies[1];
    if (tls) {
        tls_pair(&dst.bulk, &src.bulk);
        tls_pair(&dst.requests, &src.requests);
        tls_pair(&dst.replies, &src.replies);
        /* A key update every 256 KiB: the stream's sender updates keys while its reader reads. */
        src.bulk.rekey_bytes = src.replies.rekey_bytes = 256 * 1024;
    }
    /* Slow enough that the vCPU and the reader fault on pages the stream has
     * not sent yet: about 0.2 s for the guest, uninstrumented. */
    src.pace = (pacer_t){ .rate = pages * PAGE * 5, .burst = 64 * PAGE, .quantum = 16 * PAGE };
    vcpu_init(&dst.vcpu, seed, 0);
    __atomic_store_n(&dst.stalls.armed, 1, __ATOMIC_RELAXED);

    loop_t l_placer, l_replies, l_faults, l_server, l_streamer;
    pthread_t t_vcpu, t_reader;
    start(&l_server, server, NULL);
    start(&l_faults, fault_reader, NULL);
    start(&l_replies, reply_placer, NULL);
    start(&l_placer, placer, NULL);
    CHECK(pthread_create(&t_vcpu, NULL, vcpu, NULL) == 0);
    gate_open(&dst.gate);
    CHECK(pthread_create(&t_reader, NULL, reader, NULL) == 0);
    start(&l_streamer, streamer, NULL);

    /* Until every page is present, by the counters (the done eventfd), and
     * the stream has ended: the placer hands its control frame over. */
    uint64_t t0 = mono_ns();
    for (;;) {
        struct pollfd pfd = { dst.plane.done_fd, POLLIN, 0 };
        watch();
        if (poll(&pfd, 1, 2) > 0)
            break;
        CHECK(mono_ns() - t0 < 120 * 1000000000ULL);
    }
    CHECK(finish(&l_streamer, 0) == 0);
    finish(&l_placer, 0);
    expect("the placer", &l_placer, LOOP_CONTROL);
    CHECK(pthread_join(t_reader, NULL) == 0);
    __atomic_store_n(&dst.vcpu_stop, 1, __ATOMIC_RELAXED);
    CHECK(pthread_join(t_vcpu, NULL) == 0);
    watch();
    /* The rest are stopped, as their trio owners stop them when cancelled. */
    finish(&l_faults, 1);
    expect("the fault reader", &l_faults, LOOP_STOPPED);
    finish(&l_replies, 1);
    expect("the reply placer", &l_replies, LOOP_STOPPED);
    finish(&l_server, 1);
    expect("the request server", &l_server, LOOP_STOPPED);

    /* Every page placed once, by one placer or the other; every read saw the source's data. */
    const dst_plane_t *d = &dst.plane;
    CHECK(d->bulk.pages + d->urgent.pages == pages);
    CHECK(dst.read_ok == pages - pages / 2);
    CHECK(src.stream.pages == pages);
    CHECK(d->urgent.answered <= d->faults.pages_requested);
    CHECK(src.served.requests <= d->faults.requests);
    CHECK(src.noted + src.notes.dropped <= d->faults.faults);
    printf("tsan_plane: %s, %llu pages: %llu by the stream, %llu by replies to %llu faults (%llu requests), "
           "%llu -EEXIST, %llu vCPU stalls, %llu vCPU steps\n",
           tls ? "TLS" : "plaintext", (unsigned long long)pages, (unsigned long long)d->bulk.pages, (unsigned long long)d->urgent.pages,
           (unsigned long long)d->faults.faults, (unsigned long long)d->faults.requests,
           (unsigned long long)(d->bulk.eexist + d->urgent.eexist), (unsigned long long)dst.stalls.hist.count,
           (unsigned long long)dst.vcpu.steps);
    CHECK(d->faults.faults > 0);
    CHECK(!tls || src.bulk.rekeys > 0);

    link_t *links[] = { &src.bulk, &dst.bulk, &src.requests, &dst.requests, &src.replies, &dst.replies };
    for (size_t i = 0; i < sizeof links / sizeof links[0]; i++)
        if (links[i]->ssl)
            tls_detach(links[i]);
    for (int i = 0; i < 2; i++) {
        close(bulk[i]);
        close(requests[i]);
        close(replies[i]);
    }
    close(dst.plane.done_fd);
    close(uffd);
    free(dst.bulk_rx.data);
    free(dst.replies_rx.data);
    free(src.requests_rx.data);
    region_unmap(dst_base, pages * PAGE);
    region_unmap(src_base, pages * PAGE);
}

int main(int argc, char **argv)
{
    pages = argc > 1 ? strtoull(argv[1], NULL, 0) : 2048;
    int rounds = argc > 2 ? atoi(argv[2]) : 2;
    CHECK(pages >= 2);
    char cert[] = "/tmp/tsan-plane-cert-XXXXXX", key[] = "/tmp/tsan-plane-key-XXXXXX";
    make_self_signed(cert, key);
    const char *why = NULL;
    server_ctx = tls_context(1, cert, key, cert, &why);
    client_ctx = tls_context(0, cert, key, cert, &why);
    unlink(cert);
    unlink(key);
    CHECK(server_ctx && client_ctx);
    for (int i = 0; i < rounds; i++)
        migrate_once(1 + (uint64_t)i, i % 2); /* plaintext, TLS, plaintext, ... */
    tls_context_free(server_ctx);
    tls_context_free(client_ctx);
    printf("tsan_plane: %d migrations, every thread stopped as asked (%llu)\n", rounds,
           (unsigned long long)(watched % 10));
    return 0;
}
