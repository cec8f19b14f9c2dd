/*
 * CUDA allocations through every way in, for the GPU side of the shim: the runtime
 * (fake libcudart, which reaches the driver through cuGetProcAddress_v2), the driver
 * by symbol (built with -DLINKED and -lcuda), by dlsym and by cuGetProcAddress (both
 * versions, with and without the per-thread flag). Run as `gpu <scenario>`; prints
 * one line per check, the same with and without the shim where the shim must not
 * change what the program sees. Exit 1 on a failed check.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

typedef unsigned long long CUdeviceptr;
typedef int (*gpa_v2_t)(const char *, void **, int, unsigned long long, int *);
typedef int (*gpa_v1_t)(const char *, void **, int, unsigned long long);

/* The runtime (linked). */
int cudaMalloc(void **, size_t);
int cudaFree(void *);
int cudaMallocAsync(void **, size_t, void *);
int cudaFreeAsync(void *, void *);
int cudaMallocFromPoolAsync(void **, size_t, void *, void *);
int cudaMallocHost(void **, size_t);
int cudaHostAlloc(void **, size_t, unsigned);
int cudaFreeHost(void *);
int cudaHostRegister(void *, size_t, unsigned);
int cudaHostUnregister(void *);
int cudaMemGetInfo(size_t *, size_t *);
int cudaMallocManaged(void **, size_t, unsigned);
int cudaMemcpy(void *, const void *, size_t, int);
int cudaMemcpyAsync(void *, const void *, size_t, int, void *);
int cudaStreamCreate(void **);
int cudaStreamSynchronize(void *);
int cudaDeviceSynchronize(void);
int cudaGetDevice(int *);
int cudaSetDevice(int);

#ifdef LINKED
int cuInit(unsigned);
int cuMemAlloc_v2(CUdeviceptr *, size_t);
int cuMemFree_v2(CUdeviceptr);
int cuMemAllocAsync(CUdeviceptr *, size_t, void *);
int cuMemFreeAsync(CUdeviceptr, void *);
int cuMemAllocHost_v2(void **, size_t);
int cuMemHostAlloc(void **, size_t, unsigned);
int cuMemFreeHost(void *);
int cuMemHostRegister_v2(void *, size_t, unsigned);
int cuMemHostUnregister(void *);
int cuMemGetInfo_v2(size_t *, size_t *);
int cuMemCreate(unsigned long long *, size_t, const void *, unsigned long long);
int cuMemRelease(unsigned long long);
#endif

static struct {
    int (*MemAlloc)(CUdeviceptr *, size_t);
    int (*MemFree)(CUdeviceptr);
    int (*MemAllocAsync)(CUdeviceptr *, size_t, void *);
    int (*MemFreeAsync)(CUdeviceptr, void *);
    int (*MemAllocHost)(void **, size_t);
    int (*MemHostAlloc)(void **, size_t, unsigned);
    int (*MemFreeHost)(void *);
    int (*MemHostRegister)(void *, size_t, unsigned);
    int (*MemHostUnregister)(void *);
    int (*MemGetInfo)(size_t *, size_t *);
    int (*MemCreate)(unsigned long long *, size_t, const void *, unsigned long long);
    int (*MemRelease)(unsigned long long);
    int (*StreamBeginCapture)(void *, int);
    int (*StreamEndCapture)(void *, void **);
} d;

static int failures;
#define CHECK(cond, ...)                                                       \
    do {                                                                       \
        if (!(cond)) {                                                         \
            printf("FAIL %s:%d: ", __FILE__, __LINE__);                        \
            printf(__VA_ARGS__);                                               \
            printf("\n");                                                      \
            failures++;                                                        \
        }                                                                      \
    } while (0)
#define CODE(what, expr) printf("%s = %d\n", what, (int)(expr))

static const char *origin(void *f) {
    Dl_info i;
    if (!f || !dladdr(f, &i) || !i.dli_fname) return "?";
    return strstr(i.dli_fname, "hetmem_preload") ? "shim" : "driver";
}

