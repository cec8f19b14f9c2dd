// A C host (like the python executable: no libstdc++ of its own) that loads a C++
// library with RTLD_LOCAL, as Python loads PyTorch, and hands it hetmem's C++ entry.
#include <dlfcn.h>
#include <stdio.h>
#include <sys/types.h>
#include "hetmem.h"

int main(int argc, char** argv) {
    if (argc < 2) return 3;
    void* h = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (!h) { fprintf(stderr, "%s\n", dlerror()); return 3; }
    int (*run)(void* (*)(ssize_t, int, void*)) =
        (int (*)(void* (*)(ssize_t, int, void*)))dlsym(h, "shim_alloc");
    if (!run) return 3;
    int r = run(hetmem_torch_malloc_cxx);
    printf("torch_local: %s\n", r == 0 ? "thrown" : "NULL came back (no exception)");
    return r;
}
