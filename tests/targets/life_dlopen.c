/* dlopen lifetimes: life_dlopen LIB N M MODE.
   The main binary never calls into LIB directly. "seq": dlopen LIB, call plugin_work N times through
   dlsym, dlclose it (unmapped), put an anonymous mapping over the range it occupied (so a stale
   breakpoint would land in plain data, which is checked afterwards), dlopen it again when M > 0 (now
   at another address) and call M more times. "thread": the same from a second thread while the main
   thread keeps calling busy_work (a probed function of this binary) until the plugin thread is done.
   Prints "plugin=<calls> busy=<calls>" and checks the data over the old range is intact. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <link.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

__attribute__((noinline)) int busy_work(int x) { return x ^ 0x33; }

static const char *lib;
static long n, m;
static atomic_int started, finished;
static long plugin_calls;
static void *hole;
static size_t hole_len;

static void *open_lib(void) {
    void *h = dlopen(lib, RTLD_NOW | RTLD_LOCAL);
    if (!h) { fprintf(stderr, "dlopen: %s\n", dlerror()); exit(2); }
    return h;
}

static void call_n(void *h, long count) {
    int (*fn)(int) = (int (*)(int))dlsym(h, "plugin_work");
    if (!fn) { fprintf(stderr, "dlsym: %s\n", dlerror()); exit(2); }
    volatile long s = 0;
    for (long i = 0; i < count; i++) s += fn((int)i);
    plugin_calls += count;
}

/* The [start, end) of the object's mappings, from its program headers. */
static void extent(void *h, char **start, size_t *len) {
    struct link_map *lm;
    dlinfo(h, RTLD_DI_LINKMAP, &lm);
    const ElfW(Ehdr) *eh = (const ElfW(Ehdr) *)lm->l_addr;
    const ElfW(Phdr) *ph = (const ElfW(Phdr) *)(lm->l_addr + eh->e_phoff);
    uintptr_t lo = UINTPTR_MAX, hi = 0, pg = (uintptr_t)sysconf(_SC_PAGESIZE);
    for (int i = 0; i < eh->e_phnum; i++) {
        if (ph[i].p_type != PT_LOAD) continue;
        uintptr_t a = lm->l_addr + ph[i].p_vaddr, b = a + ph[i].p_memsz;
        if (a < lo) lo = a;
        if (b > hi) hi = b;
    }
    lo &= ~(pg - 1);
    hi = (hi + pg - 1) & ~(pg - 1);
    *start = (char *)lo;
    *len = hi - lo;
}

static void *plugin_thread(void *arg) {
    (void)arg;
    while (!atomic_load(&started)) sched_yield();
    void *h = open_lib();
    call_n(h, n);
    char *start;
    extent(h, &start, &hole_len);
    dlclose(h);
    hole = mmap(start, hole_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE,
                -1, 0);
    if (hole == MAP_FAILED) { perror("mmap over the old range (still mapped?)"); exit(2); }
    memset(hole, 0xa5, hole_len);
    if (m > 0) {
        h = open_lib();
        call_n(h, m);
        dlclose(h);
    }
    atomic_store(&finished, 1);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 5) { fprintf(stderr, "usage: life_dlopen LIB N M seq|thread\n"); return 2; }
    lib = argv[1];
    n = atol(argv[2]);
    m = atol(argv[3]);
    long busy = 0;
    volatile long s = 0;
    if (strcmp(argv[4], "thread") == 0) {
        pthread_t t;
        pthread_create(&t, NULL, plugin_thread, NULL);
        s += busy_work(0);
        busy++;
        atomic_store(&started, 1);
        while (!atomic_load(&finished)) { s += busy_work((int)busy); busy++; }
        for (int i = 0; i < 1000; i++) { s += busy_work(i); busy++; }
        pthread_join(t, NULL);
    } else {
        atomic_store(&started, 1);
        plugin_thread(NULL);
    }
    for (size_t i = 0; i < hole_len; i++)
        if (((unsigned char *)hole)[i] != 0xa5) { printf("data at old range changed at +%zu\n", i); return 3; }
    printf("plugin=%ld busy=%ld\n", plugin_calls, busy);
    return 0;
}
