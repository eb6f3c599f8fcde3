/* Symbol-resolution target for tests/unit/events/test_symbols.py and tests/integration/test_list.py:
 * functions of known shape, a static one, an ifunc, a mangled-looking name and a bare asm label. */
#include <stdio.h>
#include <stdlib.h>

__attribute__((noinline)) int work(int x) {
    volatile long acc = 0x1122334455667788L; /* a long instruction to probe the middle of */
    for (int i = 0; i < x; i++) acc += i * 3;
    return (int)acc;
}

__attribute__((noinline)) int work2(int x) { return work(x) + 1; }

static __attribute__((noinline)) int helper(int x) { return x * 7; }

/* A C++-style mangled symbol name without needing a C++ compiler. */
int foo_bar(void) __asm__("_ZN3foo3barEv");
__attribute__((noinline)) int foo_bar(void) { return 42; }

/* An indirect function: the symbol's code is the resolver. */
static int fast_impl(int x) { return x + 2; }
static int (*resolve_fast(void))(int) { return fast_impl; }
int fast(int x) __attribute__((ifunc("resolve_fast")));

/* A label without a type or size (STT_NOTYPE) in .text, as hand-written assembly defines them. */
__asm__(".text\n.globl sym_notype\nsym_notype:\n\tnop\n\tmovl $1, %eax\n\tret\n");
int sym_notype(void);

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 10;
    printf("%d\n", work(n) + work2(n) + helper(n) + foo_bar() + fast(n) + sym_notype());
    return 0;
}
