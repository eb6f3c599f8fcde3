/* Hand-written code that jumps into another function's first bytes, as glibc's mempcpy jumps into
   memmove: entry_b, two functions further, ends in a jmp to func_a+3, which a jump patch on func_a would cover.
     intojump N   calls both N times and prints the sum */
#include <stdio.h>
#include <stdlib.h>

__asm__(".text\n"
        ".globl func_a\n.type func_a, @function\n"
        "func_a:\n  mov %rdi, %rax\n.Linto_a:\n  add $1, %rax\n  add $2, %rax\n  ret\n.size func_a, .-func_a\n"
        ".globl between\n.type between, @function\n"
        "between:\n  lea 7(%rdi), %rax\n  ret\n.size between, .-between\n"
        ".globl entry_b\n.type entry_b, @function\n"
        "entry_b:\n  mov %rdi, %rax\n  add $100, %rax\n  jmp .Linto_a\n.size entry_b, .-entry_b\n");

long entry_b(long);
long func_a(long);

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 10;
    long s = 0;
    for (long i = 0; i < n; i++) s += func_a(i) + entry_b(i);
    printf("%ld\n", s);
    return 0;
}
