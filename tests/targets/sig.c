/* work is called N times from main and once from each of M SIGUSR1 handlers (raised by main). */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>

__attribute__((noinline)) int work(int x) { return x * 7; }
static volatile long handled;

static void on_usr1(int sig) { handled += work(sig); }

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 100;
    long m = argc > 2 ? atol(argv[2]) : 10;
    signal(SIGUSR1, on_usr1);
    volatile long s = 0;
    for (long i = 0; i < n; i++) s += work((int)i);
    for (long i = 0; i < m; i++) raise(SIGUSR1);
    printf("handled=%ld\n", (long)handled);
    return 0;
}
