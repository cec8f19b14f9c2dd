/*
 * HIP allocations under the shim, against the fake HIP runtime: `hip <scenario> <path>`
 * with path symbol (linked), dlsym or proc (hipGetProcAddress). Prints one line per
 * call with its code.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int (*gpa_t)(const char *, void **, int, unsigned long long, int *);
int hipMalloc(void **, size_t);
int hipFree(void *);
int hipMallocAsync(void **, size_t, void *);
int hipFreeAsync(void *, void *);
int hipHostMalloc(void **, size_t, unsigned);
int hipHostFree(void *);
int hipMemGetInfo(size_t *, size_t *);
int hipSetDevice(int);
int hipStreamCreateWithFlags(void **, unsigned);

static struct {
    int (*Malloc)(void **, size_t);
    int (*Free)(void *);
    int (*MallocAsync)(void **, size_t, void *);
    int (*FreeAsync)(void *, void *);
    int (*HostMalloc)(void **, size_t, unsigned);
    int (*HostFree)(void *);
    int (*MemGetInfo)(size_t *, size_t *);
} h;

#define CODE(what, expr) printf("%s = %d\n", what, (int)(expr))

static const char *origin(void *f) {
    Dl_info i;
    if (!f || !dladdr(f, &i) || !i.dli_fname) return "?";
    return strstr(i.dli_fname, "hetmem_preload") ? "shim" : "runtime";
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IONBF, 0);
    const char *s = argc > 1 ? argv[1] : "", *path = argc > 2 ? argv[2] : "symbol";
    if (!strcmp(path, "symbol")) {
        h.Malloc = hipMalloc, h.Free = hipFree, h.MallocAsync = hipMallocAsync, h.FreeAsync = hipFreeAsync;
        h.HostMalloc = hipHostMalloc, h.HostFree = hipHostFree, h.MemGetInfo = hipMemGetInfo;
    } else {
        void *lib = dlopen("libamdhip64.so.6", RTLD_NOW | RTLD_LOCAL);
        if (!lib) return 2;
        gpa_t g = (gpa_t)dlsym(lib, "hipGetProcAddress");
        void *f[7];
        const char *names[] = {"hipMalloc", "hipFree", "hipMallocAsync", "hipFreeAsync",
                               "hipHostMalloc", "hipHostFree", "hipMemGetInfo"};
        for (int i = 0; i < 7; i++) {
            int st = -7;
            if (!strcmp(path, "proc")) {
                if (g(names[i], &f[i], 60200, 0, &st) || st != 0) return 3;
            } else {
                f[i] = dlsym(lib, names[i]);
            }
            printf("%s from=%s\n", names[i], origin(f[i]));
        }
        memcpy(&h, f, sizeof h);
        void *x = NULL;
        int st = -7;
        CODE("unknown", g("hipNoSuch", &x, 60200, 0, &st));
        printf("unknown status=%d\n", st);
    }
    hipSetDevice(0);
    void *stream = NULL;
    hipStreamCreateWithFlags(&stream, 0);
    size_t f = 0, t = 0;
    void *a = NULL, *b = NULL, *p = NULL;
    if (!strcmp(s, "observe") || !strcmp(s, "limit")) {
        CODE("info", h.MemGetInfo(&f, &t));
        printf("total=%zu free=%zu\n", t, f);
        CODE("malloc 48M", h.Malloc(&a, 48 << 20));
        CODE("async 32M", h.MallocAsync(&b, 32 << 20, stream));
        CODE("info", h.MemGetInfo(&f, &t));
        printf("total=%zu free=%zu\n", t, f);
        CODE("host 1M", h.HostMalloc(&p, 1 << 20, 0));
        CODE("host free", h.HostFree(p));
        CODE("free", h.Free(a));
        if (b) CODE("async free", h.FreeAsync(b, stream));
        CODE("info", h.MemGetInfo(&f, &t));
        printf("total=%zu free=%zu\n", t, f);
    } else if (!strcmp(s, "bad")) {
        char host[16];
        CODE("free foreign", h.Free(host));
        CODE("malloc NULL", h.Malloc(NULL, 16));
        CODE("malloc 0", h.Malloc(&a, 0));
        CODE("malloc SIZE_MAX", h.Malloc(&a, SIZE_MAX));
        CODE("malloc", h.Malloc(&a, 1 << 20));
        CODE("free", h.Free(a));
        CODE("free twice", h.Free(a));
        CODE("host free foreign", h.HostFree(host));
        CODE("async free NULL", h.FreeAsync(NULL, stream));
        CODE("info NULL", h.MemGetInfo(NULL, NULL));
    }
    return 0;
}
