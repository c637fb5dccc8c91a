/* tcp_bulk: TCP bulk throughput, the ceiling of any byte stream.
 *   usage: tcp_bulk [BYTES=4G]                        loopback (suffixes K/M/G accepted)
 *          tcp_bulk BYTES SEND_NETNS RECV_NETNS ADDR  through an emulated link
 * A sender thread writes BYTES from a 1 MiB buffer, the main thread reads
 * them into a 1 MiB buffer.  Kernel socket buffers are left to autotuning,
 * as our Python code leaves them.  Through a link (bench/wan.py) the sender
 * thread joins network namespace SEND_NETNS (a path such as /run/netns/x) and
 * the receiver RECV_NETNS, where it listens on ADDR: the bytes cross the
 * link's veths, shaper and delay.  Prints {"tcp_gbps": ...} (1 GB = 1e9 B). */
#include "common.h"

#define CHUNK MIB

static uint64_t total;
static int port;
static const char *send_ns, *recv_ns, *addr;

static void *sender(void *arg)
{
    (void)arg;
    char *buf = malloc(CHUNK);
    memset(buf, 0x5a, CHUNK);           /* real data, not untouched zero pages */
    int fd;
    if (addr) {
        join_netns(send_ns);
        struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };
        inet_pton(AF_INET, addr, &a.sin_addr);
        fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd < 0 || connect(fd, (void *)&a, sizeof a))
            die("connect");
    } else {
        fd = tcp_connect(port, 0);
    }
    for (uint64_t left = total; left;) {
        size_t n = left < CHUNK ? left : CHUNK;
        send_all(fd, buf, n);
        left -= n;
    }
    close(fd);
    free(buf);
    return NULL;
}

/* The receiver's end of an emulated link: in RECV_NETNS, on ADDR. */
static int listen_link(void)
{
    join_netns(recv_ns);
    return tcp_listen_on(addr, &port);
}

int main(int argc, char **argv)
{
    total = argc > 1 ? parse_size(argv[1]) : 4UL << 30;
    if (argc == 5) {
        send_ns = argv[2], recv_ns = argv[3], addr = argv[4];
    } else if (argc > 2) {
        fprintf(stderr, "usage: tcp_bulk [BYTES] | tcp_bulk BYTES SEND_NETNS RECV_NETNS ADDR\n");
        return 2;
    }
    int lfd = addr ? listen_link() : tcp_listen(&port);
    char *buf = malloc(CHUNK);
    memset(buf, 0, CHUNK);

    pthread_t t;
    pthread_create(&t, NULL, sender, NULL);
    int fd = tcp_accept(lfd, 0);

    /* The clock starts at accept: connection setup is not bulk throughput. */
    double t0 = now_s();
    uint64_t got = 0;
    size_t r;
    do {
        r = recv_all(fd, buf, CHUNK);
        got += r;
    } while (r == CHUNK);
    double dt = now_s() - t0;
    pthread_join(t, NULL);
    if (got != total) {
        fprintf(stderr, "short stream: %lu of %lu bytes\n", got, total);
        return 1;
    }
    printf("{\"tcp_gbps\": %.3f, \"bytes\": %lu, \"seconds\": %.4f}\n", got / dt / 1e9, got, dt);
    return 0;
}
