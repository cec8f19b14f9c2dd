/*
 * An allocation-heavy CUDA program, for the GPU side's overhead in observe mode: run
 * side by side with and without LD_PRELOAD=libhetmem_preload.so (scripts/gpu-shim-bench.sh).
 *
 *   gpu_alloc <libcudart path or name> [rounds] [largest size, bytes]
 *
 * It dlopens the runtime (as PyTorch loads it: by name, RTLD_LOCAL) and, per round,
 * makes 1000 cudaMalloc + cudaFree pairs of sizes from 512 B to 64 MiB, then 1000
 * cudaMallocAsync + cudaFreeAsync pairs on one stream, and 1000 cudaMemGetInfo calls
 * (what a framework's allocator asks between allocations). Prints one JSON line: ns
 * per call pair of each, the total, and a checksum of the pointers' low bits (the same
 * work done).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

typedef int (*malloc_t)(void **, size_t);
typedef int (*free_t)(void *);
typedef int (*malloc_async_t)(void **, size_t, void *);
typedef int (*free_async_t)(void *, void *);
typedef int (*info_t)(size_t *, size_t *);
typedef int (*stream_create_t)(void **);
typedef int (*sync_t)(void *);

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e9 + t.tv_nsec;
}

int main(int argc, char **argv) {
    const char *lib = argc > 1 ? argv[1] : "libcudart.so";
    int rounds = argc > 2 ? atoi(argv[2]) : 20;
    void *h = dlopen(lib, RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        fprintf(stderr, "gpu_alloc: %s\n", dlerror());
        return 2;
    }
    malloc_t m = (malloc_t)dlsym(h, "cudaMalloc");
    free_t f = (free_t)dlsym(h, "cudaFree");
    malloc_async_t ma = (malloc_async_t)dlsym(h, "cudaMallocAsync");
    free_async_t fa = (free_async_t)dlsym(h, "cudaFreeAsync");
    info_t info = (info_t)dlsym(h, "cudaMemGetInfo");
    stream_create_t sc = (stream_create_t)dlsym(h, "cudaStreamCreate");
    sync_t ss = (sync_t)dlsym(h, "cudaStreamSynchronize");
    if (!m || !f || !ma || !fa || !info || !sc || !ss) {
        fprintf(stderr, "gpu_alloc: missing runtime entry points\n");
        return 2;
    }
    void *s = NULL;
    if (sc(&s)) return 3;
    void *warm = NULL;
    if (m(&warm, 1 << 20) || f(warm)) return 3;
    size_t largest = argc > 3 ? strtoull(argv[3], NULL, 0) : (size_t)64 << 20;
    size_t sizes[] = {512, 4096, 65536, 1 << 20, 2 << 20, 8 << 20, 64 << 20, 200};
    for (int i = 0; i < 8; i++)
        if (sizes[i] > largest) sizes[i] = largest;
    double t_sync = 0, t_async = 0, t_info = 0;
    unsigned long long check = 0;
    for (int r = 0; r < rounds; r++) {
        double t0 = now();
        for (int i = 0; i < 1000; i++) {
            void *p = NULL;
            if (m(&p, sizes[i % 8])) return 4;
            check += (uintptr_t)p & 0xff;
            if (f(p)) return 4;
        }
        double t1 = now();
        for (int i = 0; i < 1000; i++) {
            void *p = NULL;
            if (ma(&p, sizes[i % 8], s)) return 5;
            if (fa(p, s)) return 5;
        }
        if (ss(s)) return 5;
        double t2 = now();
        for (int i = 0; i < 1000; i++) {
            size_t fr = 0, tot = 0;
            if (info(&fr, &tot)) return 6;
            check += tot & 1;
        }
        double t3 = now();
        t_sync += t1 - t0;
        t_async += t2 - t1;
        t_info += t3 - t2;
    }
    double n = rounds * 1000.0;
    printf("{\"rounds\":%d,\"malloc_free_ns\":%.1f,\"async_ns\":%.1f,\"mem_get_info_ns\":%.1f,"
           "\"total_ms\":%.2f,\"check\":%llu}\n",
           rounds, t_sync / n, t_async / n, t_info / n, (t_sync + t_async + t_info) / 1e6, check);
    return 0;
}
