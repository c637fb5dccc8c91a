/*
 * The native data plane of uffd-migrate.  Threads, one loop each, each
 * started and stopped by a trio task (migrate/loops.py):
 *
 *   destination
 *     bulk placer    dst_bulk_placer: bulk connection -> UFFDIO_COPY /
 *                    UFFDIO_ZEROPAGE; before switchover also discards
 *                    (MADV_DONTNEED) the runs a precopy round replaces or the
 *                    switchover names
 *     fault reader   dst_fault_loop: uffd -> a page request per batch of
 *                    faults -> request connection
 *     reply placer   dst_reply_placer: reply connection -> UFFDIO_COPY /
 *                    UFFDIO_ZEROPAGE; counts what the replies answer, times
 *                    each request's hops
 *     (both placers receive and place a frame with place_next())
 *   source (its memory is read, never written: by postcopy the guest is
 *   stopped; a precopy round reads it while the guest runs, and the kernel's
 *   dirty tracking sends a page written meanwhile again in the next round)
 *     streamer       src_stream_runs: runs of guest memory -> bulk connection
 *                    (Python picks the runs), paced by a token bucket when
 *                    --max-bandwidth caps it; src_stream_discards at a hybrid
 *                    switchover
 *     request server src_request_server: request connection -> guest memory
 *                    -> reply connection
 *     (both queue frames with push_pages() and send them with flush())
 *
 * No per-page state anywhere: the destination places what arrives and asks
 * for what faults.  A fault that races a placement of the same page is never
 * lost, because the kernel re-checks the page tables after the faulting
 * thread queued itself (userfaultfd_must_wait()); the losing UFFDIO_COPY
 * answers -EEXIST, which is counted, and needs no explicit wake: the copy that
 * won woke every waiter.  Completion is a sum of counters from a base the
 * kernel gave at switchover (see dst_plane_t).
 *
 * Every loop poll()s its descriptors and a stop eventfd of its own, and looks
 * at that eventfd once a frame too, as a peer that keeps data flowing never
 * lets it wait; a stop is LOOP_STOPPED, never mistaken for the peer going
 * away.  A frame's work is bounded (wire.h: at most 1 MiB or one page a run).  Errors are returned
 * as -errno with *why naming the operation, never printed.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>
#include <linux/userfaultfd.h>

#include "uffd.h"
#include "wire.h"
#include "link.h"
#include "stats.h"
#include "dataplane.h"
#include "dirty.h"
#include "common.h"

/* A placer looks at its stop every this many frames (see place_next). */
#define STOP_EVERY_FRAMES 16
/* Frames gathered into one sendmsg(): each is a header and at most one
 * payload iovec. */
#define TXQ_FRAMES 64

static uint64_t load(const uint64_t *p)
{
    return __atomic_load_n(p, __ATOMIC_SEQ_CST);
}

static uint64_t add(uint64_t *p, uint64_t n)
{
    return __atomic_add_fetch(p, n, __ATOMIC_SEQ_CST);
}

/* -- waiting -------------------------------------------------------------- */

/* Pages this side is owed while it waits: silence then means a dead link.
 * NULL: always owed (a stream that is not finished). */
typedef struct {
    const uint64_t *asked;
    const uint64_t *answered;
    uint64_t base;
} owed_t;

static int owed(const owed_t *o)
{
    return !o || load(o->asked) > load(o->answered) + o->base;
}

/* One loop's use of one link: what each of its waits needs. */
typedef struct {
    link_t *l;
    int stop_fd;
    int idle_ms;         /* -1: silence is never an error */
    const owed_t *owed;  /* when silence is one (NULL: always) */
    const char **why;
} io_t;

/* Waits until the link is ready for events or the stop eventfd fires.
 * Returns 0 (ready, or a quiet half-period that does not count),
 * LOOP_STOPPED, -ETIMEDOUT once two half-periods in a row passed in silence
 * while owed, or -errno. */
static int wait_ready(const io_t *io, short events, int *strikes)
{
    struct pollfd pfd[2] = { { io->l->fd, events, 0 }, { io->stop_fd, POLLIN, 0 } };
    int was_owed = owed(io->owed);
    int rc = poll(pfd, 2, io->idle_ms < 0 ? -1 : (io->idle_ms + 1) / 2);
    if (rc < 0) {
        *io->why = "poll";
        return errno == EINTR ? 0 : -errno;
    }
    if (pfd[1].revents)
        return LOOP_STOPPED;
    if (rc > 0) {
        *strikes = 0;
        return 0;
    }
    *strikes = was_owed ? *strikes + 1 : 0;
    if (*strikes >= 2) {
        *io->why = "the link stayed silent";
        return -ETIMEDOUT;
    }
    return 0;
}

/* Whether the stop eventfd fired, without waiting: a loop asks once a frame,
 * as a peer that keeps data flowing never lets it wait (where wait_ready looks
 * too).  One poll() of one descriptor: about a microsecond. */
static int stop_requested(int stop_fd)
{
    struct pollfd pfd = { stop_fd, POLLIN, 0 };
    return poll(&pfd, 1, 0) > 0;
}

/* After a link call (link_recv, link_send, send_iov) that moved nothing (n <
 * 0): for -EAGAIN, waits as wait_ready does until the link is ready the way
 * the call asked in want, and returns what wait_ready returns (0: call
 * again); any other n is an error, returned as it is.  A send that moved
 * nothing and said nothing (n == 0, which link.h rules out) is an error too:
 * taking it for "call again" would spin. */
