/* sink: a recvmmsg receiver (batch 64) for the udpx benchmarks: the kernel's ceiling.
 *
 *   sink WARMUP WINDOW QUIET DEADLINE
 *
 * Binds 127.0.0.1:0 (4 MiB receive buffer requested, as every receiver of the suite), prints
 * {"event": "ready", "port": P}, then receives. The measurement window opens WARMUP seconds
 * after the first datagram and lasts WINDOW seconds; the program ends after QUIET seconds
 * without a datagram (once the window closed) or DEADLINE seconds after the start. Prints one
 * JSON result line: datagrams in all and in the window, window seconds, CPU seconds in the window.
 * Prints {"event": "window_closed"} when the window closes (the harness then stops the sender).
 */
#include "common.h"

#include <poll.h>
#include <sys/uio.h>

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: sink WARMUP WINDOW QUIET DEADLINE\n");
        return 2;
    }
    double warmup = atof(argv[1]), window = atof(argv[2]), quiet = atof(argv[3]);
    double deadline = atof(argv[4]);
    int port;
    int fd = bound_socket(&port);
    printf("{\"event\": \"ready\", \"port\": %d}\n", port);
    fflush(stdout);

    static char slots[BATCH][SLOT];
    struct iovec iovs[BATCH];
    struct mmsghdr msgs[BATCH];
    memset(msgs, 0, sizeof msgs);
    for (int i = 0; i < BATCH; i++) {
        iovs[i].iov_base = slots[i];
        iovs[i].iov_len = SLOT;
        msgs[i].msg_hdr.msg_iov = &iovs[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    long long total = 0, bytes = 0, calls = 0, c0 = 0, c1 = 0;
    double start = now(), first = -1, last = start, t0 = -1, t1 = -1, cpu0 = 0, cpu1 = 0;
    double end_at = start + deadline;
    struct pollfd pfd = {fd, POLLIN, 0};
    for (;;) {
        int n = recvmmsg(fd, msgs, BATCH, MSG_DONTWAIT, NULL);
        double t = now();
        calls++;
        if (n > 0) {
            total += n;
            for (int i = 0; i < n; i++) bytes += msgs[i].msg_len;
            last = t;
            if (first < 0) first = t;
        } else if (n < 0 && errno != EAGAIN && errno != EINTR) {
            die("recvmmsg");
        }
        if (first >= 0 && t0 < 0 && t >= first + warmup) {
            t0 = t; c0 = total; cpu0 = cpu_self();
        }
        if (t0 >= 0 && t1 < 0 && t >= t0 + window) {
            t1 = t; c1 = total; cpu1 = cpu_self();
            printf("{\"event\": \"window_closed\"}\n");
            fflush(stdout);
        }
        if (t >= end_at) break;
        if (first >= 0 && t - last >= quiet && (t1 >= 0 || t - first > warmup + window)) break;
        if (n < BATCH) poll(&pfd, 1, 5);
    }
    int complete = t1 >= 0;
    if (t0 >= 0 && t1 < 0) {  /* the sender stopped early: the window ends at the last datagram */
        t1 = last; c1 = total; cpu1 = cpu_self();
    }
    double seconds = t0 >= 0 ? t1 - t0 : 0.0;
    long long count = c1 - c0;
    printf("{\"event\": \"result\", \"total\": %lld, \"bytes\": %lld, "
           "\"window_count\": %lld, \"window_seconds\": %.6f, \"cpu_seconds\": %.6f, "
           "\"rate\": %.1f, \"cpu_us_per_dgram\": %.4f, \"window_complete\": %s, "
           "\"calls\": %lld}\n",
           total, bytes, count, seconds, cpu1 - cpu0, seconds > 0 ? count / seconds : 0.0,
           count > 0 ? (cpu1 - cpu0) * 1e6 / (double)count : 0.0, complete ? "true" : "false",
           calls);
    fflush(stdout);
    close(fd);
    return 0;
}
