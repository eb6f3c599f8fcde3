/* Sites for tests/unit/trace/test_patchsafety.py: prologues that can take a 5-byte jump patch, and one
   function for each reason pmu.trace.patchsafety refuses one. Never run: main only keeps them alive.
   The asm functions spell out their bytes (and .size) so that each test knows what it displaces. */
#include <stdio.h>
#include <stdlib.h>

long counter = 1;
long helper(long x) { return x + counter; }
long (*volatile fp)(long) = helper;

/* --- sites that take a jump patch ------------------------------------------------------------------ */

/* push rbp; mov rbp, rsp; sub rsp, 0x10: three instructions, 8 bytes, boundaries 0, 1, 4 */
__asm__(".text\n.globl ps_ok_frame\n.type ps_ok_frame, @function\nps_ok_frame:\n"
        "\tpush %rbp\n\tmov %rsp, %rbp\n\tsub $0x10, %rsp\n\tmov %rdi, %rax\n\tleave\n\tret\n"
        ".size ps_ok_frame, .-ps_ok_frame\n");

/* endbr64; push r15: 6 bytes */
__asm__(".globl ps_ok_endbr\n.type ps_ok_endbr, @function\nps_ok_endbr:\n"
        "\tendbr64\n\tpush %r15\n\tmov %rdi, %rax\n\tpop %r15\n\tret\n"
        ".size ps_ok_endbr, .-ps_ok_endbr\n");

/* mov rax, [rip + counter]: one 7-byte RIP-relative instruction */
__asm__(".globl ps_ok_riprel\n.type ps_ok_riprel, @function\nps_ok_riprel:\n"
        "\tmov counter(%rip), %rax\n\tadd %rdi, %rax\n\tret\n"
        ".size ps_ok_riprel, .-ps_ok_riprel\n");

/* push rbx; call helper: a call as the last displaced instruction returns after the patch */
__asm__(".globl ps_ok_call_last\n.type ps_ok_call_last, @function\nps_ok_call_last:\n"
        "\tpush %rbx\n\tcall helper\n\tpop %rbx\n\tret\n"
        ".size ps_ok_call_last, .-ps_ok_call_last\n");

/* test rdi, rdi; je: a conditional branch among the displaced instructions */
__asm__(".globl ps_ok_jcc\n.type ps_ok_jcc, @function\nps_ok_jcc:\n"
        "\ttest %rdi, %rdi\n\tje 1f\n\tmov $1, %eax\n\tret\n1:\txor %eax, %eax\n\tret\n"
        ".size ps_ok_jcc, .-ps_ok_jcc\n");

/* a loop back to the first byte (which becomes the jump), an indirect call, a tail call through a pointer */
__asm__(".globl ps_ok_loop_to_entry\n.type ps_ok_loop_to_entry, @function\nps_ok_loop_to_entry:\n"
        "\tadd $1, %rax\n\tnop\n\tcall *%rdx\n\tdec %rdi\n\tjnz ps_ok_loop_to_entry\n"
        "\tjmp *fp(%rip)\n"
        ".size ps_ok_loop_to_entry, .-ps_ok_loop_to_entry\n");

/* --- sites that cannot -------------------------------------------------------------------------------- */

/* xor eax, eax; ret: 3 bytes, the patch would pass the end */
__asm__(".globl ps_tiny\n.type ps_tiny, @function\nps_tiny:\n"
        "\txor %eax, %eax\n\tret\n"
        ".size ps_tiny, .-ps_tiny\n");

/* a function symbol without .size */
__asm__(".globl ps_no_size\n.type ps_no_size, @function\nps_no_size:\n"
        "\tpush %rbp\n\tmov %rsp, %rbp\n\tpop %rbp\n\tret\n");

/* a byte that is no x86-64 instruction (0x06, push es, is invalid in 64-bit mode) */
__asm__(".globl ps_undecodable\n.type ps_undecodable, @function\nps_undecodable:\n"
        "\tpush %rbp\n\tmov %rsp, %rbp\n\tjmp 1f\n\t.byte 0x06\n1:\tpop %rbp\n\tret\n"
        ".size ps_undecodable, .-ps_undecodable\n");

/* a second entry point one byte in */
__asm__(".globl ps_two_entries\n.type ps_two_entries, @function\nps_two_entries:\n"
        "\tpush %rbx\n"
        ".globl ps_inner\n.type ps_inner, @function\nps_inner:\n"
        "\tmov %rdi, %rax\n\tadd $1, %rax\n\tret\n"
        ".size ps_inner, .-ps_inner\n"
        ".size ps_two_entries, .-ps_two_entries\n");