static void *libcuda(void) {
    void *h = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        printf("FAIL dlopen: %s\n", dlerror());
        exit(1);
    }
    return h;
}

#define SYM(h, field, name) memcpy(&d.field, (void *[]){dlsym(h, name)}, sizeof(void *))

static void by_dlsym(void) {
    void *h = libcuda();
    SYM(h, MemAlloc, "cuMemAlloc_v2");
    SYM(h, MemFree, "cuMemFree_v2");
    SYM(h, MemAllocAsync, "cuMemAllocAsync");
    SYM(h, MemFreeAsync, "cuMemFreeAsync");
    SYM(h, MemAllocHost, "cuMemAllocHost_v2");
    SYM(h, MemHostAlloc, "cuMemHostAlloc");
    SYM(h, MemFreeHost, "cuMemFreeHost");
    SYM(h, MemHostRegister, "cuMemHostRegister_v2");
    SYM(h, MemHostUnregister, "cuMemHostUnregister");
    SYM(h, MemGetInfo, "cuMemGetInfo_v2");
    SYM(h, MemCreate, "cuMemCreate");
    SYM(h, MemRelease, "cuMemRelease");
    SYM(h, StreamBeginCapture, "cuStreamBeginCapture_v2");
    SYM(h, StreamEndCapture, "cuStreamEndCapture");
}

static void by_symbol(void) {
#ifdef LINKED
    d.MemAlloc = cuMemAlloc_v2;
    d.MemFree = cuMemFree_v2;
    d.MemAllocAsync = cuMemAllocAsync;
    d.MemFreeAsync = cuMemFreeAsync;
    d.MemAllocHost = cuMemAllocHost_v2;
    d.MemHostAlloc = cuMemHostAlloc;
    d.MemFreeHost = cuMemFreeHost;
    d.MemHostRegister = cuMemHostRegister_v2;
    d.MemHostUnregister = cuMemHostUnregister;
    d.MemGetInfo = cuMemGetInfo_v2;
    d.MemCreate = cuMemCreate;
    d.MemRelease = cuMemRelease;
    void *h = libcuda();
    SYM(h, StreamBeginCapture, "cuStreamBeginCapture_v2");
    SYM(h, StreamEndCapture, "cuStreamEndCapture");
#else
    printf("FAIL built without -DLINKED\n");
    exit(1);
#endif
}

/* Through cuGetProcAddress_v2 (v1: the CUDA 11.3 four-argument one). */
static void by_proc(int v1, unsigned long long flags) {
    void *h = libcuda();
    void *g = dlsym(h, v1 ? "cuGetProcAddress" : "cuGetProcAddress_v2");
    CHECK(g != NULL, "no cuGetProcAddress");
#define P(field, name)                                                                     \
    do {                                                                                   \
        void *f_ = NULL;                                                                   \
        int st_ = -7;                                                                      \
        int rc_ = v1 ? ((gpa_v1_t)g)(name, &f_, 12080, flags) : ((gpa_v2_t)g)(name, &f_, 12080, flags, &st_); \
        CHECK(rc_ == 0 && f_ && (v1 || st_ == 0), "lookup %s: %d %d", name, rc_, st_);    \
        memcpy(&d.field, &f_, sizeof f_);                                                  \
    } while (0)
    P(MemAlloc, "cuMemAlloc");
    P(MemFree, "cuMemFree");
    P(MemAllocAsync, "cuMemAllocAsync");
    P(MemFreeAsync, "cuMemFreeAsync");
    P(MemAllocHost, "cuMemAllocHost");
    P(MemHostAlloc, "cuMemHostAlloc");
    P(MemFreeHost, "cuMemFreeHost");
    P(MemHostRegister, "cuMemHostRegister");
    P(MemHostUnregister, "cuMemHostUnregister");
    P(MemGetInfo, "cuMemGetInfo");
    P(MemCreate, "cuMemCreate");
    P(MemRelease, "cuMemRelease");
    P(StreamBeginCapture, "cuStreamBeginCapture");
    P(StreamEndCapture, "cuStreamEndCapture");
}

