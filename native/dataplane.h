/*
 * The native data plane: the hot loops of both sides, each run in a worker
 * thread that a trio task owns (see dataplane.c for every thread's job).
 *
 * Read by the C compiler and by cffi's cdef parser: plain declarations only.
 * A loop owns its socket direction(s) and the counters it writes; it never
 * calls into Python.  It returns one of enum loop_end, or -errno with *why
 * naming the operation (or, for -EBADMSG and -ENOMSG, what the peer got wrong:
 * a malformed frame, or one out of order; see wire_check).
 *
 * Each loop takes a context struct, filled by its trio task or a C harness
 * and only read by the loop, then its stop eventfd and *why (the two
 * arguments migrate/loops.py's run_native adds).  A context holds pointers
 * only: its owner keeps what they point to alive while the loop runs.
 * Histograms and the clock: stats.h.
 */

enum loop_end {
    LOOP_STOPPED = 1, /* our own stop eventfd: a local stop, never a peer error */
    LOOP_CONTROL = 2, /* a control frame is next in the receive buffer: Python's turn */
    LOOP_EOF = 3      /* the peer closed the connection between two frames */
};

/* A receive buffer, one per connection direction.  Python's protocol
 * Connection (handshake, control frames) and the native loop that owns the
 * direction afterwards read through the same buffer, so no byte is lost when
 * one hands over to the other.  cap holds two largest frames. */
typedef struct {
    uint8_t *data;
    uint64_t cap;
    uint64_t start; /* first byte not consumed */
    uint64_t end;   /* one past the last byte received */
} rxbuf_t;

/* One placing loop's counters (bulk placer, or reply placer): written by that
 * loop alone, read by anyone while it runs (native/common.h says how). */
typedef struct {
    uint64_t pages;      /* pages newly placed (a replaced page counts each time) */
    uint64_t zero_pages; /* of which as zero pages */
    uint64_t eexist;     /* pages already present: races the kernel absorbed */
    uint64_t frames;
    uint64_t bytes;      /* bytes received, frames and payload */
    uint64_t answered;   /* replies only: requested pages answered, placed or not; never
                          * more than pages_requested - owed_base (a reply for pages
                          * never asked counts for nothing) */
    uint64_t owed_base;  /* replies only: pages asked of earlier, lost links (set between sessions) */
    uint64_t replaced;   /* bulk only: pages of WIRE_REPLACE frames (discarded, then placed) */
    uint64_t discarded;  /* bulk only: pages of WIRE_DISCARD frames */
    hist_t service;      /* replies: request sent -> pages placed */
    hist_t network;      /* replies: request sent -> reply received, less the source's hold */
    hist_t held;         /* replies: the source's hold, as it measured it */
    hist_t place;        /* replies: reply received -> pages placed */
} place_stats_t;

/* The fault reader's counters: written by it alone, read by anyone. */
typedef struct {
    uint64_t faults;
    uint64_t requests;
    uint64_t pages_requested;
    uint64_t bytes;      /* bytes sent */
    hist_t to_send;      /* faults read -> their request sent (send() included) */
} fault_stats_t;

/* Where the guest's pages are: pages [first, first + pages) at base.  Our
 * own guest is one region; a VMM's memory (migrate-dst --handoff) is one per
 * region it described, the wire's page numbers being offsets in its memory
 * file.  The regions cover [0, dst_plane_t.pages) with no gap or overlap. */
#define PLANE_REGIONS 64
typedef struct {
    uint64_t base;
    uint64_t first;
    uint64_t pages;
} region_t;

/* The destination's guest as its loops see it.  Completion: once the
 * discards are over (at switchover), the kernel is asked how many pages are
 * present (present_base, one PAGEMAP_SCAN walk) and the placement counters
 * are noted (placed_base); from then on nothing is discarded and the kernel
 * never places a page twice, so pages present now are
 * present_base + bulk.pages + urgent.pages - placed_base. */
typedef struct {
    int uffd;
    int pagemap_fd;       /* /proc/PID/pagemap of the process whose memory the uffd serves */
    uint32_t nregions;
    region_t region[PLANE_REGIONS];
    uint64_t pages;       /* wire pages, of 1 << page_shift bytes: the memory's page */
    uint32_t page_shift;  /* 12, or 21 on hugetlb */
    int memory;           /* enum memory_kind: how a run is discarded */
    int done_fd;          /* eventfd, written whenever a placement leaves every page present */
    uint64_t present_base; /* set between sessions, while no loop runs */
    uint64_t placed_base;
    place_stats_t bulk;   /* the placer's */
    place_stats_t urgent; /* the reply placer's */
    fault_stats_t faults; /* the fault reader's */
    void *removes;        /* a VMM's memory: the ranges it removed (see plane_track_removes); NULL: our own */
    uint64_t remove_events;  /* UFFD_EVENT_REMOVE read, written by the fault reader */
    uint64_t removed_pages;  /* pages they named */
} dst_plane_t;

/* A VMM's memory (migrate-dst --handoff) with UFFD_EVENT_REMOVE: after the
 * VMM drops a range (MADV_DONTNEED, a balloon), its kernel says the range
 * reads as zeros, so no page may be placed there with the image's old bytes,
 * from a stream frame or a reply already under way.  No per-page state: the
 * fault reader records each removed range (a bounded list of events, merged,
 * never forgotten: a remove can come at any time, its frames later) while it
 * holds a lock exclusively around read(); every placement holds the same
 * lock shared around its look at the list and its UFFDIO_COPY, and places
 * zero pages wherever the list says.  So a placement either ends before the
 * remove event is read (and the kernel's zap after it clears the page), or
 * starts after and sees the range.  Returns 0 or -ENOMEM. */
