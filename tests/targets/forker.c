/* Process tree: the parent calls work N times, then forks K children that each call work M times;
   with "exec" each child instead execs this binary as a leaf ("leaf M"). vfork+exec with "vfork". */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

__attribute__((noinline)) int work(int x) { return x * 5; }

static void calls(long m) { volatile long s = 0; for (long i = 0; i < m; i++) s += work((int)i); }

int main(int argc, char **argv) {
    if (argc > 2 && strcmp(argv[1], "leaf") == 0) { calls(atol(argv[2])); return 0; }
    long n = argc > 1 ? atol(argv[1]) : 10;
    long k = argc > 2 ? atol(argv[2]) : 3;
    long m = argc > 3 ? atol(argv[3]) : 100;
    const char *mode = argc > 4 ? argv[4] : "fork";
    calls(n);
    char mbuf[32];
    snprintf(mbuf, sizeof mbuf, "%ld", m);
    for (long c = 0; c < k; c++) {
        pid_t pid = strcmp(mode, "vfork") == 0 ? vfork() : fork();
        if (pid == 0) {
            if (strcmp(mode, "fork") == 0) { calls(m); _exit(0); }
            execl("/proc/self/exe", argv[0], "leaf", mbuf, (char *)NULL);
            _exit(127);
        }
        int st;
        waitpid(pid, &st, 0);
        if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) { printf("child failed\n"); return 1; }
    }
    printf("done\n");
    return 0;
}
