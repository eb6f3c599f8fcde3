/* The target of the backend contract suite (tests/contract): f() is the probed function and every call
   of it also writes to a page the process has never touched (so a page-fault counter sees the work too).

   contract script OUT STEP...   runs the steps in order: a number N calls f() N times; "fork:M" forks a
                                 child that calls f() M times and exits, and waits for it. Each process
                                 appends "parent|child CALLS PAGES BAD" to OUT (one write) as it ends;
                                 exit status 0 if every f() result was right and every child exited 0.
   contract serve CTL DONE       prints "ready ADDR" (f's address here), then for each line "N" read from
                                 the FIFO CTL calls f() N times and writes "done N BAD" into the FIFO DONE;
                                 "quit" (or EOF) ends it, exit status 0 if no result was ever wrong. */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

__attribute__((noinline)) long f(long x) { return x * 3 + 1; }

static long calls, pages, bad;

static void work(long n) {
    if (n <= 0) return;
    long page = sysconf(_SC_PAGESIZE);
    char *mem = mmap(NULL, n * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) exit(3);
    madvise(mem, n * page, MADV_NOHUGEPAGE);
    for (long i = 0; i < n; i++) {
        if (f(i) != i * 3 + 1) bad++;
        mem[i * page] = 1;
    }
    calls += n;
    pages += n;
}

static void report(const char *out, const char *role) {
    char line[128];
    int len = snprintf(line, sizeof line, "%s %ld %ld %ld\n", role, calls, pages, bad);
    int fd = open(out, O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (fd < 0 || write(fd, line, len) != len) exit(4);
    close(fd);
}

static int script(const char *out, int nsteps, char **steps) {
    int failed = 0;
    for (int s = 0; s < nsteps; s++) {
        if (strncmp(steps[s], "fork:", 5) != 0) {
            work(atol(steps[s]));
            continue;
        }
        long m = atol(steps[s] + 5);
        pid_t pid = fork();
        if (pid < 0) return 5;
        if (pid == 0) {
            calls = pages = bad = 0;
            work(m);
            report(out, "child");
            _exit(bad != 0);
        }
        int st;
        if (waitpid(pid, &st, 0) != pid || !WIFEXITED(st) || WEXITSTATUS(st) != 0) failed = 1;
    }
    report(out, "parent");
    return failed || bad != 0;
}

static int serve(const char *ctl, const char *done) {
    printf("ready %p\n", (void *)f);
    fflush(stdout);
    char line[64];
    for (;;) {
        FILE *in = fopen(ctl, "r");
        if (!in) return 3;
        char *got = fgets(line, sizeof line, in);
        fclose(in);
        if (!got || strncmp(line, "quit", 4) == 0) break;
        long before = bad;
        long n = atol(line);
        work(n);
        FILE *reply = fopen(done, "w");
        if (!reply) return 4;
        fprintf(reply, "done %ld %ld\n", n, bad - before);
        fclose(reply);
    }
    return bad != 0;
}

int main(int argc, char **argv) {
    if (argc >= 3 && strcmp(argv[1], "script") == 0) return script(argv[2], argc - 3, argv + 3);
    if (argc == 4 && strcmp(argv[1], "serve") == 0) return serve(argv[2], argv[3]);
    return 2;
}
