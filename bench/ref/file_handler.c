/* file_handler: the floor of a snapshot restore, Firecracker's model of serving a local file.
 *   usage: file_handler SOCKET MEMORY_FILE [ondemand|all]
 * One thread, as Firecracker's example handlers (src/firecracker/examples/uffd/):
 *   - listens on the Unix socket SOCKET, accepts one VMM and reads its one handoff
 *     message exactly as migrate-dst --handoff takes it: a JSON array of regions
 *     ({"base_host_virt_addr", "size", "offset", and "page_size" or "page_size_kib"
 *     when present, else 4 KiB}), parsed minimally, with the userfaultfd attached by
 *     SCM_RIGHTS;
 *   - maps MEMORY_FILE (the snapshot's memory, already in the page cache; MAP_POPULATE
 *     so that no copy waits for the file), then polls the userfaultfd and the socket:
 *       ondemand: each faulting page is copied from the file with UFFDIO_COPY
 *                 (on_demand_handler), nothing else: no stream, no network;
 *       all:      the first fault copies the faulting page, then every region whole
 *                 in 2 MiB runs (fault_all_handler): the floor of "every page present";
 *   - UFFD_EVENT_REMOVE is counted (the stand-in VMM sends none);
 *   - ends when the VMM hangs up (POLLHUP on the socket).
 * Prints one JSON object: when the message came and the first fault, last placement and
 * "every page present" happened (seconds after the message, CLOCK_MONOTONIC), faults,
 * pages placed, -EEXIST races, and the copy's service time per fault (p50/p99/max µs). */
#include "common.h"
#include <sys/un.h>

#define MAX_REGIONS 64
#define MAX_FAULTS (4 << 20)
#define ALL_RUN (2 * MIB)

struct region { uint64_t base, size, offset, page; };
static struct region regions[MAX_REGIONS];
static int nregions;

/* The integer after "key": in obj (up to its closing brace); -1 when absent. */
static int64_t field(const char *obj, const char *end, const char *key)
{
    char pat[64];
    snprintf(pat, sizeof pat, "\"%s\":", key);
    const char *p = strstr(obj, pat);
    return p && p < end ? strtoll(p + strlen(pat), NULL, 10) : -1;
}

static void parse(char *msg)
{
    for (char *p = strchr(msg, '{'); p; p = strchr(p + 1, '{')) {
        char *end = strchr(p, '}');
        if (!end || nregions == MAX_REGIONS) {
            fprintf(stderr, "file_handler: malformed handoff message: %s\n", msg);
            exit(1);
        }
        struct region *r = &regions[nregions++];
        r->base = field(p, end, "base_host_virt_addr");
        r->size = field(p, end, "size");
        r->offset = field(p, end, "offset");
        int64_t page = field(p, end, "page_size");
        if (page < 0)
            page = field(p, end, "page_size_kib");  /* 1.7-1.11: bytes, despite the name */
        r->page = page > 0 ? (uint64_t)page : PAGE;
        p = end;
    }
    if (!nregions) {
        fprintf(stderr, "file_handler: no region in the handoff message: %s\n", msg);
        exit(1);
    }
}

static int receive(int conn)
{
    static char msg[65536];
    size_t len = 0;
    int uffd = -1;
    for (;;) {  /* until the array closes: Firecracker sends it in one sendmsg */
        char cbuf[CMSG_SPACE(sizeof(int))];
        struct iovec iov = { msg + len, sizeof msg - 1 - len };
        struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf,
                             .msg_controllen = sizeof cbuf };
        ssize_t n = recvmsg(conn, &mh, MSG_CMSG_CLOEXEC);
        if (n <= 0)
            die("recvmsg handoff");
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c))
            if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS)
                memcpy(&uffd, CMSG_DATA(c), sizeof uffd);
        len += n;
        msg[len] = 0;
        if (strrchr(msg, ']'))
            break;
    }
    if (uffd < 0) {
        fprintf(stderr, "file_handler: no userfaultfd came with the handoff message\n");
        exit(1);
    }
    parse(msg);
    return uffd;
}

static const struct region *find(uint64_t addr)
{
    for (int i = 0; i < nregions; i++)
        if (addr - regions[i].base < regions[i].size)
            return &regions[i];
    return NULL;
}

/* Copies [addr, addr+len) of region r from the file; returns pages placed (EEXIST skipped). */
static uint64_t copy(int uffd, const struct region *r, const char *file, uint64_t addr, uint64_t len,
                     uint64_t *eexist)
{
    return uffd_place_pages(uffd, (char *)(uintptr_t)addr, file + r->offset + (addr - r->base), len, r->page,
                            eexist) / r->page;
}

