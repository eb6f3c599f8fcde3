/* Return probes: fib (recursive) returns known values; jumper is left by longjmp every other call;
   tail() ends in a tail call to leaf(). Prints everything it computed so a changed behaviour shows. */
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>

static jmp_buf env;

__attribute__((noinline)) long fib(long n) { return n < 2 ? n : fib(n - 1) + fib(n - 2); }

__attribute__((noinline)) long deep(long n, long jump) {
    if (n == 0) {
        if (jump) longjmp(env, 7);
        return 100;
    }
    return deep(n - 1, jump) + 1;
}

__attribute__((noinline)) long jumper(long i) { return deep(3, i & 1); }

__attribute__((noinline)) long leaf(long x) { return x * 2; }
__attribute__((noinline, optimize("O2"))) long tail(long x) { return leaf(x + 1); }

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 10;
    long rounds = argc > 2 ? atol(argv[2]) : 4;
    printf("fib(%ld)=%ld\n", n, fib(n));
    long sum = 0;
    for (long i = 0; i < rounds; i++) {
        int r = setjmp(env);
        if (r == 0) sum += jumper(i);
        else sum += r;
    }
    printf("jumper sum=%ld\n", sum);
    long t = 0;
    for (long i = 0; i < rounds; i++) t += tail(i);
    printf("tail sum=%ld\n", t);
    return 0;
}