static int wait_link(const io_t *io, int64_t n, int want, int *strikes)
{
    if (n == 0) {
        *io->why = "a send moved nothing";
        return -EPIPE;
    }
    if (n != -EAGAIN)
        return (int)n;
    return wait_ready(io, (short)want, strikes);
}

/* -- receiving ------------------------------------------------------------ */

/* A loop's receiving side: the link and its buffer, and what frames it may
 * carry (wire_check). */
typedef struct {
    io_t io;
    rxbuf_t *rx;
    uint64_t guest_pages;
    uint32_t page_shift;
    uint32_t accept;
} reader_t;

/* Makes need bytes available at rx->data + rx->start.  need is at most a
 * frame, so this loop ends or waits (and sees a stop) within one frame; the
 * loops that call it look at their stop once a frame besides. */
static int rx_fill(const reader_t *r, uint64_t need)
{
    rxbuf_t *rx = r->rx;
    int strikes = 0;
    uint64_t begun = 0; /* when part of what is needed was here: the rest must follow within idle_ms */
    while (rx->end - rx->start < need) {
        /* Silence is counted by wait_ready; a peer that drips a byte at a
         * time is never silent, so a frame begun must also end within
         * idle_ms (a largest frame, 1 MiB, takes 8 s at 1 Mbit/s). */
        if (rx->end > rx->start && !begun)
            begun = mono_ns();
        if (begun && r->io.idle_ms >= 0 && mono_ns() - begun > (uint64_t)r->io.idle_ms * 1000000) {
            *r->io.why = "a frame began but did not end within the link timeout (a drip)";
            return -ETIMEDOUT;
        }
        if (rx->cap - rx->start < need) {
            memmove(rx->data, rx->data + rx->start, rx->end - rx->start);
            rx->end -= rx->start;
            rx->start = 0;
        }
        int want = POLLIN;
        int64_t n = link_recv(r->io.l, rx->data + rx->end, rx->cap - rx->end, &want, r->io.why);
        if (n > 0) {
            rx->end += (uint64_t)n;
            strikes = 0;
            continue;
        }
        if (n == 0) {
            if (rx->end == rx->start)
                return LOOP_EOF;
            *r->io.why = "the peer closed the connection in the middle of a frame";
            return -EPIPE;
        }
        int rc = wait_link(&r->io, n, want, &strikes);
        if (rc)
            return rc;
    }
    return 0;
}

/* The next frame's header, checked; *plen gets its payload length, which is
 * then in the buffer too, unless the frame is a control frame (LOOP_CONTROL:
 * left unconsumed for Python). */
static int next_frame(const reader_t *r, struct wire_frame *f, uint64_t *plen)
{
    int rc = rx_fill(r, WIRE_FRAME_SIZE);
    if (rc)
        return rc;
    memcpy(f, r->rx->data + r->rx->start, sizeof *f);
    int64_t len = wire_check(f, r->guest_pages, r->page_shift, r->accept, r->io.why);
    if (len < 0)
        return (int)len;
    if (f->kind == WIRE_CONTROL)
        return LOOP_CONTROL;
    *plen = (uint64_t)len;
    rc = rx_fill(r, WIRE_FRAME_SIZE + *plen);
    if (rc == LOOP_EOF) {
        *r->io.why = "the peer closed the connection in the middle of a frame";
        return -EPIPE;
    }
    return rc;
}

/* -- destination ---------------------------------------------------------- */

/* Pages present now, by the counters (meaningful after switchover: before,
 * replacements count twice, and Python ignores the signal). */
static uint64_t present_pages(const dst_plane_t *d)
{
    return d->present_base + load(&d->bulk.pages) + load(&d->urgent.pages) - d->placed_base;
}

/* The region that holds page (the regions cover every page), or NULL. */
static const region_t *region_of_page(const dst_plane_t *d, uint64_t page)
{
    for (uint32_t i = 0; i < d->nregions; i++)
        if (page - d->region[i].first < d->region[i].pages)
            return &d->region[i];
    return NULL;
}

/* The wire page at address addr (a fault's), or -1: not the guest's. */
static int64_t page_at(const dst_plane_t *d, uint64_t addr)
{
    for (uint32_t i = 0; i < d->nregions; i++) {
        const region_t *r = &d->region[i];
        if (addr - r->base < r->pages << d->page_shift)
            return (int64_t)(r->first + ((addr - r->base) >> d->page_shift));
    }
    return -1;
}

/* The pages [start, start + count) as stretches of one region each, for
 * an operation on memory: fn(d, address, first page's index in the run, pages, arg). */
typedef int (*stretch_fn)(const dst_plane_t *d, uint64_t addr, uint64_t at, uint64_t count, void *arg);

static int for_each_stretch(const dst_plane_t *d, uint64_t start, uint64_t count, stretch_fn fn, void *arg)
{
    for (uint64_t at = 0; at < count;) {
        const region_t *r = region_of_page(d, start + at);
        if (!r)
            return -EFAULT; /* never: wire_check bounds every run by the guest's pages */
        uint64_t n = r->first + r->pages - (start + at);
        if (n > count - at)
            n = count - at;
        int rc = fn(d, r->base + ((start + at - r->first) << d->page_shift), at, n, arg);
        if (rc)
            return rc; /* an error, or LOOP_STOPPED */
        at += n;
    }
    return 0;
}

