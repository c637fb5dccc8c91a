/*
 * libFuzzer target: the frame reader of the native loops (rx_fill and
 * next_frame in native/dataplane.c) and what they do with what they read,
 * driven through the real loops in one thread:
 *
 *   destination  dst_bulk_placer or dst_reply_placer, over a small guest region
 *                registered with a real userfaultfd (UFFDIO_COPY,
 *                UFFDIO_ZEROPAGE and MADV_DONTNEED happen for real)
 *   source       src_request_server over a small guest, whose replies are
 *                parsed back and checked against its memory
 *
 * The loops read and write through a stand-in for native/link.c (this file's
 * link_recv and link_send; link.c is not linked in): it hands out the input
 * in pieces whose sizes come from the input, answering -EAGAIN between some
 * two pieces, so a frame is split at every point the fuzzer picks, and then
 * reports the peer's close.  Each link's fd is an eventfd that is always
 * readable and writable, so a loop's poll() after -EAGAIN returns at once.
 * The production code is used as it is.
 *
 * Input: an 8-byte setup, then the bytes the peer sends:
 *   [0] mode: bit 0 replies (destination), bit 1 source side, bits 2-4 how
 *       the bytes are split (see piece_limit)
 *   [1] the accept mask for the destination (kinds it may handle)
 *   [2] the guest's pages, 1 + [2] % GUEST_PAGES
 *   [3] replies: pages asked of the source; [4] of which on lost links
 *   [5..7] the seed of the split sizes
 * What is checked beyond "no crash" is the loops' contract: a loop ends with
 * LOOP_CONTROL (a control frame waits, whole header in the buffer), LOOP_EOF,
 * -EPIPE, -EBADMSG or -ENOMSG, never with a failed placement; the buffer's
 * indexes stay ordered; the counters match what the kernel holds and what
 * was asked; every reply the source sends is a well formed frame carrying
 * its guest's pages.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <unistd.h>

#include "stats.h"
#include "uffd.h"
#include "guest.h"
#include "wire.h"
#include "link.h"
#include "dataplane.h"
#include "dirty.h"
#include "common.h"

#define CHECK(cond)                                                                          \
    do {                                                                                     \
        if (!(cond)) {                                                                       \
            fprintf(stderr, "fuzz_frames: %s:%d: property broken: %s\n", __FILE__, __LINE__, #cond); \
            abort();                                                                         \
        }                                                                                    \
    } while (0)

#define GUEST_PAGES 260 /* a little over one largest run */
/* The receive buffers migrate/protocol/connection.py gives each end: two largest frames. */
#define DST_CAP (2 * FRAME_MAX)
#define SRC_CAP (2 * (WIRE_FRAME_SIZE + WIRE_MAX_CONTROL))
/* The link timeout: longer than any input takes (libFuzzer's -timeout is 10 s),
 * so that no silence and no slow frame ends a loop: the stand-in link is never
 * silent, and an input handed out a byte at a time under ASan is slow. */
#define IDLE_MS 60000

/* -- the stand-in link ---------------------------------------------------- */

static struct {
    const uint8_t *data;
    size_t left;
    uint64_t prng;
    unsigned mode; /* how pieces are sized */
    int paused;    /* the last call ended a piece: the next one answers -EAGAIN first */
} feed;

static uint64_t next_random(void)
{
    uint64_t x = feed.prng;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    feed.prng = x;
    return x;
}

/* The most the next call moves: 0 is no limit. */
static uint64_t piece_limit(void)
{
    static const uint64_t most[8] = { 0, 1, 2, 7, 33, 4096, 70000, 1 << 20 };
    uint64_t m = most[feed.mode];
    return m <= 1 ? m : 1 + next_random() % m;
}

static uint64_t piece(uint64_t len)
{
    uint64_t limit = piece_limit();
    return limit && limit < len ? limit : len;
}

int64_t link_recv(link_t *l, void *buf, uint64_t len, int *want, const char **why)
{
    (void)l;
    (void)why;
    CHECK(len > 0);
    if (feed.paused) {
        feed.paused = 0;
        *want = POLLIN;
        return -EAGAIN;
    }
    if (!feed.left)
        return 0; /* the peer closed */
    uint64_t n = piece(len < feed.left ? len : feed.left);
    memcpy(buf, feed.data, n);
    feed.data += n;
    feed.left -= n;
    feed.paused = feed.mode != 0 && next_random() % 4 == 0;
    return (int64_t)n;
}

/* What the source sent, parsed back as the destination would read it. */
static struct {
    uint8_t hdr[WIRE_FRAME_SIZE];
    size_t have;        /* header bytes so far */
    struct wire_frame f;
    uint64_t payload;   /* payload bytes still to come */
    uint64_t at;        /* offset into the guest of the next payload byte */
    uint64_t base, pages;
    uint64_t frames;
    int paused;
} sent;