/* call rax (2 bytes), then more displaced bytes: the call returns into the patch */
__asm__(".globl ps_call_in_patch\n.type ps_call_in_patch, @function\nps_call_in_patch:\n"
        "\tcall *%rax\n\tmov %rdi, %rax\n\tret\n"
        ".size ps_call_in_patch, .-ps_call_in_patch\n");

/* xbegin: a transaction begun out of line would abort into the copy */
__asm__(".globl ps_xbegin\n.type ps_xbegin, @function\nps_xbegin:\n"
        "\txbegin 1f\n\txend\n1:\tret\n"
        ".size ps_xbegin, .-ps_xbegin\n");

/* xor eax, eax; 1: add rax, rdi; dec rdi; jnz 1b: the loop head is 2 bytes in */
__asm__(".globl ps_branch_into\n.type ps_branch_into, @function\nps_branch_into:\n"
        "\txor %eax, %eax\n1:\tadd %rdi, %rax\n\tdec %rdi\n\tjnz 1b\n\tret\n"
        ".size ps_branch_into, .-ps_branch_into\n");

/* a tail call through a register: where it goes is not in the code */
__asm__(".globl ps_jmp_reg\n.type ps_jmp_reg, @function\nps_jmp_reg:\n"
        "\tpush %rbx\n\tmov fp(%rip), %rax\n\tpop %rbx\n\tjmp *%rax\n"
        ".size ps_jmp_reg, .-ps_jmp_reg\n");

/* a jump through a pointer, with a pointer in the data (ps_into_ptr) to an instruction 3 bytes in */
__asm__(".globl ps_ptr_into\n.type ps_ptr_into, @function\nps_ptr_into:\n"
        "\tmov %rdi, %rax\nps_ptr_into_in:\n\tadd $1, %rax\n\tmov ps_into_ptr(%rip), %rdx\n\tjmp *%rdx\n"
        ".size ps_ptr_into, .-ps_ptr_into\n"
        ".data\n.globl ps_into_ptr\nps_into_ptr:\n\t.quad ps_ptr_into_in\n.text\n");

/* a jump to a label whose address the function takes (computed goto), 3 bytes in */
__asm__(".globl ps_lea_into\n.type ps_lea_into, @function\nps_lea_into:\n"
        "\tmov %rdi, %rax\n1:\tadd $1, %rax\n\tlea 1b(%rip), %rdx\n\tjmp *%rdx\n"
        ".size ps_lea_into, .-ps_lea_into\n");

/* a switch gcc compiles to a jump table (distinct calls keep it from becoming a lookup table) */
__attribute__((noinline)) long ps_switch(int k, long x) {
    switch (k) {
    case 0: return helper(x);
    case 1: return puts("one") + x;
    case 2: return helper(x * 3) - 1;
    case 3: return abs((int)x) + 3;
    case 4: return labs(x) * 5;
    case 5: return helper(x ^ 5) + 9;
    case 6: return putchar((int)x) * 6;
    case 7: return fp(x + 7) * 7;
    default: return -1;
    }
}

/* a jump table whose cases loop back into the first bytes of the function */
__asm__(".globl ps_table_into\n.type ps_table_into, @function\nps_table_into:\n"
        "\txor %eax, %eax\n"
        "2:\tadd $1, %rax\n"
        "\tcmp $2, %edi\n\tja 9f\n"
        "\tlea 8f(%rip), %rdx\n\tmov %edi, %edi\n\tmovslq (%rdx,%rdi,4), %rcx\n\tadd %rdx, %rcx\n\tjmp *%rcx\n"
        "3:\tdec %edi\n\tjmp 9f\n"
        "9:\tret\n"
        ".size ps_table_into, .-ps_table_into\n"
        ".section .rodata\n.align 4\n8:\t.long 9b-8b\n\t.long 3b-8b\n\t.long 2b-8b\n.text\n");

int main(int argc, char **argv) {
    extern long ps_ok_frame(long), ps_ok_endbr(long), ps_ok_riprel(long), ps_ok_jcc(long);
    printf("%ld\n", ps_ok_frame(argc) + ps_ok_endbr(argc) + ps_ok_riprel(argc) + ps_ok_jcc(argc) +
                        ps_switch(argc, argc));
    return 0;
}