/* A frame a placer placed. */
typedef struct {
    struct wire_frame f;
    uint64_t t_recv; /* when it was whole in the buffer */
    uint64_t placed; /* bytes newly placed */
} placement_t;

/* Discards the frame's run (MADV_DONTNEED, or MADV_REMOVE on a memfd): a
 * DISCARD frame, or a page or zero frame flagged WIRE_REPLACE, whose pages
 * are placed next. */
static int discard_stretch(const dst_plane_t *d, uint64_t addr, uint64_t at, uint64_t count, void *arg)
{
    (void)at, (void)arg;
    return region_discard(addr, count << d->page_shift, d->memory);
}

static int discard(const dst_placer_t *c, place_stats_t *me, const struct wire_frame *f, const char **why)
{
    const dst_plane_t *d = c->plane;
    int rc = for_each_stretch(d, f->start, f->count, discard_stretch, NULL);
    if (rc < 0) {
        *why = d->memory == MEMORY_ANON ? "MADV_DONTNEED of a discarded run" : "MADV_REMOVE of a discarded run";
        return rc;
    }
    add(f->kind == WIRE_DISCARD ? &me->discarded : &me->replaced, f->count);
    return 0;
}

/* A VMM's removed ranges (see plane_track_removes in dataplane.h). */
#define REMOVES_MAX PLANE_REMOVES_MAX
/* With a VMM's removes, a placement holds the lock shared for at most this
 * many bytes (or one huge page): the fault reader, which needs it exclusively
 * to read the faults too, waits at most one such copy (a 1 MiB frame under
 * one hold made every fault wait for the bulk placer's copy in progress). */
#define REMOVES_SLICE (64u << 10)
/* How long a placement waits before it tries again when the memory's layout
 * is changing (-EAGAIN: a remove event not read yet, which the fault reader
 * reads within microseconds). */
#define LAYOUT_WAIT_MS 1

struct removes {
    pthread_rwlock_t lock; /* placements shared, the fault reader exclusive around read() */
    uint32_t n;
    struct wire_run run[REMOVES_MAX]; /* in page order, disjoint, not adjacent */
};

int plane_track_removes(dst_plane_t *d)
{
    struct removes *r = calloc(1, sizeof *r);
    pthread_rwlockattr_t attr;
    if (!r)
        return -ENOMEM;
    /* The fault reader must get the lock between two placements, however
     * busy both placers are: a writer waiting goes first. */
    pthread_rwlockattr_init(&attr);
    pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&r->lock, &attr);
    pthread_rwlockattr_destroy(&attr);
    d->removes = r;
    return 0;
}

void plane_untrack_removes(dst_plane_t *d)
{
    struct removes *r = d->removes;
    if (r) {
        pthread_rwlock_destroy(&r->lock);
        free(r);
        d->removes = NULL;
    }
}

int plane_removed_runs(dst_plane_t *d, struct wire_run *out, int max)
{
    struct removes *r = d->removes;
    if (!r)
        return 0;
    pthread_rwlock_rdlock(&r->lock);
    int n = (int)r->n < max ? (int)r->n : max;
    memcpy(out, r->run, (size_t)n * sizeof *out);
    pthread_rwlock_unlock(&r->lock);
    return n;
}

/* Adds pages [start, start + count) to the removed ranges, merged with those
 * it touches; under the lock, exclusively.  -ENOSPC: the list is full. */
static int removes_add(struct removes *r, uint64_t start, uint64_t count)
{
    uint64_t end = start + count;
    uint32_t i = 0, j;
    while (i < r->n && r->run[i].start + r->run[i].count < start)
        i++; /* runs wholly before, not adjacent */
    for (j = i; j < r->n && r->run[j].start <= end; j++) { /* runs it touches: merged into it */
        if (r->run[j].start < start)
            start = r->run[j].start;
        if (r->run[j].start + r->run[j].count > end)
            end = r->run[j].start + r->run[j].count;
    }
    if (j == i && r->n == REMOVES_MAX)
        return -ENOSPC;
    memmove(&r->run[i + 1], &r->run[j], (r->n - j) * sizeof r->run[0]);
    r->n = r->n - (j - i) + 1;
    r->run[i] = (struct wire_run){ start, end - start };
    return 0;
}

/* Of pages [page, page + count): how many from page on are all removed
 * (*removed = 1) or none removed (*removed = 0).  Under the lock, shared. */
static uint64_t removes_span(const struct removes *r, uint64_t page, uint64_t count, int *removed)
{
    for (uint32_t i = 0; i < r->n; i++) {
        const struct wire_run *w = &r->run[i];
        if (w->start + w->count <= page)
            continue;
        if (w->start <= page) {
            *removed = 1;
            return w->start + w->count - page < count ? w->start + w->count - page : count;
        }
        *removed = 0;
        return w->start - page < count ? w->start - page : count;
    }
    *removed = 0;
    return count;
}

/* What a frame's placement does: its first page and payload (NULL: zero
 * pages), the bytes placed and found present, and the placer's stop. */
typedef struct {
    uint64_t start;
    const uint8_t *payload;
    uint64_t placed;
    uint64_t existed;
    int stop_fd;
} placing_t;

