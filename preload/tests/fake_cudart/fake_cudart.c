/*
 * A small fake CUDA runtime (libcudart) for the GPU side of the LD_PRELOAD shim's tests.
 * Like the real one it reaches the driver only at run time: at its first call it
 * dlopens "libcuda.so.1" (RTLD_LOCAL), takes cuGetProcAddress_v2 from it with dlsym
 * (cuGetProcAddress with FAKE_CUDART_GPA=v1) and every other driver entry point through
 * that, at cudaVersion 12080 (CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM with
 * FAKE_CUDART_PTSZ=1, as a program built with --default-stream per-thread). Each
 * thread gets the primary context of its current device (cudaSetDevice; 0 at first) at
 * its first call. Codes: the driver's (the runtime's cudaError_t values for the errors
 * used here are the same numbers: 1 invalid value, 2 memory allocation, 500, 712, 713,
 * 900...). As the real runtime: cudaMalloc of 0 bytes gives NULL and success,
 * cudaFree(NULL) and cudaFreeHost(NULL) succeed.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define EXPORT __attribute__((visibility("default")))
typedef int cudaError_t;
typedef unsigned long long CUdeviceptr;
typedef void *cudaStream_t;
typedef int (*gpa_v2_t)(const char *, void **, int, unsigned long long, int *);
typedef int (*gpa_v1_t)(const char *, void **, int, unsigned long long);

static struct {
    int (*Init)(unsigned);
    int (*DeviceGetCount)(int *);
    int (*PrimaryCtxRetain)(void **, int);
    int (*CtxGetCurrent)(void **);
    int (*CtxSetCurrent)(void *);
    int (*CtxSynchronize)(void);
    int (*MemAlloc)(CUdeviceptr *, size_t);
    int (*MemFree)(CUdeviceptr);
    int (*MemAllocAsync)(CUdeviceptr *, size_t, void *);
    int (*MemFreeAsync)(CUdeviceptr, void *);
    int (*MemAllocFromPoolAsync)(CUdeviceptr *, size_t, void *, void *);
    int (*MemAllocHost)(void **, size_t);
    int (*MemHostAlloc)(void **, size_t, unsigned);
    int (*MemFreeHost)(void *);
    int (*MemHostRegister)(void *, size_t, unsigned);
    int (*MemHostUnregister)(void *);
    int (*MemGetInfo)(size_t *, size_t *);
    int (*MemAllocManaged)(CUdeviceptr *, size_t, unsigned);
    int (*Memcpy)(CUdeviceptr, CUdeviceptr, size_t);
    int (*MemcpyAsync)(CUdeviceptr, CUdeviceptr, size_t, void *);
    int (*StreamCreate)(void **, unsigned);
    int (*StreamSynchronize)(void *);
    int (*StreamBeginCapture)(void *, int);
    int (*StreamEndCapture)(void *, void **);
    int (*PointerGetAttribute)(void *, int, CUdeviceptr);
    int (*IpcGetMemHandle)(void *, CUdeviceptr);
} d;

static pthread_once_t g_once = PTHREAD_ONCE_INIT;
static int g_init_rc = 35; /* cudaErrorInsufficientDriver until loaded */
static __thread int t_device;
static __thread int t_ready = -1;

static void load(void) {
    void *h = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        fprintf(stderr, "fake cudart: %s\n", dlerror());
        return;
    }
    const char *which = getenv("FAKE_CUDART_GPA");
    int v1 = which && strcmp(which, "v1") == 0;
    void *g = dlsym(h, v1 ? "cuGetProcAddress" : "cuGetProcAddress_v2");
    if (!g) return;
    const char *p = getenv("FAKE_CUDART_PTSZ");
    unsigned long long flags = p && *p == '1' ? 2 : 0;
