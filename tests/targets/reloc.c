/* Functions whose first instruction needs relocation when run out of line. Each returns a value that
   depends on the instruction being relocated correctly; main prints them all, N times over. */
#include <stdio.h>
#include <stdlib.h>

long table[4] = {11, 22, 33, 44};
long helper(void) { return 42; }

/* lea rax,[rip+table]: RIP-relative */
__attribute__((naked, noinline)) long f_riprel(void) {
    __asm__("lea table(%rip), %rax\n\tmov 8(%rax), %rax\n\tret");
}
/* mov rax,[rip+table] */
__attribute__((naked, noinline)) long f_ripload(void) {
    __asm__("mov table+16(%rip), %rax\n\tret");
}
/* call rel32 as the first instruction */
__attribute__((naked, noinline)) long f_call(void) {
    __asm__("call helper\n\tadd $1, %rax\n\tret");
}
/* jmp rel32 as the first instruction */
__attribute__((naked, noinline)) long f_jmp(void) {
    __asm__("jmp helper");
}
/* jcc, probed at f_jcc+3 (after the test): taken when rdi is zero */
__attribute__((naked, noinline)) long f_jcc(long x) {
    __asm__("test %rdi, %rdi\n\tje 1f\n\tmov $5, %rax\n\tret\n1:\tmov $6, %rax\n\tret");
}
/* cmp byte [rip+x], imm: displacement followed by an immediate */
__attribute__((naked, noinline)) long f_cmpimm(void) {
    __asm__("cmpq $11, table(%rip)\n\tsete %al\n\tmovzbl %al, %eax\n\tret");
}

/* never called: its first instruction cannot run out of line */
__attribute__((naked, noinline)) void f_ud2(void) {
    __asm__("ud2");
}

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 1;
    long s = 0;
    for (long i = 0; i < n; i++)
        s += f_riprel() + f_ripload() + f_call() + f_jmp() + f_jcc(i & 1) + f_cmpimm();
    printf("s=%ld riprel=%ld ripload=%ld call=%ld jmp=%ld jcc0=%ld jcc1=%ld cmpimm=%ld\n", s, f_riprel(),
           f_ripload(), f_call(), f_jmp(), f_jcc(0), f_jcc(1), f_cmpimm());
    return 0;
}