/* The runtime makes the context current on this thread. */
static void context(void) {
    int dev = -1;
    CHECK(cudaGetDevice(&dev) == 0 && dev == 0, "cudaGetDevice");
}

static void driver_calls(void) {
    context();
    CUdeviceptr p = 0, q = 0;
    CHECK(d.MemAlloc(&p, 3 << 20) == 0 && p, "cuMemAlloc");
    CHECK(d.MemAllocAsync(&q, 1 << 20, NULL) == 0 && q, "cuMemAllocAsync");
    size_t f = 0, t = 0;
    CHECK(d.MemGetInfo(&f, &t) == 0, "cuMemGetInfo");
    printf("driver info total=%zu free=%zu\n", t, f);
    CHECK(d.MemFreeAsync(q, NULL) == 0, "cuMemFreeAsync");
    CHECK(d.MemFree(p) == 0, "cuMemFree");
    void *hp = NULL, *ha = NULL;
    CHECK(d.MemAllocHost(&hp, 1 << 20) == 0 && hp, "cuMemAllocHost");
    CHECK(d.MemHostAlloc(&ha, 1 << 20, 1) == 0 && ha, "cuMemHostAlloc");
    CHECK(d.MemFreeHost(hp) == 0 && d.MemFreeHost(ha) == 0, "cuMemFreeHost");
    char *buf = aligned_alloc(4096, 1 << 20);
    memset(buf, 1, 1 << 20);
    CHECK(d.MemHostRegister(buf, 1 << 20, 0) == 0, "cuMemHostRegister");
    CHECK(d.MemHostUnregister(buf) == 0, "cuMemHostUnregister");
    free(buf);
    /* CUmemAllocationProp: pinned (1), no handle types, location device 0. */
    int prop[8] = {1, 0, 1, 0, 0, 0, 0, 0};
    unsigned long long hdl = 0;
    CHECK(d.MemCreate(&hdl, 2 << 20, prop, 0) == 0, "cuMemCreate");
    CHECK(d.MemRelease(hdl) == 0, "cuMemRelease");
    printf("driver ok\n");
}

static void runtime_calls(void) {
    void *p = NULL, *q = NULL, *r = NULL, *s = NULL, *m = NULL;
    CHECK(cudaMalloc(&p, 5 << 20) == 0 && p, "cudaMalloc");
    CHECK(cudaStreamCreate(&s) == 0, "cudaStreamCreate");
    CHECK(cudaMallocAsync(&q, 1 << 20, s) == 0 && q, "cudaMallocAsync");
    CHECK(cudaMallocFromPoolAsync(&r, 1 << 20, (void *)16, s) == 0 && r, "cudaMallocFromPoolAsync");
    CHECK(cudaMallocManaged(&m, 1 << 20, 1) == 0 && m, "cudaMallocManaged");
    size_t f = 0, t = 0;
    CHECK(cudaMemGetInfo(&f, &t) == 0, "cudaMemGetInfo");
    printf("runtime info total=%zu free=%zu\n", t, f);
    char *host = malloc(1 << 20), *back = malloc(1 << 20);
    for (int i = 0; i < 1 << 20; i++) host[i] = (char)(i * 7);
    CHECK(cudaMemcpy(p, host, 1 << 20, 1) == 0, "H2D");
    CHECK(cudaMemcpyAsync(back, p, 1 << 20, 2, s) == 0 && cudaStreamSynchronize(s) == 0, "D2H");
    CHECK(memcmp(host, back, 1 << 20) == 0, "bytes back");
    free(host);
    free(back);
    CHECK(cudaFreeAsync(q, s) == 0 && cudaFreeAsync(r, s) == 0, "cudaFreeAsync");
    CHECK(cudaFree(p) == 0 && cudaFree(m) == 0, "cudaFree");
    void *hp = NULL, *ha = NULL;
    CHECK(cudaMallocHost(&hp, 1 << 20) == 0 && cudaHostAlloc(&ha, 1 << 20, 0) == 0, "pinned");
    CHECK(cudaFreeHost(hp) == 0 && cudaFreeHost(ha) == 0, "cudaFreeHost");
    char *buf = aligned_alloc(4096, 1 << 20);
    memset(buf, 1, 1 << 20);
    CHECK(cudaHostRegister(buf, 1 << 20, 0) == 0 && cudaHostUnregister(buf) == 0, "register");
    free(buf);
    printf("runtime ok\n");
}

