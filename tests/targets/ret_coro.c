// A coroutine's buried frame stays in the graveyard after the coroutine is abandoned; a new coroutine
// on the same stack buries a frame with the same slot; its return is served from the stale entry.
// Expected output: "B got 2042" (f(41)=42 + 2000 from cb). Wrong return address -> "B got 1042".
#include <stdio.h>
#include <stdlib.h>
#include <ucontext.h>
static ucontext_t mainc, A, B, C, D;
static char S1[65536] __attribute__((aligned(64)));   // .bss: lower than the mmap'd S2
static char *S2;
static int phase;
static ucontext_t *self_ctx, *other_ctx;
__attribute__((noinline)) long f(long x){
    if (phase == 1 || phase == 3) { int p = phase; phase++; swapcontext(self_ctx, other_ctx); (void)p; }
    return x + 1;
}
__attribute__((noinline)) long ca(long x){ long r = f(x); asm volatile("" ::: "memory"); return r + 1000; }
__attribute__((noinline)) long cb(long x){ long r = f(x); asm volatile("" ::: "memory"); return r + 2000; }
static long result;
static void body(long which){ long (*fn)(long) = which ? cb : ca; result = fn(41); printf("%s got %ld\n", which ? "B" : "A", result); setcontext(&mainc); }
static void helper(int resume_b){ f(7); if (resume_b) swapcontext(&D, &B); else swapcontext(&C, &mainc); setcontext(&mainc); }
int main(void){
    S2 = malloc(1<<20); // large: mmap'd, above .bss
    if (!(S2 > S1)) { printf("layout\n"); return 1; }
    getcontext(&A); A.uc_stack.ss_sp=S1; A.uc_stack.ss_size=sizeof S1; A.uc_link=&mainc; makecontext(&A,(void(*)(void))body,1,0L);
    getcontext(&C); C.uc_stack.ss_sp=S2; C.uc_stack.ss_size=1<<20; C.uc_link=&mainc; makecontext(&C,(void(*)(void))helper,1,0);
    phase = 1; self_ctx=&A; other_ctx=&C;
    swapcontext(&mainc, &A);          // A in f -> C calls f (buries A's frame) -> back to main; A abandoned
    printf("A abandoned\n");
    getcontext(&B); B.uc_stack.ss_sp=S1; B.uc_stack.ss_size=sizeof S1; B.uc_link=&mainc; makecontext(&B,(void(*)(void))body,1,1L);
    getcontext(&D); D.uc_stack.ss_sp=S2; D.uc_stack.ss_size=1<<20; D.uc_link=&mainc; makecontext(&D,(void(*)(void))helper,1,1);
    phase = 3; self_ctx=&B; other_ctx=&D;
    swapcontext(&mainc, &B);          // B in f -> D calls f (buries B's) -> D resumes B -> B's f returns
    printf("done result=%ld\n", result);
    return 0;
}
