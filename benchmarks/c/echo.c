/* echo: the echo server and the echo client (a window of datagrams in flight) of the udpx
 * benchmarks.
 *
 *   echo server                  prints {"event": "ready", "port": P}; sends every datagram
 *                                back to its source (recvmmsg + sendmmsg) until stdin closes
 *   echo client PORT SIZE WINDOW WARMUP SECONDS DEADLINE SERVER_PID
 *                                keeps WINDOW requests in flight on one connected socket; the
 *                                measurement window opens WARMUP seconds after the first reply
 *                                and lasts SECONDS; reads the server's on-CPU time from
 *                                /proc/SERVER_PID/schedstat at both ends of the window
 *   echo clients PORT SIZE NSOCKS WARMUP SECONDS DEADLINE SERVER_PID
 *                                NSOCKS client sockets (NSOCKS peers of the server), each
 *                                connected to 127.0.0.1:PORT with exactly one request in flight
 *                                (like DNS or a game tick): send one datagram, wait for its
 *                                reply, send the next; epoll over the sockets. A request not
 *                                answered within 200 ms counts as a timeout and is sent again,
 *                                unchanged, as a DNS client does: the first reply to either
 *                                copy answers it, a second one is ignored (every request
 *                                carries its socket's index and sequence number). The sockets
 *                                start 256 at a time; the warm-up opens once every socket had
 *                                a reply (or after half the deadline) and lasts WARMUP seconds,
 *                                the window SECONDS; server CPU as for "client". SERVER_PID may
 *                                be a comma-separated list (a server in several worker
 *                                processes): the server's CPU is their sum, and each one's is
 *                                in "server_cpu_each"
 */
#include "common.h"

#include <poll.h>
#include <stdint.h>
#include <sys/epoll.h>
#include <sys/uio.h>

static char slots[BATCH][SLOT];
static struct iovec iovs[BATCH];
static struct mmsghdr msgs[BATCH];
static struct sockaddr_in names[BATCH];

