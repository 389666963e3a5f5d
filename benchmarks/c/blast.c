/* blast: a saturating UDP sender for the udpx benchmarks.
 *
 *   blast PORT SIZE SECONDS MAX_COUNT NSOCKS BURST MODE
 *
 * Opens NSOCKS UDP sockets connected to 127.0.0.1:PORT (each gets its own source port, so a
 * listener sees NSOCKS peers) and, round-robin over them, sends BURST datagrams of SIZE bytes
 * per turn until SECONDS have passed or MAX_COUNT datagrams were sent. MODE says how one turn
 * is sent: "gso" = one sendmsg with UDP_SEGMENT carrying BURST equal segments (falls back to
 * "mmsg" when the kernel refuses), "mmsg" = one sendmmsg of BURST datagrams, "send" = BURST
 * send() calls.
 *
 * "raw" sends the same traffic (NSOCKS peers, BURST datagrams per peer per turn, round-robin)
 * without a socket per peer: one IPPROTO_RAW socket (IP_HDRINCL) sendmmsg's batches of 64
 * hand-built IPv4/UDP packets from 127.0.0.1:SPORT to 127.0.0.1:PORT, SPORT cycling over
 * NSOCKS ports from 1024 up (skipping PORT). Sources and destination are 127.0.0.1, nothing
 * else. The UDP checksum is 0 ("none", valid for IPv4), the kernel fills in the IP checksum,
 * length and id. One system call per 64 datagrams instead of one per turn of a socket, so it
 * outruns the per-socket modes when BURST is small. Needs CAP_NET_RAW: when the raw socket is
 * refused it says so on stderr and falls back to "mmsg" over NSOCKS sockets (the result's
 * "mode" is what was really used).
 *
 * SIGTERM stops it early. Prints one JSON line: datagrams the kernel took, seconds, CPU
 * seconds.
 */
#include "common.h"

#include <netinet/ip.h>
#include <netinet/udp.h>
#include <signal.h>
#include <sys/uio.h>

static volatile sig_atomic_t stop = 0;

static void on_term(int sig) {
    (void)sig;
    stop = 1;
}

/* Bytes of the IPv4 and UDP headers in front of every raw packet. */
#define HEADERS ((int)(sizeof(struct iphdr) + sizeof(struct udphdr)))
#define FIRST_SPORT 1024

/* The raw socket of "raw" mode, connected to 127.0.0.1; -1 (and why on stderr) if refused. */
static int raw_socket(void) {
    int fd = socket(AF_INET, SOCK_RAW, IPPROTO_RAW);
    if (fd < 0) {
        fprintf(stderr, "blast: raw socket refused (%s; needs root or CAP_NET_RAW), "
                        "falling back to mmsg over one UDP socket per peer\n",
                strerror(errno));
        return -1;
    }
    int on = 1;
    if (setsockopt(fd, IPPROTO_IP, IP_HDRINCL, &on, sizeof on) < 0) die("IP_HDRINCL");
    struct sockaddr_in dest = loopback(0);
    if (connect(fd, (struct sockaddr *)&dest, sizeof dest) < 0) die("connect raw");
    return fd;
}

/* Source port of the peer that sends datagram number SEQ of the stream. */
static unsigned short raw_sport(long long seq, int nsocks, int burst, int port) {
    int peer = (int)((seq / burst) % nsocks);
    int sport = FIRST_SPORT + peer;
    if (sport >= port) sport++;  /* never the destination's own port */
    return (unsigned short)sport;
}

