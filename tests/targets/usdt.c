/* USDT probes as <sys/sdt.h> makes them (written out here: no systemtap-sdt-dev needed): a nop at each
   site and a .note.stapsdt note naming it, its semaphore and its argument operands.
     usdt N            calls tick(i, name) N times: probe demo:tick (with a semaphore, args i and a
                       string) and demo:plain (no semaphore, inlined at two sites); prints how many
                       ticks saw the semaphore set
     usdt wait FILE    prints its pid, then ticks every millisecond until FILE exists */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define SDT_NOTE(provider, name, sem, args)                                                          \
    "990: nop\n"                                                                                     \
    ".pushsection .note.stapsdt,\"?\",\"note\"\n"                                                   \
    ".balign 4\n"                                                                                    \
    ".4byte 992f-991f, 994f-993f, 3\n"                                                               \
    "991: .asciz \"stapsdt\"\n"                                                                      \
    "992: .balign 4\n"                                                                               \
    "993: .8byte 990b\n"                                                                             \
    ".8byte _.stapsdt.base\n"                                                                        \
    ".8byte " sem "\n"                                                                               \
    ".asciz \"" provider "\"\n"                                                                      \
    ".asciz \"" name "\"\n"                                                                          \
    ".asciz \"" args "\"\n"                                                                          \
    "994: .balign 4\n"                                                                               \
    ".popsection\n"                                                                                  \
    ".ifndef _.stapsdt.base\n"                                                                       \
    ".pushsection .stapsdt.base,\"aG\",\"progbits\",.stapsdt.base,comdat\n"                         \
    ".weak _.stapsdt.base\n"                                                                         \
    ".hidden _.stapsdt.base\n"                                                                       \
    "_.stapsdt.base: .space 1\n"                                                                     \
    ".size _.stapsdt.base, 1\n"                                                                      \
    ".popsection\n"                                                                                  \
    ".endif\n"

unsigned short demo_tick_semaphore __attribute__((section(".probes"), used));
static long enabled;
static const char *names[] = {"alpha", "beta", "gamma"};

__attribute__((noinline)) void tick(long i, const char *name) {
    if (demo_tick_semaphore) {
        enabled++;
        __asm__ __volatile__(SDT_NOTE("demo", "tick", "demo_tick_semaphore", "-8@%0 8@%1")
                             :: "nor"(i), "nor"(name));
    }
}

static inline __attribute__((always_inline)) void plain(long i) {
    __asm__ __volatile__(SDT_NOTE("demo", "plain", "0", "-8@%0") :: "nor"(i));
}

int main(int argc, char **argv) {
    if (argc > 2 && strcmp(argv[1], "wait") == 0) {
        printf("%d\n", getpid());
        fflush(stdout);
        for (long i = 0; access(argv[2], F_OK) != 0; i++) {
            tick(i, names[i % 3]);
            usleep(1000);
        }
        return 0;
    }
    long n = argc > 1 ? atol(argv[1]) : 10;
    for (long i = 0; i < n; i++) {
        tick(i, names[i % 3]);
        if (i % 2) plain(i); else plain(-i);
    }
    printf("ticks=%ld enabled=%ld\n", n, enabled);
    return 0;
}
