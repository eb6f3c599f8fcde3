/* A target for the full-disk test: fill HITS. Prints "ready", waits until a probe is placed on work (its
   first byte changes: an int3 or a jump), then calls work HITS times with pseudo-random arguments (six
   incompressible words a record: no encoding packs them much), prints "done armed=A" (A: the probe was
   there) and blocks until SIGUSR1; then prints "total=HITS bad=B" and exits 0 if no result was wrong.
   The number of hits never depends on how fast the machine runs. */
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

__attribute__((noinline)) uint64_t work(uint64_t a, uint64_t b, uint64_t c, uint64_t d, uint64_t e, uint64_t f) {
    return a ^ (b + c) ^ (d * 3) ^ (e - f);
}

int main(int argc, char **argv) {
    long hits = argc > 1 ? atol(argv[1]) : 1000;
    sigset_t usr1;
    sigemptyset(&usr1);
    sigaddset(&usr1, SIGUSR1);
    sigprocmask(SIG_BLOCK, &usr1, NULL); /* taken with sigwait at the end, whenever it comes */
    const volatile unsigned char *entry = (const volatile unsigned char *)(uintptr_t)work;
    unsigned char orig = *entry;
    printf("ready\n");
    fflush(stdout);
    /* Polling for the probe, not a timed wait: the bound only keeps a broken run from hanging. */
    struct timespec ms = {0, 1000000};
    for (long i = 0; *entry == orig && i < 120000; i++) nanosleep(&ms, NULL);
    int armed = *entry != orig;
    uint64_t x = 0x9e3779b97f4a7c15u, a[6];
    long bad = 0;
    for (long i = 0; i < hits; i++) {
        for (int j = 0; j < 6; j++) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            a[j] = x;
        }
        if (work(a[0], a[1], a[2], a[3], a[4], a[5]) != (a[0] ^ (a[1] + a[2]) ^ (a[3] * 3) ^ (a[4] - a[5])))
            bad++;
    }
    printf("done armed=%d\n", armed);
    fflush(stdout);
    int sig;
    sigwait(&usr1, &sig);
    printf("total=%ld bad=%ld\n", hits, bad);
    return bad != 0;
}
