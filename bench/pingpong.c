/* pingpong: the urgent path's floor through an emulated link (bench/wan.py):
 * a 32-byte request from the destination's side, a one-page (4096-byte)
 * reply from the source's side, as uffd-migrate's fault path sends them.
 *   usage: pingpong COUNT CLIENT_NETNS SERVER_NETNS ADDR [TOS [GAP_US]]
 * The server thread joins SERVER_NETNS (the source's) and listens on ADDR;
 * the client joins CLIENT_NETNS (the destination's), connects, and sends
 * COUNT requests one at a time, GAP_US apart (default 2000), timing each
 * round trip.  TOS (e.g. 0xb8, DSCP EF) marks both sockets as uffd-migrate
 * marks its urgent connections.  Run next to a bulk stream (tcp_bulk) it
 * shows whether replies queue behind bulk data at the bottleneck.  Prints
 * {"rtt_us": {"p50": ..., "p99": ..., "min": ..., "max": ...}, "count": N}. */
#include "ref/common.h"

#define REQ 32
#define REPLY 4096

static const char *client_ns, *server_ns, *addr;
static int port, tos, count, gap_us = 2000, ready;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;

static void mark(int fd)
{
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (tos && setsockopt(fd, IPPROTO_IP, IP_TOS, &tos, sizeof tos))
        die("IP_TOS");
}

static void *server(void *arg)
{
    (void)arg;
    join_netns(server_ns);
    int lfd = tcp_listen_on(addr, &port);
    pthread_mutex_lock(&mu);
    ready = 1;
    pthread_cond_signal(&cv);
    pthread_mutex_unlock(&mu);
    int fd = accept(lfd, NULL, NULL);
    if (fd < 0)
        die("accept");
    mark(fd);
    char req[REQ], *reply = calloc(1, REPLY);
    memset(reply, 0x5a, REPLY);
    while (recv_all(fd, req, REQ) == REQ)
        send_all(fd, reply, REPLY);
    close(fd);
    close(lfd);
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc < 5) {
        fprintf(stderr, "usage: pingpong COUNT CLIENT_NETNS SERVER_NETNS ADDR [TOS [GAP_US]]\n");
        return 2;
    }
    count = atoi(argv[1]);
    client_ns = argv[2], server_ns = argv[3], addr = argv[4];
    if (argc > 5)
        tos = (int)strtol(argv[5], NULL, 0);
    if (argc > 6)
        gap_us = atoi(argv[6]);
    pthread_t t;
    pthread_create(&t, NULL, server, NULL);
    pthread_mutex_lock(&mu);
    while (!ready)
        pthread_cond_wait(&cv, &mu);
    pthread_mutex_unlock(&mu);

    join_netns(client_ns);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };
    inet_pton(AF_INET, addr, &a.sin_addr);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0)
        die("socket");
    mark(fd);
    if (connect(fd, (void *)&a, sizeof a))
        die("connect");
    char req[REQ] = { 1 }, *reply = malloc(REPLY);
    double *rtt = calloc((size_t)count, sizeof *rtt);
    for (int i = 0; i < count; i++) {
        double t0 = now_s();
        send_all(fd, req, REQ);
        if (recv_all(fd, reply, REPLY) != REPLY)
            die("short reply");
        rtt[i] = (now_s() - t0) * 1e6;
        struct timespec ts = { 0, gap_us * 1000L };
        nanosleep(&ts, NULL);
    }
    shutdown(fd, SHUT_WR);
    pthread_join(t, NULL);
    qsort(rtt, (size_t)count, sizeof *rtt, cmp_double);
    printf("{\"rtt_us\": {\"p50\": %.1f, \"p99\": %.1f, \"min\": %.1f, \"max\": %.1f}, \"count\": %d}\n",
           pct(rtt, (size_t)count, 50), pct(rtt, (size_t)count, 99), rtt[0], rtt[count - 1], count);
    return 0;
}
