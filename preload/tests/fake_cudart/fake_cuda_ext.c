/*
 * The fake CUDA driver of hetmem's tests (tests/fake_cuda/fake_cuda.c, included whole
 * and unchanged) plus the entry points the GPU side of the LD_PRELOAD shim interposes
 * and fake_cuda.c lacks, with the signatures and codes of CUDA 12.x cuda.h:
 *
 *   - cuGetProcAddress (CUDA 11.3: 4 arguments) and cuGetProcAddress_v2 (CUDA 12: a 5th,
 *     CUdriverProcAddressQueryResult *symbolStatus), resolving a base name ("cuMemAlloc")
 *     by the version asked, as the driver does: "cuMemAlloc" at cudaVersion >= 3020 is
 *     cuMemAlloc_v2, below it the CUDA 3.0 cuMemAlloc (32-bit pointer and size); with
 *     CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM the _ptsz variant where there is one.
 *     An unknown name: CUDA_ERROR_NOT_FOUND and CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND; a
 *     known name asked for a version older than it: CUDA_ERROR_NOT_FOUND and
 *     CU_GET_PROC_ADDRESS_VERSION_NOT_SUFFICIENT. Built with -Bsymbolic, so the
 *     pointers it hands out are its own functions (as the real driver's are), never an
 *     interposer's.
 *   - Stream-ordered allocation: cuMemAllocAsync / cuMemFreeAsync /
 *     cuMemAllocFromPoolAsync (and _ptsz): device memory as cuMemAlloc_v2 (charged at
 *     once; freeing runs the stream's queue first). A NULL pool is CUDA_ERROR_INVALID_VALUE.
 *   - cuMemHostAlloc (flags PORTABLE 1, DEVICEMAP 2, WRITECOMBINED 4), cuMemGetAddressRange_v2,
 *     cuPointerGetAttribute (CONTEXT 1, MEMORY_TYPE 2, DEVICE_POINTER 3, HOST_POINTER 4,
 *     RANGE_START_ADDR 11, RANGE_SIZE 12, IS_MANAGED 8, DEVICE_ORDINAL 9; for VMM memory the
 *     mapping's device and range), cuPointerGetAttributes
 *     (each in turn), cuMemcpy (synchronous,
 *     legacy stream), cuIpcGetMemHandle (the allocation's base must be named).
 *   - fakeCudaUsed(device): bytes charged to a device, for the tests.
 */
#include "../../../tests/fake_cuda/fake_cuda.c"

typedef CUresult (*fake_fn)(void);

EXPORT long long fakeCudaUsed(int device) {
    pthread_mutex_lock(&g_lock);
    long long u = valid_device(device) ? (long long)g_used[device] : -1;
    pthread_mutex_unlock(&g_lock);
    return u;
}

/* The CUDA 3.0 cuMemAlloc: a 32-bit device pointer. The fake's addresses do not fit,
 * so it answers CUDA_ERROR_OUT_OF_MEMORY unless the size is 0 (CUDA_ERROR_INVALID_VALUE),
 * and writes 0x1234 to *dptr on success... never reached; what matters is that it writes
 * 4 bytes, not 8. */
EXPORT CUresult cuMemAlloc(unsigned int *dptr, unsigned int bytesize) {
    ENTER("cuMemAlloc");
    REQUIRE_CTX();
    if (!dptr || bytesize == 0) RETURN(CUDA_ERROR_INVALID_VALUE);
    *dptr = 0xC0DEu; /* 4 bytes: a caller that passed a 32-bit slot keeps its neighbours */
    RETURN(CUDA_SUCCESS);
}

static CUresult alloc_async(CUdeviceptr *dptr, size_t size, CUstream s, const char *name) {
    ENTER(name);
    struct ctx *c;
    NEED_CTX(c);
    struct object *o;
    CUresult rc = resolve_stream(s, c, &o);
    if (rc) RETURN(rc);
    RETURN(do_alloc(dptr, size, MEM_DEVICE, c));
}

static CUresult free_async(CUdeviceptr d, CUstream s, const char *name) {
    ENTER(name);
    struct ctx *c;
    NEED_CTX(c);
    struct object *o;
    CUresult rc = resolve_stream(s, c, &o);
    if (rc) RETURN(rc);
    RETURN(free_kind((const char *)(uintptr_t)d, MEM_DEVICE, MEM_DEVICE));
}

