// NT threads created one after another (C at a time), each on its own never-reused stack (distinct
// FS base), each calls probed f K times (f nested in probed g).
#include <stdio.h>
#include <stdlib.h>
#include <pthread.h>
#include <stdatomic.h>
static int K; static atomic_long fr;
__attribute__((noinline)) long f(long x){ atomic_fetch_add_explicit(&fr,1,memory_order_relaxed); return x+1; }
__attribute__((noinline)) long g(long x){ long r=f(x)+1; asm volatile(""); return r; }
static void *thr(void *p){ long s=0; for(int i=0;i<K;i++) s+=g(i); return (void*)s; }
int main(int argc,char**argv){
    int NT=atoi(argv[1]); K=atoi(argv[2]); int C=atoi(argv[3]);
    size_t ss=64<<10; char *mem = malloc((size_t)NT*ss + 4096);
    long s=0;
    for(int b=0;b<NT;b+=C){
        pthread_t t[64]; int n = (NT-b<C)?NT-b:C;
        for(int i=0;i<n;i++){ pthread_attr_t a; pthread_attr_init(&a); pthread_attr_setstack(&a, mem + (size_t)(b+i)*ss, ss); pthread_create(&t[i],&a,thr,0); pthread_attr_destroy(&a); }
        for(int i=0;i<n;i++){ void*r; pthread_join(t[i],&r); s+=(long)r; }
    }
    printf("NT=%d K=%d s=%ld f=%ld\n",NT,K,s,(long)fr); return 0;
}