int main(int argc, char **argv) {
    if (argc != 8) {
        fprintf(stderr, "usage: blast PORT SIZE SECONDS MAX_COUNT NSOCKS BURST "
                        "gso|mmsg|send|raw\n");
        return 2;
    }
    int port = atoi(argv[1]);
    int size = atoi(argv[2]);
    double seconds = atof(argv[3]);
    long long max_count = atoll(argv[4]);
    int nsocks = atoi(argv[5]);
    int burst = atoi(argv[6]);
    const char *mode = argv[7];
    int raw = strcmp(mode, "raw") == 0;
    int gso = strcmp(mode, "gso") == 0;
    int mmsg = gso || raw || strcmp(mode, "mmsg") == 0;
    if (!raw && !mmsg && strcmp(mode, "send") != 0) {
        fprintf(stderr, "blast: unknown mode %s\n", mode);
        return 2;
    }
    if (size < 1 || size > SLOT || nsocks < 1 || burst < 1 || burst > BATCH || port < 1 ||
        port > 65535 || (raw && FIRST_SPORT + nsocks > 65535)) {
        fprintf(stderr, "blast: bad arguments\n");
        return 2;
    }
    if (gso && (long long)size * burst > 65507) burst = 65507 / size;
    raise_nofile();
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_term;
    sigaction(SIGTERM, &sa, NULL);

    int raw_fd = raw ? raw_socket() : -1;
    if (raw && raw_fd < 0) raw = 0;  /* refused: mmsg over NSOCKS sockets */
    int *fds = calloc((size_t)nsocks, sizeof *fds);
    struct sockaddr_in dest = loopback(port);
    for (int i = 0; !raw && i < nsocks; i++) {
        fds[i] = socket(AF_INET, SOCK_DGRAM, 0);
        if (fds[i] < 0) die("socket");
        if (connect(fds[i], (struct sockaddr *)&dest, sizeof dest) < 0) die("connect");
    }

    static char payload[BATCH * SLOT];
    for (size_t i = 0; i < sizeof payload; i++) payload[i] = (char)('a' + i % 26);
    struct iovec iovs[BATCH];
    struct mmsghdr msgs[BATCH];
    memset(msgs, 0, sizeof msgs);
    for (int i = 0; i < BATCH; i++) {
        iovs[i].iov_base = payload + (size_t)i * (size_t)size;
        iovs[i].iov_len = (size_t)size;
        msgs[i].msg_hdr.msg_iov = &iovs[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    /* Raw mode: BATCH packets, headers then SIZE bytes of payload, in slots of their own. */
    static char packets[BATCH][SLOT + 64];
    struct iovec raw_iovs[BATCH];
    struct mmsghdr raw_msgs[BATCH];
    memset(raw_msgs, 0, sizeof raw_msgs);
    for (int i = 0; raw && i < BATCH; i++) {
        struct iphdr *ip = (struct iphdr *)packets[i];
        struct udphdr *udp = (struct udphdr *)(packets[i] + sizeof *ip);
        memset(packets[i], 0, HEADERS);
        ip->version = 4;
        ip->ihl = 5;
        ip->ttl = 64;
        ip->protocol = IPPROTO_UDP;
        ip->tot_len = htons((unsigned short)(HEADERS + size));  /* the kernel sets it too */
        ip->saddr = htonl(INADDR_LOOPBACK);
        ip->daddr = htonl(INADDR_LOOPBACK);
        udp->dest = htons((unsigned short)port);
        udp->len = htons((unsigned short)(sizeof *udp + (size_t)size));
        udp->check = 0;
        memcpy(packets[i] + HEADERS, payload, (size_t)size);
        raw_iovs[i].iov_base = packets[i];
        raw_iovs[i].iov_len = (size_t)(HEADERS + size);
        raw_msgs[i].msg_hdr.msg_iov = &raw_iovs[i];
        raw_msgs[i].msg_hdr.msg_iovlen = 1;
    }
    struct iovec gso_iov = {payload, (size_t)size * (size_t)burst};
    char control[CMSG_SPACE(sizeof(unsigned short))];
    memset(control, 0, sizeof control);
    struct msghdr gso_msg;
    memset(&gso_msg, 0, sizeof gso_msg);
    gso_msg.msg_iov = &gso_iov;
    gso_msg.msg_iovlen = 1;
    gso_msg.msg_control = control;
    gso_msg.msg_controllen = sizeof control;
    struct cmsghdr *cm = CMSG_FIRSTHDR(&gso_msg);
    cm->cmsg_level = SOL_UDP;
    cm->cmsg_type = UDP_SEGMENT;
    cm->cmsg_len = CMSG_LEN(sizeof(unsigned short));
    unsigned short segment = (unsigned short)size;
    memcpy(CMSG_DATA(cm), &segment, sizeof segment);

    long long sent = 0, errors = 0, syscalls = 0;
    double cpu0 = cpu_self();
    double start = now(), deadline = start + seconds, t = start;
    int turn = 0;
    while (sent < max_count && !stop) {
        int want = burst;
        if (raw) want = BATCH;
        if (max_count - sent < want) want = (int)(max_count - sent);
        int n;
        syscalls++;
        if (raw) {
            for (int i = 0; i < want; i++) {
                struct udphdr *udp = (struct udphdr *)(packets[i] + sizeof(struct iphdr));
                udp->source = htons(raw_sport(sent + i, nsocks, burst, port));
            }
            n = sendmmsg(raw_fd, raw_msgs, (unsigned)want, 0);
        } else {
            int fd = fds[turn];
            if (++turn == nsocks) turn = 0;
            if (gso && want == burst && burst > 1) {
                ssize_t r = sendmsg(fd, &gso_msg, 0);
                n = r < 0 ? -1 : want;
                if (r < 0 && (errno == EIO || errno == EINVAL || errno == ENOPROTOOPT ||
                              errno == EOPNOTSUPP)) {
                    fprintf(stderr, "blast: GSO refused (%s), using sendmmsg\n",
                            strerror(errno));
                    gso = 0;
                    continue;
                }
            } else if (mmsg) {
                n = sendmmsg(fd, msgs, (unsigned)want, 0);
            } else {
                n = 0;
                for (int i = 0; i < want; i++) {
                    if (send(fd, payload, (size_t)size, 0) < 0) {
                        if (n == 0) n = -1;
                        break;
                    }
                    n++;
                }
            }
        }
        if (n < 0) {
            if (errno == ECONNREFUSED) {  /* the receiver is gone: ICMP port unreachable */
                if (++errors > 1000) break;
            } else if (errno == EINTR && stop) {
                break;
            } else if (errno != EAGAIN && errno != ENOBUFS && errno != EINTR) {
                die("send");
            }
        } else {
            sent += n;
        }
        t = now();
        if (t >= deadline) break;
    }
    double elapsed = now() - start;
    double cpu = cpu_self() - cpu0;
    printf("{\"event\": \"result\", \"total\": %lld, \"seconds\": %.6f, \"rate\": %.1f, "
           "\"cpu_seconds\": %.6f, \"cpu_us_per_dgram\": %.4f, \"mode\": \"%s\", "
           "\"burst\": %d, \"sockets\": %d, \"syscalls\": %lld, \"refused\": %lld}\n",
           sent, elapsed, sent / elapsed, cpu, sent ? cpu * 1e6 / (double)sent : 0.0,
           raw ? "raw" : gso ? "gso" : (mmsg ? "mmsg" : "send"), burst, nsocks, syscalls,
           errors);
    fflush(stdout);
    for (int i = 0; !raw && i < nsocks; i++) close(fds[i]);
    if (raw_fd >= 0) close(raw_fd);
    free(fds);
    return 0;
}
