/* A vfork child that runs probed code before it execs or exits, in memory it shares with its parent:
   life_vfork N M HOW. The parent calls work N times, vforks a child that calls work M times and then
   "exec"s /bin/true or "exit"s, then calls work N more times. Prints "done". */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

__attribute__((noinline)) int work(int x) { return x * 11; }

__attribute__((noinline)) static void calls(long m) {
    volatile long s = 0;
    for (long i = 0; i < m; i++) s += work((int)i);
}

int main(int argc, char **argv) {
    if (argc < 4) { fprintf(stderr, "usage: life_vfork N M exec|exit\n"); return 2; }
    long n = atol(argv[1]), m = atol(argv[2]);
    int exec = strcmp(argv[3], "exec") == 0;
    calls(n);
    pid_t pid = vfork();
    if (pid == 0) {
        calls(m);
        if (exec) execl("/bin/true", "true", (char *)NULL);
        _exit(0);
    }
    int st;
    waitpid(pid, &st, 0);
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) { printf("child failed\n"); return 1; }
    calls(n);
    printf("done\n");
    return 0;
}