#define GET(field, name)                                                                        \
    do {                                                                                        \
        void *f_ = NULL;                                                                        \
        int st_ = -1;                                                                           \
        int rc_ = v1 ? ((gpa_v1_t)g)(name, &f_, 12080, flags)                                    \
                     : ((gpa_v2_t)g)(name, &f_, 12080, flags, &st_);                            \
        if (rc_ || !f_ || (!v1 && st_ != 0)) {                                                  \
            fprintf(stderr, "fake cudart: cuGetProcAddress(%s) = %d, status %d\n", name, rc_, st_); \
            return;                                                                             \
        }                                                                                       \
        memcpy(&d.field, &f_, sizeof f_);                                                       \
    } while (0)
    GET(Init, "cuInit");
    GET(DeviceGetCount, "cuDeviceGetCount");
    GET(PrimaryCtxRetain, "cuDevicePrimaryCtxRetain");
    GET(CtxGetCurrent, "cuCtxGetCurrent");
    GET(CtxSetCurrent, "cuCtxSetCurrent");
    GET(CtxSynchronize, "cuCtxSynchronize");
    GET(MemAlloc, "cuMemAlloc");
    GET(MemFree, "cuMemFree");
    GET(MemAllocAsync, "cuMemAllocAsync");
    GET(MemFreeAsync, "cuMemFreeAsync");
    GET(MemAllocFromPoolAsync, "cuMemAllocFromPoolAsync");
    GET(MemAllocHost, "cuMemAllocHost");
    GET(MemHostAlloc, "cuMemHostAlloc");
    GET(MemFreeHost, "cuMemFreeHost");
    GET(MemHostRegister, "cuMemHostRegister");
    GET(MemHostUnregister, "cuMemHostUnregister");
    GET(MemGetInfo, "cuMemGetInfo");
    GET(MemAllocManaged, "cuMemAllocManaged");
    GET(Memcpy, "cuMemcpy");
    GET(MemcpyAsync, "cuMemcpyAsync");
    GET(StreamCreate, "cuStreamCreate");
    GET(StreamSynchronize, "cuStreamSynchronize");
    GET(StreamBeginCapture, "cuStreamBeginCapture");
    GET(StreamEndCapture, "cuStreamEndCapture");
    GET(PointerGetAttribute, "cuPointerGetAttribute");
    GET(IpcGetMemHandle, "cuIpcGetMemHandle");
    g_init_rc = d.Init(0);
}

/* The driver loaded and this thread's context current. */
static int ready(void) {
    if (t_ready == 0) return 0;
    pthread_once(&g_once, load);
    if (g_init_rc) return g_init_rc;
    void *c = NULL;
    int rc = d.PrimaryCtxRetain(&c, t_device);
    if (rc) return rc;
    rc = d.CtxSetCurrent(c);
    if (rc) return rc;
    t_ready = 0;
    return 0;
}
#define READY()              \
    do {                     \
        int r_ = ready();    \
        if (r_) return r_;   \
    } while (0)

