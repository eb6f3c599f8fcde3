/* Threads that spend their time inside a probed function (slow sleeps 1 ms then returns i*2), so a
   detach always finds hijacked returns on their stacks. Runs SECONDS, then checks every return value. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

__attribute__((noinline)) long slow(long i) { usleep(1000); return i * 2; }

static double seconds;
static long bad, calls;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static double now(void) { struct timespec ts; clock_gettime(CLOCK_MONOTONIC, &ts); return ts.tv_sec + ts.tv_nsec / 1e9; }

static void *thread(void *arg) {
    (void)arg;
    double end = now() + seconds;
    long i = 0, b = 0;
    for (; now() < end; i++)
        if (slow(i) != i * 2) b++;
    pthread_mutex_lock(&lock);
    bad += b;
    calls += i;
    pthread_mutex_unlock(&lock);
    return NULL;
}

int main(int argc, char **argv) {
    seconds = argc > 1 ? atof(argv[1]) : 3;
    int nt = argc > 2 ? atoi(argv[2]) : 3;
    pthread_t t[64];
    for (int i = 0; i < nt; i++) pthread_create(&t[i], NULL, thread, NULL);
    printf("ready\n");
    fflush(stdout);
    for (int i = 0; i < nt; i++) pthread_join(t[i], NULL);
    printf("calls=%ld bad=%ld\n", calls, bad);
    return bad != 0;
}
