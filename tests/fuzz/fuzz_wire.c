/*
 * libFuzzer target: the frame checks of native/wire.c, wire_check() and
 * wire_check_runs(), which every reader of a connection trusts (the native
 * loops, and migrate/protocol through cffi).
 *
 * Input: a struct wire_frame (32 bytes), the guest's size in pages (8 bytes),
 * the accept mask (1 byte), then up to WIRE_MAX_REQUEST_RUNS struct wire_run
 * (16 bytes each).  Missing bytes are zeros.  The mask's top bit (no frame
 * kind's) selects the wire page: set, 2 MiB pages (a hugetlb guest,
 * WIRE_HUGE_SHIFT), else 4 KiB; the checks take that page's shift.  Beyond "no crash", the harness
 * checks what a reader relies on: an accepted frame is of a kind the mask
 * allows, its pages lie in the guest, and its payload length is the one its
 * kind implies, bounded; accepted runs lie in the guest.  A broken property
 * aborts, which libFuzzer reports as a crash.
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "wire.h"

#define CHECK(cond)                                                                        \
    do {                                                                                   \
        if (!(cond)) {                                                                     \
            fprintf(stderr, "fuzz_wire: %s:%d: property broken: %s\n", __FILE__, __LINE__, #cond); \
            abort();                                                                       \
        }                                                                                  \
    } while (0)

#define HUGE_BIT 0x80 /* in the accept mask byte: 2 MiB wire pages */

static void take(void *out, size_t size, const uint8_t **data, size_t *left)
{
    size_t n = *left < size ? *left : size;
    memset(out, 0, size);
    memcpy(out, *data, n);
    *data += n;
    *left -= n;
}

static int inside(uint64_t start, uint64_t count, uint64_t pages)
{
    /* Written apart from wire.c's, in other words. */
    uint64_t end;
    return !__builtin_add_overflow(start, count, &end) && end <= pages;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct wire_frame f;
    uint64_t pages;
    uint8_t accept;
    struct wire_run runs[WIRE_MAX_REQUEST_RUNS];
    const char *why = NULL;

    take(&f, sizeof f, &data, &size);
    take(&pages, sizeof pages, &data, &size);
    take(&accept, sizeof accept, &data, &size);
    uint32_t shift = accept & HUGE_BIT ? WIRE_HUGE_SHIFT : WIRE_PAGE_SHIFT;
    accept &= (uint8_t)~HUGE_BIT;
    /* A frame carries at most 1 MiB of 4 KiB pages, or one 2 MiB page. */
    uint64_t max_run = shift == WIRE_PAGE_SHIFT ? WIRE_MAX_RUN_BYTES / WIRE_PAGE_SIZE : 1;
    uint32_t n = (uint32_t)(size / sizeof runs[0]);
    if (n > WIRE_MAX_REQUEST_RUNS)
        n = WIRE_MAX_REQUEST_RUNS;
    memcpy(runs, data, n * sizeof runs[0]);

    int64_t len = wire_check(&f, pages, shift, accept, &why);
    if (len < 0) {
        CHECK(len == -EBADMSG || len == -ENOMSG);
        CHECK(why && why[0]);
        if (len == -ENOMSG) /* out of order: a known kind, which the mask refuses */
            CHECK(f.kind >= WIRE_PAGES && f.kind <= WIRE_DISCARD);
    } else {
        CHECK(accept & (1u << f.kind));
        CHECK(f.flags == 0 || (f.flags == WIRE_REPLACE && (f.kind == WIRE_PAGES || f.kind == WIRE_ZEROS) &&
                               (accept & (1u << WIRE_DISCARD))));
        switch (f.kind) {
        case WIRE_PAGES:
        case WIRE_ZEROS:
            CHECK(f.count >= 1 && f.count <= max_run);
            CHECK(inside(f.start, f.count, pages));
            CHECK(len == (f.kind == WIRE_PAGES ? (int64_t)f.count << shift : 0));
            break;
        case WIRE_DISCARD:
            CHECK(f.count >= 1 && inside(f.start, f.count, pages) && len == 0);
            break;
        case WIRE_REQUEST:
            CHECK(f.count >= 1 && f.count <= WIRE_MAX_REQUEST_RUNS);
            CHECK(len == (int64_t)f.count * (int64_t)sizeof(struct wire_run));
            break;
        case WIRE_CONTROL:
            CHECK(f.count >= 1 && f.count <= WIRE_MAX_CONTROL && len == f.count);
            break;
        default:
            CHECK(!"an unknown kind accepted");
        }
        /* Every reader's buffer holds two of the largest frame. */
        CHECK(len <= (int64_t)WIRE_MAX_PAYLOAD);
    }

    why = NULL;
    int rc = wire_check_runs(runs, n, pages, shift, &why);
    int ok = 1;
    for (uint32_t i = 0; i < n; i++)
        ok &= runs[i].count >= 1 && runs[i].count <= max_run && inside(runs[i].start, runs[i].count, pages);
    CHECK(rc == 0 || rc == -EBADMSG);
    CHECK((rc == 0) == ok);
    CHECK(rc == 0 || (why && why[0]));
    return 0;
}
