/* wanfwd: the delay of an emulated WAN link (bench/wan.py), since this
 * kernel has no netem.
 *
 *   usage: wanfwd IFACE_A IFACE_B ONE_WAY_US
 *
 * Runs in the link's middle network namespace, between two veth ends that
 * have no address there: a transparent bridge that holds every frame for
 * ONE_WAY_US microseconds before it leaves by the other interface.  Two
 * threads, one per direction, each:
 *
 *   receive   AF_PACKET socket of the interface the frame came in by
 *             (PACKET_VNET_HDR keeps a TSO/GSO frame whole, as a tap device
 *             does, so the kernel segments it later if at all; our own
 *             transmissions are not looped back: PACKET_IGNORE_OUTGOING)
 *   hold      a FIFO ring of frames with their due times (a fixed delay
 *             never reorders)
 *   transmit  the other interface's socket, at the due time; the frame then
 *             meets that interface's egress qdisc, where bench/wan.py puts
 *             the link's rate and bottleneck queue (htb): a full queue
 *             drops, as a router's does (ENOBUFS, counted)
 *
 * On SIGTERM or SIGINT it prints one JSON object of counters per direction
 * and exits.  It never sends anything it did not receive.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <net/if.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <linux/virtio_net.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>

#ifndef PACKET_IGNORE_OUTGOING
#define PACKET_IGNORE_OUTGOING 23
#endif

#define VNET sizeof(struct virtio_net_hdr)
/* A GSO frame holds at most 64 KiB of IP packet, plus its Ethernet header. */
#define MAX_FRAME (65536 + 256)
/* Frames one direction may hold at once, each in a slot of its own (memory
 * is touched only as far as each frame reaches): more than any rate times
 * delay the bench uses needs, even in full-size frames. */
#define SLOTS 8192
#define SLOT_BYTES (64 + MAX_FRAME + 4096 - ((64 + MAX_FRAME) % 4096))
/* Frames received per wake-up before the due ones are sent again. */
#define RX_BATCH 64

struct slot {
    uint64_t due_ns;
    uint32_t len; /* vnet header + frame */
};

struct dir {
    const char *name;
    int rx, tx;
    uint64_t delay_ns;
    char *ring;          /* SLOTS slots of SLOT_BYTES: a FIFO, as a fixed delay never reorders */
    uint64_t head, tail; /* slots sent, slots received */
    /* counters */
    uint64_t frames, bytes, gso_frames, drops_queue, drops_ring, drops_other;
    uint64_t late_max_ns, late_total_ns, sent;
};

static volatile sig_atomic_t stopping;

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static void die(const char *what, const char *arg)
{
    fprintf(stderr, "wanfwd: %s %s: %s\n", what, arg ? arg : "", strerror(errno));
    exit(1);
}

static int open_iface(const char *name)
{
    int fd = socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC, htons(ETH_P_ALL));
    if (fd < 0)
        die("socket(AF_PACKET)", name);
    int one = 1, big = 256 << 20;
    if (setsockopt(fd, SOL_PACKET, PACKET_VNET_HDR, &one, sizeof one))
        die("PACKET_VNET_HDR", name);
    if (setsockopt(fd, SOL_PACKET, PACKET_IGNORE_OUTGOING, &one, sizeof one))
        die("PACKET_IGNORE_OUTGOING", name);
    /* Bursts wait in the socket until this thread reads them; frames sent wait in
     * the qdisc (the bottleneck queue) charged to this socket. */
    if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &big, sizeof big) ||
        setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &big, sizeof big))
        die("SO_RCVBUFFORCE/SO_SNDBUFFORCE", name);
    struct sockaddr_ll a = { .sll_family = AF_PACKET, .sll_protocol = htons(ETH_P_ALL),
                             .sll_ifindex = (int)if_nametoindex(name) };
    if (!a.sll_ifindex)
        die("no interface", name);
    if (bind(fd, (struct sockaddr *)&a, sizeof a))
        die("bind", name);
    return fd;
}

static struct slot *slot_at(struct dir *d, uint64_t i)
{
    return (struct slot *)(d->ring + (i % SLOTS) * SLOT_BYTES);
}

