/* One end of a connection, plaintext or TLS 1.3 (OpenSSL): see link.h. */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include "link.h"

/* One TLS record's plaintext at most per write: with partial writes enabled
 * each SSL_write_ex then costs one record, and a retry after WANT_WRITE
 * resends exactly the same bytes. */
#define RECORD 16384

/* OpenSSL's error queue is per thread and shared by every user of the
 * library in that thread (Python's ssl module too), and SSL_get_error()
 * reads it first: a stale entry would turn a would-block into a failure.
 * So every SSL call below starts with ERR_clear_error(), as OpenSSL asks. */

/* What OpenSSL says went wrong, or the verification result when that is the
 * cause, written into buf (a link's reason, or tls_context's own). */
static const char *ssl_reason(char *buf, size_t size, SSL *ssl, const char *what)
{
    unsigned long e = ERR_peek_last_error();
    long verify = ssl ? SSL_get_verify_result(ssl) : X509_V_OK;
    if (verify != X509_V_OK)
        snprintf(buf, size, "%s: certificate verify failed: %s", what,
                 X509_verify_cert_error_string(verify));
    else if (e)
        snprintf(buf, size, "%s: %s", what, ERR_reason_error_string(e) ? ERR_reason_error_string(e) : "error");
    else
        snprintf(buf, size, "%s failed", what);
    ERR_clear_error();
    return buf;
}

/* Maps a failed SSL call to our conventions; formatted text goes to l->reason. */
static int64_t tls_fail(link_t *l, int ret, int *want, const char **why, const char *what)
{
    int sys_errno = errno; /* the socket call's, before anything else can change it */
    int err = SSL_get_error((SSL *)l->ssl, ret);
    switch (err) {
    case SSL_ERROR_WANT_READ:
        *want = POLLIN;
        return -EAGAIN;
    case SSL_ERROR_WANT_WRITE:
        *want = POLLOUT;
        return -EAGAIN;
    case SSL_ERROR_ZERO_RETURN:
        return 0; /* close_notify: a clean end */
    case SSL_ERROR_SYSCALL:
        ERR_clear_error();
        if (sys_errno) {
            *why = what;
            return -sys_errno;
        }
        return 0; /* an abrupt close: framing tells a truncated frame from a clean end */
    default:
        *why = ssl_reason(l->reason, sizeof l->reason, (SSL *)l->ssl, what);
        return -EPROTO;
    }
}

int64_t link_recv(link_t *l, void *buf, uint64_t len, int *want, const char **why)
{
    if (!l->ssl) {
        ssize_t n = recv(l->fd, buf, len, MSG_DONTWAIT);
        if (n >= 0)
            return n;
        if (errno == EAGAIN || errno == EINTR) {
            *want = POLLIN;
            return -EAGAIN;
        }
        *why = "recv";
        return -errno;
    }
    size_t got = 0;
    ERR_clear_error();
    errno = 0;
    int ret = SSL_read_ex((SSL *)l->ssl, buf, len, &got);
    return ret > 0 ? (int64_t)got : tls_fail(l, ret, want, why, "TLS receive");
}

int64_t link_send(link_t *l, const void *buf, uint64_t len, int *want, const char **why)
{
    if (len == 0) { /* send() would answer 0: a caller's bug, never "call again" */
        *why = "a send of nothing";
        return -EINVAL;
    }
    if (!l->ssl) {
        ssize_t n = send(l->fd, buf, len, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (n >= 0)
            return n;
        if (errno == EAGAIN || errno == EINTR) {
            *want = POLLOUT;
            return -EAGAIN;
        }
        *why = "send";
        return -errno;
    }
    if (l->rekey_bytes && l->since_rekey >= l->rekey_bytes) {
        /* NOT_REQUESTED: the peer's reader updates its keys without writing
         * back, so no thread ever has to read and write one session at once. */
        ERR_clear_error();
        if (!SSL_key_update((SSL *)l->ssl, SSL_KEY_UPDATE_NOT_REQUESTED)) {
            *why = ssl_reason(l->reason, sizeof l->reason, (SSL *)l->ssl, "TLS key update");
            return -EPROTO;
        }
        l->since_rekey = 0;
        l->rekeys++;
    }
    size_t sent = 0;
    ERR_clear_error();
    errno = 0;
    int ret = SSL_write_ex((SSL *)l->ssl, buf, len < RECORD ? len : RECORD, &sent);
    if (ret <= 0) {
        int64_t rc = tls_fail(l, ret, want, why, "TLS send");
        /* tls_fail's 0 is a receiver's EOF: once OpenSSL has read the
         * peer's end (close_notify, or an abrupt close), a failed write
         * reports the same.  A send never returns 0: every caller would
         * take it for "call again" and spin. */
        if (rc == 0) {
            *why = "TLS send: the peer closed the connection";
            return -EPIPE;
        }
        return rc;
    }
    l->since_rekey += sent;
    return (int64_t)sent;
}

/* tls_context has no link to hold its text: a buffer of the calling thread,
 * which is fine as long as that thread reads *why before it makes another
 * call here.  Its one caller, TlsConfig in migrate/wire.py, calls it from the
 * trio thread and reads the text at once. */
static __thread char context_reason[256];

void *tls_context(int server, const char *cert, const char *key, const char *ca, const char **why)
{
    ERR_clear_error();
    SSL_CTX *ctx = SSL_CTX_new(server ? TLS_server_method() : TLS_client_method());
    if (!ctx) {
        *why = ssl_reason(context_reason, sizeof context_reason, NULL, "creating a TLS context");
        return NULL;
    }
    SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION);
    /* AES-128-GCM first: with AES-NI the fastest AEAD here, and ample for a
     * migration's lifetime; the peer may still pick the others. */
    SSL_CTX_set_ciphersuites(ctx, "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256");
    /* Partial writes: a record at a time; a moving buffer: our retries
     * re-gather the same bytes elsewhere. */
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    SSL_CTX_set_options(ctx, SSL_OP_IGNORE_UNEXPECTED_EOF | SSL_OP_NO_TICKET);
    /* Read ahead: one read() per 16 KiB record instead of two (its header,
     * then its body).  A larger read buffer would take many records a read()
     * but measured no faster: see docs/performance.md, TLS.  Every reader
     * tries SSL_read before it polls, so bytes buffered here are never left
     * waiting for a readable socket. */
    SSL_CTX_set_read_ahead(ctx, 1);
    /* No session tickets: nobody reads the server-to-client direction of the
     * requests connection, so nothing should be sent there. */
    SSL_CTX_set_num_tickets(ctx, 0);
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, NULL);
    if (SSL_CTX_use_certificate_chain_file(ctx, cert) != 1) {
        *why = ssl_reason(context_reason, sizeof context_reason, NULL, "reading the TLS certificate");
    } else if (SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1) {
        *why = ssl_reason(context_reason, sizeof context_reason, NULL, "reading the TLS key");
    } else if (SSL_CTX_check_private_key(ctx) != 1) {
        *why = ssl_reason(context_reason, sizeof context_reason, NULL, "the TLS key does not match the certificate");
    } else if (SSL_CTX_load_verify_locations(ctx, ca, NULL) != 1) {
        *why = ssl_reason(context_reason, sizeof context_reason, NULL, "reading the TLS CA file");
    } else {
        return ctx;
    }
    SSL_CTX_free(ctx);
    return NULL;
}

