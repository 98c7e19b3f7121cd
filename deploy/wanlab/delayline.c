/* The delay line's forwarding loop in C (wanlab.delayline describes what it does).
 *
 * Built by wanlab at lab start (gcc -O2) and used instead of the Python loop
 * when it builds: the same TUN device, the same per-path delay and loss, the
 * same counters, at a fraction of the CPU per packet. Python keeps the
 * orchestration; this file only forwards.
 *
 *   wanlab-delayline DEV READY_FILE STATS_FILE MATRIX_FILE
 *
 * MATRIX_FILE: "N SUBNET" then N*N lines "delay_ns loss_ppm" (row: source host,
 * column: destination host). Host i is 10.SUBNET.(i+1).2, so a packet's path
 * is found from the third octets of its addresses, no lookup table needed.
 * One FIFO per path (its delay is constant, so due times are in order); a
 * timerfd armed at the earliest head wakes epoll when something is due.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define MAX_PKT 65536
#define BATCH 256

struct pkt {
    struct pkt *next;
    uint64_t due_ns;
    uint32_t len;
    unsigned char data[];
};

struct path {
    struct pkt *head, *tail;
    uint64_t delay_ns;
    uint32_t loss_ppm;
};

static volatile sig_atomic_t stop_flag;
static void on_signal(int sig) { (void)sig; stop_flag = 1; }

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static uint32_t rand_ppm(void) { /* xorshift64*: uniform in [0, 1e6) */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return (uint32_t)(((rng_state * 0x2545f4914f6cdd1dull) >> 32) % 1000000u);
}

static int open_tun(const char *name) {
    int fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK);
    if (fd < 0) return -1;
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    ifr.ifr_flags = IFF_TUN | IFF_NO_PI;
    strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
    if (ioctl(fd, TUNSETIFF, &ifr) < 0) { close(fd); return -1; }
    return fd;
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s DEV READY STATS MATRIX\n", argv[0]);
        return 2;
    }
    FILE *m = fopen(argv[4], "r");
    int n, subnet;
    if (!m || fscanf(m, "%d %d", &n, &subnet) != 2 || n < 2 || n > 254) {
        fprintf(stderr, "bad matrix file %s\n", argv[4]);
        return 2;
    }
    struct path *paths = calloc((size_t)n * n, sizeof *paths);
    for (int i = 0; i < n * n; i++) {
        unsigned long long d;
        unsigned loss;
        if (fscanf(m, "%llu %u", &d, &loss) != 2) { fprintf(stderr, "short matrix\n"); return 2; }
        paths[i].delay_ns = d;
        paths[i].loss_ppm = loss;
    }
    fclose(m);

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal; /* no SA_RESTART: epoll_wait returns EINTR */
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);

    int tun = open_tun(argv[1]);
    if (tun < 0) { perror("tun"); return 1; }
    int tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK);
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = tun};
    epoll_ctl(ep, EPOLL_CTL_ADD, tun, &ev);
    ev.data.fd = tfd;
    epoll_ctl(ep, EPOLL_CTL_ADD, tfd, &ev);

    FILE *r = fopen(argv[2], "w");
    if (!r) { perror("ready"); return 1; }
    fprintf(r, "{\"pid\": %d, \"device\": \"%s\", \"engine\": \"c\"}", getpid(), argv[1]);
    fclose(r);

    unsigned long long packets = 0, bytes = 0, lost = 0, foreign = 0;
    unsigned char buf[MAX_PKT];
    uint64_t armed = 0;
    while (!stop_flag) {
        struct epoll_event evs[2];
        int k = epoll_wait(ep, evs, 2, 500);
        if (k < 0 && errno != EINTR) { perror("epoll_wait"); break; }
        /* Drain expirations before reading the clock: one that comes after
         * this stays readable and wakes the next epoll_wait. */
        uint64_t expirations;
        while (read(tfd, &expirations, sizeof expirations) > 0) {}
        for (int b = 0; b < BATCH; b++) {
            ssize_t len = read(tun, buf, sizeof buf);
            if (len <= 0) break;
            /* IPv4 between two hosts of this lab: 10.SUBNET.(i+1).2 */
            if (len < 20 || (buf[0] >> 4) != 4 || buf[12] != 10 || buf[16] != 10 ||
                buf[13] != subnet || buf[17] != subnet || buf[14] < 1 || buf[14] > n ||
                buf[18] < 1 || buf[18] > n) {
                foreign++;
                continue;
            }
            struct path *p = &paths[(buf[14] - 1) * n + (buf[18] - 1)];
            if (p->loss_ppm && rand_ppm() < p->loss_ppm) { lost++; continue; }
            struct pkt *q = malloc(sizeof *q + (size_t)len);
            if (!q) { lost++; continue; }
            q->next = NULL;
            q->len = (uint32_t)len;
            q->due_ns = now_ns() + p->delay_ns;
            memcpy(q->data, buf, (size_t)len);
            if (p->tail) p->tail->next = q; else p->head = q;
            p->tail = q;
        }
        uint64_t now = now_ns(), next = 0;
        for (int i = 0; i < n * n; i++) {
            struct path *p = &paths[i];
            while (p->head && p->head->due_ns <= now) {
                struct pkt *q = p->head;
                p->head = q->next;
                if (!p->head) p->tail = NULL;
                if (write(tun, q->data, q->len) < 0) lost++;
                else { packets++; bytes += q->len; }
                free(q);
            }
            if (p->head && (!next || p->head->due_ns < next)) next = p->head->due_ns;
        }
        if (next != armed) { /* 0 disarms */
            struct itimerspec its = {{0, 0}, {(time_t)(next / 1000000000ull),
                                              (long)(next % 1000000000ull)}};
            timerfd_settime(tfd, TFD_TIMER_ABSTIME, &its, NULL);
            armed = next;
        }
    }
    FILE *s = fopen(argv[3], "w");
    if (s) {
        fprintf(s, "{\"packets\": %llu, \"bytes\": %llu, \"lost\": %llu, \"foreign\": %llu}",
                packets, bytes, lost, foreign);
        fclose(s);
    }
    return 0;
}