/* Lookups whose answers the shim must not change (or must change exactly). */
static void proc_lookups(void) {
    void *h = libcuda();
    gpa_v2_t g2 = (gpa_v2_t)dlsym(h, "cuGetProcAddress_v2");
    gpa_v1_t g1 = (gpa_v1_t)dlsym(h, "cuGetProcAddress");
    void *f = NULL;
    int st = -7;
    /* CUDA 3.0's cuMemAlloc (32-bit pointer) below version 3020: never the _v2 wrapper. */
    CODE("old cuMemAlloc", g2("cuMemAlloc", &f, 3000, 0, &st));
    printf("old cuMemAlloc status=%d from=%s\n", st, origin(f));
    struct {
        unsigned v, canary;
    } slot = {0, 0x5A5A5A5Au};
    context();
    int (*old)(unsigned *, unsigned) = (int (*)(unsigned *, unsigned))f;
    CODE("old cuMemAlloc call", old(&slot.v, 4096));
    printf("old slot=%#x canary=%#x\n", slot.v, slot.canary);
    CODE("new cuMemAlloc", g2("cuMemAlloc", &f, 12080, 0, &st));
    printf("new cuMemAlloc status=%d from=%s\n", st, origin(f));
    CODE("ptsz cuMemAllocAsync", g2("cuMemAllocAsync", &f, 12080, 2, &st));
    printf("ptsz from=%s\n", origin(f));
    CUdeviceptr p = 0;
    CHECK(((int (*)(CUdeviceptr *, size_t, void *))f)(&p, 1 << 20, NULL) == 0, "ptsz alloc");
    CHECK(d.MemFree(p) == 0, "ptsz free");
    CODE("unknown", g2("cuNoSuchCall", &f, 12080, 0, &st));
    printf("unknown status=%d\n", st);
    CODE("too new", g2("cuMemAllocAsync", &f, 11000, 0, &st));
    printf("too new status=%d\n", st);
    CODE("not wrapped", g2("cuCtxGetCurrent", &f, 12080, 0, &st));
    printf("not wrapped from=%s same=%d\n", origin(f), f == dlsym(h, "cuCtxGetCurrent"));
    CODE("itself", g1("cuGetProcAddress", &f, 12080, 0));
    printf("itself from=%s\n", origin(f));
    CODE("null pfn", g2("cuMemAlloc", NULL, 12080, 0, &st));
}

static void limit(void) {
    context();
    size_t f = 0, t = 0;
    cudaMemGetInfo(&f, &t);
    printf("start total=%zu free=%zu\n", t, f);
    void *a = NULL, *b = NULL;
    CODE("malloc 48M", cudaMalloc(&a, 48 << 20));
    cudaMemGetInfo(&f, &t);
    printf("held 48M total=%zu free=%zu\n", t, f);
    CODE("malloc 32M", cudaMalloc(&b, 32 << 20));
    CUdeviceptr p = 0;
    CODE("driver 32M", d.MemAlloc(&p, 32 << 20));
    CODE("driver 16M", d.MemAlloc(&p, 16 << 20));
    d.MemGetInfo(&f, &t);
    printf("driver full total=%zu free=%zu\n", t, f);
    int prop[8] = {1, 0, 1, 0, 0, 0, 0, 0};
    unsigned long long hdl = 0;
    CODE("cuMemCreate 2M", d.MemCreate(&hdl, 2 << 20, prop, 0));
    CODE("free driver", d.MemFree(p));
    CODE("cuMemCreate 2M again", d.MemCreate(&hdl, 2 << 20, prop, 0));
    CODE("cuMemRelease", d.MemRelease(hdl));
    CODE("free 48M", cudaFree(a));
    cudaMemGetInfo(&f, &t);
    printf("end total=%zu free=%zu\n", t, f);
}

