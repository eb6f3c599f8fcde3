/* memcpy, an IFUNC of libc, called N times through the address the dynamic linker bound for it (the
   implementation its resolver picked for this CPU); prints that implementation's address in libc's
   terms (from dladdr), so a test knows it without asking pmu.   ifunc N */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 10;
    static char a[256], b[256];
    volatile size_t len = 100;
    void *(*volatile copy)(void *, const void *, size_t) = memcpy;
    for (long i = 0; i < n; i++) copy(a, b, len);
    Dl_info info;
    if (!dladdr((void *)copy, &info)) return 1;
    printf("memcpy=%#lx in %s\n", (unsigned long)((char *)copy - (char *)info.dli_fbase), info.dli_fname);
    return 0;
}
