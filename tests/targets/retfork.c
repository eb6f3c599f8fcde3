/* Return probes across process lifetimes: spawn() is probed and forks (or vforks) inside itself, so
   its frame is live in both processes and returns in both; the child then calls work() M times (or
   execs this binary as "leaf M", which does), the parent N times. Prints what it computed.
     retfork N M fork|vfork|exec  */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

__attribute__((noinline)) long work(long x) { return x * 5 + 1; }

static long calls(long m) { long s = 0; for (long i = 0; i < m; i++) s += work(i); return s; }

__attribute__((noinline)) int spawn(const char *mode, long m) {
    char mbuf[32];
    snprintf(mbuf, sizeof mbuf, "%ld", m);
    pid_t pid = strcmp(mode, "vfork") == 0 ? vfork() : fork();
    if (pid == 0 && strcmp(mode, "fork") != 0) {
        execl("/proc/self/exe", "retfork", "leaf", mbuf, (char *)NULL);
        _exit(127);
    }
    return pid;  /* returns in the parent, and in a forked child */
}

int main(int argc, char **argv) {
    if (argc > 2 && strcmp(argv[1], "leaf") == 0) {
        printf("leaf %ld\n", calls(atol(argv[2])));
        return 0;
    }
    long n = argc > 1 ? atol(argv[1]) : 10;
    long m = argc > 2 ? atol(argv[2]) : 20;
    const char *mode = argc > 3 ? argv[3] : "fork";
    int pid = spawn(mode, m);
    if (pid == 0) {
        printf("child %ld\n", calls(m));
        fflush(stdout);
        _exit(0);
    }
    int st;
    waitpid(pid, &st, 0);
    printf("parent %ld status %d\n", calls(n), st);
    return 0;
}
