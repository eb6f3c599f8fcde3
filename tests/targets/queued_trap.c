/* A thread with a trap signal queued to it that it has not yet taken: main blocks SIGTRAP, queues
   itself a SIGTRAP with the int3's si_code (SI_KERNEL), prints "ready", waits for a byte on stdin and
   unblocks SIGTRAP, whose default action then ends it. A test stops it inside that last syscall and
   interrupts it there, which leaves it at an interrupt stop with the trap queued, as an int3 executed
   just as PTRACE_INTERRUPT arrives does. */
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

int main(void) {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTRAP);
    sigprocmask(SIG_BLOCK, &set, NULL);
    siginfo_t si;
    memset(&si, 0, sizeof si);
    si.si_signo = SIGTRAP;
    si.si_code = 0x80; /* SI_KERNEL */
    syscall(SYS_rt_tgsigqueueinfo, getpid(), gettid(), SIGTRAP, &si);
    printf("ready\n");
    fflush(stdout);
    char c;
    if (read(0, &c, 1) != 1) return 2;
    syscall(SYS_rt_sigprocmask, SIG_UNBLOCK, &set, NULL, 8);
    return 0;
}
