/* Dies by a signal mid-run: life_die K HOW [T J [WHO]].
   T threads each call work J times and then block in pause(); once they all have, work is called K
   more times and the process dies. HOW: "kill" (SIGKILL to the process), "segv" (a write through a
   null pointer), "abort" (raise(SIGABRT)), "int" (raise(SIGINT), default action), "pipe" (a write to
   a pipe whose reader is gone, default SIGPIPE action). WHO: "main" (default) - the main thread does
   the K calls and dies; "thread" - the main thread calls pthread_exit at once and another thread, once
   the main thread is a zombie, does the K calls and dies (so the group leader is gone first).
   No core file is written. Returns 1 if it is still alive after the signal. */
#define _GNU_SOURCE
#include <pthread.h>
#include <semaphore.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

__attribute__((noinline)) int work(int x) { return x * 3 + 2; }

static long k, per_thread;
static int nt;
static const char *how;
static sem_t ready;

static void calls(long count) { volatile long s = 0; for (long i = 0; i < count; i++) s += work((int)i); }

static void *thread(void *arg) {
    (void)arg;
    calls(per_thread);
    sem_post(&ready);
    for (;;) pause();
    return NULL;
}

static int leader_is_zombie(void) {
    char path[64], buf[512];
    snprintf(path, sizeof path, "/proc/self/task/%d/stat", getpid());
    FILE *f = fopen(path, "r");
    if (!f) return 1;
    size_t len = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[len] = 0;
    char *p = strrchr(buf, ')');
    return p && p[1] == ' ' && p[2] == 'Z';
}

static void die(void) {
    for (int i = 0; i < nt; i++) sem_wait(&ready);
    calls(k);
    if (strcmp(how, "kill") == 0) kill(getpid(), SIGKILL);
    else if (strcmp(how, "segv") == 0) *(volatile int *)0 = 1;
    else if (strcmp(how, "abort") == 0) raise(SIGABRT);
    else if (strcmp(how, "int") == 0) raise(SIGINT);
    else if (strcmp(how, "pipe") == 0) {
        int p[2];
        if (pipe(p) != 0) exit(2);
        close(p[0]);
        (void)!write(p[1], "x", 1);
        printf("write to a broken pipe returned (SIGPIPE ignored?)\n");
    }
    fflush(stdout);
    exit(1); /* still alive: the signal did not take */
}

static void *dying_thread(void *arg) {
    (void)arg;
    for (int i = 0; i < 2000 && !leader_is_zombie(); i++) nanosleep(&(struct timespec){0, 1000000}, NULL);
    die();
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 3) { fprintf(stderr, "usage: life_die K kill|segv|abort|int|pipe [T J [main|thread]]\n"); return 2; }
    struct rlimit none = {0, 0};
    setrlimit(RLIMIT_CORE, &none);
    k = atol(argv[1]);
    how = argv[2];
    nt = argc > 3 ? atoi(argv[3]) : 0;
    per_thread = argc > 4 ? atol(argv[4]) : 0;
    const char *who = argc > 5 ? argv[5] : "main";
    sem_init(&ready, 0, 0);
    pthread_t t;
    for (int i = 0; i < nt; i++) pthread_create(&t, NULL, thread, NULL);
    if (strcmp(who, "thread") == 0) {
        pthread_create(&t, NULL, dying_thread, NULL);
        pthread_exit(NULL);
    }
    die();
    return 1;
}
