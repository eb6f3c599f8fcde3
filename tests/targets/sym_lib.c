/* A versioned shared library (link with sym_lib.map): api@VERS_1 is old_api, api@@VERS_2 is new_api. */
__asm__(".symver old_api,api@VERS_1");
__asm__(".symver new_api,api@@VERS_2");
int old_api(int x) { return x; }
int new_api(int x) { return x * 2; }
int lib_entry(int x) { return new_api(x) + 1; }
