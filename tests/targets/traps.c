/* The tracee's own traps must reach it as without pmu: raise(SIGTRAP) and its own int3 both run
   its SIGTRAP handler; work is probed and called around them. Prints what the handler saw. */
#include <signal.h>
#include <stdio.h>
#include <string.h>

__attribute__((noinline)) int work(int x) { return x + 2; }
static volatile int traps;

static void on_trap(int sig, siginfo_t *si, void *uc) { (void)sig; (void)uc; traps++; printf("trap code=%d\n", si->si_code); }

int main(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_trap;
    sa.sa_flags = SA_SIGINFO;
    sigaction(SIGTRAP, &sa, NULL);
    volatile int s = work(1);
    raise(SIGTRAP);
    s += work(2);
    __asm__ volatile("int3");
    s += work(3);
    printf("traps=%d s=%d\n", traps, s);
    return 0;
}
