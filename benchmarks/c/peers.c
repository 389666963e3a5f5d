/* peers: one datagram from each of many distinct source addresses, for the memory case.
 *
 *   peers PORT SIZE
 *
 * Reads counts from stdin, one a line; for each count K sends K datagrams of SIZE bytes to
 * 127.0.0.1:PORT, each from a new source address (socket, bind, sendto, close), then prints
 * {"event": "sent", "sent": K, "total": T}. Source addresses run through ports 1024-65535 of
 * 127.0.0.2, then of 127.0.0.3, ... (127/8 is all loopback; one address has too few ports for
 * 100,000 peers). Ports already in use are skipped. Ends at end of input.
 */
#include "common.h"

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: peers PORT SIZE\n");
        return 2;
    }
    int port = atoi(argv[1]), size = atoi(argv[2]);
    static char payload[SLOT];
    memset(payload, 'p', sizeof payload);
    if (size < 1 || size > SLOT) return 2;
    struct sockaddr_in dest = loopback(port);
    unsigned host = 2, src_port = 1024;
    long long total = 0, skipped = 0;
    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        long k = atol(line), done = 0;
        while (done < k) {
            if (src_port > 65535) {
                src_port = 1024;
                host++;
            }
            struct sockaddr_in src;
            memset(&src, 0, sizeof src);
            src.sin_family = AF_INET;
            src.sin_port = htons((unsigned short)src_port++);
            src.sin_addr.s_addr = htonl((127u << 24) | host);
            int fd = socket(AF_INET, SOCK_DGRAM, 0);
            if (fd < 0) die("socket");
            if (bind(fd, (struct sockaddr *)&src, sizeof src) < 0) {
                if (errno != EADDRINUSE) die("bind");
                skipped++;
                close(fd);
                continue;
            }
            if (sendto(fd, payload, (size_t)size, 0, (struct sockaddr *)&dest, sizeof dest) < 0)
                die("sendto");
            close(fd);
            done++;
        }
        total += done;
        printf("{\"event\": \"sent\", \"sent\": %ld, \"total\": %lld, \"skipped\": %lld}\n", done,
               total, skipped);
        fflush(stdout);
    }
    return 0;
}
