/* Paths a recording trampoline must get right. Every line printed names who called work() how often.
   stamp N      : N calls, each between two CLOCK_MONOTONIC readings: "stamp I BEFORE AFTER"
   seq T K      : T threads one after another (glibc reuses the stack and TLS): "tid=TID calls=K"
   fork K M     : K calls, then a forked child makes M calls: "pid=PID calls=N" for both
   vfork K M    : K calls, then a vfork child makes M calls before _exit: "pid=PID calls=N" for both
   exec K M     : K calls, then three children (fork, vfork, fork) each exec this program as "leaf M"
   leaf M       : M calls */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

__attribute__((noinline)) int work(int x) { return x * 7 + 1; }

static long now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

static volatile long sink;
static void calls(long m) { for (long i = 0; i < m; i++) sink += work((int)i); }

static long per_thread;
static void *thread(void *arg) {
    (void)arg;
    calls(per_thread);
    printf("tid=%d calls=%ld\n", gettid(), per_thread);
    fflush(stdout);
    return NULL;
}

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "stamp";
    long a = argc > 2 ? atol(argv[2]) : 100;
    long b = argc > 3 ? atol(argv[3]) : 100;
    if (strcmp(mode, "stamp") == 0) {
        for (long i = 0; i < a; i++) {
            long t0 = now();
            sink += work((int)i);
            long t1 = now();
            printf("stamp %ld %ld %ld\n", i, t0, t1);
        }
    } else if (strcmp(mode, "seq") == 0) {
        per_thread = b;
        for (long i = 0; i < a; i++) {
            pthread_t t;
            pthread_create(&t, NULL, thread, NULL);
            pthread_join(t, NULL);
        }
    } else if (strcmp(mode, "leaf") == 0) {
        calls(a);
    } else if (strcmp(mode, "exec") == 0) {
        calls(a);
        char m[32];
        snprintf(m, sizeof m, "%ld", b);
        for (int c = 0; c < 3; c++) {
            pid_t pid = c == 1 ? vfork() : fork();
            if (pid == 0) {
                execl("/proc/self/exe", argv[0], "leaf", m, (char *)NULL);
                _exit(127);
            }
            int st;
            waitpid(pid, &st, 0);
            if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) { printf("child failed\n"); return 1; }
        }
        printf("done\n");
    } else {
        int use_vfork = strcmp(mode, "vfork") == 0;
        calls(a);
        fflush(stdout);
        pid_t pid = use_vfork ? vfork() : fork();
        if (pid == 0) {
            calls(b);
            _exit(0);
        }
        int st;
        waitpid(pid, &st, 0);
        printf("pid=%d calls=%ld\npid=%d calls=%ld\n", getpid(), a, pid, b);
    }
    return 0;
}
