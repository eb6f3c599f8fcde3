/* Two static functions named `dup` in two translation units: an ambiguous symbol (with sym_dup_b.c). */
static __attribute__((noinline)) int dup(int x) { return x + 1; }
int dup_a(int x) { return dup(x); }
int main(void) { extern int dup_b(int); return dup_a(1) + dup_b(2); }
