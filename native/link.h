/*
 * One end of a connection, plaintext or TLS: the only path bytes take to and
 * from the network, for Python (handshake, control frames) and for the
 * native loops alike.
 *
 * Read by the C compiler and by cffi's cdef parser: plain declarations only.
 * Non-blocking throughout: a call that cannot proceed returns -EAGAIN and
 * says in *want whether to wait for POLLIN or POLLOUT (TLS may need to write
 * while reading, or read while writing).  A TLS session is used by one thread
 * at a time: each connection has one user at a time, Python or one loop
 * (OpenSSL forbids two threads in one SSL object at once).
 */

typedef struct {
    int fd;
    void *ssl;                /* SSL *, or NULL: plaintext */
    uint64_t rekey_bytes;     /* TLS sender: a key update every this many bytes (0: OpenSSL's own) */
    uint64_t since_rekey;     /* bytes sent since the last key update */
    uint64_t rekeys;          /* key updates sent */
    /* Set when a send stopped part-way through a frame (a stop or an error
     * after some bytes of it left, or with TLS after a write that must be
     * retried): nobody may write on this link again, as the peer would read
     * what follows as the rest of that frame.  Set by the native loops'
     * senders (send_all, flush in dataplane.c); never cleared. */
    int cut;
    /* The text a failed call's *why points to when it is more than a
     * constant (OpenSSL's reason), and tls_description's: kept in the link,
     * not the thread, as the trio thread reads it after the worker that
     * wrote it has returned (and maybe run another loop since).  Valid until
     * the next call on this link. */
    char reason[256];
} link_t;

/* Receives up to len bytes: returns how many (> 0), 0 when the peer closed,
 * -EAGAIN with *want set, or -errno (-EPROTO for TLS) with *why set. */
int64_t link_recv(link_t *l, void *buf, uint64_t len, int *want, const char **why);

/* Sends up to len bytes (len > 0): returns how many (> 0), -EAGAIN with *want
 * set, or -errno with *why set; never 0.  The peer closing shows as -EPIPE
 * (with TLS, once its end was read: "the peer closed the connection").  TLS:
 * at most one record (16 KiB) per call. */
int64_t link_send(link_t *l, const void *buf, uint64_t len, int *want, const char **why);

/* A TLS 1.3 context with this end's certificate and key, verifying the peer
 * against the CA file (mutual: a server demands a client certificate).
 * Returns NULL with *why set, in a buffer of the calling thread: read it
 * before that thread calls tls_context again. */
void *tls_context(int server, const char *cert, const char *key, const char *ca, const char **why);
void tls_context_free(void *ctx);

/* Starts TLS on l->fd.  A client checks that the server's certificate names
 * peer_host (a DNS name or an IP address); a server passes NULL. */
int tls_attach(link_t *l, void *ctx, const char *peer_host, const char **why);

/* One step of the handshake: 0 when done, -EAGAIN with *want, or -EPROTO with *why. */
int tls_handshake(link_t *l, int *want, const char **why);

/* The negotiated protocol and cipher, e.g. "TLSv1.3 TLS_AES_256_GCM_SHA384",
 * in l->reason. */
const char *tls_description(link_t *l);

/* Frees the TLS session (the socket is closed by its owner). */
void tls_detach(link_t *l);

/* The kernel's smoothed round-trip time of the TCP connection on fd, in
 * microseconds (tcp_info.tcpi_rtt); 0 when fd is not a TCP socket. */
uint32_t link_rtt_us(int fd);

/* Kernel receive timestamps on fd (SO_TIMESTAMPNS), on or off: 0 or -errno. */
int link_stamp_arrivals(int fd, int on);

/* When the first unread byte on fd arrived, as the kernel stamped it (after
 * link_stamp_arrivals), on CLOCK_MONOTONIC; 0 when nothing is waiting or the
 * kernel gave no timestamp.  Reads nothing (MSG_PEEK). */
uint64_t link_arrival_ns(int fd);
