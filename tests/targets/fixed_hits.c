/* A target that makes a fixed number of hits when it is told to, for tests that must not depend on
   the machine's speed: fixed_hits CTL DONE NT N. NT threads wait; each "go" line read from the FIFO
   CTL makes every thread call work() N times (checking each result), then main writes
   "done CALLS BAD" (this round's calls and wrong results) into the FIFO DONE. "quit" ends it: main
   prints "total=CALLS bad=BAD" and exits 0 if no result was ever wrong. Prints "ready" once the
   threads exist. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

__attribute__((noinline)) long work(long x) { return x * 3 + 3; }

static pthread_barrier_t start, end;
static int quit;
static long n;
static long calls, bad;

static void *thread(void *arg) {
    long k = (long)arg;
    for (;;) {
        pthread_barrier_wait(&start);
        if (quit) return NULL;
        long wrong = 0;
        for (long i = 0; i < n; i++)
            if (work(i + k) != (i + k) * 3 + 3) wrong++;
        __atomic_fetch_add(&calls, n, __ATOMIC_RELAXED);
        __atomic_fetch_add(&bad, wrong, __ATOMIC_RELAXED);
        pthread_barrier_wait(&end);
    }
}

int main(int argc, char **argv) {
    if (argc != 5) return 2;
    int nt = atoi(argv[3]);
    n = atol(argv[4]);
    pthread_barrier_init(&start, NULL, nt + 1);
    pthread_barrier_init(&end, NULL, nt + 1);
    pthread_t t[64];
    for (long i = 0; i < nt && i < 64; i++) pthread_create(&t[i], NULL, thread, (void *)i);
    printf("ready\n");
    fflush(stdout);
    long total = 0, total_bad = 0;
    char line[64];
    for (;;) {
        FILE *ctl = fopen(argv[1], "r");
        if (!ctl) return 3;
        char *got = fgets(line, sizeof line, ctl);
        fclose(ctl);
        if (!got) continue;
        if (strncmp(line, "quit", 4) == 0) break;
        if (strncmp(line, "go", 2) != 0) continue;
        calls = bad = 0;
        pthread_barrier_wait(&start);
        pthread_barrier_wait(&end);
        total += calls;
        total_bad += bad;
        FILE *done = fopen(argv[2], "w");
        if (!done) return 4;
        fprintf(done, "done %ld %ld\n", calls, bad);
        fclose(done);
    }
    quit = 1;
    pthread_barrier_wait(&start);
    for (int i = 0; i < nt; i++) pthread_join(t[i], NULL);
    printf("total=%ld bad=%ld\n", total, total_bad);
    return total_bad != 0;
}