void tls_context_free(void *ctx)
{
    SSL_CTX_free((SSL_CTX *)ctx);
}

int tls_attach(link_t *l, void *ctx, const char *peer_host, const char **why)
{
    ERR_clear_error();
    SSL *ssl = SSL_new((SSL_CTX *)ctx);
    if (!ssl || SSL_set_fd(ssl, l->fd) != 1) {
        *why = ssl_reason(l->reason, sizeof l->reason, NULL, "starting TLS");
        SSL_free(ssl);
        return -EPROTO;
    }
    if (peer_host) {
        SSL_set_connect_state(ssl);
        X509_VERIFY_PARAM *param = SSL_get0_param(ssl);
        /* An IP address must be in the certificate's IP SANs, a name in its DNS SANs. */
        if (X509_VERIFY_PARAM_set1_ip_asc(param, peer_host) != 1 &&
            (SSL_set1_host(ssl, peer_host) != 1 || SSL_set_tlsext_host_name(ssl, peer_host) != 1)) {
            *why = ssl_reason(l->reason, sizeof l->reason, NULL, "setting the TLS peer name");
            SSL_free(ssl);
            return -EPROTO;
        }
    } else {
        SSL_set_accept_state(ssl);
    }
    l->ssl = ssl;
    return 0;
}

int tls_handshake(link_t *l, int *want, const char **why)
{
    ERR_clear_error();
    errno = 0;
    int ret = SSL_do_handshake((SSL *)l->ssl);
    if (ret == 1)
        return 0;
    int64_t rc = tls_fail(l, ret, want, why, "TLS handshake");
    if (rc == 0) { /* the peer closed in the middle of the handshake */
        *why = "TLS handshake: the peer closed the connection";
        return -ECONNRESET;
    }
    return (int)rc;
}

const char *tls_description(link_t *l)
{
    if (!l->ssl)
        return "plaintext";
    snprintf(l->reason, sizeof l->reason, "%s %s", SSL_get_version((SSL *)l->ssl),
             SSL_get_cipher_name((SSL *)l->ssl));
    return l->reason;
}

void tls_detach(link_t *l)
{
    SSL_free((SSL *)l->ssl);
    l->ssl = NULL;
}

uint32_t link_rtt_us(int fd)
{
    struct tcp_info info;
    socklen_t len = sizeof(info);

    /* An older kernel fills less of the struct: tcpi_rtt is near its start. */
    if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &info, &len) < 0 || len < offsetof(struct tcp_info, tcpi_rttvar))
        return 0;
    return info.tcpi_rtt;
}

int link_stamp_arrivals(int fd, int on)
{
    return setsockopt(fd, SOL_SOCKET, SO_TIMESTAMPNS, &on, sizeof(on)) < 0 ? -errno : 0;
}

uint64_t link_arrival_ns(int fd)
{
    char byte, control[CMSG_SPACE(sizeof(struct timespec))];
    struct iovec iov = {.iov_base = &byte, .iov_len = 1};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control,
                         .msg_controllen = sizeof(control)};

    if (recvmsg(fd, &msg, MSG_PEEK | MSG_DONTWAIT) <= 0)
        return 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_TIMESTAMPNS)
            continue;
        struct timespec at, real, mono;
        memcpy(&at, CMSG_DATA(c), sizeof(at));
        /* The kernel stamps with CLOCK_REALTIME: carried over to the monotonic clock by the
         * two clocks' offset now (one host's two clocks, read together).  An age beyond a
         * second, or negative, says the time of day was stepped (or faked, as libfaketime
         * does for this process only) in between: then the report counts as arriving now. */
        clock_gettime(CLOCK_REALTIME, &real);
        clock_gettime(CLOCK_MONOTONIC, &mono);
        int64_t age = ((int64_t)real.tv_sec - at.tv_sec) * 1000000000LL + (real.tv_nsec - at.tv_nsec);
        int64_t now = (int64_t)mono.tv_sec * 1000000000LL + mono.tv_nsec;
        return age >= 0 && age <= 1000000000LL && age < now ? (uint64_t)(now - age) : (uint64_t)now;
    }
    return 0;
}
