/* startup_main N: calls lib_call (startup_lib.c) N times and prints "calls=N sum=S". The probes of its
   test are on what the dynamic linker runs at start-up (pick_resolver, libc's __libc_early_init). */
#include <stdio.h>
#include <stdlib.h>

int lib_call(int x);

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 10;
    long sum = 0;
    for (long i = 0; i < n; i++) sum += lib_call((int)i);
    printf("calls=%ld sum=%ld\n", n, sum);
    return 0;
}
