/* Two probed functions called a known number of times: work N times, work2 N/2 times. */
#include <stdio.h>
#include <stdlib.h>

__attribute__((noinline)) int work(int x) { return x * 3 + 1; }
__attribute__((noinline)) int work2(int x) { return x ^ 0x55; }

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 1000;
    volatile long sum = 0;
    for (long i = 0; i < n; i++) {
        sum += work((int)i);
        if (i % 2 == 0) sum += work2((int)i);
    }
    printf("sum=%ld\n", (long)sum);
    return argc > 2 ? atoi(argv[2]) : 0;
}
