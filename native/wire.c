/* Frame checks shared by the native loops and migrate/protocol/codec.py: see wire.h. */
#include <errno.h>
#include <stddef.h>
#include <stdint.h>

#include "wire.h"

_Static_assert(sizeof(struct wire_frame) == WIRE_FRAME_SIZE, "wire_frame has padding");
_Static_assert(offsetof(struct wire_frame, start) == 8, "wire_frame layout");
_Static_assert(offsetof(struct wire_frame, held_ns) == 24, "wire_frame layout");
_Static_assert(sizeof(struct wire_run) == 16, "wire_run has padding");
#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the wire is little-endian; this build would need byte swaps"
#endif

static int bad(const char **why, const char *reason)
{
    *why = reason;
    return -EBADMSG;
}

/* A frame of a kind the connection's state does not allow now: well formed,
 * but out of order (a protocol violation, never a broken link). */
static int out_of_order(const char **why, const char *reason)
{
    *why = reason;
    return -ENOMSG;
}

static int inside(uint64_t start, uint64_t count, uint64_t guest_pages)
{
    return count <= guest_pages && start <= guest_pages - count;
}

uint32_t wire_max_run(uint32_t page_shift)
{
    uint32_t n = WIRE_MAX_RUN_BYTES >> page_shift;
    return n ? n : 1;
}

int64_t wire_check(const struct wire_frame *f, uint64_t guest_pages, uint32_t page_shift, uint32_t accept,
                   const char **why)
{
    if (f->kind < WIRE_PAGES || f->kind > WIRE_DISCARD)
        return bad(why, "unknown frame kind");
    if (!(accept & (1u << f->kind)))
        return out_of_order(why, f->kind == WIRE_DISCARD
                                     ? "a discard where none may come (a vCPU may have written the pages)"
                                     : "a frame of a kind that may not come now");
    if (f->flags & ~(uint32_t)WIRE_REPLACE)
        return bad(why, "unknown frame flags");
    if (f->flags && f->kind != WIRE_PAGES && f->kind != WIRE_ZEROS)
        return bad(why, "frame flags on a frame that takes none");
    if (f->flags && !(accept & (1u << WIRE_DISCARD)))
        return out_of_order(why, "a replacement where no discard may come (a vCPU may have written the pages)");
    switch (f->kind) {
    case WIRE_CONTROL:
        if (f->count == 0 || f->count > WIRE_MAX_CONTROL)
            return bad(why, "control frame length outside 1..65536");
        return f->count;
    case WIRE_REQUEST:
        if (f->count == 0 || f->count > WIRE_MAX_REQUEST_RUNS)
            return bad(why, "page request with no runs or more than 64");
        return (int64_t)f->count * (int64_t)sizeof(struct wire_run);
    }
    if (guest_pages == 0)
        return bad(why, "pages before the guest was described");
    if (f->count == 0 || !inside(f->start, f->count, guest_pages))
        return bad(why, "pages outside the guest");
    if (f->kind == WIRE_DISCARD)
        return 0; /* one madvise() whatever its length */
    /* A zero run is bounded like a page run: on pages already present the
     * placer moves one page per ioctl (-EEXIST), and one frame must not hold
     * it for as long as the peer likes. */
    if (page_shift != WIRE_PAGE_SHIFT && page_shift != WIRE_HUGE_SHIFT)
        return bad(why, "pages of a size the wire does not carry");
    if (f->count > wire_max_run(page_shift))
        return bad(why, "page or zero run longer than 1 MiB or one page");
    return f->kind == WIRE_ZEROS ? 0 : (int64_t)f->count << page_shift;
}

int wire_check_runs(const struct wire_run *runs, uint32_t n, uint64_t guest_pages, uint32_t page_shift,
                    const char **why)
{
    for (uint32_t i = 0; i < n; i++) {
        if (runs[i].count == 0 || runs[i].count > wire_max_run(page_shift))
            return bad(why, "requested run of 0 pages or more than a frame carries");
        if (!inside(runs[i].start, runs[i].count, guest_pages))
            return bad(why, "requested pages outside the guest");
    }
    return 0;
}
