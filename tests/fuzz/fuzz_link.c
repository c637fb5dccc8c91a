/*
 * libFuzzer target: the receive path of native/link.c, link_recv(), over a
 * real socketpair, plaintext or TLS 1.3 (OpenSSL), with link_send() as the
 * sender (and its key updates).
 *
 *   sender link --socketpair--> relay (this harness) --socketpair--> receiver link
 *
 * The relay moves the sender's bytes (TLS records) to the receiver in pieces
 * of the sizes the input picks, so a record is split at every point; it may
 * also flip one byte, inject garbage, or close in the middle.  The receiver
 * reads with lengths the input picks.  Checked: what the receiver delivers is
 * always a prefix of what was sent, all of it on a clean link; a damaged TLS
 * stream ends in -EPROTO or a close (0), never in wrong bytes; a plaintext
 * close is 0; a result is never a positive count larger than asked.
 *
 * The TLS pair (a certificate made here, self-signed, naming 127.0.0.1) is
 * made once and kept across inputs, made anew after an input broke it.
 *
 * Input: a 4-byte setup, then the payload:
 *   [0] bit 0 TLS; bits 1-3 the relay's piece sizes; bits 4-6 the receiver's
 *       read sizes; bit 7 the sender's piece sizes are small
 *   [1] TLS: when >= 24, a key update every 2^([1] % 24) bytes sent
 *   [2] damage: 0-127 none, and the link is kept for the next input;
 *       128-159 none, then a close; 160-191 a byte flipped at offset
 *       [3] * 37 of the stream; 192-223 the stream cut there; 224-255 cut
 *       there and followed by garbage (the payload itself, raw), then a close
 *   [3] where the damage is
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "link.h"
#include "selfsigned.h"

#define CHECK(cond)                                                                        \
    do {                                                                                   \
        if (!(cond)) {                                                                     \
            fprintf(stderr, "fuzz_link: %s:%d: property broken: %s\n", __FILE__, __LINE__, #cond); \
            abort();                                                                       \
        }                                                                                  \
    } while (0)

#define MAX_PAYLOAD (1 << 20)

static uint64_t prng = 88172645463325252ULL;

static uint64_t next_random(void)
{
    prng ^= prng << 13;
    prng ^= prng >> 7;
    prng ^= prng << 17;
    return prng;
}

static size_t pick(unsigned cls, size_t len)
{
    static const size_t most[8] = { 0, 1, 3, 17, 300, 5000, 16384, 70000 };
    size_t m = most[cls & 7];
    if (m == 0 || len == 0)
        return len;
    size_t n = 1 + next_random() % m;
    return n < len ? n : len;
}

/* -- the pair -------------------------------------------------------------- */

static void *server_ctx, *client_ctx;

typedef struct {
    link_t tx, rx;   /* sender (a TLS server) and receiver (a client, as a destination is) */
    int relay_in;    /* the far end of the sender's socketpair: the relay reads here */
    int relay_out;   /* the far end of the receiver's socketpair: the relay writes here */
    int tls, broken;
} pair_t;

static pair_t tls_pair, plain_pair;

static void close_pair(pair_t *p)
{
    if (p->tx.ssl)
        tls_detach(&p->tx);
    if (p->rx.ssl)
        tls_detach(&p->rx);
    close(p->tx.fd);
    close(p->rx.fd);
    close(p->relay_in);
    close(p->relay_out);
    memset(p, 0, sizeof *p);
}

/* Moves what is waiting at the relay's input to its output, whole. */
static void relay_all(pair_t *p)
{
    char buf[65536];
    ssize_t n;
    while ((n = recv(p->relay_in, buf, sizeof buf, MSG_DONTWAIT)) > 0)
        CHECK(send(p->relay_out, buf, (size_t)n, MSG_NOSIGNAL) == n);
}

