/* A thousand small functions, f000 to f999, for probes by the thousand on one library.
 * Built as a library (-shared -DLIB) and as the program that calls them (-DMAIN, linked against it):
 *   many ROUNDS     calls fNNN (NNN % 7 + 1) * ROUNDS times, for each NNN; prints "fNNN CALLS" lines. */
#include <stdio.h>
#include <stdlib.h>

#define D10(M, p) M(p##0) M(p##1) M(p##2) M(p##3) M(p##4) M(p##5) M(p##6) M(p##7) M(p##8) M(p##9)
#define D100(M, p) D10(M, p##0) D10(M, p##1) D10(M, p##2) D10(M, p##3) D10(M, p##4) \
    D10(M, p##5) D10(M, p##6) D10(M, p##7) D10(M, p##8) D10(M, p##9)
#define D1000(M) D100(M, 0) D100(M, 1) D100(M, 2) D100(M, 3) D100(M, 4) \
    D100(M, 5) D100(M, 6) D100(M, 7) D100(M, 8) D100(M, 9)

#ifdef LIB
#define DEFINE(n) __attribute__((noinline)) long f##n(long x) { return x * 3 + 1##n; }
D1000(DEFINE)
#endif

#ifdef MAIN
#define DECLARE(n) long f##n(long);
D1000(DECLARE)
#define ENTRY(n) f##n,
static long (*const table[1000])(long) = {D1000(ENTRY)};

int main(int argc, char **argv) {
    long rounds = argc > 1 ? atol(argv[1]) : 1;
    volatile long sum = 0;
    for (int k = 0; k < 1000; k++) {
        long calls = (k % 7 + 1) * rounds;
        for (long i = 0; i < calls; i++) sum += table[k](i);
        printf("f%03d %ld\n", k, calls);
    }
    return 0;
}
#endif