/* Places one stretch (one region's part of a frame).  With a VMM's removes,
 * each piece is placed holding the lock shared, as zero pages where the VMM
 * removed the range, and a layout change under way (-EAGAIN) is waited out
 * with the lock released, or the fault reader could never read its event. */
static int place_stretch(const dst_plane_t *d, uint64_t addr, uint64_t at, uint64_t count, void *arg)
{
    placing_t *p = arg;
    struct removes *r = d->removes;
    const uint32_t shift = d->page_shift;
    const uint64_t page = 1ull << shift;
    uint64_t done = 0;
    while (done < count) {
        uint64_t n = count - done, placed = 0, existed = 0;
        int removed = 0, rc;
        if (r) {
            uint64_t slice = REMOVES_SLICE >> shift ? REMOVES_SLICE >> shift : 1;
            pthread_rwlock_rdlock(&r->lock);
            n = removes_span(r, p->start + at + done, n < slice ? n : slice, &removed);
        }
        if (p->payload && !removed)
            rc = uffd_copy(d->uffd, addr + (done << shift), p->payload + ((at + done) << shift), n << shift, page,
                           &placed, &existed, d->pagemap_fd);
        else
            rc = uffd_zeropage(d->uffd, addr + (done << shift), n << shift, page, &placed, &existed, d->pagemap_fd);
        if (r)
            pthread_rwlock_unlock(&r->lock);
        p->placed += placed;
        p->existed += existed;
        done += (placed + existed) >> shift;
        if (rc == -EAGAIN) {
            struct pollfd stop = { p->stop_fd, POLLIN, 0 };
            if (poll(&stop, 1, LAYOUT_WAIT_MS) > 0)
                return LOOP_STOPPED;
        } else if (rc < 0) {
            return rc;
        }
    }
    return 0;
}

/* Receives frames on the placer's link until one places pages, carrying out
 * the DISCARD frames on the way, and places it (UFFDIO_COPY /
 * UFFDIO_ZEROPAGE), counted in me.  Returns 0 with *out filled, or how the
 * loop ends (a control frame, the stop, EOF, an error). */
static int place_next(const dst_placer_t *c, place_stats_t *me, const reader_t *r, placement_t *out)
{
    struct wire_frame *f = &out->f;
    uint64_t plen = 0;
    int rc;
    for (;;) {
        /* Every few frames, not each: a one-page frame is placed in about
         * 1.5 us, and a poll() each time cost 20% of the rate (measured);
         * 16 frames of at most 1 or 2 MiB are a few ms at worst. */
        if (me->frames % STOP_EVERY_FRAMES == 0 && stop_requested(r->io.stop_fd))
            return LOOP_STOPPED;
        if ((rc = next_frame(r, f, &plen)))
            return rc;
        out->t_recv = mono_ns();
        if (f->kind == WIRE_DISCARD || (f->flags & WIRE_REPLACE))
            if ((rc = discard(c, me, f, r->io.why)))
                return rc;
        if (f->kind != WIRE_DISCARD)
            break;
        r->rx->start += WIRE_FRAME_SIZE;
        counter_add(&me->frames, 1);
        counter_add(&me->bytes, WIRE_FRAME_SIZE);
    }
    const uint32_t shift = c->plane->page_shift;
    placing_t p = { f->start, f->kind == WIRE_PAGES ? r->rx->data + r->rx->start + WIRE_FRAME_SIZE : NULL, 0, 0,
                    r->io.stop_fd };
    rc = for_each_stretch(c->plane, f->start, f->count, place_stretch, &p);
    if (rc == LOOP_STOPPED)
        return rc;
    out->placed = p.placed;
    *r->io.why = p.payload ? "UFFDIO_COPY" : shift == WIRE_PAGE_SHIFT ? "UFFDIO_ZEROPAGE"
                                                                    : "UFFDIO_COPY of a zero huge page";
    if (rc == -ENOSPC)
        *r->io.why = "UFFDIO_COPY: EEXIST for a huge page not mapped here (the huge page pool is exhausted)";
    if (rc < 0)
        return rc;
    r->rx->start += WIRE_FRAME_SIZE + plen;
    counter_add(&me->frames, 1);
    counter_add(&me->bytes, WIRE_FRAME_SIZE + plen);
    counter_add(&me->eexist, p.existed >> shift);
    if (f->kind == WIRE_ZEROS)
        counter_add(&me->zero_pages, out->placed >> shift);
    add(&me->pages, out->placed >> shift);
    return 0;
}

/* Wakes Python once every page is present.  Each placer adds to its own
 * counter, then reads both: of two that place the last pages at once, at
 * least one sees the sum. */
static void signal_if_complete(const dst_plane_t *d, const placement_t *p)
{
    if (p->placed && present_pages(d) >= d->pages)
        eventfd_write(d->done_fd, 1);
}

static reader_t placer_reader(const dst_placer_t *c, const owed_t *o, int stop_fd, const char **why)
{
    return (reader_t){ { c->link, stop_fd, c->idle_ms, o, why }, c->rx, c->plane->pages, c->plane->page_shift,
                       c->accept };
}

int dst_bulk_placer(const dst_placer_t *c, int stop_fd, const char **why)
{
    const reader_t r = placer_reader(c, NULL, stop_fd, why); /* the stream always owes pages */
    for (;;) {
        placement_t p;
        int rc = place_next(c, &c->plane->bulk, &r, &p);
        if (rc)
            return rc;
        signal_if_complete(c->plane, &p);
    }
}

