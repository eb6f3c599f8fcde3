/* A thread (not the leader) execs: "life_thread_exec N" calls work N times in main, then a second
   thread calls work N times and execs this binary as "leaf M", which calls work M times. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

__attribute__((noinline)) int work(int x) { return x * 3 + 5; }
static void calls(long m) { volatile long s = 0; for (long i = 0; i < m; i++) s += work((int)i); }
static char *self, *mbuf;
static long n;

static void *thread(void *arg) {
    (void)arg;
    calls(n);
    execl(self, self, "leaf", mbuf, (char *)NULL);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc > 2 && strcmp(argv[1], "leaf") == 0) { calls(atol(argv[2])); printf("leaf done\n"); return 0; }
    n = argc > 1 ? atol(argv[1]) : 10;
    self = "/proc/self/exe";
    mbuf = argc > 2 ? argv[2] : "7";
    calls(n);
    pthread_t t;
    pthread_create(&t, NULL, thread, NULL);
    pthread_join(t, NULL);  /* never returns: the exec replaces the process */
    return 1;
}
