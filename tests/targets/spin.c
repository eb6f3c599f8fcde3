/* A long-running multi-threaded target for attach tests: NT threads call work() with a short sleep
   in between (none with "busy") until SECONDS have passed (or SIGUSR1 arrives), checking every result,
   and once more after that; main prints "ready" once every thread has called work(), and at the end
   the total and the number of wrong results, and exits 0 if there were none. */
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

__attribute__((noinline)) int work(int x) { return x * 3 + 3; }

static volatile sig_atomic_t stop;
static double seconds;
static int busy;
static long bad;
static long calls[64];

static double now(void) { struct timespec ts; clock_gettime(CLOCK_MONOTONIC, &ts); return ts.tv_sec + ts.tv_nsec / 1e9; }
static void on_usr1(int sig) { (void)sig; stop = 1; }

static void *thread(void *arg) {
    long k = (long)arg;
    double end = now() + seconds;
    volatile long s = 0;
    long wrong = 0;
    while (!stop && now() < end) {
        int r = work((int)calls[k]);
        if (r != (int)calls[k] * 3 + 3) wrong++;
        s += r;
        __atomic_store_n(&calls[k], calls[k] + 1, __ATOMIC_RELAXED);
        if (!busy) usleep(200);
    }
    /* One call after the stop: SIGUSR1 sent once a probe is in place is followed by a hit of it. */
    int r = work((int)calls[k]);
    if (r != (int)calls[k] * 3 + 3) wrong++;
    __atomic_store_n(&calls[k], calls[k] + 1, __ATOMIC_RELAXED);
    __atomic_fetch_add(&bad, wrong, __ATOMIC_RELAXED);
    return NULL;
}

int main(int argc, char **argv) {
    seconds = argc > 1 ? atof(argv[1]) : 5;
    int nt = argc > 2 ? atoi(argv[2]) : 3;
    busy = argc > 3 && argv[3][0] == 'b';
    signal(SIGUSR1, on_usr1);
    pthread_t t[64];
    for (long i = 0; i < nt; i++) pthread_create(&t[i], NULL, thread, (void *)i);
    for (int i = 0; i < nt; i++)  /* "ready" once every thread has called work() */
        while (!__atomic_load_n(&calls[i], __ATOMIC_RELAXED)) usleep(100);
    printf("ready\n");
    fflush(stdout);
    long total = 0;
    for (int i = 0; i < nt; i++) { pthread_join(t[i], NULL); total += calls[i]; }
    printf("total=%ld bad=%ld\n", total, bad);
    return bad != 0;
}
