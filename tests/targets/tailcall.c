/* Indirect tail calls: dispatch() ends in a jump through a function pointer (gcc -O2: `jmp rax` or
 * `jmp [table + i*8]`), not a call, so its entry has an indirect jump whose target is not in a table.
 *   tailcall N     calls dispatch(i % 4, i) N times and prints "dispatch called N times sum=S". */
#include <stdio.h>
#include <stdlib.h>

__attribute__((noinline)) static long twice(long x) { return 2 * x; }
__attribute__((noinline)) static long plus(long x) { return x + 7; }
__attribute__((noinline)) static long minus(long x) { return x - 3; }
__attribute__((noinline)) static long same(long x) { return x; }

static long (*const ops[4])(long) = {twice, plus, minus, same};
long (*volatile chosen)(long) = same;

__attribute__((noinline)) long dispatch(long i, long x) {
    if (i == 3) return chosen(x); /* through a pointer in writable data */
    return ops[i & 3](x);         /* through a table of pointers */
}

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 1000;
    volatile long sum = 0;
    for (long i = 0; i < n; i++) sum += dispatch(i % 4, i);
    printf("dispatch called %ld times sum=%ld\n", n, (long)sum);
    return 0;
}
