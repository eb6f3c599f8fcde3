/* A function compiled to a jump table (gcc, a dense switch), called a known number of times:
 *   switch N     calls classify(i % 11) N times and prints "classify called N times sum=S". */
#include <stdio.h>
#include <stdlib.h>

__attribute__((noinline)) long classify(unsigned x) {
    switch (x) {
    case 0: return 17;
    case 1: return x * 3;
    case 2: return 41;
    case 3: return x + 100;
    case 4: return 7;
    case 5: return x << 4;
    case 6: return 99;
    case 7: return x ^ 0x55;
    case 8: return 1234;
    case 9: return x - 2;
    default: return -1;
    }
}

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 1000;
    volatile long sum = 0;
    for (long i = 0; i < n; i++) sum += classify((unsigned)(i % 11));
    printf("classify called %ld times sum=%ld\n", n, (long)sum);
    return 0;
}
