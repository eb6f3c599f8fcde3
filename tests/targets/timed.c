/* A function whose calls take a known least time, timed by its caller too:
 *   timed N US     calls nap(US) N times (nap sleeps US microseconds); prints
 *                  "calls N min_ns MIN mean_ns MEAN max_ns MAX" from CLOCK_MONOTONIC around each call. */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

__attribute__((noinline)) long nap(long us) { usleep(us); return us; }

static long now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

int main(int argc, char **argv) {
    long n = atol(argv[1]), us = atol(argv[2]), min = -1, max = 0, total = 0;
    for (long i = 0; i < n; i++) {
        long t0 = now();
        nap(us);
        long took = now() - t0;
        total += took;
        if (min < 0 || took < min) min = took;
        if (took > max) max = took;
    }
    printf("calls %ld min_ns %ld mean_ns %ld max_ns %ld\n", n, min, total / n, max);
    return 0;
}