EXPORT CUresult cuMemAllocAsync(CUdeviceptr *dptr, size_t size, CUstream s) {
    return alloc_async(dptr, size, s, "cuMemAllocAsync");
}
EXPORT CUresult cuMemAllocAsync_ptsz(CUdeviceptr *dptr, size_t size, CUstream s) {
    return alloc_async(dptr, size, s, "cuMemAllocAsync_ptsz");
}
EXPORT CUresult cuMemFreeAsync(CUdeviceptr d, CUstream s) { return free_async(d, s, "cuMemFreeAsync"); }
EXPORT CUresult cuMemFreeAsync_ptsz(CUdeviceptr d, CUstream s) { return free_async(d, s, "cuMemFreeAsync_ptsz"); }
EXPORT CUresult cuMemAllocFromPoolAsync(CUdeviceptr *dptr, size_t size, void *pool, CUstream s) {
    if (!pool) return CUDA_ERROR_INVALID_VALUE;
    return alloc_async(dptr, size, s, "cuMemAllocFromPoolAsync");
}
EXPORT CUresult cuMemAllocFromPoolAsync_ptsz(CUdeviceptr *dptr, size_t size, void *pool, CUstream s) {
    if (!pool) return CUDA_ERROR_INVALID_VALUE;
    return alloc_async(dptr, size, s, "cuMemAllocFromPoolAsync_ptsz");
}

EXPORT CUresult cuMemHostAlloc(void **pp, size_t bytesize, unsigned int flags) {
    ENTER("cuMemHostAlloc");
    struct ctx *c;
    NEED_CTX(c);
    if (!pp || (flags & ~7u)) RETURN(CUDA_ERROR_INVALID_VALUE);
    CUdeviceptr d = 0;
    CUresult rc = do_alloc(&d, bytesize, MEM_HOST, c);
    if (rc == CUDA_SUCCESS) *pp = (void *)(uintptr_t)d;
    RETURN(rc);
}

static struct alloc *containing(const char *p) {
    for (size_t i = 0; i < g_nallocs; i++)
        if (p >= g_allocs[i].ptr && p < g_allocs[i].ptr + g_allocs[i].size) return &g_allocs[i];
    return NULL;
}

EXPORT CUresult cuMemGetAddressRange_v2(CUdeviceptr *base, size_t *size, CUdeviceptr d) {
    ENTER("cuMemGetAddressRange_v2");
    REQUIRE_CTX();
    struct alloc *a = containing((const char *)(uintptr_t)d);
    if (!a || a->kind == MEM_HOST) RETURN(CUDA_ERROR_NOT_FOUND);
    if (base) *base = (CUdeviceptr)(uintptr_t)a->ptr;
    if (size) *size = a->size;
    RETURN(CUDA_SUCCESS);
}

EXPORT CUresult cuPointerGetAttribute(void *data, int attribute, CUdeviceptr d) {
    ENTER("cuPointerGetAttribute");
    if (!data) RETURN(CUDA_ERROR_INVALID_VALUE);
    struct alloc *a = containing((const char *)(uintptr_t)d);
    if (!a) {
        /* VMM memory: the mapping's device; the range is the mapping. */
        const char *p = (const char *)(uintptr_t)d;
        for (size_t i = 0; i < g_nmaps; i++) {
            struct mapping *m = &g_maps[i];
            if (p < m->ptr || p >= m->ptr + m->size) continue;
            switch (attribute) {
            case 2: *(unsigned *)data = 2u; break;
            case 3: *(CUdeviceptr *)data = d; break;
            case 8: *(int *)data = 0; break;
            case 9: *(int *)data = m->phys->device; break;
            case 11: *(CUdeviceptr *)data = (CUdeviceptr)(uintptr_t)m->ptr; break;
            case 12: *(size_t *)data = m->size; break;
            default: RETURN(CUDA_ERROR_INVALID_VALUE);
            }
            RETURN(CUDA_SUCCESS);
        }
        RETURN(CUDA_ERROR_INVALID_VALUE);
    }
    switch (attribute) {
    case 1: *(CUcontext *)data = (CUcontext)(void *)a->ctx; break;
    case 2: *(unsigned *)data = a->kind == MEM_HOST ? 1u : 2u; break; /* HOST 1, DEVICE 2 */
    case 3: *(CUdeviceptr *)data = d; break;
    case 4: *(void **)data = (void *)(uintptr_t)d; break;
    case 8: *(int *)data = a->kind == MEM_MANAGED; break;
    case 9: *(int *)data = a->device; break;
    case 11: *(CUdeviceptr *)data = (CUdeviceptr)(uintptr_t)a->ptr; break;
    case 12: *(size_t *)data = a->size; break;
    default: RETURN(CUDA_ERROR_INVALID_VALUE);
    }
    RETURN(CUDA_SUCCESS);
}

