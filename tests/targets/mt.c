/* NTHREADS threads; thread i (1-based) calls work i*N times. Prints each thread's tid and calls. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

__attribute__((noinline)) int work(int x) { return x * 3 + 1; }

static long n_per;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static void *thread(void *arg) {
    long k = (long)arg;
    volatile long s = 0;
    for (long i = 0; i < k * n_per; i++) s += work((int)i);
    pthread_mutex_lock(&lock);
    printf("tid=%d calls=%ld\n", gettid(), k * n_per);
    fflush(stdout);
    pthread_mutex_unlock(&lock);
    return NULL;
}

int main(int argc, char **argv) {
    int nt = argc > 1 ? atoi(argv[1]) : 4;
    n_per = argc > 2 ? atol(argv[2]) : 1000;
    pthread_t t[64];
    for (long i = 0; i < nt; i++) pthread_create(&t[i], NULL, thread, (void *)(i + 1));
    for (int i = 0; i < nt; i++) pthread_join(t[i], NULL);
    return 0;
}
