// Ordinary program: the altstack is mmap'd (64 KiB) BEFORE pthread_create, so it sits above the
// thread's glibc stack (mmap grows down). Probed g recursion D deep; SIGUSR1 at the bottom, the
// handler calls probed f.
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <signal.h>
#include <pthread.h>
#include <sys/mman.h>
#include <string.h>
static int D;
static volatile long fret, gret;
__attribute__((noinline)) long f(long x){ fret++; asm volatile(""); return x+1; }
static void handler(int s){ f(s); }
__attribute__((noinline)) long g(int d){
    long r;
    if(d==0){ pthread_kill(pthread_self(), SIGUSR1); r=1; } else r = g(d-1)+1;
    gret++; asm volatile(""); return r;
}
static void *thr(void *p){
    stack_t ss={.ss_sp=p,.ss_size=1<<16}; sigaltstack(&ss,0);
    fprintf(stderr,"thr stack %p alt %p\n",(void*)&ss,p); return (void*)g(D);
}
int main(int argc,char**argv){
    D=atoi(argv[1]);
    struct sigaction sa; memset(&sa,0,sizeof sa); sa.sa_handler=handler; sa.sa_flags=SA_ONSTACK; sigaction(SIGUSR1,&sa,0);
    char *alt = mmap(0, 1<<16, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS, -1,0);
    pthread_t t; void *res; pthread_create(&t,0,thr,alt); pthread_join(t,&res);
    printf("alt above thread stack: %d res=%ld fret=%ld gret=%ld\n", alt > (char*)&t ? 1 : -1, (long)res, fret, gret);
    return 0;
}