/* cuPointerGetAttributes: each attribute as cuPointerGetAttribute; an attribute the
 * pointer has not is left unchanged (the fake answers only known allocations). */
EXPORT CUresult cuPointerGetAttributes(unsigned int n, int *attributes, void **data, CUdeviceptr d) {
    if (!attributes || !data) return CUDA_ERROR_INVALID_VALUE;
    for (unsigned i = 0; i < n; i++) {
        CUresult rc = cuPointerGetAttribute(data[i], attributes[i], d);
        if (rc) return rc;
    }
    return CUDA_SUCCESS;
}

/* Synchronous copy on the legacy stream. */
EXPORT CUresult cuMemcpy(CUdeviceptr dst, CUdeviceptr src, size_t n) {
    CUresult rc = cuMemcpyAsync(dst, src, n, NULL);
    if (rc) return rc;
    return cuStreamSynchronize(NULL);
}

typedef struct { char reserved[64]; } CUipcMemHandle;
EXPORT CUresult cuIpcGetMemHandle(CUipcMemHandle *h, CUdeviceptr d) {
    ENTER("cuIpcGetMemHandle");
    REQUIRE_CTX();
    if (!h) RETURN(CUDA_ERROR_INVALID_VALUE);
    struct alloc *a = containing((const char *)(uintptr_t)d);
    if (!a || a->kind != MEM_DEVICE) RETURN(CUDA_ERROR_INVALID_VALUE);
    memset(h, 0, sizeof *h);
    memcpy(h->reserved, &a->ptr, sizeof a->ptr);
    RETURN(CUDA_SUCCESS);
}

/* ------------------------------------------------------------- cuGetProcAddress */

struct proc {
    const char *name; /* base name */
    int since;        /* oldest cudaVersion that has it */
    void *fn;         /* below `v2_since`; NULL: none */
    int v2_since;     /* from this version on: v2 */
    void *v2;
    void *ptsz;       /* with CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM */
};

#define F(x) ((void *)(x))
static const struct proc g_procs[] = {
    {"cuInit", 2000, F(cuInit), 0, NULL, NULL},
    {"cuGetErrorString", 6000, F(cuGetErrorString), 0, NULL, NULL},
    {"cuDeviceGet", 2000, F(cuDeviceGet), 0, NULL, NULL},
    {"cuDeviceGetCount", 2000, F(cuDeviceGetCount), 0, NULL, NULL},
    {"cuDeviceTotalMem", 2000, NULL, 3020, F(cuDeviceTotalMem_v2), NULL},
    {"cuDevicePrimaryCtxRetain", 7000, F(cuDevicePrimaryCtxRetain), 0, NULL, NULL},
    {"cuDevicePrimaryCtxRelease", 7000, NULL, 11000, F(cuDevicePrimaryCtxRelease_v2), NULL},
    {"cuCtxGetCurrent", 4000, F(cuCtxGetCurrent), 0, NULL, NULL},
    {"cuCtxSetCurrent", 4000, F(cuCtxSetCurrent), 0, NULL, NULL},
    {"cuCtxGetDevice", 2000, F(cuCtxGetDevice), 0, NULL, NULL},
    {"cuCtxSynchronize", 2000, F(cuCtxSynchronize), 0, NULL, NULL},
    {"cuMemGetInfo", 2000, NULL, 3020, F(cuMemGetInfo_v2), NULL},
    {"cuMemAlloc", 2000, F(cuMemAlloc), 3020, F(cuMemAlloc_v2), NULL},
    {"cuMemFree", 2000, NULL, 3020, F(cuMemFree_v2), NULL},
    {"cuMemAllocManaged", 6000, F(cuMemAllocManaged), 0, NULL, NULL},
    {"cuMemAllocHost", 2000, NULL, 3020, F(cuMemAllocHost_v2), NULL},
    {"cuMemHostAlloc", 2020, F(cuMemHostAlloc), 0, NULL, NULL},
    {"cuMemFreeHost", 2000, F(cuMemFreeHost), 0, NULL, NULL},
    {"cuMemHostRegister", 4000, NULL, 6050, F(cuMemHostRegister_v2), NULL},
    {"cuMemHostUnregister", 4000, F(cuMemHostUnregister), 0, NULL, NULL},
    {"cuMemAllocAsync", 11020, F(cuMemAllocAsync), 0, NULL, F(cuMemAllocAsync_ptsz)},
    {"cuMemFreeAsync", 11020, F(cuMemFreeAsync), 0, NULL, F(cuMemFreeAsync_ptsz)},
    {"cuMemAllocFromPoolAsync", 11020, F(cuMemAllocFromPoolAsync), 0, NULL, F(cuMemAllocFromPoolAsync_ptsz)},
    {"cuMemGetAddressRange", 2000, NULL, 3020, F(cuMemGetAddressRange_v2), NULL},
    {"cuPointerGetAttribute", 4000, F(cuPointerGetAttribute), 0, NULL, NULL},
    {"cuPointerGetAttributes", 7000, F(cuPointerGetAttributes), 0, NULL, NULL},
    {"cuMemcpy", 4000, F(cuMemcpy), 0, NULL, NULL},
    {"cuMemcpyAsync", 4000, F(cuMemcpyAsync), 0, NULL, NULL},
    {"cuStreamCreate", 2000, F(cuStreamCreate), 0, NULL, NULL},
    {"cuStreamDestroy", 4000, NULL, 4000, F(cuStreamDestroy_v2), NULL},
    {"cuStreamSynchronize", 2000, F(cuStreamSynchronize), 0, NULL, NULL},
    {"cuStreamBeginCapture", 10000, NULL, 10010, F(cuStreamBeginCapture_v2), NULL},
    {"cuStreamEndCapture", 10000, F(cuStreamEndCapture), 0, NULL, NULL},
    {"cuStreamIsCapturing", 10000, F(cuStreamIsCapturing), 0, NULL, NULL},
    {"cuGraphDestroy", 10000, F(cuGraphDestroy), 0, NULL, NULL},
    {"cuMemCreate", 10020, F(cuMemCreate), 0, NULL, NULL},
    {"cuMemRelease", 10020, F(cuMemRelease), 0, NULL, NULL},
    {"cuMemAdvise", 8000, NULL, 12020, F(cuMemAdvise_v2), NULL},
    {"cuMemPrefetchAsync", 8000, NULL, 12020, F(cuMemPrefetchAsync_v2), NULL},
    {"cuIpcGetMemHandle", 4010, F(cuIpcGetMemHandle), 0, NULL, NULL},
    {"cuGetProcAddress", 11030, NULL, 12000, NULL, NULL}, /* filled in below */
};

