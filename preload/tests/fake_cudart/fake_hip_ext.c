/*
 * The fake HIP runtime of hetmem's tests (tests/fake_hip/fake_hip.c, included whole and
 * unchanged) plus what the GPU side of the LD_PRELOAD shim interposes and it lacks:
 * hipGetDevice, hipMallocAsync / hipFreeAsync (device memory as hipMalloc; the stream
 * must be valid), hipHostMalloc / hipHostFree (page-locked host memory, counted apart
 * from the devices; hipHostFree of anything else is hipErrorInvalidValue) and
 * hipGetProcAddress (ROCm 6.2: symbol, pfn, hipVersion, flags, symbolStatus; the
 * exported function of that name, hipErrorNotFound (500) and status 1 for an unknown
 * one). Built with -Bsymbolic: the pointers it hands out are its own.
 */
#include "../../../tests/fake_hip/fake_hip.c"

EXPORT hipError_t hipGetDevice(int *device) {
    ENTER("hipGetDevice");
    if (!device) RETURN(hipErrorInvalidValue);
    *device = t_current;
    RETURN(hipSuccess);
}

EXPORT hipError_t hipMallocAsync(void **ptr, size_t size, hipStream_t stream) {
    ENTER("hipMallocAsync");
    struct object *s;
    hipError_t rc = resolve_stream(stream, &s);
    if (rc) RETURN(rc);
    RETURN(do_alloc(ptr, size, 0));
}

EXPORT hipError_t hipFreeAsync(void *ptr, hipStream_t stream) {
    struct object *s;
    pthread_mutex_lock(&g_lock);
    hipError_t rc = resolve_stream(stream, &s);
    pthread_mutex_unlock(&g_lock);
    if (rc) return rc;
    if (!ptr) return hipErrorInvalidValue;
    return hipFree(ptr);
}

static void **g_host;
static size_t g_nhost, g_cap_host;

EXPORT hipError_t hipHostMalloc(void **ptr, size_t size, unsigned int flags) {
    ENTER("hipHostMalloc");
    (void)flags;
    if (!ptr) RETURN(hipErrorInvalidValue);
    if (size == 0) {
        *ptr = NULL;
        RETURN(hipSuccess);
    }
    void **n = grow(g_host, &g_cap_host, g_nhost + 1, sizeof *g_host);
    if (!n) RETURN(hipErrorOutOfMemory);
    g_host = n;
    void *p = NULL;
    if (posix_memalign(&p, 4096, size) != 0) RETURN(hipErrorOutOfMemory);
    g_host[g_nhost++] = p;
    *ptr = p;
    RETURN(hipSuccess);
}

EXPORT hipError_t hipHostFree(void *ptr) {
    ENTER("hipHostFree");
    if (!ptr) RETURN(hipSuccess);
    for (size_t i = 0; i < g_nhost; i++) {
        if (g_host[i] == ptr) {
            free(ptr);
            g_host[i] = g_host[--g_nhost];
            RETURN(hipSuccess);
        }
    }
    RETURN(hipErrorInvalidValue);
}

EXPORT hipError_t hipGetProcAddress(const char *symbol, void **pfn, int hipVersion, unsigned long long flags,
                                    int *symbolStatus) {
    (void)hipVersion;
    (void)flags;
    if (!symbol || !pfn) return hipErrorInvalidValue;
    static const struct {
        const char *name;
        void *fn;
    } table[] = {
        {"hipMalloc", (void *)hipMalloc},         {"hipFree", (void *)hipFree},
        {"hipMallocAsync", (void *)hipMallocAsync}, {"hipFreeAsync", (void *)hipFreeAsync},
        {"hipHostMalloc", (void *)hipHostMalloc}, {"hipHostFree", (void *)hipHostFree},
        {"hipMemGetInfo", (void *)hipMemGetInfo}, {"hipSetDevice", (void *)hipSetDevice},
        {"hipGetDevice", (void *)hipGetDevice},   {"hipGetProcAddress", (void *)hipGetProcAddress},
    };
    for (size_t i = 0; i < sizeof table / sizeof table[0]; i++) {
        if (!strcmp(table[i].name, symbol)) {
            *pfn = table[i].fn;
            if (symbolStatus) *symbolStatus = 0;
            return hipSuccess;
        }
    }
    *pfn = NULL;
    if (symbolStatus) *symbolStatus = 1;
    return (hipError_t)500;
}