static void bad(void) {
    context();
    void *p = NULL;
    char host[64];
    CODE("cudaFree foreign", cudaFree(host));
    CODE("cudaMalloc", cudaMalloc(&p, 1 << 20));
    CODE("cudaFree", cudaFree(p));
    CODE("cudaFree twice", cudaFree(p));
    CODE("cudaMalloc NULL out", cudaMalloc(NULL, 1 << 20));
    p = (void *)1;
    CODE("cudaMalloc 0", cudaMalloc(&p, 0));
    printf("cudaMalloc 0 ptr=%p\n", p);
    CODE("cudaMalloc SIZE_MAX", cudaMalloc(&p, SIZE_MAX));
    CODE("cudaMallocAsync SIZE_MAX", cudaMallocAsync(&p, SIZE_MAX, NULL));
    CODE("cudaMallocAsync 0", cudaMallocAsync(&p, 0, NULL));
    CODE("cudaFreeHost foreign", cudaFreeHost(host));
    CODE("cudaHostUnregister foreign", cudaHostUnregister(host));
    CODE("cudaMemGetInfo NULL", cudaMemGetInfo(NULL, NULL));
    CUdeviceptr q = 0;
    CODE("cuMemAlloc NULL out", d.MemAlloc(NULL, 1 << 20));
    CODE("cuMemAlloc 0", d.MemAlloc(&q, 0));
    CODE("cuMemAlloc SIZE_MAX", d.MemAlloc(&q, SIZE_MAX));
    CODE("cuMemAlloc", d.MemAlloc(&q, 1 << 20));
    CODE("cuMemFree", d.MemFree(q));
    CODE("cuMemFree twice", d.MemFree(q));
    CODE("cuMemFree 0", d.MemFree(0));
    CODE("cuMemFree foreign", d.MemFree((CUdeviceptr)(uintptr_t)host));
    CODE("cuMemFreeAsync foreign", d.MemFreeAsync((CUdeviceptr)(uintptr_t)host, NULL));
    CODE("cuMemAllocHost NULL out", d.MemAllocHost(NULL, 4096));
    CODE("cuMemAllocHost 0", d.MemAllocHost(&p, 0));
    CODE("cuMemFreeHost foreign", d.MemFreeHost(host));
    CODE("cuMemHostRegister NULL", d.MemHostRegister(NULL, 4096, 0));
    CODE("cuMemHostUnregister foreign", d.MemHostUnregister(host));
    CODE("cuMemGetInfo NULL", d.MemGetInfo(NULL, NULL));
    CODE("cuMemRelease bogus", d.MemRelease(12345));
    CODE("cuMemCreate NULL prop", d.MemCreate((unsigned long long *)&q, 2 << 20, NULL, 0));
}

static void *worker(void *arg) {
    (void)arg;
    context();
    for (int i = 0; i < 200; i++) {
        void *p = NULL;
        CUdeviceptr q = 0;
        CHECK(cudaMalloc(&p, 4096 + i) == 0, "thread cudaMalloc");
        CHECK(d.MemAlloc(&q, 8192) == 0, "thread cuMemAlloc");
        CHECK(cudaFree(p) == 0 && d.MemFree(q) == 0, "thread free");
    }
    return NULL;
}

static void threads(void) {
    pthread_t t[8];
    for (int i = 0; i < 8; i++) pthread_create(&t[i], NULL, worker, NULL);
    for (int i = 0; i < 8; i++) pthread_join(t[i], NULL);
    printf("threads ok\n");
}

