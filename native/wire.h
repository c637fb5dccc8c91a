/*
 * The wire layout of every frame, defined once.
 *
 * Read by the C compiler (the native loops) and by cffi's cdef parser, so
 * migrate/protocol/codec.py encodes and decodes this same struct: Python and C
 * cannot drift.  Plain declarations only (cffi parses them).
 *
 * A connection starts with the preamble (magic, version) from each side, then
 * carries frames: a struct wire_frame, then its payload:
 *
 *   WIRE_PAGES    count pages from page start: count pages' bytes
 *   WIRE_ZEROS    count all-zero pages from page start (as many as PAGES
 *                 may carry): no payload
 *   WIRE_REQUEST  count struct wire_run: the pages a vCPU waits for
 *   WIRE_CONTROL  count bytes of msgpack [kind, fields...]: handshake, CPU
 *                 state, Round, RoundEnd, RoundAck, Resume, SourceDone,
 *                 DestDone, Error (Python only)
 *   WIRE_DISCARD  count pages from page start that the destination must make
 *                 absent again (MADV_DONTNEED): at a precopy switchover, the
 *                 pages written since they were sent; no payload
 *
 * Flags: WIRE_REPLACE on a PAGES or ZEROS frame of a precopy round says the
 * destination may already hold an older copy of the run (it was sent in an
 * earlier round, then written): the placer discards the run, then places it.
 * Without it a present page is kept (-EEXIST), which is what postcopy wants.
 * The destination accepts DISCARD and REPLACE only before its vCPUs start.
 *
 * Which kinds may come when is the protocol's state (migrate/protocol/state.py):
 * whoever reads a connection passes wire_check() the mask of kinds its state
 * allows, (1 << kind) for each; REPLACE goes with DISCARD (it is a discard,
 * then a place).
 *
 * Little-endian; the struct has no padding (asserted in wire.c).
 */

/* The wire page is the guest memory's page (GuestInfo.page_size): 4 KiB
 * (1 << WIRE_PAGE_SHIFT) for anonymous and memfd guests, 2 MiB (1 <<
 * WIRE_HUGE_SHIFT) for hugetlb ones, whose placement and faults are whole
 * huge pages.  Every start and count of a frame counts wire pages. */
#define WIRE_PAGE_SIZE 4096
#define WIRE_PAGE_SHIFT 12
#define WIRE_HUGE_SHIFT 21
/* A page frame carries at most 1 MiB of 4 KiB pages (256), or one 2 MiB
 * page: one UFFDIO_COPY places it whole, and a receive buffer of two
 * largest frames stays small.  A zero run is bounded alike, so that one
 * frame's work for the placer is bounded (over present pages it moves a page
 * per ioctl); a discard is not (one madvise). */
#define WIRE_MAX_RUN_BYTES 1048576
#define WIRE_MAX_RUN_PAGES 256
#define WIRE_MAX_PAYLOAD 2097152
/* A request names at most this many runs: one uffd read batch. */
#define WIRE_MAX_REQUEST_RUNS 64
/* A control frame's msgpack body: a few integers, or a Resume of up to 1024 runs. */
#define WIRE_MAX_CONTROL 65536
#define WIRE_FRAME_SIZE 32

enum wire_kind { WIRE_PAGES = 1, WIRE_ZEROS = 2, WIRE_REQUEST = 3, WIRE_CONTROL = 4, WIRE_DISCARD = 5 };

/* Frame flags. */
#define WIRE_REPLACE 1 /* PAGES, ZEROS: discard the run first, then place it */


struct wire_frame {
    uint32_t kind;
    uint32_t count;    /* pages (PAGES, ZEROS, DISCARD), runs (REQUEST), bytes (CONTROL) */
    uint64_t start;    /* first page (PAGES, ZEROS, DISCARD); 0 otherwise */
    uint64_t stamp;    /* REQUEST: the destination's clock when it sent it;
                        * reply PAGES/ZEROS: that stamp echoed; stream: 0 */
    uint32_t held_ns;  /* reply: how long the source held the request, its own clock */
    uint32_t flags;    /* WIRE_REPLACE on PAGES and ZEROS; 0 otherwise */
};

struct wire_run {
    uint64_t start;
    uint64_t count;
};

/* The most pages one page or zero frame (or one requested run) may count, for
 * wire pages of 1 << page_shift bytes: 256 of 4 KiB, 1 of 2 MiB. */
uint32_t wire_max_run(uint32_t page_shift);

/* Checks a received frame header: its kind is one this end accepts now (mask),
 * its pages (of 1 << page_shift bytes) lie inside a guest of guest_pages pages
 * (0: not described yet), its sizes are within the bounds above.  Returns the payload length,
 * -ENOMSG for a kind (or a REPLACE flag) the mask refuses: well formed but out
 * of order, a protocol violation; or -EBADMSG for a malformed frame (garbage,
 * or a cut: a lost link).  *why says what is wrong. */
int64_t wire_check(const struct wire_frame *f, uint64_t guest_pages, uint32_t page_shift, uint32_t accept,
                   const char **why);

/* Checks the runs of a request: each 1..wire_max_run(page_shift) pages
 * inside the guest.  Returns 0 or -EBADMSG with *why set. */
int wire_check_runs(const struct wire_run *runs, uint32_t n, uint64_t guest_pages, uint32_t page_shift,
                    const char **why);
