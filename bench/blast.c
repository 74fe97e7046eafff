/* A UDP sender at a fixed packet rate (sendmmsg batches) and its receiver (recvmmsg), for the
 * CPU-cost method (bench/cpucost.py): cheap per packet, so what a hook costs is a visible part of
 * the whole, and exact about the rate it offers.
 *
 *   blast send ADDRESS PORT LENGTH PACKETS_PER_SECOND SECONDS   prints: packets sent
 *   blast recv PORT IDLE_MS                                     prints: ready, then packets bytes
 *
 * The receiver stops once no datagram came for IDLE_MS after the first one.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BATCH 32
#define MAX_LENGTH 9000
#define BUFFER (16 << 20)

static char payload[BATCH][MAX_LENGTH];

static void fail(const char *what) {
    perror(what);
    exit(1);
}

static void add_ns(struct timespec *t, long long ns) {
    ns += t->tv_nsec;
    t->tv_sec += ns / 1000000000LL;
    t->tv_nsec = ns % 1000000000LL;
}

static int send_main(const char *address, int port, int length, long long rate, double seconds) {
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons(port)};
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    long long total = (long long)(rate * seconds), sent = 0;
    long long interval = 1000000000LL * BATCH / rate;
    struct timespec next;
    int fd = socket(AF_INET, SOCK_DGRAM, 0);

    if (fd < 0 || inet_pton(AF_INET, address, &to.sin_addr) != 1 || length > MAX_LENGTH)
        fail("socket");
    if (connect(fd, (struct sockaddr *)&to, sizeof to) < 0)
        fail("connect");
    memset(msgs, 0, sizeof msgs);
    for (int i = 0; i < BATCH; i++) {
        iov[i].iov_base = payload[i];
        iov[i].iov_len = (size_t)length;
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    clock_gettime(CLOCK_MONOTONIC, &next);
    while (sent < total) {
        int want = total - sent < BATCH ? (int)(total - sent) : BATCH;
        int done = sendmmsg(fd, msgs, (unsigned)want, 0);
        if (done < 0 && errno != ENOBUFS && errno != EAGAIN && errno != ECONNREFUSED)
            fail("sendmmsg");
        sent += done > 0 ? done : 0;
        add_ns(&next, interval);
        clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL);
    }
    printf("%lld\n", sent);
    return 0;
}

static int recv_main(int port, int idle_ms) {
    struct sockaddr_in at = {.sin_family = AF_INET, .sin_port = htons(port)};
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    long long packets = 0, bytes = 0;
    int size = BUFFER, fd = socket(AF_INET, SOCK_DGRAM, 0);

    if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof size) < 0)
        fail("socket");
    if (bind(fd, (struct sockaddr *)&at, sizeof at) < 0)
        fail("bind");
    memset(msgs, 0, sizeof msgs);
    for (int i = 0; i < BATCH; i++) {
        iov[i].iov_base = payload[i];
        iov[i].iov_len = MAX_LENGTH;
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    printf("ready\n");
    fflush(stdout);
    for (;;) {
        struct pollfd wait = {.fd = fd, .events = POLLIN};
        int got = poll(&wait, 1, packets ? idle_ms : 60000);
        if (got == 0)
            break;
        got = recvmmsg(fd, msgs, BATCH, MSG_DONTWAIT, NULL);
        for (int i = 0; i < got; i++)
            bytes += msgs[i].msg_len;
        packets += got > 0 ? got : 0;
    }
    printf("%lld %lld\n", packets, bytes);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 7 && strcmp(argv[1], "send") == 0)
        return send_main(argv[2], atoi(argv[3]), atoi(argv[4]), atoll(argv[5]), atof(argv[6]));
    if (argc == 4 && strcmp(argv[1], "recv") == 0)
        return recv_main(atoi(argv[2]), atoi(argv[3]));
    fprintf(stderr, "usage: blast send ADDRESS PORT LENGTH RATE SECONDS | blast recv PORT IDLE_MS\n");
    return 2;
}