static void *run(void *arg)
{
    struct dir *d = arg;
    prctl(PR_SET_TIMERSLACK, 1UL); /* wake at the due time, not 50 µs after it */
    while (!stopping) {
        /* Transmit whatever is due. */
        uint64_t now = now_ns();
        while (d->head < d->tail && slot_at(d, d->head)->due_ns <= now) {
            struct slot *s = slot_at(d, d->head++);
            ssize_t n = send(d->tx, (char *)(s + 1), s->len, MSG_DONTWAIT);
            if (n < 0) {
                if (errno == ENOBUFS || errno == EAGAIN)
                    d->drops_queue++; /* the bottleneck queue is full: a router drops too */
                else
                    d->drops_other++;
            } else {
                uint64_t late = now - s->due_ns;
                d->sent++;
                d->late_total_ns += late;
                if (late > d->late_max_ns)
                    d->late_max_ns = late;
            }
            now = now_ns();
        }
        /* Wait for a frame or the next due time (or, idle, look at the stop flag now and then). */
        uint64_t wait = 100000000ULL;
        if (d->head < d->tail) {
            uint64_t due = slot_at(d, d->head)->due_ns;
            wait = due > now ? due - now : 0;
        }
        struct timespec ts = { (time_t)(wait / 1000000000ULL), (long)(wait % 1000000000ULL) };
        struct pollfd pfd = { d->rx, POLLIN, 0 };
        if (ppoll(&pfd, 1, &ts, NULL) <= 0)
            continue;
        for (int i = 0; i < RX_BATCH; i++) {
            if (d->tail - d->head == SLOTS) {
                char sink[64];
                if (recv(d->rx, sink, sizeof sink, MSG_DONTWAIT | MSG_TRUNC) < 0)
                    break;
                d->drops_ring++;
                continue;
            }
            struct slot *s = slot_at(d, d->tail);
            ssize_t n = recv(d->rx, (char *)(s + 1), MAX_FRAME, MSG_DONTWAIT | MSG_TRUNC);
            if (n < 0)
                break;
            if ((size_t)n > MAX_FRAME || (size_t)n <= VNET) {
                d->drops_other++;
                continue;
            }
            const struct virtio_net_hdr *h = (const void *)(s + 1);
            if (h->gso_type != VIRTIO_NET_HDR_GSO_NONE)
                d->gso_frames++;
            d->frames++;
            d->bytes += (uint64_t)n - VNET;
            s->len = (uint32_t)n;
            s->due_ns = now_ns() + d->delay_ns;
            d->tail++;
        }
    }
    return NULL;
}

static void on_signal(int sig)
{
    (void)sig;
    stopping = 1;
}

static void print_dir(const struct dir *d, const char *sep)
{
    printf("\"%s\": {\"frames\": %lu, \"bytes\": %lu, \"gso_frames\": %lu, \"drops_queue\": %lu, "
           "\"drops_ring\": %lu, \"drops_other\": %lu, \"late_max_us\": %.1f, \"late_mean_us\": %.2f}%s",
           d->name, d->frames, d->bytes, d->gso_frames, d->drops_queue, d->drops_ring, d->drops_other,
           d->late_max_ns / 1e3, d->sent ? d->late_total_ns / 1e3 / (double)d->sent : 0.0, sep);
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: wanfwd IFACE_A IFACE_B ONE_WAY_US\n");
        return 2;
    }
    uint64_t delay = strtoull(argv[3], NULL, 10) * 1000ULL;
    int a = open_iface(argv[1]), b = open_iface(argv[2]);
    struct dir ab = { .name = "a_to_b", .rx = a, .tx = b, .delay_ns = delay };
    struct dir ba = { .name = "b_to_a", .rx = b, .tx = a, .delay_ns = delay };
    ab.ring = malloc((size_t)SLOTS * SLOT_BYTES);
    ba.ring = malloc((size_t)SLOTS * SLOT_BYTES);
    if (!ab.ring || !ba.ring)
        die("malloc", NULL);
    struct sigaction sa = { .sa_handler = on_signal };
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    pthread_t t1, t2;
    pthread_create(&t1, NULL, run, &ab);
    pthread_create(&t2, NULL, run, &ba);
    printf("{\"ready\": true}\n");
    fflush(stdout);
    pthread_join(t1, NULL);
    pthread_join(t2, NULL);
    printf("{");
    print_dir(&ab, ", ");
    print_dir(&ba, "");
    printf("}\n");
    return 0;
}