/* What the source sends is its choice: answers count up to what was asked
 * since the last lost link, no more.  Else answers nobody asked for would
 * make owed() false (silencing the replies' timeout), and answered could
 * pass pages_requested, which owed_base is computed from at a
 * reconnection. */
static void count_answered(dst_plane_t *d, uint32_t pages)
{
    place_stats_t *me = &d->urgent;
    uint64_t asked = load(&d->faults.pages_requested);
    asked = asked > me->owed_base ? asked - me->owed_base : 0;
    uint64_t answered = load(&me->answered) + pages;
    __atomic_store_n(&me->answered, answered < asked ? answered : asked, __ATOMIC_SEQ_CST);
}

/* The first frame of each reply times the request's hops; a stamp from the
 * future (a lying peer) is ignored. */
static void time_reply(place_stats_t *me, const placement_t *p, uint64_t *last_stamp)
{
    const struct wire_frame *f = &p->f;
    uint64_t t_placed = mono_ns();
    if (!f->stamp || f->stamp == *last_stamp || f->stamp > p->t_recv)
        return;
    *last_stamp = f->stamp;
    uint64_t rtt = p->t_recv - f->stamp;
    hist_add(&me->service, t_placed - f->stamp);
    hist_add(&me->network, rtt > f->held_ns ? rtt - f->held_ns : 0);
    hist_add(&me->held, f->held_ns);
    hist_add(&me->place, t_placed - p->t_recv);
}

int dst_reply_placer(const dst_placer_t *c, int stop_fd, const char **why)
{
    dst_plane_t *d = c->plane;
    /* Silence is a lost link only while requests are unanswered. */
    const owed_t from_requests = { &d->faults.pages_requested, &d->urgent.answered, d->urgent.owed_base };
    const reader_t r = placer_reader(c, &from_requests, stop_fd, why);
    uint64_t last_stamp = 0;
    for (;;) {
        placement_t p;
        int rc = place_next(c, &d->urgent, &r, &p);
        if (rc)
            return rc;
        count_answered(d, p.f.count);
        time_reply(&d->urgent, &p, &last_stamp);
        signal_if_complete(d, &p);
    }
}

/* Sends len bytes from buf whole: one small frame (a request), so it ends
 * or waits (and sees a stop) within a frame.  Returning before the end after
 * some of it left, or with TLS after a write that must be retried (OpenSSL
 * holds part of a record that only the same write may finish), leaves the
 * link cut (link.h). */
static int send_all(const io_t *io, const void *buf, size_t len)
{
    int strikes = 0, pending = 0;
    size_t whole = len;
    while (len) {
        int want = POLLOUT;
        int64_t n = link_send(io->l, buf, len, &want, io->why);
        if (n > 0) {
            buf = (const char *)buf + n;
            len -= (size_t)n;
            pending = 0;
            continue;
        }
        pending = io->l->ssl && n == -EAGAIN;
        int rc = wait_link(io, n, want, &strikes);
        if (rc) {
            if (len < whole || pending)
                io->l->cut = 1;
            return rc;
        }
    }
    return 0;
}

/* Records a VMM's UFFD_EVENT_REMOVE of [start, end) (addresses; a range
 * may cross regions, and parts outside the guest are not ours); under the
 * lock, exclusively. */
static int record_remove(dst_plane_t *d, uint64_t start, uint64_t end, const char **why)
{
    const uint32_t shift = d->page_shift;
    for (uint32_t i = 0; i < d->nregions; i++) { /* the part in each region: a run of its pages */
        const region_t *r = &d->region[i];
        uint64_t lo = start > r->base ? start : r->base, hi = r->base + (r->pages << shift);
        if (end < hi)
            hi = end;
        if (lo >= hi)
            continue;
        uint64_t first = (lo - r->base) >> shift, last = (hi - r->base + (1ull << shift) - 1) >> shift;
        if (removes_add(d->removes, r->first + first, last - first) < 0) {
            *why = "recording the VMM's removes (more separate ranges than PLANE_REMOVES_MAX)";
            return -ENOSPC;
        }
        add(&d->removed_pages, last - first);
    }
    add(&d->remove_events, 1);
    return 0;
}

/* Reads what the userfaultfd has (faults, and a VMM's removes, which are
 * recorded before any placement may look again: see plane_track_removes).
 * Returns the bytes read, or -errno. */
static ssize_t read_events(dst_plane_t *d, struct uffd_msg *msgs, size_t size, const char **why)
{
    struct removes *r = d->removes;
    if (r)
        pthread_rwlock_wrlock(&r->lock);
    ssize_t n = read(d->uffd, msgs, size);
    int err = errno;
    for (ssize_t i = 0; r && n > 0 && i < n / (ssize_t)sizeof msgs[0]; i++) {
        if (msgs[i].event != UFFD_EVENT_REMOVE)
            continue;
        int rc = record_remove(d, msgs[i].arg.remove.start, msgs[i].arg.remove.end, why);
        if (rc < 0) {
            n = rc;
            err = -rc;
        }
    }
    if (r)
        pthread_rwlock_unlock(&r->lock);
    if (n < 0 && err != EAGAIN && err != EINTR && err != ENOSPC)
        *why = "reading the userfaultfd";
    return n < 0 ? -err : n;
}