static void sent_bytes(const uint8_t *p, uint64_t n)
{
    while (n) {
        if (sent.payload) {
            uint64_t k = n < sent.payload ? n : sent.payload;
            CHECK(memcmp(p, (const void *)(uintptr_t)(sent.base + sent.at), k) == 0);
            sent.at += k;
            sent.payload -= k;
            p += k;
            n -= k;
            continue;
        }
        uint64_t k = WIRE_FRAME_SIZE - sent.have < n ? WIRE_FRAME_SIZE - sent.have : n;
        memcpy(sent.hdr + sent.have, p, k);
        sent.have += k;
        p += k;
        n -= k;
        if (sent.have < WIRE_FRAME_SIZE)
            continue;
        sent.have = 0;
        memcpy(&sent.f, sent.hdr, sizeof sent.f);
        const char *why;
        int64_t len = wire_check(&sent.f, sent.pages, WIRE_PAGE_SHIFT, 1u << WIRE_PAGES | 1u << WIRE_ZEROS, &why);
        CHECK(len >= 0); /* the destination would refuse it */
        CHECK(sent.f.flags == 0);
        sent.frames++;
        if (sent.f.kind == WIRE_ZEROS) {
            static const uint8_t zero[PAGE];
            for (uint64_t i = 0; i < sent.f.count; i++)
                CHECK(memcmp((const void *)(uintptr_t)(sent.base + (sent.f.start + i) * PAGE), zero, PAGE) == 0);
        }
        sent.payload = (uint64_t)len;
        sent.at = sent.f.start * PAGE;
    }
}

int64_t link_send(link_t *l, const void *buf, uint64_t len, int *want, const char **why)
{
    (void)l;
    (void)why;
    CHECK(len > 0); /* link.h: a send of nothing is a caller's bug */
    if (sent.paused) {
        sent.paused = 0;
        *want = POLLOUT;
        return -EAGAIN;
    }
    uint64_t n = piece(len);
    sent_bytes(buf, n);
    sent.paused = feed.mode != 0 && next_random() % 4 == 0;
    return (int64_t)n;
}

/* -- the setting, made once ----------------------------------------------- */

static int ready_fd;  /* an eventfd holding 1: always readable, always writable */
static int stop_fd;   /* never signalled */
static int done_fd;
static dst_plane_t plane;
static uint64_t src_base;
static uint8_t *dst_rx, *src_rx;
static note_ring_t notes;

static void setup(void)
{
    int e1, e2;
    int uffd = uffd_open(&e1, &e2);
    if (uffd < 0) {
        fprintf(stderr, "fuzz_frames: no userfaultfd (%s, %s); hint: run as root, or "
                        "sysctl vm.unprivileged_userfaultfd=1\n", strerror(e1), strerror(e2));
        exit(1);
    }
    uint64_t features;
    CHECK(uffd_api(uffd, &features) == 0);
    uint64_t base = region_map(GUEST_PAGES * PAGE, MEMORY_ANON);
    CHECK(base);
    CHECK(uffd_register(uffd, base, GUEST_PAGES * PAGE) == 0);
    ready_fd = eventfd(1, EFD_CLOEXEC | EFD_NONBLOCK);
    stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    done_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    CHECK(ready_fd >= 0 && stop_fd >= 0 && done_fd >= 0);
    plane.uffd = uffd;
    plane.page_shift = WIRE_PAGE_SHIFT;
    plane.pagemap_fd = -1;
    /* Two regions, so that runs across their boundary are placed in two stretches. */
    plane.nregions = 2;
    plane.region[0] = (region_t){ base, 0, GUEST_PAGES / 2 };
    plane.region[1] = (region_t){ base + GUEST_PAGES / 2 * PAGE, GUEST_PAGES / 2, GUEST_PAGES - GUEST_PAGES / 2 };
    plane.done_fd = done_fd;
    /* The source's guest: some pages zero, some not (zero runs and page runs). */
    src_base = region_map(GUEST_PAGES * PAGE, MEMORY_ANON);
    CHECK(src_base);
    guest_fill(src_base, 0, GUEST_PAGES, 7, 300);
    /* Exactly the size of Python's buffers: a byte past either end is an ASan report. */
    dst_rx = malloc(DST_CAP);
    src_rx = malloc(SRC_CAP);
    CHECK(dst_rx && src_rx);
}

/* Pages of the destination's region the kernel holds. */
static uint64_t present(void)
{
    unsigned char vec[GUEST_PAGES];
    CHECK(mincore((void *)(uintptr_t)plane.region[0].base, GUEST_PAGES * PAGE, vec) == 0);
    uint64_t n = 0;
    for (int i = 0; i < GUEST_PAGES; i++)
        n += vec[i] & 1;
    return n;
}