static void forks(void) {
    context();
    void *p = NULL;
    CHECK(cudaMalloc(&p, 1 << 20) == 0, "parent malloc");
    pid_t pid = fork();
    if (pid == 0) {
        void *q = NULL;
        int ok = cudaMalloc(&q, 1 << 20) == 0 && cudaFree(q) == 0;
        _exit(ok ? 0 : 3);
    }
    int st = 0;
    waitpid(pid, &st, 0);
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0, "child status %d", st);
    CHECK(cudaFree(p) == 0, "parent free");
    printf("fork ok\n");
}

static void capture(void) {
    context();
    void *s = NULL;
    CHECK(cudaStreamCreate(&s) == 0, "stream");
    CHECK(d.StreamBeginCapture(s, 0) == 0, "begin capture");
    CUdeviceptr p = 0;
    CODE("captured alloc", d.MemAllocAsync(&p, 1 << 20, s));
    CODE("captured free", d.MemFreeAsync(p, s));
    void *g = NULL;
    CODE("end capture", d.StreamEndCapture(s, &g));
}

static void oversubscribe(void) {
    context();
    void *a = NULL, *b = NULL;
    CODE("malloc 48M", cudaMalloc(&a, 48 << 20));
    CODE("malloc 48M past the limit", cudaMalloc(&b, 48 << 20));
    CUdeviceptr c = 0;
    CODE("driver 48M past the limit", d.MemAlloc(&c, 48 << 20));
    char *host = malloc(1 << 20), *back = malloc(1 << 20);
    for (int i = 0; i < 1 << 20; i++) host[i] = (char)(i * 13);
    CHECK(cudaMemcpy(b, host, 1 << 20, 1) == 0 && cudaMemcpy(back, b, 1 << 20, 2) == 0, "copies");
    CHECK(memcmp(host, back, 1 << 20) == 0, "bytes back");
    void *e = NULL;
    CUdeviceptr g = 0;
    CODE("async 48M past the limit", cudaMallocAsync(&e, 48 << 20, NULL));
    CODE("driver async 48M past the limit", d.MemAllocAsync(&g, 48 << 20, NULL));
    CODE("async frees", cudaFreeAsync(e, NULL) | d.MemFreeAsync(g, NULL));
    CODE("free", cudaFree(a) | cudaFree(b) | d.MemFree(c));
}

static void pin(void) {
    context();
    size_t n = 16 << 20;
    char *host = malloc(n), *back = malloc(n);
    void *dev = NULL;
    for (size_t i = 0; i < n; i++) host[i] = (char)(i * 3);
    CHECK(cudaMalloc(&dev, n) == 0, "malloc");
    for (int k = 0; k < 3; k++) CHECK(cudaMemcpy(dev, host, n, 1) == 0, "H2D");
    CHECK(cudaMemcpy(back, dev, n, 2) == 0, "D2H");
    CHECK(memcmp(host, back, n) == 0, "bytes back");
    /* A pinned block that grows (and may move) is unregistered first: registering it
     * again works. */
    host = realloc(host, 2 * n);
    CODE("register after realloc", cudaHostRegister(host, 2 * n, 0));
    CODE("unregister after realloc", cudaHostUnregister(host));
    free(host);
    free(back);
    /* The freed block is unregistered: registering a new block there works. */
    char *again = malloc(n);
    memset(again, 0, n);
    CODE("register after free", cudaHostRegister(again, n, 0));
    CODE("unregister", cudaHostUnregister(again));
    free(again);
    CODE("free", cudaFree(dev));
}

int cudaIpcGetMemHandle(void *, void *);
int cudaPointerGetRange(void **, size_t *, void *);

