/* A plugin for life_dlopen: plugin_work is only ever reached through dlopen + dlsym. */
__attribute__((noinline)) int plugin_work(int x) { return x * 7 + 1; }