static void check_end(int rc, const char *why, const rxbuf_t *rx, uint32_t accept)
{
    if (rc == LOOP_CONTROL) {
        struct wire_frame f;
        CHECK(rx->end - rx->start >= WIRE_FRAME_SIZE);
        memcpy(&f, rx->data + rx->start, sizeof f);
        CHECK(f.kind == WIRE_CONTROL && (accept & (1u << WIRE_CONTROL)));
    } else {
        /* Anything else is this side's failure (a placement, a poll), which no input may cause. */
        if (!(rc == LOOP_EOF || rc == -EPIPE || rc == -EBADMSG || rc == -ENOMSG)) {
            fprintf(stderr, "fuzz_frames: the loop ended with %d: %s\n", rc, why ? why : "(no reason)");
            abort();
        }
        CHECK(rc == LOOP_EOF || (why && why[0]));
    }
    CHECK(rx->start <= rx->end && rx->end <= rx->cap);
}

static void run_destination(const uint8_t *cfg)
{
    int replies = cfg[0] & 1;
    /* The kinds a destination's protocol state can allow (state.py): never a request. */
    uint32_t accept = cfg[1] & (1u << WIRE_PAGES | 1u << WIRE_ZEROS | 1u << WIRE_CONTROL | 1u << WIRE_DISCARD);
    plane.pages = 1 + cfg[2] % GUEST_PAGES;
    memset(&plane.bulk, 0, sizeof plane.bulk);
    memset(&plane.urgent, 0, sizeof plane.urgent);
    memset(&plane.faults, 0, sizeof plane.faults);
    plane.faults.pages_requested = cfg[3];
    plane.urgent.owed_base = cfg[4];
    plane.present_base = plane.placed_base = 0;
    rxbuf_t rx = { dst_rx, DST_CAP, 0, 0 };
    link_t l = { .fd = ready_fd };
    const char *why = NULL;

    const dst_placer_t c = { &plane, &l, &rx, accept, IDLE_MS };
    int rc = replies ? dst_reply_placer(&c, stop_fd, &why) : dst_bulk_placer(&c, stop_fd, &why);
    check_end(rc, why, &rx, accept);

    const place_stats_t *me = replies ? &plane.urgent : &plane.bulk;
    const place_stats_t *other = replies ? &plane.bulk : &plane.urgent;
    CHECK(other->frames == 0 && other->pages == 0);
    CHECK(me->zero_pages <= me->pages);
    uint64_t held = present();
    if (!(accept & (1u << WIRE_DISCARD))) {
        /* Nothing was dropped: the kernel holds exactly the pages placed, each once. */
        CHECK(me->replaced == 0 && me->discarded == 0);
        CHECK(held == me->pages);
    } else {
        CHECK(held <= me->pages);
    }
    CHECK(held <= plane.pages);
    if (replies) {
        uint64_t asked = cfg[3] > cfg[4] ? (uint64_t)cfg[3] - cfg[4] : 0;
        CHECK(me->answered <= asked);
    }
    /* Next input: an empty region, as at the start. */
    CHECK(region_discard(plane.region[0].base, GUEST_PAGES * PAGE, MEMORY_ANON) == 0);
    uint64_t v;
    (void)!read(done_fd, &v, sizeof v);
}

static void run_source(const uint8_t *cfg)
{
    uint64_t pages = 1 + cfg[2] % GUEST_PAGES;
    rxbuf_t rx = { src_rx, SRC_CAP, 0, 0 };
    link_t rxl = { .fd = ready_fd }, txl = { .fd = ready_fd };
    /* A non-NULL ssl sends every reply through link_send (this file's), as
     * over TLS, rather than sendmsg() on the fd.  It is never dereferenced:
     * link.c, the only code that would, is not linked in. */
    txl.ssl = &txl;
    send_stats_t st;
    memset(&st, 0, sizeof st);
    memset(&sent, 0, sizeof sent);
    sent.base = src_base;
    sent.pages = pages;
    notes.head = notes.tail = 0;
    const char *why = NULL;

    const src_server_t c = { { src_base, pages, WIRE_PAGE_SHIFT, &txl, IDLE_MS, NULL, &st }, &rxl, &rx, &notes };
    int rc = src_request_server(&c, stop_fd, &why);
    check_end(rc, why, &rx, 1u << WIRE_REQUEST | 1u << WIRE_CONTROL);
    /* Every reply went whole, and is what was counted. */
    CHECK(sent.have == 0 && sent.payload == 0);
    CHECK(sent.frames == st.frames);
    CHECK(!txl.cut);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static int once;
    if (!once) {
        setup();
        once = 1;
    }
    uint8_t cfg[8] = { 0 };
    size_t n = size < sizeof cfg ? size : sizeof cfg;
    memcpy(cfg, data, n);
    feed.data = data + n;
    feed.left = size - n;
    feed.mode = (cfg[0] >> 2) & 7;
    feed.prng = (uint64_t)cfg[5] << 16 | (uint64_t)cfg[6] << 8 | cfg[7] | 1ULL << 40;
    feed.paused = 0;
    if (cfg[0] & 2)
        run_source(cfg);
    else
        run_destination(cfg);
    return 0;
}
