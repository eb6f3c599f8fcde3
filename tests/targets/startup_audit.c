/* An LD_AUDIT library (rtld-audit(7)): ld.so loads it, with a libc of its own in a namespace of its own,
   before it maps the program's libraries. It raises SIGUSR1 in la_version and in la_objopen of each
   object the program loads, and la_preinit prints "audit: raised=R handled=H" to stderr: every signal
   that arrives while the dynamic linker starts the program must reach its handler. */
#define _GNU_SOURCE
#include <link.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static volatile sig_atomic_t handled;
static int raised;

static void on_usr1(int sig) { (void)sig; handled++; }

unsigned int la_version(unsigned int version) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sigaction(SIGUSR1, &sa, NULL);
    raise(SIGUSR1);
    raised++;
    return version;
}

unsigned int la_objopen(struct link_map *map, Lmid_t lmid, uintptr_t *cookie) {
    (void)map, (void)lmid, (void)cookie;
    raise(SIGUSR1);
    raised++;
    return 0;
}

void la_preinit(uintptr_t *cookie) {
    (void)cookie;
    char line[64];
    int n = snprintf(line, sizeof line, "audit: raised=%d handled=%d\n", raised, (int)handled);
    if (write(2, line, (size_t)n) < 0) _exit(3);
}