/* What a program does with its pointers: ranges, attributes, IPC, copies, frees. */
static void pooled(void) {
    context();
    void *p = NULL, *q = NULL, *s = NULL, *hp = NULL;
    CUdeviceptr r = 0;
    CHECK(cudaStreamCreate(&s) == 0, "stream");
    CODE("cudaMalloc 3M", cudaMalloc(&p, 3 << 20));
    CODE("cudaMallocAsync 1M", cudaMallocAsync(&q, 1 << 20, s));
    CODE("cuMemAlloc 1M", d.MemAlloc(&r, 1 << 20));
    CHECK(p && q && r && p != q && (CUdeviceptr)(uintptr_t)p != r, "distinct pointers");
    size_t n = 1 << 20;
    char *host = malloc(n), *back = malloc(n);
    for (size_t i = 0; i < n; i++) host[i] = (char)(i * 5 + 1);
    CHECK(cudaMemcpy((char *)p + n, host, n, 1) == 0, "H2D");
    CHECK(cudaMemcpyAsync(q, (char *)p + n, n, 3, s) == 0 && cudaStreamSynchronize(s) == 0, "D2D");
    CHECK(cudaMemcpy(back, q, n, 2) == 0, "D2H");
    CHECK(memcmp(host, back, n) == 0, "bytes through the pool");
    free(host);
    free(back);
    void *h = libcuda();
    int (*range)(CUdeviceptr *, size_t *, CUdeviceptr) =
        (int (*)(CUdeviceptr *, size_t *, CUdeviceptr))dlsym(h, "cuMemGetAddressRange_v2");
    CUdeviceptr base = 0;
    size_t size = 0;
    CODE("range", range(&base, &size, (CUdeviceptr)(uintptr_t)p + 100));
    printf("range base=%s size=%zu\n", base == (CUdeviceptr)(uintptr_t)p ? "start" : "other", size);
    void *b2 = NULL;
    size = 0;
    CODE("attribute range", cudaPointerGetRange(&b2, &size, (char *)q + 5));
    printf("attribute base=%s size=%zu\n", b2 == q ? "start" : "other", size);
    int (*attrs)(unsigned, int *, void **, CUdeviceptr) =
        (int (*)(unsigned, int *, void **, CUdeviceptr))dlsym(h, "cuPointerGetAttributes");
    int which[3] = {11, 9, 12};
    CUdeviceptr start = 0;
    int ordinal = -1;
    size_t len = 0;
    void *outs[3] = {&start, &ordinal, &len};
    CODE("attributes", attrs(3, which, outs, (CUdeviceptr)(uintptr_t)p + 4096));
    printf("attributes base=%s device=%d size=%zu\n", start == (CUdeviceptr)(uintptr_t)p ? "start" : "other",
           ordinal, len);
    char ipc[64];
    CODE("ipc", cudaIpcGetMemHandle(ipc, p));
    CODE("cudaFreeAsync", cudaFreeAsync(q, s));
    CODE("cudaFree", cudaFree(p));
    CODE("cudaFree twice", cudaFree(p));
    CODE("cuMemFree", d.MemFree(r));
    CODE("cudaMallocHost", cudaMallocHost(&hp, 1 << 20));
    memset(hp, 7, 1 << 20);
    CODE("cudaFreeHost", cudaFreeHost(hp));
    CODE("cudaFreeHost twice", cudaFreeHost(hp));
    CHECK(cudaStreamSynchronize(s) == 0, "sync");
}

/* Per-device limits: device 1 has its own. */
static void devices(void) {
    void *a = NULL, *b = NULL;
    size_t f = 0, t = 0;
    CODE("set 1", cudaSetDevice(1));
    cudaMemGetInfo(&f, &t);
    printf("device 1 total=%zu free=%zu\n", t, f);
    CODE("device 1 malloc 48M", cudaMalloc(&a, 48 << 20));
    CODE("device 1 malloc 16M", cudaMalloc(&a, 16 << 20));
    CUdeviceptr c = 0;
    CODE("device 1 driver 32M", d.MemAlloc(&c, 32 << 20));
    CODE("set 0", cudaSetDevice(0));
    cudaMemGetInfo(&f, &t);
    printf("device 0 total=%zu free=%zu\n", t, f);
    CODE("device 0 malloc 48M", cudaMalloc(&b, 48 << 20));
    CODE("free on device 0 of device 1's", cudaFree(a));
    CODE("free", cudaFree(b));
    CODE("set 1 again", cudaSetDevice(1));
    cudaMemGetInfo(&f, &t);
    printf("device 1 total=%zu free=%zu\n", t, f);
}

