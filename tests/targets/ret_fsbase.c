// MODE 0: raw clone thread sharing the parent's FS base (no CLONE_SETTLS); both call probed f/g.
// MODE 1: raw clone thread with FS base 0 (CLONE_SETTLS, tls=0) calling probed f/g.
// MODE 2: the main thread changes its FS base (arch_prctl) inside probed sw() and back after it returns
//         -> sw returns with a different FS base than it entered with.
// MODE 3: inside probed sw2() the FS base is switched to a copy and switched back before returning.
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sched.h>
#include <unistd.h>
#include <signal.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <sys/mman.h>
#include <asm/prctl.h>
#include <linux/futex.h>
static long N;
static volatile long fcnt, gcnt;
__attribute__((noinline)) long f(long x){ __atomic_add_fetch(&fcnt,1,__ATOMIC_RELAXED); return x+1; }
__attribute__((noinline)) long g(int d, long x){ long r = d ? g(d-1,x)+f(x) : f(x); __atomic_add_fetch(&gcnt,1,__ATOMIC_RELAXED); return r; }
static volatile int child_done;
static long child_sum;
static int child(void *p){
    long s=0; for(long i=0;i<N;i++) s+=g(3,i);
    child_sum=s;
    __atomic_store_n(&child_done,1,__ATOMIC_SEQ_CST);
    syscall(SYS_futex, &child_done, FUTEX_WAKE, 1, 0,0,0);
    syscall(SYS_exit, 0); return 0;
}
static unsigned long getfs(void){ unsigned long v; syscall(SYS_arch_prctl, ARCH_GET_FS, &v); return v; }
static char tlscopy[1<<16] __attribute__((aligned(4096)));
static unsigned long oldfs;
__attribute__((noinline)) long sw(long x){ // leaves the FS base changed (to a copy of the TCB region)
    unsigned long fs = getfs();
    memcpy(tlscopy + 0x8000 - 0x200, (void*)(fs - 0x200), 0xa00);
    unsigned long nfs = (unsigned long)tlscopy + 0x8000;
    *(unsigned long*)nfs = nfs;     // tcb self pointer
    oldfs = fs;
    syscall(SYS_arch_prctl, ARCH_SET_FS, nfs);
    return x+1;
}
__attribute__((noinline)) long sw2(long x){
    unsigned long fs = getfs();
    memcpy(tlscopy + 0x8000 - 0x200, (void*)(fs - 0x200), 0xa00);
    unsigned long nfs = (unsigned long)tlscopy + 0x8000; *(unsigned long*)nfs = nfs;
    syscall(SYS_arch_prctl, ARCH_SET_FS, nfs);
    long r = f(x) + g(2,x);   // probed calls on the other FS base
    syscall(SYS_arch_prctl, ARCH_SET_FS, fs);
    return r;
}
int main(int argc, char **argv){
    int MODE=atoi(argv[1]); N=atol(argv[2]);
    long s=0;
    if (MODE<=1){
        char *stk = mmap(0, 1<<20, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS|MAP_STACK, -1, 0);
        int flags = CLONE_VM|CLONE_FS|CLONE_FILES|CLONE_SIGHAND|CLONE_THREAD|CLONE_SYSVSEM;
        if (MODE==1) flags |= CLONE_SETTLS;
        if (clone(child, stk + (1<<20) - 64, flags, 0, 0, (void*)0, 0) < 0) { perror("clone"); return 1; }
        for(long i=0;i<N;i++) s+=g(3,i);
        while(!__atomic_load_n(&child_done,__ATOMIC_SEQ_CST)) syscall(SYS_futex, &child_done, FUTEX_WAIT, 0, 0,0,0);
        usleep(10000);
        s += child_sum;
    } else if (MODE==2) {
        for (long i=0;i<N;i++){ s += sw(i); unsigned long cur=getfs(); syscall(SYS_arch_prctl, ARCH_SET_FS, oldfs); (void)cur; s += g(2,i); }
    } else {
        for (long i=0;i<N;i++) s += sw2(i) + g(1,i);
    }
    printf("mode=%d s=%ld f=%ld g=%ld\n", MODE, s, fcnt, gcnt);
    return 0;
}
