/* The second static `dup` (see sym_dup_a.c). */
static __attribute__((noinline)) int dup(int x) { return x * 2; }
int dup_b(int x) { return dup(x); }
