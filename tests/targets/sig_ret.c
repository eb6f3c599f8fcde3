/* Return probes and signal handlers: outer() raises SIGUSR1 three times, and the handler calls f(), which
 * outer also calls; on the main stack, or with "alt" on a sigaltstack. Prints what it computed. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
static volatile long handled;
__attribute__((noinline)) long f(long x) { volatile long y = x; return y + 1; }
static void on_alarm(int sig) { handled += f(sig); }
__attribute__((noinline)) long outer(long x) {
    long s = 0;
    for (int i = 0; i < 3; i++) { raise(SIGUSR1); s += f(x + i); }
    return s;
}
int main(int argc, char **argv) {
    int alt = argc > 1 && !strcmp(argv[1], "alt");
    if (alt) { stack_t ss = {.ss_sp = malloc(1 << 16), .ss_size = 1 << 16}; sigaltstack(&ss, 0); }
    struct sigaction sa = {0};
    sa.sa_handler = on_alarm;
    sa.sa_flags = alt ? SA_ONSTACK : 0;
    sigaction(SIGUSR1, &sa, 0);
    long s = 0;
    for (int k = 0; k < 5; k++) s += outer(k);
    printf("s %ld handled %ld\n", s, handled);
    return 0;
}
