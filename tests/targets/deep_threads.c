/* Threads that sit deep inside a probed recursive function while pmu is killed.
 *   deep_threads CTL READY THREADS DEPTH
 * Prints "started"; reads "go" from the fifo CTL, then each thread recurses rec(DEPTH); once every
 * thread is at the bottom it writes "bottom" to the fifo READY; the threads wait there until CTL
 * says "release", then return. Prints "ok N" if every thread computed DEPTH*(DEPTH+1)/2, else
 * "WRONG". */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static long depth, threads;
static volatile long at_bottom, released;
static char *ready_path;

__attribute__((noinline, noipa)) long rec(long n) {
    volatile long here = n;
    if (n == 0) {
        if (__atomic_add_fetch(&at_bottom, 1, __ATOMIC_SEQ_CST) == threads) {
            FILE *f = fopen(ready_path, "w");
            fputs("bottom\n", f);
            fclose(f);
        }
        struct timespec nap = {0, 1000000};
        while (!released) nanosleep(&nap, 0);
        return 0;
    }
    return rec(n - 1) + here;
}

static void *worker(void *arg) {
    long *out = arg;
    *out = rec(depth);
    return 0;
}

static void read_line(const char *path, char *line, int size) {
    FILE *f = fopen(path, "r");
    if (!f || !fgets(line, size, f)) line[0] = 0;
    if (f) fclose(f);
}

int main(int argc, char **argv) {
    if (argc < 5) return 2;
    ready_path = argv[2];
    threads = atol(argv[3]);
    depth = atol(argv[4]);
    printf("started\n");
    fflush(stdout);
    char line[64];
    read_line(argv[1], line, sizeof line);
    if (strcmp(line, "go\n")) return 3;
    pthread_t t[64];
    long result[64];
    for (long i = 0; i < threads; i++) pthread_create(&t[i], 0, worker, &result[i]);
    /* Until "release": an open of CTL made while the writer of "go" still holds it reads its end of
       file, not the release (seen under load: the threads let go before pmu was killed). */
    do read_line(argv[1], line, sizeof line); while (strcmp(line, "release\n"));
    released = 1;
    int good = 1;
    for (long i = 0; i < threads; i++) {
        pthread_join(t[i], 0);
        if (result[i] != depth * (depth + 1) / 2) good = 0;
    }
    if (good) printf("ok %ld\n", threads);
    else printf("WRONG\n");
    return 0;
}
