/* Exit statuses through a fork: life_status PARENT CHILD HOW.
   The parent calls work once and forks a child that calls work twice, prints "child done" and
   exits with CHILD.
   HOW: "wait" - the parent reaps the child and exits with PARENT;
        "nowait" - the parent exits with PARENT at once; the child exits later (after 200 ms);
        "relay" - the parent reaps the child and exits with the child's status (PARENT is ignored);
        "thread" - as "wait", but the main thread then calls pthread_exit and a second thread,
                   once the main thread is a zombie, calls exit(PARENT). */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

__attribute__((noinline)) int work(int x) { return x - 9; }

static int parent_status;

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

static void *exiter(void *arg) {
    (void)arg;
    for (int i = 0; i < 2000 && !leader_is_zombie(); i++) nanosleep(&(struct timespec){0, 1000000}, NULL);
    exit(parent_status);
}

int main(int argc, char **argv) {
    if (argc < 4) { fprintf(stderr, "usage: life_status PARENT CHILD wait|nowait|relay|thread\n"); return 2; }
    parent_status = atoi(argv[1]);
    int child_status = atoi(argv[2]);
    const char *how = argv[3];
    volatile int s = work(1);
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        if (strcmp(how, "nowait") == 0) nanosleep(&(struct timespec){0, 200000000}, NULL);
        s += work(2);
        s += work(3);
        printf("child done\n");
        fflush(stdout);
        _exit(child_status);
    }
    if (strcmp(how, "nowait") == 0) return parent_status;
    int st;
    waitpid(pid, &st, 0);
    if (!WIFEXITED(st)) return 100;
    if (strcmp(how, "relay") == 0) return WEXITSTATUS(st);
    if (strcmp(how, "thread") == 0) {
        pthread_t t;
        pthread_create(&t, NULL, exiter, NULL);
        pthread_exit(NULL);
    }
    return parent_status;
}