#define PLANE_REMOVES_MAX 4096
int plane_track_removes(dst_plane_t *d);
void plane_untrack_removes(dst_plane_t *d);

/* The removed ranges now, in page order, at most max of them; returns how many. */
int plane_removed_runs(dst_plane_t *d, struct wire_run *out, int max);

/* A placer's context: the bulk placer's, or the reply placer's. */
typedef struct {
    dst_plane_t *plane;
    link_t *link;    /* the connection the page frames arrive on (read) */
    rxbuf_t *rx;     /* its receive buffer */
    uint32_t accept; /* the frame kinds its protocol state allows (wire_check) */
    int idle_ms;
} dst_placer_t;

/* Destination, bulk placer and reply placer: receive page frames on the
 * link and place them (UFFDIO_COPY / UFFDIO_ZEROPAGE) until a control frame,
 * the stop eventfd, EOF, or idle_ms of silence while pages are owed (always
 * on the bulk stream; on replies, while requests are unanswered), or a frame
 * begun and not whole within idle_ms (a peer dripping bytes is never silent).
 * DISCARD frames and REPLACE flags only before switchover (accept says when),
 * while no vCPU runs here; after it they are a protocol error, as dropping a
 * page could lose what a vCPU wrote.  The reply placer also counts what its
 * replies answer and times each request's hops. */
int dst_bulk_placer(const dst_placer_t *c, int stop_fd, const char **why);
int dst_reply_placer(const dst_placer_t *c, int stop_fd, const char **why);

/* Destination, fault reader: read faults from the uffd in batches and send
 * one request per batch on l, runs of span pages from each faulting page. */
int dst_fault_loop(dst_plane_t *d, link_t *l, int idle_ms, uint32_t span, int stop_fd,
                   const char **why);

/* Requests the source answered, for its streamer to skip and jump after:
 * one producer (the request server), one consumer (the streamer task, which
 * drains it between windows).  Sized for a few thousand requests a window; a
 * note that does not fit is dropped: the stream then sends those pages
 * again, a duplicate the destination absorbs, never a loss. */
#define NOTE_RING 4096
typedef struct {
    uint64_t head;
    uint64_t tail;
    uint64_t dropped;
    struct wire_run runs[NOTE_RING];
} note_ring_t;

/* Takes up to max notes; returns how many. */
int notes_take(note_ring_t *r, struct wire_run *out, int max);

/* What a sending loop sent: written by it alone, read by anyone. */
typedef struct {
    uint64_t pages;
    uint64_t zero_pages;
    uint64_t frames;
    uint64_t bytes;
    uint64_t discards; /* pages named in DISCARD frames */
    uint64_t requests; /* request server only */
    hist_t held;       /* request server only: request received -> reply sent */
} send_stats_t;

/* The streamer's token bucket (--max-bandwidth): owned by the streamer task
 * alone and handed to every src_stream_runs() call, so the budget carries over
 * from one window to the next (and the pause between two windows, while
 * Python picks the next one, is made up for, up to the bucket's depth).  The
 * request server never has one: replies are never capped.  Tokens are bytes
 * on the wire (a TLS send also pays its record's overhead);
 * they accrue at rate, up to burst, and a send of at most quantum bytes is let
 * through while they are positive, then charged what it sent, so over any
 * stretch the stream sends at most rate * time + burst + quantum bytes, and
 * in a steady stream at most quantum bytes at once. */
typedef struct {
    uint64_t rate;      /* bytes per second; 0: no cap */
    uint64_t burst;     /* bytes: the bucket's depth */
    uint64_t quantum;   /* bytes: the most one send may take */
    double tokens;      /* bytes that may go now; negative: owed */
    uint64_t t_ns;      /* when tokens was last brought up to date; 0: not yet */
    uint64_t waits;     /* pauses the cap imposed */
    uint64_t waited_ns; /* their total length */
} pacer_t;

/* A sending loop's context: the streamer's, or the request server's replies. */
typedef struct {
    uint64_t base;     /* the guest's memory, read only */
    uint64_t pages;    /* wire pages, of 1 << page_shift bytes */
    uint32_t page_shift;
    link_t *link;      /* the connection the frames leave on (written) */
    int idle_ms;       /* bounds a send the peer does not read */
    pacer_t *pace;     /* NULL: no cap (the request server's, always) */
    send_stats_t *st;
} src_sender_t;

/* Source, streamer: send the n runs straight from guest memory, as page and
 * zero frames with flags (0, or WIRE_REPLACE for a precopy round after the
 * first), no faster than the pacer lets.  Returns 0 once all are sent. */
int src_stream_runs(const src_sender_t *c, const struct wire_run *runs, uint64_t n, uint32_t flags,
                    int stop_fd, const char **why);

/* Source, at a hybrid switchover: one DISCARD frame per run (never paced).
 * Returns 0 once all are sent. */
int src_stream_discards(const src_sender_t *c, const struct wire_run *runs, uint64_t n, int stop_fd,
                        const char **why);

/* The request server's context. */
typedef struct {
    src_sender_t replies; /* the guest, the replies connection and the server's counters */
    link_t *requests;     /* the requests connection (read) */
    rxbuf_t *rx;          /* its receive buffer */
    note_ring_t *notes;   /* answered requests, for the streamer */
} src_server_t;

/* Source, request server: receive requests, answer each from guest memory
 * on the replies connection (zero runs as WIRE_ZEROS, pages sent straight
 * from the stopped guest), note it for the streamer.  Until the stop
 * eventfd, a control frame or EOF; idle_ms bounds a reply the destination
 * does not read. */
int src_request_server(const src_server_t *c, int stop_fd, const char **why);