/* A limit shared with another process (a forked child here). */
static void shared_child(const char *what) {
    pid_t pid = fork();
    if (pid == 0) {
        void *b = NULL, *c = NULL;
        size_t f = 0, t = 0;
        printf("%s: child 32M = %d\n", what, cudaMalloc(&b, 32 << 20));
        printf("%s: child 8M = %d\n", what, cudaMalloc(&c, 8 << 20));
        cudaMemGetInfo(&f, &t);
        printf("%s: child total=%zu free=%zu\n", what, t, f);
        _exit(0);
    }
    int st = 0;
    waitpid(pid, &st, 0);
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0, "child status %d", st);
}

static void shared_limit(void) {
    context();
    void *a = NULL;
    CODE("parent 48M", cudaMalloc(&a, 48 << 20));
    shared_child("parent holds 48M");
    CODE("parent free", cudaFree(a));
    shared_child("parent holds nothing");
}

static void nocuda(void) {
    char *p = malloc(8 << 20);
    memset(p, 1, 8 << 20);
    free(p);
    FILE *f = fopen("/proc/self/maps", "r");
    char line[512];
    int cuda = 0;
    while (fgets(line, sizeof line, f))
        if (strstr(line, "libcuda.so")) cuda = 1; /* the driver, not libcudart */
    fclose(f);
    printf("driver mapped=%d\n", cuda);
}

/* dlsym(RTLD_NEXT) from the program: the first definition after it, as without the
 * interposed dlsym (under the shim that is the shim's own malloc and wrappers). */
static void next(void) {
    const char *names[] = {"malloc", "puts", "cuMemAlloc_v2", "cudaMalloc", "dlopen"};
    for (int i = 0; i < 5; i++) {
        void *n = dlsym(RTLD_NEXT, names[i]), *f = dlsym(RTLD_DEFAULT, names[i]);
        printf("next %s found=%d same=%d\n", names[i], n != NULL, n == f);
    }
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IONBF, 0);
    const char *s = argc > 1 ? argv[1] : "";
    if (!strcmp(s, "next")) {
        next();
        return 0;
    }
    const char *path = argc > 2 ? argv[2] : "dlsym";
    if (!strcmp(s, "nocuda")) {
        nocuda();
        return 0;
    }
    if (!strcmp(path, "symbol")) by_symbol();
    else if (!strcmp(path, "proc")) by_proc(0, 0);
    else if (!strcmp(path, "proc1")) by_proc(1, 0);
    else if (!strcmp(path, "proc-ptsz")) by_proc(0, 2);
    else by_dlsym();
    if (!strcmp(s, "driver")) driver_calls();
    else if (!strcmp(s, "runtime")) runtime_calls();
    else if (!strcmp(s, "lookups")) proc_lookups();
    else if (!strcmp(s, "limit")) limit();
    else if (!strcmp(s, "bad")) bad();
    else if (!strcmp(s, "threads")) threads();
    else if (!strcmp(s, "fork")) forks();
    else if (!strcmp(s, "capture")) capture();
    else if (!strcmp(s, "oversubscribe")) oversubscribe();
    else if (!strcmp(s, "pin")) pin();
    else if (!strcmp(s, "pool")) pooled();
    else if (!strcmp(s, "devices")) devices();
    else if (!strcmp(s, "shared")) shared_limit();
    else {
        printf("FAIL unknown scenario %s\n", s);
        return 1;
    }
    return failures ? 1 : 0;
}