static void setup(int named) {
    memset(msgs, 0, sizeof msgs);
    for (int i = 0; i < BATCH; i++) {
        memset(slots[i], 'e', SLOT);
        iovs[i].iov_base = slots[i];
        iovs[i].iov_len = SLOT;
        msgs[i].msg_hdr.msg_iov = &iovs[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
        if (named) {
            msgs[i].msg_hdr.msg_name = &names[i];
            msgs[i].msg_hdr.msg_namelen = sizeof names[i];
        }
    }
}

static int server(void) {
    int port;
    int fd = bound_socket(&port);
    printf("{\"event\": \"ready\", \"port\": %d}\n", port);
    fflush(stdout);
    setup(1);
    long long echoed = 0;
    struct pollfd pfds[2] = {{fd, POLLIN, 0}, {0, POLLIN, 0}};
    for (;;) {
        for (int i = 0; i < BATCH; i++) {
            iovs[i].iov_len = SLOT;
            msgs[i].msg_hdr.msg_namelen = sizeof names[i];
        }
        int n = recvmmsg(fd, msgs, BATCH, MSG_DONTWAIT, NULL);
        if (n > 0) {
            for (int i = 0; i < n; i++) iovs[i].iov_len = msgs[i].msg_len;
            int done = 0;
            while (done < n) {
                int s = sendmmsg(fd, msgs + done, (unsigned)(n - done), 0);
                if (s < 0) {
                    if (errno == EINTR || errno == EAGAIN || errno == ENOBUFS) continue;
                    done++;  /* drop the one the kernel refused */
                    continue;
                }
                done += s;
            }
            echoed += n;
        }
        if (n < BATCH) {
            if (poll(pfds, 2, 100) < 0 && errno != EINTR) die("poll");
            if (pfds[1].revents) {
                char buf[64];
                if (read(0, buf, sizeof buf) <= 0) break;
            }
        }
    }
    printf("{\"event\": \"result\", \"echoed\": %lld, \"cpu_seconds\": %.6f}\n", echoed,
           cpu_self());
    fflush(stdout);
    close(fd);
    return 0;
}

static int client(int argc, char **argv) {
    if (argc != 9) {
        fprintf(stderr, "usage: echo client PORT SIZE WINDOW WARMUP SECONDS DEADLINE PID\n");
        return 2;
    }
    int port = atoi(argv[2]), size = atoi(argv[3]), window = atoi(argv[4]);
    double warmup = atof(argv[5]), seconds = atof(argv[6]), deadline = atof(argv[7]);
    int server_pid = atoi(argv[8]);
    if (size < 1 || size > SLOT || window < 1) {
        fprintf(stderr, "echo: bad arguments\n");
        return 2;
    }
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    if (fd < 0) die("socket");
    int rcvbuf = RCVBUF;
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
    struct sockaddr_in dest = loopback(port);
    if (connect(fd, (struct sockaddr *)&dest, sizeof dest) < 0) die("connect");
    setup(0);
    static struct mmsghdr out[BATCH];
    static struct iovec out_iovs[BATCH];
    static char payload[SLOT];
    memset(payload, 'q', sizeof payload);
    memset(out, 0, sizeof out);
    for (int i = 0; i < BATCH; i++) {
        out_iovs[i].iov_base = payload;
        out_iovs[i].iov_len = (size_t)size;
        out[i].msg_hdr.msg_iov = &out_iovs[i];
        out[i].msg_hdr.msg_iovlen = 1;
    }
    long long replies = 0, requests = 0, timeouts = 0, c0 = 0, c1 = 0;
    double start = now(), first = -1, t0 = -1, t1 = -1, s0 = 0, s1 = 0, cpu0 = 0, cpu1 = 0;
    long long in_flight = 0;
    struct pollfd pfd = {fd, POLLIN, 0};
    for (;;) {
        /* Top the window up. */
        while (in_flight < window) {
            int want = window - in_flight > BATCH ? BATCH : (int)(window - in_flight);
            int s = sendmmsg(fd, out, (unsigned)want, 0);
            if (s < 0) {
                if (errno == EINTR || errno == EAGAIN || errno == ENOBUFS ||
                    errno == ECONNREFUSED)
                    break;
                die("sendmmsg");
            }
            in_flight += s;
            requests += s;
        }
        int n = recvmmsg(fd, msgs, BATCH, MSG_DONTWAIT, NULL);
        double t = now();
        if (n > 0) {
            replies += n;
            in_flight -= n;
            if (in_flight < 0) in_flight = 0;  /* late replies after a timeout */
            if (first < 0) first = t;
        } else if (n < 0 && errno != EAGAIN && errno != EINTR && errno != ECONNREFUSED) {
            die("recvmmsg");
        }
        if (first >= 0 && t0 < 0 && t >= first + warmup) {
            t0 = t; c0 = replies; s0 = cpu_of(server_pid); cpu0 = cpu_self();
        }
        if (t0 >= 0 && t >= t0 + seconds) {
            t1 = t; c1 = replies; s1 = cpu_of(server_pid); cpu1 = cpu_self();
            break;
        }
        if (t - start >= deadline) break;
        if (n <= 0) {
            int r = poll(&pfd, 1, 50);
            if (r == 0) {  /* 50 ms without a reply: count the window lost, send it again */
                timeouts++;
                in_flight = 0;
            }
        }
    }
    double secs = t1 >= 0 ? t1 - t0 : 0.0;
    long long count = c1 - c0;
    double server_cpu = (s0 >= 0 && s1 >= 0) ? s1 - s0 : -1.0;
    printf("{\"event\": \"result\", \"round_trips\": %lld, \"requests\": %lld, "
           "\"window_count\": %lld, \"window_seconds\": %.6f, \"rate\": %.1f, "
           "\"server_cpu_seconds\": %.6f, \"server_cpu_us_per_rt\": %.4f, "
           "\"client_cpu_seconds\": %.6f, \"timeouts\": %lld, \"window_complete\": %s}\n",
           replies, requests, count, secs, secs > 0 ? count / secs : 0.0, server_cpu,
           count > 0 && server_cpu >= 0 ? server_cpu * 1e6 / (double)count : -1.0,
           cpu1 - cpu0, timeouts, t1 >= 0 ? "true" : "false");
    fflush(stdout);
    close(fd);
    return t1 >= 0 ? 0 : 1;
}

/* "clients": one request in flight on each of many sockets. */
#define TIMEOUT 0.2
#define RAMP 256
#define EVENTS 256
#define MAX_PIDS 64

/* "PID" or "PID,PID,...": the server's processes (at most MAX_PIDS). */
static int parse_pids(const char *text, int *pids) {
    int n = 0;
    const char *p = text;
    while (*p && n < MAX_PIDS) {
        char *end;
        long pid = strtol(p, &end, 10);
        if (end == p || pid <= 0) break;
        pids[n++] = (int)pid;
        p = *end == ',' ? end + 1 : end;
        if (*end != ',') break;
    }
    return n;
}

/* The on-CPU seconds of every process in PIDS (into EACH) and their sum; -1 if one is gone. */
static double cpu_of_all(const int *pids, int n, double *each) {
    double total = 0;
    for (int k = 0; k < n; k++) {
        each[k] = cpu_of(pids[k]);
        if (each[k] < 0) return -1.0;
        total += each[k];
    }
    return total;
}

static int clients(int argc, char **argv) {
    if (argc != 9) {
        fprintf(stderr, "usage: echo clients PORT SIZE NSOCKS WARMUP SECONDS DEADLINE PID\n");
        return 2;
    }
    int port = atoi(argv[2]), size = atoi(argv[3]), nsocks = atoi(argv[4]);
    double warmup = atof(argv[5]), seconds = atof(argv[6]), deadline = atof(argv[7]);
    int server_pids[MAX_PIDS];
    double each0[MAX_PIDS], each1[MAX_PIDS];
    int npids = parse_pids(argv[8], server_pids);
    if (size < 8 || size > SLOT || nsocks < 1 || port < 1 || port > 65535 || npids < 1) {
        fprintf(stderr, "echo: bad arguments\n");
        return 2;
    }
    raise_nofile();
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < (rlim_t)nsocks + 16) {
        fprintf(stderr, "echo: RLIMIT_NOFILE %llu is too low for %d sockets\n",
                (unsigned long long)rl.rlim_cur, nsocks);
        return 2;
    }
    int *fds = calloc((size_t)nsocks, sizeof *fds);
    uint32_t *seq = calloc((size_t)nsocks, sizeof *seq);
    double *sent_at = calloc((size_t)nsocks, sizeof *sent_at);
    char *answered = calloc((size_t)nsocks, 1);
    if (!fds || !seq || !sent_at || !answered) die("calloc");
    int ep = epoll_create1(0);
    if (ep < 0) die("epoll_create1");
    struct sockaddr_in dest = loopback(port);
    for (int i = 0; i < nsocks; i++) {
        fds[i] = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
        if (fds[i] < 0) die("socket");
        if (connect(fds[i], (struct sockaddr *)&dest, sizeof dest) < 0) die("connect");
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, fds[i], &ev) < 0) die("epoll_ctl");
    }
    static char request[SLOT], reply[SLOT];
    memset(request, 'q', sizeof request);
    long long replies = 0, requests = 0, timeouts = 0, stale = 0, send_errors = 0;
    long long c0 = 0, c1 = 0, timeouts0 = 0, timeouts1 = 0;
    int started = 0, answered_count = 0;
    double start = now(), first = -1, t0 = -1, t1 = -1, s0 = 0, s1 = 0, cpu0 = 0, cpu1 = 0;
    double last_scan = start;
    struct epoll_event events[EVENTS];
    for (;;) {
        double t = now();
        /* Start the next sockets (a few at a time: the server's buffer is not flooded). */
        for (int k = 0; k < RAMP && started < nsocks; k++, started++) {
            int i = started;
            seq[i] = 1;
            sent_at[i] = t;
            memcpy(request, &i, 4);
            memcpy(request + 4, &seq[i], 4);
            if (send(fds[i], request, (size_t)size, 0) < 0) send_errors++;
            requests++;
        }
        int n = epoll_wait(ep, events, EVENTS, 10);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        t = now();
        for (int e = 0; e < n; e++) {
            int i = (int)events[e].data.u32;
            for (;;) {
                ssize_t r = recv(fds[i], reply, sizeof reply, 0);
                if (r < 0) {
                    if (errno == EAGAIN || errno == EWOULDBLOCK) break;
                    if (errno == EINTR || errno == ECONNREFUSED) continue;
                    die("recv");
                }
                int index;
                uint32_t number;
                memcpy(&index, reply, 4);
                memcpy(&number, reply + 4, 4);
                if (r < 8 || index != i || number != seq[i]) {
                    stale++;  /* the second reply to a request that was sent twice */
                    continue;
                }
                replies++;
                if (!answered[i]) {
                    answered[i] = 1;
                    answered_count++;
                }
                seq[i]++;
                sent_at[i] = t;
                memcpy(request, &i, 4);
                memcpy(request + 4, &seq[i], 4);
                if (send(fds[i], request, (size_t)size, 0) < 0) send_errors++;
                requests++;
            }
        }
        if (t - last_scan >= 0.02) {  /* resend what was not answered in time */
            last_scan = t;
            for (int i = 0; i < started; i++) {
                if (t - sent_at[i] < TIMEOUT) continue;
                timeouts++;  /* sent again as it was: whichever reply comes first answers it */
                sent_at[i] = t;
                memcpy(request, &i, 4);
                memcpy(request + 4, &seq[i], 4);
                if (send(fds[i], request, (size_t)size, 0) < 0) send_errors++;
                requests++;
            }
        }
        if (first < 0 && replies > 0 &&
            (answered_count == nsocks || t - start >= deadline / 2)) {
            first = t;
        }
        if (first >= 0 && t0 < 0 && t >= first + warmup) {
            t0 = t; c0 = replies; timeouts0 = timeouts;
            s0 = cpu_of_all(server_pids, npids, each0);
            cpu0 = cpu_self();
        }
        if (t0 >= 0 && t >= t0 + seconds) {
            t1 = t; c1 = replies; timeouts1 = timeouts;
            s1 = cpu_of_all(server_pids, npids, each1);
            cpu1 = cpu_self();
            break;
        }
        if (t - start >= deadline) break;
    }
    double secs = t1 >= 0 ? t1 - t0 : 0.0;
    long long count = c1 - c0;
    double server_cpu = (s0 >= 0 && s1 >= 0) ? s1 - s0 : -1.0;
    printf("{\"event\": \"result\", \"sockets\": %d, \"round_trips\": %lld, "
           "\"requests\": %lld, \"window_count\": %lld, \"window_seconds\": %.6f, "
           "\"rate\": %.1f, \"server_cpu_seconds\": %.6f, \"server_cpu_us_per_rt\": %.4f, "
           "\"client_cpu_seconds\": %.6f, \"timeouts\": %lld, \"window_timeouts\": %lld, "
           "\"stale\": %lld, \"send_errors\": %lld, \"answered\": %d, \"ready_after\": %.3f, "
           "\"window_complete\": %s, \"server_cpu_each\": [",
           nsocks, replies, requests, count, secs, secs > 0 ? count / secs : 0.0, server_cpu,
           count > 0 && server_cpu >= 0 ? server_cpu * 1e6 / (double)count : -1.0,
           cpu1 - cpu0, timeouts, timeouts1 - timeouts0, stale, send_errors, answered_count,
           first >= 0 ? first - start : -1.0, t1 >= 0 ? "true" : "false");
    for (int k = 0; k < npids; k++) {
        int ok = t1 >= 0 && s0 >= 0 && s1 >= 0;
        printf("%s%.6f", k ? ", " : "", ok ? each1[k] - each0[k] : -1.0);
    }
    printf("]}\n");
    fflush(stdout);
    for (int i = 0; i < nsocks; i++) close(fds[i]);
    close(ep);
    free(fds);
    free(seq);
    free(sent_at);
    free(answered);
    return t1 >= 0 ? 0 : 1;
}

int main(int argc, char **argv) {
    if (argc >= 2 && strcmp(argv[1], "server") == 0) return server();
    if (argc >= 2 && strcmp(argv[1], "client") == 0) return client(argc, argv);
    if (argc >= 2 && strcmp(argv[1], "clients") == 0) return clients(argc, argv);
    fprintf(stderr, "usage: echo server | echo client ... | echo clients ...\n");
    return 2;
}
