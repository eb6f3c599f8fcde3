/* kcalls N [PAGES]: calls f() N times (an exact count for the kernel's uprobe PMU, whatever CPU or
   process runs it), touches PAGES fresh anonymous pages once each (PAGES more page faults than the
   same run without them), and prints "f called N times". */
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

__attribute__((noinline)) int f(int x) {
    __asm__ volatile("" ::: "memory"); /* a real call each time: neither inlined nor folded */
    return x + 1;
}

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 1000;
    long pages = argc > 2 ? atol(argv[2]) : 0;
    volatile int sum = 0;
    for (long i = 0; i < n; i++) sum += f((int)i);
    if (pages > 0) {
        long size = sysconf(_SC_PAGESIZE);
        volatile char *p = mmap(NULL, pages * size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) return 1;
        for (long i = 0; i < pages; i++) p[i * size] = 1;
        munmap((void *)p, pages * size);
    }
    printf("f called %ld times\n", n);
    return 0;
}