int dst_fault_loop(dst_plane_t *d, link_t *l, int idle_ms, uint32_t span, int stop_fd,
                   const char **why)
{
    fault_stats_t *st = &d->faults;
    const io_t io = { l, stop_fd, idle_ms, NULL, why };
    struct uffd_msg msgs[WIRE_MAX_REQUEST_RUNS];
    struct {
        struct wire_frame f;
        struct wire_run runs[WIRE_MAX_REQUEST_RUNS];
    } req;
    struct pollfd pfd[2] = { { d->uffd, POLLIN, 0 }, { stop_fd, POLLIN, 0 } };

    for (;;) {
        if (poll(pfd, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            *why = "poll";
            return -errno;
        }
        if (pfd[1].revents)
            return LOOP_STOPPED;
        ssize_t n = read_events(d, msgs, sizeof msgs, why);
        if (n < 0) {
            if (n == -EAGAIN || n == -EINTR)
                continue;
            return (int)n;
        }
        uint64_t t_read = mono_ns(), pages = 0;
        uint32_t k = 0;
        for (size_t i = 0; i < (size_t)n / sizeof msgs[0]; i++) {
            if (msgs[i].event != UFFD_EVENT_PAGEFAULT)
                continue;
            /* A hugetlb fault names its huge page's aligned address. */
            int64_t at = page_at(d, msgs[i].arg.pagefault.address);
            if (at < 0) {
                *why = "a fault outside the guest's regions";
                return -EFAULT;
            }
            uint64_t page = (uint64_t)at;
            uint64_t count = d->pages - page < span ? d->pages - page : span;
            req.runs[k++] = (struct wire_run){ page, count };
            pages += count;
        }
        if (!k)
            continue;
        /* Counted as asked before it leaves, so a reply never finds more
         * answered than asked. */
        add(&st->pages_requested, pages);
        req.f = (struct wire_frame){ .kind = WIRE_REQUEST, .count = k, .stamp = mono_ns() };
        size_t len = WIRE_FRAME_SIZE + k * sizeof req.runs[0];
        int rc = send_all(&io, &req, len);
        if (rc)
            return rc;
        hist_add(&st->to_send, mono_ns() - t_read); /* read, request built and sent */
        counter_add(&st->faults, k);
        counter_add(&st->requests, 1);
        counter_add(&st->bytes, len);
    }
}

/* -- source --------------------------------------------------------------- */

/* A sending loop at work: its context, its link's waits, and the frames
 * queued for one sendmsg() (page payloads point into guest memory; TLS
 * cannot gather, so a TLS link copies up to a record's worth of the queue
 * into stage for each write). */
typedef struct {
    const src_sender_t *c;
    io_t io;
    uint32_t flags;  /* of the page and zero frames: 0 or WIRE_REPLACE */
    uint64_t stamp;  /* request server: the request's stamp, echoed in its replies */
    uint64_t t_recv; /* request server: when the request arrived; 0: not a reply */
    struct wire_frame hdr[TXQ_FRAMES];
    struct iovec iov[2 * TXQ_FRAMES];
    int frames, iovs;
    char stage[16384];
} sender_t;

static void sender_init(sender_t *s, const src_sender_t *c, int stop_fd, const char **why)
{
    s->c = c;
    s->io = (io_t){ c->link, stop_fd, c->idle_ms, NULL, why };
    s->flags = 0;
    s->stamp = s->t_recv = 0;
    s->frames = s->iovs = 0;
}

/* Sends from the first left iovecs, at most max bytes: bytes sent, -EAGAIN
 * with *want, or -errno. */
static int64_t send_iov(sender_t *s, const struct iovec *iov, int left, size_t max, int *want)
{
    link_t *l = s->io.l;
    if (!l->ssl) {
        struct iovec cut[2 * TXQ_FRAMES];
        struct msghdr msg = { .msg_iov = (struct iovec *)iov, .msg_iovlen = (size_t)left };
        size_t total = 0;
        for (int i = 0; i < left && total <= max; i++)
            total += iov[i].iov_len;
        if (total > max) { /* paced: a copy of the vector, cut at max bytes */
            size_t room = max;
            int k = 0;
            for (; k < left && room; k++) {
                cut[k] = iov[k];
                if (cut[k].iov_len > room)
                    cut[k].iov_len = room;
                room -= cut[k].iov_len;
            }
            msg.msg_iov = cut;
            msg.msg_iovlen = (size_t)k;
        }
        ssize_t n = sendmsg(l->fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (n >= 0)
            return n;
        if (errno == EAGAIN || errno == EINTR) {
            *want = POLLOUT;
            return -EAGAIN;
        }
        *s->io.why = "sendmsg";
        return -errno;
    }
    /* A large piece (guest pages) is encrypted straight from where it is. */
    if (iov[0].iov_len >= sizeof s->stage || left == 1)
        return link_send(l, iov[0].iov_base, iov[0].iov_len < max ? iov[0].iov_len : max, want, s->io.why);
    size_t len = 0, cap = max < sizeof s->stage ? max : sizeof s->stage;
    for (int i = 0; i < left && len < cap; i++) {
        size_t n = iov[i].iov_len < cap - len ? iov[i].iov_len : cap - len;
        memcpy(s->stage + len, iov[i].iov_base, n);
        len += n;
    }
    return link_send(l, s->stage, len, want, s->io.why);
}

/* What a TLS 1.3 record adds to its plaintext on the wire: a 5-byte header,
 * the inner content type and a 16-byte AEAD tag (AES-GCM, ChaCha20-Poly1305).
 * A paced TLS send is one record (link_send), of a quantum at most: at a small
 * cap that is 4 KiB, where the records alone would add 0.5% to the stream. */
#define TLS_RECORD_OVERHEAD 22

/* Waits until the pacer lets a send through (its tokens are positive).
 * Returns 0, LOOP_STOPPED, or -errno. */
static int pace_wait(pacer_t *p, int stop_fd, const char **why)
{
    for (;;) {
        uint64_t now = mono_ns();
        if (!p->t_ns) {
            p->t_ns = now;
            p->tokens = (double)p->burst;
        }
        p->tokens += (double)(now - p->t_ns) * (double)p->rate / 1e9;
        if (p->tokens > (double)p->burst)
            p->tokens = (double)p->burst;
        p->t_ns = now;
        if (p->tokens > 0)
            return 0;
        /* Sleep until the debt is paid, in ns: a millisecond poll() would
         * round every pause up and undershoot the rate. */
        uint64_t ns = (uint64_t)(-p->tokens * 1e9 / (double)p->rate) + 1;
        struct timespec ts = { (time_t)(ns / 1000000000ULL), (long)(ns % 1000000000ULL) };
        struct pollfd pfd = { stop_fd, POLLIN, 0 };
        int rc = ppoll(&pfd, 1, &ts, NULL);
        if (rc < 0 && errno != EINTR) {
            *why = "ppoll";
            return -errno;
        }
        if (rc > 0)
            return LOOP_STOPPED;
        p->waits++;
        p->waited_ns += mono_ns() - now;
    }
}

/* Sends the queue whole (the replies' headers first get the source's hold,
 * request received -> sent), no faster than the pacer lets, and empties it. */
static int flush(sender_t *s)
{
    pacer_t *pace = s->c->pace && s->c->pace->rate ? s->c->pace : NULL;
    send_stats_t *st = s->c->st;
    if (s->t_recv) {
        uint64_t held = mono_ns() - s->t_recv;
        for (int i = 0; i < s->frames; i++)
            s->hdr[i].held_ns = held > UINT32_MAX ? UINT32_MAX : (uint32_t)held;
    }
    struct iovec *iov = s->iov;
    int left = s->iovs, strikes = 0, pending = 0, rc = 0;
    uint64_t sent = 0;
    /* The stop is looked at before the first byte, then once a largest
     * frame's worth has left: a peer that reads as fast as we write never
     * makes us wait (where wait_link looks). */
    uint64_t unchecked = FRAME_MAX;
    while (left) {
        int want = POLLOUT;
        size_t max = SIZE_MAX;
        if (unchecked >= FRAME_MAX) {
            if (stop_requested(s->io.stop_fd)) {
                rc = LOOP_STOPPED;
                break;
            }
            unchecked = 0;
        }
        if (pace) {
            if ((rc = pace_wait(pace, s->io.stop_fd, s->io.why)))
                break;
            max = pace->quantum;
        }
        int64_t n = send_iov(s, iov, left, max, &want);
        if (n <= 0) {
            pending = s->io.l->ssl && n == -EAGAIN; /* OpenSSL holds part of a record */
            if ((rc = wait_link(&s->io, n, want, &strikes)))
                break;
            continue;
        }
        pending = 0;
        sent += (uint64_t)n;
        counter_add(&st->bytes, (uint64_t)n);
        unchecked += (uint64_t)n;
        if (pace) /* the cap counts what goes on the wire */
            pace->tokens -= (double)n + (s->io.l->ssl ? TLS_RECORD_OVERHEAD : 0);
        while (left && (size_t)n >= iov->iov_len) {
            n -= (int64_t)iov->iov_len;
            iov++;
            left--;
        }
        if (left) {
            iov->iov_base = (char *)iov->iov_base + n;
            iov->iov_len -= (size_t)n;
        }
    }
    if (rc) {
        /* Part of the queue left, or a TLS write must be retried: what
         * follows on this link would read as the rest of a frame. */
        if (sent || pending)
            s->io.l->cut = 1;
        return rc;
    }
    counter_add(&st->frames, (uint64_t)s->frames);
    s->frames = s->iovs = 0;
    return 0;
}

/* Queues one frame (and its payload, unless len is 0), sending the queue
 * when it is full. */
static int push_frame(sender_t *s, struct wire_frame f, const void *payload, size_t len)
{
    s->hdr[s->frames] = f;
    s->iov[s->iovs++] = (struct iovec){ &s->hdr[s->frames], WIRE_FRAME_SIZE };
    if (len)
        s->iov[s->iovs++] = (struct iovec){ (void *)payload, len };
    s->frames++;
    return s->frames == TXQ_FRAMES ? flush(s) : 0;
}

static int page_is_zero(const uint64_t *w, uint64_t page)
{
    for (uint64_t i = 0; i < page / 8; i++)
        if (w[i])
            return 0;
    return 1;
}

/* Queues pages [start, start+count) as page frames and zero frames of at
 * most wire_max_run() pages each (wire_check's bound), with the sender's
 * flags and stamp. */
static int push_pages(sender_t *s, uint64_t start, uint64_t count)
{
    const uint32_t shift = s->c->page_shift, max_run = wire_max_run(shift);
    const uint64_t page = 1ull << shift;
    uint64_t base = s->c->base, p = start, end = start + count;
    while (p < end) {
        const char *mem = (const char *)(uintptr_t)(base + (p << shift));
        int zero = page_is_zero((const uint64_t *)mem, page);
        uint64_t q_end = p + 1;
        while (q_end < end && q_end - p < max_run &&
               page_is_zero((const uint64_t *)(uintptr_t)(base + (q_end << shift)), page) == zero)
            q_end++;
        uint64_t n = q_end - p;
        counter_add(&s->c->st->pages, n);
        if (zero)
            counter_add(&s->c->st->zero_pages, n);
        const struct wire_frame f = { .kind = zero ? WIRE_ZEROS : WIRE_PAGES, .count = (uint32_t)n, .start = p,
                                      .stamp = s->stamp, .flags = s->flags };
        p = q_end;
        int rc = push_frame(s, f, mem, zero ? 0 : n << shift);
        if (rc)
            return rc;
    }
    return 0;
}

static void note_put(note_ring_t *r, struct wire_run run)
{
    uint64_t head = r->head;
    if (head - __atomic_load_n(&r->tail, __ATOMIC_ACQUIRE) == NOTE_RING) {
        counter_add(&r->dropped, 1);
        return;
    }
    r->runs[head % NOTE_RING] = run;
    __atomic_store_n(&r->head, head + 1, __ATOMIC_RELEASE);
}

int notes_take(note_ring_t *r, struct wire_run *out, int max)
{
    uint64_t tail = r->tail, head = __atomic_load_n(&r->head, __ATOMIC_ACQUIRE);
    int n = 0;
    while (tail != head && n < max)
        out[n++] = r->runs[tail++ % NOTE_RING];
    __atomic_store_n(&r->tail, tail, __ATOMIC_RELEASE);
    return n;
}

int src_request_server(const src_server_t *c, int stop_fd, const char **why)
{
    sender_t s;
    /* A destination without faults sends nothing for a long time: no idle
     * bound on requests. */
    const reader_t in = { { c->requests, stop_fd, -1, NULL, why }, c->rx, c->replies.pages, c->replies.page_shift,
                          1u << WIRE_REQUEST | 1u << WIRE_CONTROL };
    struct wire_run runs[WIRE_MAX_REQUEST_RUNS];

    sender_init(&s, &c->replies, stop_fd, why);
    for (;;) {
        struct wire_frame f;
        uint64_t plen = 0;
        if (stop_requested(stop_fd))
            return LOOP_STOPPED;
        int rc = next_frame(&in, &f, &plen);
        if (rc)
            return rc;
        s.t_recv = mono_ns();
        s.stamp = f.stamp;
        memcpy(runs, c->rx->data + c->rx->start + WIRE_FRAME_SIZE, plen);
        if ((rc = wire_check_runs(runs, f.count, c->replies.pages, c->replies.page_shift, why)))
            return rc;
        c->rx->start += WIRE_FRAME_SIZE + plen;
        for (uint32_t i = 0; i < f.count; i++)
            if ((rc = push_pages(&s, runs[i].start, runs[i].count)))
                return rc;
        if ((rc = flush(&s)))
            return rc;
        hist_add(&c->replies.st->held, mono_ns() - s.t_recv);
        counter_add(&c->replies.st->requests, 1);
        for (uint32_t i = 0; i < f.count; i++)
            note_put(c->notes, runs[i]);
    }
}

static int check_run(const struct wire_run *r, uint64_t pages, const char **why)
{
    if (r->count == 0 || r->start > pages || r->count > pages - r->start) {
        *why = "a run outside the guest";
        return -EINVAL;
    }
    return 0;
}

int src_stream_runs(const src_sender_t *c, const struct wire_run *runs, uint64_t n, uint32_t flags,
                    int stop_fd, const char **why)
{
    sender_t s;
    sender_init(&s, c, stop_fd, why);
    s.flags = flags;
    for (uint64_t i = 0; i < n; i++) {
        int rc = check_run(&runs[i], c->pages, why);
        if (!rc)
            rc = push_pages(&s, runs[i].start, runs[i].count);
        if (rc)
            return rc;
    }
    return flush(&s);
}

int src_stream_discards(const src_sender_t *c, const struct wire_run *runs, uint64_t n, int stop_fd,
                        const char **why)
{
    sender_t s;
    const src_sender_t unpaced = { c->base, c->pages, c->page_shift, c->link, c->idle_ms, NULL, c->st };
    sender_init(&s, &unpaced, stop_fd, why);
    for (uint64_t i = 0; i < n; i++) {
        int rc = check_run(&runs[i], c->pages, why);
        if (rc)
            return rc;
        /* A frame counts at most 2^32 - 1 pages: split longer runs. */
        for (uint64_t p = runs[i].start, end = p + runs[i].count; p < end;) {
            uint64_t k = end - p < UINT32_MAX ? end - p : UINT32_MAX;
            counter_add(&c->st->discards, k);
            const struct wire_frame f = { .kind = WIRE_DISCARD, .count = (uint32_t)k, .start = p };
            p += k;
            if ((rc = push_frame(&s, f, NULL, 0)))
                return rc;
        }
    }
    return flush(&s);
}