static long long g_proc_lookups;
EXPORT CUresult cuGetProcAddress(const char *symbol, void **pfn, int cudaVersion, unsigned long long flags);
EXPORT CUresult cuGetProcAddress_v2(const char *symbol, void **pfn, int cudaVersion, unsigned long long flags,
                                    int *symbolStatus);

static CUresult get_proc(const char *symbol, void **pfn, int version, unsigned long long flags, int *status) {
    /* CUDA 12: CU_GET_PROC_ADDRESS_SUCCESS 0, SYMBOL_NOT_FOUND 1, VERSION_NOT_SUFFICIENT 2 */
    if (!symbol || !pfn || (flags & ~(unsigned long long)3)) return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&g_lock);
    g_proc_lookups++;
    pthread_mutex_unlock(&g_lock);
    *pfn = NULL;
    for (size_t i = 0; i < sizeof g_procs / sizeof g_procs[0]; i++) {
        const struct proc *p = &g_procs[i];
        if (strcmp(p->name, symbol) != 0) continue;
        if (version < p->since) {
            if (status) *status = 2;
            return CUDA_ERROR_NOT_FOUND;
        }
        void *f;
        if (strcmp(symbol, "cuGetProcAddress") == 0)
            f = version >= 12000 ? F(cuGetProcAddress_v2) : F(cuGetProcAddress);
        else if ((flags & 2) && p->ptsz)
            f = p->ptsz;
        else if (p->v2 && version >= p->v2_since)
            f = p->v2;
        else
            f = p->fn;
        if (!f) {
            if (status) *status = 2;
            return CUDA_ERROR_NOT_FOUND;
        }
        *pfn = f;
        if (status) *status = 0;
        return CUDA_SUCCESS;
    }
    if (status) *status = 1;
    return CUDA_ERROR_NOT_FOUND;
}

EXPORT CUresult cuGetProcAddress(const char *symbol, void **pfn, int cudaVersion, unsigned long long flags) {
    return get_proc(symbol, pfn, cudaVersion, flags, NULL);
}

EXPORT CUresult cuGetProcAddress_v2(const char *symbol, void **pfn, int cudaVersion, unsigned long long flags,
                                    int *symbolStatus) {
    return get_proc(symbol, pfn, cudaVersion, flags, symbolStatus);
}

EXPORT long long fakeCudaProcLookups(void) {
    pthread_mutex_lock(&g_lock);
    long long n = g_proc_lookups;
    pthread_mutex_unlock(&g_lock);
    return n;
}