static void open_pair(pair_t *p, int tls)
{
    int a[2], b[2];
    CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, a) == 0);
    CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, b) == 0);
    memset(p, 0, sizeof *p);
    p->tx.fd = a[0];
    p->relay_in = a[1];
    p->relay_out = b[0];
    p->rx.fd = b[1];
    /* Room for the largest input in flight, as TLS records (the relay
     * holds nothing back). */
    int size = 4 * MAX_PAYLOAD;
    setsockopt(p->relay_out, SOL_SOCKET, SO_SNDBUFFORCE, &size, sizeof size);
    setsockopt(p->rx.fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof size);
    p->tls = tls;
    if (!tls)
        return;
    const char *why = NULL;
    CHECK(tls_attach(&p->tx, server_ctx, NULL, &why) == 0);
    CHECK(tls_attach(&p->rx, client_ctx, "127.0.0.1", &why) == 0);
    int tx_done = 0, rx_done = 0, want;
    for (int i = 0; i < 100 && !(tx_done && rx_done); i++) {
        if (!rx_done) {
            int rc = tls_handshake(&p->rx, &want, &why);
            CHECK(rc == 0 || rc == -EAGAIN);
            rx_done = rc == 0;
        }
        if (!tx_done) {
            int rc = tls_handshake(&p->tx, &want, &why);
            CHECK(rc == 0 || rc == -EAGAIN);
            tx_done = rc == 0;
        }
        relay_all(p);
        /* The receiver's direction back to the sender goes straight through. */
        char buf[65536];
        ssize_t n;
        while ((n = recv(p->relay_out, buf, sizeof buf, MSG_DONTWAIT)) > 0)
            CHECK(send(p->relay_in, buf, (size_t)n, MSG_NOSIGNAL) == n);
    }
    CHECK(tx_done && rx_done);
}

static void setup(void)
{
    char cert[] = "/tmp/fuzz-link-cert-XXXXXX", key[] = "/tmp/fuzz-link-key-XXXXXX";
    make_self_signed(cert, key);
    const char *why = NULL;
    server_ctx = tls_context(1, cert, key, cert, &why);
    CHECK(server_ctx);
    client_ctx = tls_context(0, cert, key, cert, &why);
    CHECK(client_ctx);
    unlink(cert);
    unlink(key);
}

/* Reads what is there on the receiver: bytes into got, up to cap; returns
 * the last result (0, -EAGAIN, or an error) once nothing more comes. */
