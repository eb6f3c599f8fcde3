/* Recursion: down(N) calls itself N times deep, then returns N. */
#include <stdio.h>
#include <stdlib.h>
__attribute__((noinline)) long down(long n) { return n == 0 ? 0 : down(n - 1) + 1; }
int main(int argc, char **argv) { long n = atol(argv[1]); printf("depth %ld\n", down(n)); return 0; }
