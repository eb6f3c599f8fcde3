// Single-threaded: setitimer(ITIMER_REAL, 100 us); the SIGALRM handler calls probed h (CALLH=1) or not;
// main loop calls probed g -> f N times. Prints deterministic sum.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/time.h>
static volatile long hret, ticks; static int CALLH;
__attribute__((noinline)) long h(long x){ hret++; return x^1; }
__attribute__((noinline)) long f(long x){ return x*2+1; }
__attribute__((noinline)) long g(long x){ long r = f(x) + f(x+1); asm volatile(""); return r; }
static void handler(int s){ ticks++; if (CALLH) h(s); }
int main(int argc,char**argv){
    long N=atol(argv[1]); CALLH=atoi(argv[2]);
    struct sigaction sa; memset(&sa,0,sizeof sa); sa.sa_handler=handler; sa.sa_flags=SA_RESTART; sigaction(SIGALRM,&sa,0);
    struct itimerval it={{0,100},{0,100}}; setitimer(ITIMER_REAL,&it,0);
    long s=0; for(long i=0;i<N;i++) s+=g(i);
    struct itimerval z={{0,0},{0,0}}; setitimer(ITIMER_REAL,&z,0);
    printf("s=%ld\n", s);
    fprintf(stderr,"ticks=%ld hret=%ld\n", ticks, hret);
    return 0;
}