int main(int argc, char **argv)
{
    if (argc < 3 || (argc > 3 && strcmp(argv[3], "ondemand") && strcmp(argv[3], "all"))) {
        fprintf(stderr, "usage: file_handler SOCKET MEMORY_FILE [ondemand|all]\n");
        return 2;
    }
    int all = argc > 3 && !strcmp(argv[3], "all");
    int ffd = open(argv[2], O_RDONLY | O_CLOEXEC);
    if (ffd < 0)
        die(argv[2]);
    off_t flen = lseek(ffd, 0, SEEK_END);
    char *file = mmap(NULL, flen, PROT_READ, MAP_PRIVATE | MAP_POPULATE, ffd, 0);
    if (file == MAP_FAILED)
        die("mmap memory file");

    struct sockaddr_un a = { .sun_family = AF_UNIX };
    snprintf(a.sun_path, sizeof a.sun_path, "%s", argv[1]);
    unlink(argv[1]);
    int lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (lfd < 0 || bind(lfd, (void *)&a, sizeof a) || listen(lfd, 1))
        die("listen");
    printf("{\"listening\": \"%s\"}\n", argv[1]);
    fflush(stdout);
    int conn = accept(lfd, NULL, NULL);
    if (conn < 0)
        die("accept");
    close(lfd);
    unlink(argv[1]);
    int uffd = receive(conn);
    double t0 = now_s();
    uint64_t total = 0;
    for (int i = 0; i < nregions; i++) {
        if (regions[i].offset + regions[i].size > (uint64_t)flen) {
            fprintf(stderr, "file_handler: region %d ends past the memory file\n", i);
            return 1;
        }
        total += regions[i].size / regions[i].page;
    }

    double *service = malloc(MAX_FAULTS * sizeof *service);
    uint64_t faults = 0, placed = 0, eexist = 0, removes = 0, events = 0;
    double first_fault = -1, last_placed = -1, all_present = -1, all_copy_s = 0;
    uint64_t all_copy_bytes = 0;
    struct uffd_msg msgs[64];
    struct pollfd p[2] = { { .fd = uffd, .events = POLLIN }, { .fd = conn, .events = POLLIN } };
    for (;;) {
        if (poll(p, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            die("poll");
        }
        if (p[1].revents) {  /* the VMM hung up (it never writes after the message) */
            char b;
            if (recv(conn, &b, 1, MSG_DONTWAIT) <= 0)
                break;
        }
        if (!(p[0].revents & POLLIN))
            continue;
        ssize_t n = read(uffd, msgs, sizeof msgs);
        if (n < 0 && (errno == EAGAIN || errno == EINTR))
            continue;
        if (n < 0)
            die("read uffd");
        for (size_t i = 0; i < n / sizeof msgs[0]; i++) {
            events++;
            if (msgs[i].event == UFFD_EVENT_REMOVE) {
                removes++;
                continue;
            }
            if (msgs[i].event != UFFD_EVENT_PAGEFAULT)
                continue;
            double t = now_s();
            const struct region *r = find(msgs[i].arg.pagefault.address);
            if (!r) {
                fprintf(stderr, "file_handler: a fault at %#llx outside every region\n",
                        (unsigned long long)msgs[i].arg.pagefault.address);
                return 1;
            }
            uint64_t addr = msgs[i].arg.pagefault.address & ~(r->page - 1);
            if (first_fault < 0)
                first_fault = t - t0;
            placed += copy(uffd, r, file, addr, r->page, &eexist);
            if (faults < MAX_FAULTS)
                service[faults] = (now_s() - t) * 1e6;
            faults++;
            if (all && placed < total) {  /* fault_all: the rest of every region, now */
                double c0 = now_s();
                uint64_t before = placed;
                for (int j = 0; j < nregions; j++)
                    for (uint64_t off = 0; off < regions[j].size; off += ALL_RUN) {
                        uint64_t len = regions[j].size - off < ALL_RUN ? regions[j].size - off : ALL_RUN;
                        placed += copy(uffd, &regions[j], file, regions[j].base + off, len, &eexist);
                    }
                all_copy_s = now_s() - c0;
                all_copy_bytes = (placed - before) * r->page;
            }
            last_placed = now_s() - t0;
            if (placed >= total && all_present < 0)
                all_present = last_placed;
        }
    }
    size_t k = faults < MAX_FAULTS ? faults : MAX_FAULTS;
    qsort(service, k, sizeof *service, cmp_double);
    printf("{\"mode\": \"%s\", \"regions\": %d, \"pages_total\": %llu, \"pages_placed\": %llu, \"faults\": %llu, "
           "\"eexist\": %llu, \"removes\": %llu, \"events\": %llu, \"first_fault_s\": %.6f, \"last_placed_s\": %.6f, "
           "\"all_present_s\": %.6f, \"all_copy_s\": %.6f, \"all_copy_gbps\": %.3f, "
           "\"service_us\": {\"p50\": %.1f, \"p99\": %.1f, \"max\": %.1f}}\n",
           all ? "all" : "ondemand", nregions, (unsigned long long)total, (unsigned long long)placed,
           (unsigned long long)faults, (unsigned long long)eexist, (unsigned long long)removes,
           (unsigned long long)events, first_fault, last_placed, all_present, all_copy_s,
           all_copy_s > 0 ? all_copy_bytes / all_copy_s / 1e9 : 0.0,
           k ? pct(service, k, 50) : 0, k ? pct(service, k, 99) : 0, k ? service[k - 1] : 0);
    return placed == total ? 0 : 3;
}