EXPORT cudaError_t cudaSetDevice(int dev) {
    int n = 0;
    pthread_once(&g_once, load);
    if (g_init_rc) return g_init_rc;
    d.DeviceGetCount(&n);
    if (dev < 0 || dev >= n) return 101; /* cudaErrorInvalidDevice */
    t_device = dev;
    t_ready = -1;
    return ready();
}
EXPORT cudaError_t cudaGetDevice(int *dev) {
    if (!dev) return 1;
    READY();
    *dev = t_device;
    return 0;
}
EXPORT cudaError_t cudaDeviceSynchronize(void) {
    READY();
    return d.CtxSynchronize();
}
EXPORT cudaError_t cudaMalloc(void **p, size_t size) {
    READY();
    if (!p) return 1;
    if (size == 0) {
        *p = NULL;
        return 0;
    }
    CUdeviceptr x = 0;
    int rc = d.MemAlloc(&x, size);
    if (rc == 0) *p = (void *)(uintptr_t)x;
    return rc;
}
EXPORT cudaError_t cudaFree(void *p) {
    READY();
    if (!p) return 0;
    return d.MemFree((CUdeviceptr)(uintptr_t)p);
}
EXPORT cudaError_t cudaMallocAsync(void **p, size_t size, cudaStream_t s) {
    READY();
    if (!p) return 1;
    CUdeviceptr x = 0;
    int rc = d.MemAllocAsync(&x, size, s);
    if (rc == 0) *p = (void *)(uintptr_t)x;
    return rc;
}
EXPORT cudaError_t cudaFreeAsync(void *p, cudaStream_t s) {
    READY();
    return d.MemFreeAsync((CUdeviceptr)(uintptr_t)p, s);
}
EXPORT cudaError_t cudaMallocFromPoolAsync(void **p, size_t size, void *pool, cudaStream_t s) {
    READY();
    if (!p) return 1;
    CUdeviceptr x = 0;
    int rc = d.MemAllocFromPoolAsync(&x, size, pool, s);
    if (rc == 0) *p = (void *)(uintptr_t)x;
    return rc;
}
EXPORT cudaError_t cudaMallocHost(void **p, size_t size) {
    READY();
    return d.MemAllocHost(p, size);
}
EXPORT cudaError_t cudaHostAlloc(void **p, size_t size, unsigned flags) {
    READY();
    return d.MemHostAlloc(p, size, flags);
}
EXPORT cudaError_t cudaFreeHost(void *p) {
    READY();
    if (!p) return 0;
    return d.MemFreeHost(p);
}
EXPORT cudaError_t cudaHostRegister(void *p, size_t size, unsigned flags) {
    READY();
    return d.MemHostRegister(p, size, flags);
}
EXPORT cudaError_t cudaHostUnregister(void *p) {
    READY();
    return d.MemHostUnregister(p);
}
EXPORT cudaError_t cudaMemGetInfo(size_t *free_bytes, size_t *total) {
    READY();
    return d.MemGetInfo(free_bytes, total);
}
EXPORT cudaError_t cudaMallocManaged(void **p, size_t size, unsigned flags) {
    READY();
    if (!p) return 1;
    CUdeviceptr x = 0;
    int rc = d.MemAllocManaged(&x, size, flags);
    if (rc == 0) *p = (void *)(uintptr_t)x;
    return rc;
}
EXPORT cudaError_t cudaMemcpy(void *dst, const void *src, size_t n, int kind) {
    READY();
    if (kind < 0 || kind > 4) return 21; /* cudaErrorInvalidMemcpyDirection */
    return d.Memcpy((CUdeviceptr)(uintptr_t)dst, (CUdeviceptr)(uintptr_t)src, n);
}
EXPORT cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t n, int kind, cudaStream_t s) {
    READY();
    if (kind < 0 || kind > 4) return 21;
    return d.MemcpyAsync((CUdeviceptr)(uintptr_t)dst, (CUdeviceptr)(uintptr_t)src, n, s);
}
EXPORT cudaError_t cudaStreamCreate(cudaStream_t *s) {
    READY();
    return d.StreamCreate(s, 0);
}
EXPORT cudaError_t cudaStreamSynchronize(cudaStream_t s) {
    READY();
    return d.StreamSynchronize(s);
}
EXPORT cudaError_t cudaStreamBeginCapture(cudaStream_t s, int mode) {
    READY();
    return d.StreamBeginCapture(s, mode);
}
EXPORT cudaError_t cudaStreamEndCapture(cudaStream_t s, void **graph) {
    READY();
    return d.StreamEndCapture(s, graph);
}
EXPORT cudaError_t cudaIpcGetMemHandle(void *handle, void *p) {
    READY();
    return d.IpcGetMemHandle(handle, (CUdeviceptr)(uintptr_t)p);
}
EXPORT cudaError_t cudaPointerGetRange(void **base, size_t *size, void *p) {
    /* Not a CUDA call: the range start and size attributes, for the tests. */
    READY();
    CUdeviceptr b = 0;
    int rc = d.PointerGetAttribute(&b, 11, (CUdeviceptr)(uintptr_t)p);
    if (rc) return rc;
    *base = (void *)(uintptr_t)b;
    return d.PointerGetAttribute(size, 12, (CUdeviceptr)(uintptr_t)p);
}
