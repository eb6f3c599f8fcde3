/* A target for killing pmu while it is attached: N threads call work() (checked) and tiny() (3 bytes, its first instruction 2:
   too short for a jump patch, so its probe stays an int3) and one() (a lone ret) in a loop, with a short sleep now and then.
   Prints "ready"; then reads commands from stdin: "mark" waits until every thread has made 1000 more
   calls and prints "progressed"; anything else (or EOF) stops the threads, prints "ok" or "WRONG". */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define N 8
__attribute__((noinline)) long work(long x) { return x * 3 + 1; }
__attribute__((naked, noinline)) void tiny(void) { __asm__("xor %eax, %eax\n\tret"); }
/* A 1-byte function: its only instruction, ret, is too short for a second int3; what follows it is
   an instruction that must never run (a thread that skipped the ret would fall into it). */
__attribute__((naked, noinline)) void one(void) { __asm__("ret\n\tud2"); }

static volatile long progress[N];
static volatile int stop, bad;

static void *worker(void *arg) {
    long id = (long)arg;
    struct timespec nap = {0, 20000};
    for (long i = 0; !stop; i++) {
        if (work(i) != i * 3 + 1) bad = 1;
        tiny();
        one();
        progress[id] = i + 1;
        if (i % 64 == 0) nanosleep(&nap, 0);
    }
    return 0;
}

int main(void) {
    pthread_t t[N];
    for (long i = 0; i < N; i++) pthread_create(&t[i], 0, worker, (void *)i);
    printf("ready\n");
    fflush(stdout);
    char line[64];
    while (fgets(line, sizeof line, stdin) && !strncmp(line, "mark", 4)) {
        long base[N];
        for (int i = 0; i < N; i++) base[i] = progress[i];
        for (int i = 0; i < N; i++)
            while (progress[i] < base[i] + 1000) usleep(100);
        printf("progressed\n");
        fflush(stdout);
    }
    stop = 1;
    for (int i = 0; i < N; i++) pthread_join(t[i], 0);
    printf(bad ? "WRONG\n" : "ok\n");
    return bad;
}
