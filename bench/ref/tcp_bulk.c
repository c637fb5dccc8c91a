/* tcp_bulk: loopback TCP bulk throughput, the ceiling of any byte stream.
 *   usage: tcp_bulk [BYTES=4G]        (suffixes K/M/G accepted)
 * A sender thread writes BYTES from a 1 MiB buffer, the main thread reads
 * them into a 1 MiB buffer.  Kernel socket buffers are left to autotuning,
 * as our Python code leaves them.  Prints {"tcp_gbps": ...} (1 GB = 1e9 B). */
#include "common.h"

#define CHUNK MIB

static uint64_t total;
static int port;

static void *sender(void *arg)
{
    (void)arg;
    char *buf = malloc(CHUNK);
    memset(buf, 0x5a, CHUNK);           /* real data, not untouched zero pages */
    int fd = tcp_connect(port, 0);
    for (uint64_t left = total; left;) {
        size_t n = left < CHUNK ? left : CHUNK;
        send_all(fd, buf, n);
        left -= n;
    }
    close(fd);
    free(buf);
    return NULL;
}

int main(int argc, char **argv)
{
    total = argc > 1 ? parse_size(argv[1]) : 4UL << 30;
    int lfd = tcp_listen(&port);
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
