/* A library for startup_main, linked with -Wl,-z,now: `pick` is an IFUNC that the library itself calls
   through its PLT, so ld.so runs pick_resolver once while it relocates the library at start-up, before
   main and before r_brk first reports the library. pick_impl is what every call of pick reaches. */
__attribute__((noinline, visibility("hidden"))) int pick_impl(int x) { return x * 5 + 2; }

typedef int pick_fn(int);

__attribute__((noinline, used)) pick_fn *pick_resolver(void) {
    __asm__ volatile("" ::: "memory");  /* a body of its own: not folded into a tail jump */
    return pick_impl;
}

int pick(int x) __attribute__((ifunc("pick_resolver")));

int lib_call(int x) { return pick(x) + 1; }