static int64_t drain(pair_t *p, unsigned cls, uint8_t *got, size_t *have, size_t cap)
{
    for (;;) {
        int want = 0;
        const char *why = NULL;
        size_t len = pick(cls, cap - *have);
        if (len == 0)
            len = 1; /* a full buffer still asks: past the end is what must not come */
        uint8_t spare[1];
        uint8_t *to = *have < cap ? got + *have : spare;
        int64_t n = link_recv(&p->rx, to, len, &want, &why);
        if (n > 0) {
            CHECK((uint64_t)n <= len);
            CHECK(*have + (size_t)n <= cap); /* more than was sent */
            *have += (size_t)n;
            continue;
        }
        if (n == -EAGAIN)
            CHECK(want == POLLIN || want == POLLOUT);
        else if (n < 0)
            CHECK(why && why[0]);
        return n;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static int once;
    static uint8_t *got;
    if (!once) {
        setup();
        got = malloc(MAX_PAYLOAD);
        CHECK(got);
        once = 1;
    }
    uint8_t cfg[4] = { 0 };
    size_t k = size < sizeof cfg ? size : sizeof cfg;
    memcpy(cfg, data, k);
    data += k;
    size -= k;
    if (size > MAX_PAYLOAD)
        size = MAX_PAYLOAD;
    int tls = cfg[0] & 1;
    unsigned relay_cls = (cfg[0] >> 1) & 7, read_cls = (cfg[0] >> 4) & 7;
    unsigned send_cls = cfg[0] & 0x80 ? 3 : 7;
    enum { NONE, FLIP, CUT, GARBAGE } damage = cfg[2] < 160 ? NONE : cfg[2] < 192 ? FLIP : cfg[2] < 224 ? CUT : GARBAGE;
    size_t at = (size_t)cfg[3] * 37;
    prng = 88172645463325252ULL ^ ((uint64_t)cfg[1] << 32 | (uint64_t)cfg[3] << 8 | cfg[0]);

    pair_t *p = tls ? &tls_pair : &plain_pair;
    if (!p->tx.fd || p->broken) {
        if (p->tx.fd)
            close_pair(p);
        open_pair(p, tls);
    }
    p->tx.rekey_bytes = tls && cfg[1] >= 24 ? 1ULL << (cfg[1] % 24) : 0;

    int close_at_end = damage != NONE || cfg[2] >= 128;
    size_t sent = 0, have = 0, relayed = 0, retry = 0;
    int cut = 0, closed = 0;
    int64_t last = -EAGAIN;
    for (int idle = 0;; idle++) {
        CHECK(idle < 100); /* rounds in a row in which no byte moved: a link that stalls */
        size_t was_sent = sent, was_had = have;
        /* The sender: one link_send (at most a record with TLS). */
        if (sent < size) {
            int want = 0;
            const char *why = NULL;
            /* After -EAGAIN the same bytes again, as every caller does (OpenSSL
             * holds part of a record that only the same write may finish). */
            if (!retry)
                retry = pick(send_cls, size - sent);
            int64_t n = link_send(&p->tx, data + sent, retry, &want, &why);
            CHECK(n != 0); /* link.h: never 0 */
            if (!(n > 0 || n == -EAGAIN))
                fprintf(stderr, "fuzz_link: link_send: %lld %s\n", (long long)n, why ? why : "");
            CHECK(n > 0 || n == -EAGAIN);
            if (n > 0) {
                sent += (size_t)n;
                retry = 0;
            }
        }
        /* The relay: a piece of what the sender wrote, maybe damaged. */
        uint8_t buf[70000];
        ssize_t r = recv(p->relay_in, buf, pick(relay_cls, sizeof buf), MSG_DONTWAIT);
        if (r > 0 && !cut) {
            size_t len = (size_t)r;
            if (damage != NONE && relayed <= at && at < relayed + len) {
                size_t off = at - relayed;
                if (damage == FLIP) {
                    buf[off] ^= 0x20;
                } else {
                    len = off; /* CUT and GARBAGE: the stream ends here... */
                    cut = 1;
                }
            }
            if (len)
                CHECK(send(p->relay_out, buf, len, MSG_NOSIGNAL) == (ssize_t)len);
            relayed += len;
            /* ...and with GARBAGE raw bytes follow (over TLS: plaintext has
             * no way to tell them from data). */
            if (cut && damage == GARBAGE && tls && size)
                CHECK(send(p->relay_out, data, size < 65536 ? size : 65536, MSG_NOSIGNAL) > 0);
        }
        /* The receiver: whatever is there. */
        last = drain(p, read_cls, got, &have, size);
        if (sent != was_sent || r > 0 || have != was_had)
            idle = 0;
        if (last != -EAGAIN)
            break; /* a close or a failure: nothing more is read on this link */
        if (sent == size && r <= 0) { /* everything sent has been relayed, and read */
            if (!close_at_end) {
                CHECK(have == size);
                break;
            }
            if (closed)
                CHECK(!"the receiver still waits for data after its peer closed");
            shutdown(p->relay_out, SHUT_WR);
            closed = 1;
        }
    }
    /* What came is what was sent, so far (plaintext has no integrity: a
     * flipped byte arrives flipped). */
    if (!tls && damage == FLIP && at < have) {
        CHECK(got[at] == (data[at] ^ 0x20));
        got[at] ^= 0x20;
    }
    CHECK(memcmp(got, data, have) == 0);
    if (damage == NONE)
        CHECK(have == size && last == (close_at_end ? 0 : -EAGAIN));
    if (!tls && damage != FLIP)
        CHECK(have == (relayed < size ? relayed : size));
    if (tls && last < 0 && last != -EAGAIN)
        CHECK(last == -EPROTO);
    /* A link that closed or broke is made anew for the next input. */
    p->broken = close_at_end || last != -EAGAIN;
    return 0;
}
