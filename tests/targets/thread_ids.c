/* Ways a thread's identity (its FS base) is reused or shared, each calling f() a known number of times.
 *   thread_ids churn ROUNDS CALLS     one thread at a time, created and joined: glibc gives each the
 *                                     previous one's TLS, so all have the same FS base
 *   thread_ids many THREADS CALLS     THREADS threads at once, started together by a barrier
 *   thread_ids notls CALLS            a raw clone without CLONE_SETTLS: the child shares its parent's FS base
 *   thread_ids setfs CALLS            a thread calls f() CALLS times, then CALLS more with its FS base moved
 *                                     (arch_prctl) to a copy of its TLS block, then CALLS more with it back
 *   thread_ids foreign CALLS          like setfs, but the block its FS base moves to is not a TCB: its first
 *                                     word is 0, then the address of another block (another runtime's TLS)
 * Prints "f called N times" with the number of calls it made. */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

volatile long sink;
static long calls;
static pthread_barrier_t start;

__attribute__((noinline)) void f(long x) { sink += x; }

static void *churn_worker(void *arg) {
    for (long i = 0; i < calls; i++) f(i);
    return arg;
}

static void *many_worker(void *arg) {
    pthread_barrier_wait(&start);
    for (long i = 0; i < calls; i++) f(i);
    return arg;
}

static volatile int child_done;

/* Runs on its own stack with its parent's TLS: no libc calls, raw syscalls only. */
__attribute__((no_stack_protector)) static int notls_child(void *arg) {
    for (long i = 0; i < calls; i++) f(i);
    __atomic_store_n(&child_done, 1, __ATOMIC_SEQ_CST);
    for (;;) syscall(SYS_exit, 0);
    return 0;
}

__attribute__((no_stack_protector)) static void *setfs_worker(void *arg) {
    unsigned long fs;
    syscall(SYS_arch_prctl, ARCH_GET_FS, &fs);
    for (long i = 0; i < calls; i++) f(i);
    /* A copy of the TCB (its self pointer fixed) serves as TLS while f() is called again. */
    static char copy[4096] __attribute__((aligned(64)));
    memcpy(copy, (void *)fs, 1024);
    *(unsigned long *)copy = (unsigned long)copy;
    *(unsigned long *)(copy + 16) = (unsigned long)copy;
    syscall(SYS_arch_prctl, ARCH_SET_FS, (unsigned long)copy);
    for (long i = 0; i < calls; i++) f(i);
    syscall(SYS_arch_prctl, ARCH_SET_FS, fs);
    for (long i = 0; i < calls; i++) f(i);
    return arg;
}

/* The FS base moved, without a stop pmu could see, to blocks whose first word is not their address. */
__attribute__((no_stack_protector)) static void *foreign_worker(void *arg) {
    unsigned long fs;
    static char zeros[4096] __attribute__((aligned(64)));
    static char other[4096] __attribute__((aligned(64)));
    syscall(SYS_arch_prctl, ARCH_GET_FS, &fs);
    for (long i = 0; i < calls; i++) f(i);
    syscall(SYS_arch_prctl, ARCH_SET_FS, (unsigned long)zeros);
    for (long i = 0; i < calls; i++) f(i);
    *(unsigned long *)other = (unsigned long)zeros;
    syscall(SYS_arch_prctl, ARCH_SET_FS, (unsigned long)other);
    for (long i = 0; i < calls; i++) f(i);
    syscall(SYS_arch_prctl, ARCH_SET_FS, fs);
    for (long i = 0; i < calls; i++) f(i);
    return arg;
}

int main(int argc, char **argv) {
    if (argc < 3) return 2;
    const char *mode = argv[1];
    long total = 0;
    if (!strcmp(mode, "churn")) {
        long rounds = atol(argv[2]);
        calls = atol(argv[3]);
        for (long r = 0; r < rounds; r++) {
            pthread_t t;
            pthread_create(&t, 0, churn_worker, 0);
            pthread_join(t, 0);
        }
        total = rounds * calls;
    } else if (!strcmp(mode, "many")) {
        long n = atol(argv[2]);
        calls = atol(argv[3]);
        pthread_t *t = calloc(n, sizeof *t);
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setstacksize(&attr, 64 * 1024);
        pthread_barrier_init(&start, 0, n + 1);
        for (long i = 0; i < n; i++)
            if (pthread_create(&t[i], &attr, many_worker, 0)) return 3;
        pthread_barrier_wait(&start);
        for (long i = 0; i < n; i++) pthread_join(t[i], 0);
        total = n * calls;
    } else if (!strcmp(mode, "notls")) {
        calls = atol(argv[2]);
        size_t size = 256 * 1024;
        char *stack = malloc(size);
        int flags = CLONE_VM | CLONE_FS | CLONE_FILES | CLONE_SIGHAND | CLONE_THREAD | CLONE_SYSVSEM;
        if (clone(notls_child, stack + size, flags, 0) < 0) return 3;
        for (long i = 0; i < calls; i++) f(i);
        while (!__atomic_load_n(&child_done, __ATOMIC_SEQ_CST)) sched_yield();
        usleep(1000); /* let the child's exit syscall finish with its stack */
        total = 2 * calls;
    } else if (!strcmp(mode, "setfs")) {
        calls = atol(argv[2]);
        pthread_t t;
        pthread_create(&t, 0, setfs_worker, 0);
        pthread_join(t, 0);
        total = 3 * calls;
    } else if (!strcmp(mode, "foreign")) {
        calls = atol(argv[2]);
        pthread_t t;
        pthread_create(&t, 0, foreign_worker, 0);
        pthread_join(t, 0);
        total = 4 * calls;
    } else {
        return 2;
    }
    printf("f called %ld times\n", total);
    return 0;
}
