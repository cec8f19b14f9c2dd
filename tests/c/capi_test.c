/*
 * Exercises the whole C ABI of libhetmem.so, bad input included. Built and run by
 * tests/it/capi.rs (normally with HETMEM_BACKEND=sim). Every check prints one line
 * ("ok" or "FAIL"); the exit status is 1 if any check failed.
 *
 * Usage: capi_test <scratch directory>
 */
#include "hetmem.h"

#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

static int checks = 0;
static int failures = 0;

#define CHECK(cond, ...)                                                        \
    do {                                                                        \
        checks++;                                                               \
        if (cond) {                                                             \
            printf("ok   ");                                                    \
        } else {                                                                \
            failures++;                                                         \
            printf("FAIL [%s:%d] ", __FILE__, __LINE__);                        \
        }                                                                       \
        printf(__VA_ARGS__);                                                    \
        printf("\n");                                                           \
    } while (0)

/* Runs `call` and checks its status is `code`. */
#define EXPECT(call, code)                                                      \
    do {                                                                        \
        int rc_ = (call);                                                       \
        checks++;                                                               \
        if (rc_ == (code)) {                                                    \
            printf("ok   %-70s -> %s\n", #call, hetmem_status_string(rc_));     \
        } else {                                                                \
            failures++;                                                         \
            printf("FAIL [%s:%d] %s -> %s (%d), expected %s; last error: %s\n", \
                   __FILE__, __LINE__, #call, hetmem_status_string(rc_), rc_,   \
                   hetmem_status_string(code), hetmem_last_error());            \
        }                                                                       \
    } while (0)

/* Either of two codes (for limits that differ between backends). */
#define EXPECT2(call, a, b)                                                     \
    do {                                                                        \
        int rc_ = (call);                                                       \
        checks++;                                                               \
        if (rc_ == (a) || rc_ == (b)) {                                         \
            printf("ok   %-70s -> %s\n", #call, hetmem_status_string(rc_));     \
        } else {                                                                \
            failures++;                                                         \
            printf("FAIL [%s:%d] %s -> %s (%d), expected %s or %s: %s\n",       \
                   __FILE__, __LINE__, #call, hetmem_status_string(rc_), rc_,   \
                   hetmem_status_string(a), hetmem_status_string(b),            \
                   hetmem_last_error());                                        \
        }                                                                       \
    } while (0)

#define MIB ((size_t)1 << 20)

static void fill(unsigned char* p, size_t n, unsigned seed) {
    for (size_t i = 0; i < n; i++) p[i] = (unsigned char)(i * 31u + seed * 7u + (i >> 8));
}

static int same(const unsigned char* a, const unsigned char* b, size_t n) {
    return memcmp(a, b, n) == 0;
}

static int contains(const char* s, const char* needle) { return strstr(s, needle) != NULL; }

/* Fetches the stats JSON of `mgr` (and `store`) into a malloc'd string. */
static char* stats(hetmem_manager_t* mgr, hetmem_store_t* store) {
    size_t needed = 0;
    int rc = hetmem_stats_json(mgr, store, NULL, 0, &needed);
    CHECK(rc == HETMEM_ERR_BUFFER_TOO_SMALL && needed > 2,
          "stats_json with no buffer reports the size needed (%zu)", needed);
    char* buf = malloc(needed);
    rc = hetmem_stats_json(mgr, store, buf, needed, &needed);
    CHECK(rc == HETMEM_OK && strlen(buf) + 1 == needed, "stats_json fills %zu bytes", needed);
    return buf;
}

static void test_basics(void) {
    printf("\n== version, status strings, last error\n");
    CHECK(strcmp(hetmem_version(), HETMEM_VERSION) == 0, "library version %s == header %s",
          hetmem_version(), HETMEM_VERSION);
    CHECK(hetmem_store_config_size() == sizeof(hetmem_store_config_t),
          "hetmem_store_config_t: library %zu bytes, header %zu", hetmem_store_config_size(),
          sizeof(hetmem_store_config_t));
    CHECK(strcmp(hetmem_status_string(HETMEM_ERR_NULL_POINTER), "HETMEM_ERR_NULL_POINTER") == 0,
          "status string of NULL_POINTER");
    CHECK(strcmp(hetmem_status_string(12345), "HETMEM_ERR_UNKNOWN_STATUS") == 0,
          "status string of a non-code");
    CHECK(hetmem_last_error() != NULL, "last error is never NULL");

    hetmem_manager_t* m = (hetmem_manager_t*)0x1;
    EXPECT(hetmem_manager_create("sim", NULL), HETMEM_ERR_NULL_POINTER);
    EXPECT(hetmem_manager_create("no-such-backend", &m), HETMEM_ERR_INVALID_ARGUMENT);
    CHECK(m == NULL, "a failed create sets *out to NULL");
    CHECK(contains(hetmem_last_error(), "hetmem_manager_create") &&
              contains(hetmem_last_error(), "no-such-backend"),
          "last error names the call and the input: %s", hetmem_last_error());
    EXPECT(hetmem_manager_destroy(NULL), HETMEM_ERR_NULL_POINTER);
    EXPECT(hetmem_manager_destroy((hetmem_manager_t*)0x1234), HETMEM_ERR_INVALID_HANDLE);
    EXPECT(hetmem_manager_destroy((hetmem_manager_t*)&m), HETMEM_ERR_INVALID_HANDLE);
    CHECK(hetmem_manager_backend(NULL) == NULL, "backend name of NULL is NULL");
}

/* Allocates one buffer of every placement, copies a pattern through all of them. */
static void test_alloc_and_copies(hetmem_manager_t* mgr, int is_sim) {
    printf("\n== allocation by placement, copies\n");
    int count = -1;
    EXPECT(hetmem_device_count(mgr, &count), HETMEM_OK);
    CHECK(count >= 1, "%d device(s)", count);
    EXPECT(hetmem_device_count(mgr, NULL), HETMEM_ERR_NULL_POINTER);
    size_t free_b = 0, total_b = 0;
    EXPECT(hetmem_mem_info(mgr, 0, &free_b, &total_b), HETMEM_OK);
    CHECK(total_b > 0 && free_b <= total_b, "mem_info: %zu of %zu bytes free", free_b, total_b);
    EXPECT(hetmem_mem_info(mgr, 99, &free_b, &total_b), HETMEM_ERR_UNKNOWN_DEVICE);
    EXPECT(hetmem_mem_info(mgr, -1, &free_b, &total_b), HETMEM_ERR_INVALID_ARGUMENT);
    EXPECT(hetmem_mem_info(mgr, 0, NULL, &total_b), HETMEM_ERR_NULL_POINTER);

    const size_t n = 1 * MIB;
    unsigned char* pattern = malloc(n);
    unsigned char* back = malloc(n);
    fill(pattern, n, 1);

    void *host = NULL, *pinned = NULL, *dev = NULL, *managed = NULL;
    EXPECT(hetmem_alloc(mgr, HETMEM_HOST, -1, n, &host), HETMEM_OK);
    EXPECT(hetmem_alloc(mgr, HETMEM_PINNED, -1, n, &pinned), HETMEM_OK);
    EXPECT(hetmem_alloc(mgr, HETMEM_DEVICE, 0, n, &dev), HETMEM_OK);
    int rc = hetmem_alloc(mgr, HETMEM_MANAGED, -1, n, &managed);
    if (is_sim) {
        EXPECT(rc, HETMEM_OK);
    } else {
        CHECK(rc == HETMEM_OK || rc == HETMEM_ERR_UNSUPPORTED, "managed alloc -> %s",
              hetmem_status_string(rc));
    }
    CHECK(host && pinned && dev, "host %p, pinned %p, device %p, managed %p", host, pinned,
          dev, managed);

    /* Host memory is the caller's to touch; device memory goes through copies. */
    memcpy(host, pattern, n);
    EXPECT(hetmem_copy(mgr, dev, host, n, NULL), HETMEM_OK);
    if (managed) EXPECT(hetmem_copy(mgr, managed, dev, n, NULL), HETMEM_OK);
    EXPECT(hetmem_copy(mgr, pinned, managed ? managed : dev, n, NULL), HETMEM_OK);
    CHECK(same(pinned, pattern, n), "host -> device -> managed -> pinned keeps every byte");
    if (managed) CHECK(same(managed, pattern, n), "managed memory is readable by the CPU");

    /* Caller-owned memory in and out. */
    fill(pattern, n, 2);
    EXPECT(hetmem_copy_from_host(mgr, dev, pattern, n), HETMEM_OK);
    memset(back, 0, n);
    EXPECT(hetmem_copy_to_host(mgr, back, dev, n), HETMEM_OK);
    CHECK(same(back, pattern, n), "copy_from_host / copy_to_host round trip through the device");

    /* Addresses inside buffers. */
    EXPECT(hetmem_copy(mgr, (char*)dev + 4096, (char*)host + 100, 1000, NULL), HETMEM_OK);
    memset(back, 0, n);
    EXPECT(hetmem_copy_to_host(mgr, back, (char*)dev + 4096, 1000), HETMEM_OK);
    CHECK(same(back, (unsigned char*)host + 100, 1000), "interior addresses copy the right bytes");
    /* Both ends in one buffer (overlapping, memmove-like). */
    memcpy(back, (char*)host + 10, 5000);
    EXPECT(hetmem_copy(mgr, host, (char*)host + 10, 5000, NULL), HETMEM_OK);
    CHECK(same(host, back, 5000), "a copy within one buffer behaves like memmove");
    /* copy_from_host whose source is hetmem memory is a hetmem copy. */
    EXPECT(hetmem_copy_from_host(mgr, dev, pinned, n), HETMEM_OK);
    EXPECT(hetmem_copy(mgr, (char*)dev + 1, host, 0, NULL), HETMEM_OK);

    printf("\n== copies: bad input\n");
    EXPECT(hetmem_copy(mgr, dev, host, n + 1, NULL), HETMEM_ERR_OUT_OF_BOUNDS);
    EXPECT(hetmem_copy(mgr, (char*)dev + n - 10, host, 20, NULL), HETMEM_ERR_OUT_OF_BOUNDS);
    EXPECT(hetmem_copy(mgr, dev, host, SIZE_MAX, NULL), HETMEM_ERR_OUT_OF_BOUNDS);
    EXPECT(hetmem_copy_to_host(mgr, back, dev, n + 1), HETMEM_ERR_OUT_OF_BOUNDS);
    EXPECT(hetmem_copy(mgr, NULL, host, 16, NULL), HETMEM_ERR_NULL_POINTER);
    EXPECT(hetmem_copy(mgr, dev, NULL, 16, NULL), HETMEM_ERR_NULL_POINTER);
    EXPECT(hetmem_copy(NULL, dev, host, 16, NULL), HETMEM_ERR_NULL_POINTER);
    EXPECT(hetmem_copy_from_host(mgr, dev, NULL, 16), HETMEM_ERR_NULL_POINTER);
    EXPECT(hetmem_copy_to_host(mgr, NULL, dev, 16), HETMEM_ERR_NULL_POINTER);
    int on_stack = 0;
    EXPECT(hetmem_copy(mgr, dev, &on_stack, sizeof on_stack, NULL), HETMEM_ERR_FOREIGN_POINTER);
    EXPECT(hetmem_copy(mgr, (void*)(uintptr_t)0xdeadbeef, host, 16, NULL),
           HETMEM_ERR_FOREIGN_POINTER);
    EXPECT(hetmem_copy(mgr, (char*)dev + n, host, 1, NULL), HETMEM_ERR_FOREIGN_POINTER);
    EXPECT(hetmem_copy_from_host(mgr, &on_stack, pattern, sizeof on_stack),
           HETMEM_ERR_FOREIGN_POINTER);
    EXPECT(hetmem_copy_to_host(mgr, back, &on_stack, sizeof on_stack),
           HETMEM_ERR_FOREIGN_POINTER);
    EXPECT(hetmem_copy((hetmem_manager_t*)0x99, dev, host, 16, NULL), HETMEM_ERR_INVALID_HANDLE);
    EXPECT(hetmem_copy(mgr, dev, host, 16, (hetmem_stream_t*)0x77), HETMEM_ERR_INVALID_HANDLE);

    printf("\n== allocation: bad input\n");
    void* p = (void*)0x1;
    EXPECT(hetmem_alloc(mgr, HETMEM_HOST, -1, 0, &p), HETMEM_ERR_INVALID_SIZE);
    CHECK(p == NULL, "a failed alloc sets *out to NULL");
    EXPECT(hetmem_alloc(mgr, HETMEM_DEVICE, 0, 0, &p), HETMEM_ERR_INVALID_SIZE);
    EXPECT2(hetmem_alloc(mgr, HETMEM_HOST, -1, SIZE_MAX, &p), HETMEM_ERR_INVALID_SIZE,
            HETMEM_ERR_OUT_OF_MEMORY);
    EXPECT2(hetmem_alloc(mgr, HETMEM_PINNED, -1, SIZE_MAX, &p), HETMEM_ERR_INVALID_SIZE,
            HETMEM_ERR_OUT_OF_MEMORY);
    EXPECT2(hetmem_alloc(mgr, HETMEM_DEVICE, 0, SIZE_MAX, &p), HETMEM_ERR_INVALID_SIZE,
            HETMEM_ERR_OUT_OF_MEMORY);
    EXPECT2(hetmem_alloc(mgr, HETMEM_MANAGED, 0, SIZE_MAX, &p), HETMEM_ERR_INVALID_SIZE,
            HETMEM_ERR_OUT_OF_MEMORY);
    EXPECT(hetmem_alloc(mgr, HETMEM_DEVICE, 0, SIZE_MAX / 4, &p), HETMEM_ERR_OUT_OF_MEMORY);
    EXPECT(hetmem_alloc(mgr, HETMEM_HOST, -1, SIZE_MAX / 4, &p), HETMEM_ERR_OUT_OF_MEMORY);
    EXPECT(hetmem_alloc(mgr, 42, -1, 64, &p), HETMEM_ERR_INVALID_ARGUMENT);
    EXPECT(hetmem_alloc(mgr, HETMEM_DEVICE, 99, 64, &p), HETMEM_ERR_UNKNOWN_DEVICE);
    EXPECT(hetmem_alloc(mgr, HETMEM_DEVICE, -7, 64, &p), HETMEM_ERR_INVALID_ARGUMENT);
    EXPECT(hetmem_alloc(mgr, HETMEM_HOST, 999, 64, &p), HETMEM_ERR_UNKNOWN_NUMA_NODE);
    EXPECT(hetmem_alloc(mgr, HETMEM_HOST, -1, 64, NULL), HETMEM_ERR_NULL_POINTER);
    EXPECT(hetmem_alloc(NULL, HETMEM_HOST, -1, 64, &p), HETMEM_ERR_NULL_POINTER);

    printf("\n== free: bad input\n");
    void* extra = NULL;
    EXPECT(hetmem_alloc(mgr, HETMEM_HOST, 0, 4096, &extra), HETMEM_OK);
    EXPECT(hetmem_free(mgr, (char*)extra + 8), HETMEM_ERR_FOREIGN_POINTER);
    EXPECT(hetmem_free(mgr, extra), HETMEM_OK);
    EXPECT(hetmem_free(mgr, extra), HETMEM_ERR_FOREIGN_POINTER);
    EXPECT(hetmem_copy(mgr, dev, extra, 16, NULL), HETMEM_ERR_FOREIGN_POINTER);
    EXPECT(hetmem_free(mgr, &on_stack), HETMEM_ERR_FOREIGN_POINTER);
    EXPECT(hetmem_free(mgr, (void*)(uintptr_t)0x12345678), HETMEM_ERR_FOREIGN_POINTER);
    EXPECT(hetmem_free(mgr, pattern), HETMEM_ERR_FOREIGN_POINTER);
    EXPECT(hetmem_free(mgr, NULL), HETMEM_ERR_NULL_POINTER);
    EXPECT(hetmem_free(NULL, host), HETMEM_ERR_NULL_POINTER);
    CHECK(same((unsigned char*)host + 5000, (unsigned char*)host + 5000, 1) && host != NULL,
          "the live buffers are untouched by the bad frees");

    void* dev2 = NULL;
    EXPECT(hetmem_alloc(mgr, HETMEM_DEVICE, -1, 4096, &dev2), HETMEM_OK);
    EXPECT(hetmem_free(mgr, dev2), HETMEM_OK);
    EXPECT(hetmem_free(mgr, dev2), HETMEM_ERR_FOREIGN_POINTER);

    EXPECT(hetmem_free(mgr, host), HETMEM_OK);
    EXPECT(hetmem_free(mgr, pinned), HETMEM_OK);
    EXPECT(hetmem_free(mgr, dev), HETMEM_OK);
    if (managed) EXPECT(hetmem_free(mgr, managed), HETMEM_OK);
    free(pattern);
    free(back);
}

static void test_streams(hetmem_manager_t* mgr, hetmem_manager_t* other, int is_sim) {
    printf("\n== streams: created and wrapped\n");
    const size_t n = 256 * 1024;
    unsigned char* pattern = malloc(n);
    unsigned char* back = malloc(n);
    void *pinned = NULL, *dev = NULL;
    EXPECT(hetmem_alloc(mgr, HETMEM_PINNED, -1, n, &pinned), HETMEM_OK);
    EXPECT(hetmem_alloc(mgr, HETMEM_DEVICE, 0, n, &dev), HETMEM_OK);

    hetmem_stream_t *s = NULL, *def = NULL, *wrapped = NULL;
    EXPECT(hetmem_stream_create(mgr, 0, &s), HETMEM_OK);
    uintptr_t raw = 0;
    EXPECT(hetmem_stream_raw(s, &raw), HETMEM_OK);
    CHECK(raw != 0, "a created stream has a driver handle (%#lx)", (unsigned long)raw);

    /* An async copy on a created stream. */
    fill(pattern, n, 3);
    memcpy(pinned, pattern, n);
    EXPECT(hetmem_copy(mgr, dev, pinned, n, s), HETMEM_OK);
    EXPECT(hetmem_stream_synchronize(s), HETMEM_OK);
    memset(back, 0, n);
    EXPECT(hetmem_copy_to_host(mgr, back, dev, n), HETMEM_OK);
    CHECK(same(back, pattern, n), "async copy on a created stream arrives");

    /* The default stream (raw 0), as PyTorch passes it. */
    EXPECT(hetmem_stream_wrap(mgr, 0, 0, &def), HETMEM_OK);
    uintptr_t def_raw = 99;
    EXPECT(hetmem_stream_raw(def, &def_raw), HETMEM_OK);
    CHECK(def_raw == 0, "a wrapped default stream reports raw 0");
    fill(pattern, n, 4);
    EXPECT(hetmem_copy_from_host(mgr, dev, pattern, n), HETMEM_OK);
    EXPECT(hetmem_copy(mgr, pinned, dev, n, def), HETMEM_OK);
    EXPECT(hetmem_stream_synchronize(def), HETMEM_OK);
    CHECK(same(pinned, pattern, n), "async copy on the wrapped default stream arrives");

    /* The per-thread default stream (raw 2, cudaStreamPerThread / hipStreamPerThread):
     * through the handle, this thread's own. */
    hetmem_stream_t* per_thread = NULL;
    EXPECT(hetmem_stream_wrap(mgr, 0, 2, &per_thread), HETMEM_OK);
    uintptr_t per_thread_raw = 99;
    EXPECT(hetmem_stream_raw(per_thread, &per_thread_raw), HETMEM_OK);
    CHECK(per_thread_raw == 2, "a wrapped per-thread stream reports raw 2");
    fill(pattern, n, 5);
    EXPECT(hetmem_copy_from_host(mgr, dev, pattern, n), HETMEM_OK);
    EXPECT(hetmem_copy(mgr, pinned, dev, n, per_thread), HETMEM_OK);
    EXPECT(hetmem_stream_synchronize(per_thread), HETMEM_OK);
    CHECK(same(pinned, pattern, n), "async copy on the wrapped per-thread stream arrives");
    EXPECT(hetmem_stream_destroy(per_thread), HETMEM_OK);

    /* Wrapping a stream by its raw handle (as C code holding a cudaStream_t does). */
    EXPECT(hetmem_stream_wrap(mgr, 0, raw, &wrapped), HETMEM_OK);
    EXPECT(hetmem_copy(mgr, dev, pinned, n, wrapped), HETMEM_OK);
    EXPECT(hetmem_stream_synchronize(wrapped), HETMEM_OK);
    EXPECT(hetmem_stream_destroy(wrapped), HETMEM_OK);
    /* Letting go of the wrapper left the stream alive. */
    EXPECT(hetmem_copy(mgr, pinned, dev, n, s), HETMEM_OK);
    EXPECT(hetmem_stream_synchronize(s), HETMEM_OK);
    CHECK(same(pinned, pattern, n), "the stream still works after its wrapper is destroyed");

    printf("\n== streams: bad input\n");
    hetmem_stream_t* bad = (hetmem_stream_t*)0x1;
    EXPECT(hetmem_stream_create(mgr, 99, &bad), HETMEM_ERR_UNKNOWN_DEVICE);
    CHECK(bad == NULL, "a failed stream_create sets *out to NULL");
    EXPECT(hetmem_stream_create(mgr, -1, &bad), HETMEM_ERR_INVALID_ARGUMENT);
    EXPECT(hetmem_stream_create(mgr, 0, NULL), HETMEM_ERR_NULL_POINTER);
    EXPECT(hetmem_stream_wrap(mgr, 99, 0, &bad), HETMEM_ERR_UNKNOWN_DEVICE);
    EXPECT(hetmem_stream_wrap(mgr, 0, 0, NULL), HETMEM_ERR_NULL_POINTER);
    if (is_sim) {
        EXPECT(hetmem_stream_wrap(mgr, 0, 0x5eed, &bad), HETMEM_ERR_INVALID_ARGUMENT);
    }
    EXPECT(hetmem_stream_raw(s, NULL), HETMEM_ERR_NULL_POINTER);
    EXPECT(hetmem_stream_raw(NULL, &raw), HETMEM_ERR_NULL_POINTER);
    EXPECT(hetmem_stream_synchronize(NULL), HETMEM_ERR_NULL_POINTER);
    EXPECT(hetmem_stream_synchronize((hetmem_stream_t*)0xabc0), HETMEM_ERR_INVALID_HANDLE);
    /* A stream of another manager. */
    hetmem_stream_t* theirs = NULL;
    EXPECT(hetmem_stream_create(other, 0, &theirs), HETMEM_OK);
    EXPECT(hetmem_copy(mgr, dev, pinned, 64, theirs), HETMEM_ERR_FOREIGN_HANDLE);
    EXPECT(hetmem_free(other, dev), HETMEM_ERR_FOREIGN_POINTER);
    EXPECT(hetmem_stream_destroy(theirs), HETMEM_OK);
    /* A handle of another kind. */
    EXPECT(hetmem_stream_synchronize((hetmem_stream_t*)mgr), HETMEM_ERR_INVALID_HANDLE);
    EXPECT(hetmem_manager_destroy((hetmem_manager_t*)s), HETMEM_ERR_INVALID_HANDLE);

    EXPECT(hetmem_stream_destroy(s), HETMEM_OK);
    EXPECT(hetmem_stream_destroy(s), HETMEM_ERR_INVALID_HANDLE);
    EXPECT(hetmem_stream_synchronize(s), HETMEM_ERR_INVALID_HANDLE);
    EXPECT(hetmem_copy(mgr, dev, pinned, 64, s), HETMEM_ERR_INVALID_HANDLE);
    EXPECT(hetmem_stream_destroy(NULL), HETMEM_ERR_NULL_POINTER);

    printf("\n== managed memory: prefetch and advise\n");
    void* managed = NULL;
    int rc = hetmem_alloc(mgr, HETMEM_MANAGED, 0, n, &managed);
    if (rc == HETMEM_OK) {
        fill(pattern, n, 5);
        memcpy(managed, pattern, n);
        EXPECT(hetmem_prefetch(mgr, managed, n, 0, NULL), HETMEM_OK);
        EXPECT(hetmem_prefetch(mgr, (char*)managed + 4096, 4096, -1, def), HETMEM_OK);
        EXPECT(hetmem_stream_synchronize(def), HETMEM_OK);
        CHECK(same(managed, pattern, n), "prefetching back and forth keeps the bytes");
        EXPECT(hetmem_advise(mgr, managed, n, HETMEM_ADVISE_SET_READ_MOSTLY, 0), HETMEM_OK);
        EXPECT(hetmem_advise(mgr, managed, n, HETMEM_ADVISE_UNSET_READ_MOSTLY, 0), HETMEM_OK);
        EXPECT(hetmem_advise(mgr, managed, n, HETMEM_ADVISE_SET_PREFERRED_LOCATION, -1),
               HETMEM_OK);
        EXPECT(hetmem_advise(mgr, managed, n, HETMEM_ADVISE_SET_ACCESSED_BY, 0), HETMEM_OK);
        EXPECT(hetmem_advise(mgr, managed, n, 77, 0), HETMEM_ERR_INVALID_ARGUMENT);
        EXPECT(hetmem_advise(mgr, managed, n, HETMEM_ADVISE_SET_ACCESSED_BY, 99),
               HETMEM_ERR_UNKNOWN_DEVICE);
        EXPECT(hetmem_advise(mgr, managed, n, HETMEM_ADVISE_SET_ACCESSED_BY, -1),
               HETMEM_ERR_INVALID_ARGUMENT);
        EXPECT(hetmem_prefetch(mgr, managed, n + 1, 0, NULL), HETMEM_ERR_OUT_OF_BOUNDS);
        EXPECT(hetmem_prefetch(mgr, managed, n, 99, NULL), HETMEM_ERR_UNKNOWN_DEVICE);
        EXPECT(hetmem_free(mgr, managed), HETMEM_OK);
        EXPECT(hetmem_prefetch(mgr, managed, n, 0, NULL), HETMEM_ERR_FOREIGN_POINTER);
    } else {
        CHECK(!is_sim && rc == HETMEM_ERR_UNSUPPORTED, "managed memory -> %s",
              hetmem_status_string(rc));
    }
    EXPECT(hetmem_prefetch(mgr, dev, n, 0, NULL), HETMEM_ERR_INVALID_ARGUMENT);
    EXPECT(hetmem_advise(mgr, pinned, n, HETMEM_ADVISE_SET_READ_MOSTLY, 0),
           HETMEM_ERR_INVALID_ARGUMENT);
    EXPECT(hetmem_prefetch(mgr, NULL, n, 0, NULL), HETMEM_ERR_NULL_POINTER);
    EXPECT(hetmem_prefetch(mgr, &rc, sizeof rc, 0, NULL), HETMEM_ERR_FOREIGN_POINTER);

    EXPECT(hetmem_stream_destroy(def), HETMEM_OK);
    EXPECT(hetmem_free(mgr, pinned), HETMEM_OK);
    EXPECT(hetmem_free(mgr, dev), HETMEM_OK);
    free(pattern);
    free(back);
}

/* One copy with a stream, checked against the status wanted; `what` says which path. */
static void expect_copy(hetmem_manager_t* mgr, void* dst, const void* src, size_t n,
                        hetmem_stream_t* s, int want, const char* what) {
    int rc = hetmem_copy(mgr, dst, src, n, s);
    checks++;
    if (rc == want) {
        printf("ok   copy %-62s -> %s\n", what, hetmem_status_string(rc));
    } else {
        failures++;
        printf("FAIL copy %s -> %s, expected %s; last error: %s\n", what,
               hetmem_status_string(rc), hetmem_status_string(want), hetmem_last_error());
    }
}

/* A copy's stream is checked the same way whatever path the copy takes: within one
 * buffer or between two, host, pinned or device memory, zero bytes or more, with the
 * same stream refused (another manager's, even a destroyed one's; another device's
 * where the copy involves a device) or accepted on every path. */
static void test_copy_stream_checks(hetmem_manager_t* mgr, hetmem_manager_t* other) {
    printf("\n== copies: the stream is checked on every path\n");
    const size_t n = 64 * 1024;
    int devices = 0;
    EXPECT(hetmem_device_count(mgr, &devices), HETMEM_OK);
    void* bufs[3] = {NULL, NULL, NULL};
    const char* names[3] = {"host", "pinned", "device"};
    EXPECT(hetmem_alloc(mgr, HETMEM_HOST, -1, n, &bufs[0]), HETMEM_OK);
    EXPECT(hetmem_alloc(mgr, HETMEM_PINNED, -1, n, &bufs[1]), HETMEM_OK);
    EXPECT(hetmem_alloc(mgr, HETMEM_DEVICE, 0, n, &bufs[2]), HETMEM_OK);
    hetmem_manager_t* gone = NULL;
    hetmem_stream_t *theirs = NULL, *orphan = NULL, *mine = NULL, *dev1 = NULL;
    EXPECT(hetmem_manager_create(hetmem_manager_backend(mgr), &gone), HETMEM_OK);
    EXPECT(hetmem_stream_create(gone, 0, &orphan), HETMEM_OK);
    EXPECT(hetmem_manager_destroy(gone), HETMEM_OK); /* its stream lives on */
    EXPECT(hetmem_stream_create(other, 0, &theirs), HETMEM_OK);
    EXPECT(hetmem_stream_create(mgr, 0, &mine), HETMEM_OK);
    if (devices >= 2) EXPECT(hetmem_stream_create(mgr, 1, &dev1), HETMEM_OK);
    if (!bufs[0] || !bufs[1] || !bufs[2] || !orphan || !theirs || !mine) return;
    memset(bufs[0], 0xAA, n);
    memset(bufs[1], 0xAA, n);
    EXPECT(hetmem_copy(mgr, bufs[2], bufs[0], n, NULL), HETMEM_OK);
    const size_t len = n / 4;
    unsigned char* back = malloc(n);
    for (int i = 0; i < 3; i++) {
        for (int j = 0; j < 3; j++) {
            /* i == j: both ranges in one buffer. */
            char* dst = bufs[i];
            const char* src = i == j ? (char*)bufs[i] + n / 2 : (char*)bufs[j];
            int device = i == 2 || j == 2;
            for (size_t k = 0; k < 2; k++) {
                size_t m = k ? 0 : len;
                char what[128];
                snprintf(what, sizeof what, "%s <- %s, %zu bytes, ", names[i],
                         i == j ? "the same buffer" : names[j], m);
                char line[192];
                snprintf(line, sizeof line, "%son another manager's stream", what);
                expect_copy(mgr, dst, src, m, theirs, HETMEM_ERR_FOREIGN_HANDLE, line);
                snprintf(line, sizeof line, "%son a destroyed manager's stream", what);
                expect_copy(mgr, dst, src, m, orphan, HETMEM_ERR_FOREIGN_HANDLE, line);
                if (dev1) {
                    snprintf(line, sizeof line, "%son a stream of device 1", what);
                    expect_copy(mgr, dst, src, m, dev1,
                                device ? HETMEM_ERR_INVALID_ARGUMENT : HETMEM_OK, line);
                }
                snprintf(line, sizeof line, "%son its own stream", what);
                expect_copy(mgr, dst, src, m, mine, HETMEM_OK, line);
                snprintf(line, sizeof line, "%swith no stream", what);
                expect_copy(mgr, dst, src, m, NULL, HETMEM_OK, line);
            }
        }
    }
    EXPECT(hetmem_stream_synchronize(mine), HETMEM_OK);
    /* The refused copies moved nothing: a host buffer's first quarter was only ever
     * overwritten with 0xAA. Then a real copy within one buffer, on its own stream. */
    memset(bufs[0], 0x11, n);
    memset(bufs[0], 0x22, n / 2);
    expect_copy(mgr, bufs[0], (char*)bufs[0] + n / 2, len, theirs, HETMEM_ERR_FOREIGN_HANDLE,
                "host <- the same buffer, refused");
    CHECK(((unsigned char*)bufs[0])[0] == 0x22, "a refused copy within one buffer moved nothing");
    expect_copy(mgr, bufs[0], (char*)bufs[0] + n / 2, len, mine, HETMEM_OK,
                "host <- the same buffer, accepted");
    CHECK(((unsigned char*)bufs[0])[0] == 0x11 && ((unsigned char*)bufs[0])[len] == 0x22,
          "an accepted copy within one buffer moved the range");
    fill(bufs[0], n, 7);
    EXPECT(hetmem_copy(mgr, bufs[2], bufs[0], n, mine), HETMEM_OK);
    expect_copy(mgr, (char*)bufs[2] + 1, bufs[2], len, mine, HETMEM_OK,
                "device <- the same buffer, overlapping");
    EXPECT(hetmem_copy_to_host(mgr, back, bufs[2], n), HETMEM_OK);
    int moved = 1;
    for (size_t b = 0; b < len; b++) moved &= back[b + 1] == ((unsigned char*)bufs[0])[b];
    CHECK(moved, "an overlapping copy within a device buffer behaves like memmove");
    free(back);
    EXPECT(hetmem_stream_destroy(orphan), HETMEM_OK);
    EXPECT(hetmem_stream_destroy(theirs), HETMEM_OK);
    EXPECT(hetmem_stream_destroy(mine), HETMEM_OK);
    if (dev1) EXPECT(hetmem_stream_destroy(dev1), HETMEM_OK);
    for (int i = 0; i < 3; i++) EXPECT(hetmem_free(mgr, bufs[i]), HETMEM_OK);
}

/* A pointer of one manager given to another is FOREIGN_POINTER on every backend, the
 * simulator included (whose device addresses once started at one base for every
 * manager, so another manager's pointer was a live buffer of this one), and the other
 * manager's bytes are untouched. */
static void test_foreign_pointers(const char* backend) {
    printf("\n== pointers of another manager\n");
    const size_t n = 64 * 1024;
    hetmem_manager_t *a = NULL, *b = NULL;
    EXPECT(hetmem_manager_create(backend, &a), HETMEM_OK);
    EXPECT(hetmem_manager_create(backend, &b), HETMEM_OK);
    void *pa = NULL, *pb = NULL;
    EXPECT(hetmem_alloc(a, HETMEM_DEVICE, 0, n, &pa), HETMEM_OK);
    EXPECT(hetmem_alloc(b, HETMEM_DEVICE, 0, n, &pb), HETMEM_OK);
    if (!a || !b || !pa || !pb) return;
    CHECK(pa != pb, "two managers' first device buffers have different addresses (%p, %p)",
          pa, pb);
    unsigned char* pattern = malloc(n);
    unsigned char* back = malloc(n);
    unsigned char* zeros = calloc(1, n);
    fill(pattern, n, 9);
    EXPECT(hetmem_copy_from_host(a, pa, pattern, n), HETMEM_OK);
    EXPECT(hetmem_free(a, pb), HETMEM_ERR_FOREIGN_POINTER);
    EXPECT(hetmem_copy(b, pb, pa, n, NULL), HETMEM_ERR_FOREIGN_POINTER);
    EXPECT(hetmem_copy(a, pb, pa, n, NULL), HETMEM_ERR_FOREIGN_POINTER);
    EXPECT(hetmem_copy_to_host(b, back, pa, n), HETMEM_ERR_FOREIGN_POINTER);
    EXPECT(hetmem_copy_from_host(b, pa, zeros, n), HETMEM_ERR_FOREIGN_POINTER);
    EXPECT(hetmem_free(b, pa), HETMEM_ERR_FOREIGN_POINTER);
    memset(back, 0, n);
    EXPECT(hetmem_copy_to_host(a, back, pa, n), HETMEM_OK);
    CHECK(same(back, pattern, n), "the first manager's buffer is live and its bytes untouched");
    EXPECT(hetmem_free(a, pa), HETMEM_OK);
    EXPECT(hetmem_free(b, pb), HETMEM_OK);
    EXPECT(hetmem_manager_destroy(a), HETMEM_OK);
    EXPECT(hetmem_manager_destroy(b), HETMEM_OK);
    free(pattern);
    free(back);
    free(zeros);
}

/* Events: a C caller orders its own work after an asynchronous copy with an event, and
 * no stream synchronisation. On the simulator the virtual clock shows the wait: an
 * event recorded on the waiting stream right after the wait is not passed until the
 * copy it waited for has ended. */
static void test_events(hetmem_manager_t* mgr, hetmem_manager_t* other, int is_sim) {
    printf("\n== events\n");
    const size_t n = 64 * MIB;
    int devices = 0;
    EXPECT(hetmem_device_count(mgr, &devices), HETMEM_OK);
    void *src = NULL, *dev = NULL, *out = NULL;
    EXPECT(hetmem_alloc(mgr, HETMEM_PINNED, -1, n, &src), HETMEM_OK);
    EXPECT(hetmem_alloc(mgr, HETMEM_DEVICE, 0, n, &dev), HETMEM_OK);
    EXPECT(hetmem_alloc(mgr, HETMEM_PINNED, -1, n, &out), HETMEM_OK);
    hetmem_stream_t *a = NULL, *b = NULL;
    EXPECT(hetmem_stream_create(mgr, 0, &a), HETMEM_OK);
    EXPECT(hetmem_stream_create(mgr, 0, &b), HETMEM_OK);
    hetmem_event_t *copied = NULL, *waited = NULL;
    hetmem_event_t* bad = (hetmem_event_t*)0x1;
    EXPECT(hetmem_event_create(mgr, 0, &copied), HETMEM_OK);
    EXPECT(hetmem_event_create(mgr, 0, &waited), HETMEM_OK);
    if (!src || !dev || !out || !a || !b || !copied || !waited) return;
    int done = -1;
    EXPECT(hetmem_event_query(copied, &done), HETMEM_OK);
    CHECK(done == 1, "an event never recorded counts as passed");
    EXPECT(hetmem_event_synchronize(copied), HETMEM_OK);
    EXPECT(hetmem_stream_wait_event(b, copied), HETMEM_OK);

    fill(src, n, 11);
    memset(out, 0, n);
    EXPECT(hetmem_copy(mgr, dev, src, n, a), HETMEM_OK);
    EXPECT(hetmem_event_record(copied, a), HETMEM_OK);
    EXPECT(hetmem_stream_wait_event(b, copied), HETMEM_OK);
    EXPECT(hetmem_event_record(waited, b), HETMEM_OK);
    if (is_sim) {
        EXPECT(hetmem_event_query(waited, &done), HETMEM_OK);
        CHECK(done == 0, "on the simulator's clock stream b has not passed the wait: it waits "
                         "for the copy on a");
    }
    EXPECT(hetmem_copy(mgr, out, dev, n, b), HETMEM_OK);
    EXPECT(hetmem_event_record(waited, b), HETMEM_OK);
    EXPECT(hetmem_event_synchronize(waited), HETMEM_OK);
    EXPECT(hetmem_event_query(copied, &done), HETMEM_OK);
    CHECK(done == 1, "the copy b waited for is done once b's own work is");
    CHECK(same(out, src, n), "b's copy, ordered by the event alone, read a's bytes");

    printf("\n== events: bad input\n");
    EXPECT(hetmem_event_create(mgr, 99, &bad), HETMEM_ERR_UNKNOWN_DEVICE);
    CHECK(bad == NULL, "a failed event_create sets *out to NULL");
    EXPECT(hetmem_event_create(mgr, -1, &bad), HETMEM_ERR_INVALID_ARGUMENT);
    EXPECT(hetmem_event_create(mgr, 0, NULL), HETMEM_ERR_NULL_POINTER);
    EXPECT(hetmem_event_create(NULL, 0, &bad), HETMEM_ERR_NULL_POINTER);
    EXPECT(hetmem_event_create((hetmem_manager_t*)a, 0, &bad), HETMEM_ERR_INVALID_HANDLE);
    EXPECT(hetmem_event_record(copied, NULL), HETMEM_ERR_NULL_POINTER);
    EXPECT(hetmem_event_record(NULL, a), HETMEM_ERR_NULL_POINTER);
    EXPECT(hetmem_event_record((hetmem_event_t*)a, a), HETMEM_ERR_INVALID_HANDLE);
    EXPECT(hetmem_event_record(copied, (hetmem_stream_t*)copied), HETMEM_ERR_INVALID_HANDLE);
    EXPECT(hetmem_stream_wait_event(NULL, copied), HETMEM_ERR_NULL_POINTER);
    EXPECT(hetmem_stream_wait_event(a, NULL), HETMEM_ERR_NULL_POINTER);
    EXPECT(hetmem_stream_wait_event(a, (hetmem_event_t*)0x77), HETMEM_ERR_INVALID_HANDLE);
    EXPECT(hetmem_event_query(copied, NULL), HETMEM_ERR_NULL_POINTER);
    EXPECT(hetmem_event_query(NULL, &done), HETMEM_ERR_NULL_POINTER);
    EXPECT(hetmem_event_synchronize(NULL), HETMEM_ERR_NULL_POINTER);
    EXPECT(hetmem_event_synchronize((hetmem_event_t*)mgr), HETMEM_ERR_INVALID_HANDLE);
    EXPECT(hetmem_event_destroy(NULL), HETMEM_ERR_NULL_POINTER);
    EXPECT(hetmem_stream_destroy((hetmem_stream_t*)copied), HETMEM_ERR_INVALID_HANDLE);
    /* Another manager's stream and event. */
    hetmem_stream_t* theirs = NULL;
    hetmem_event_t* their_ev = NULL;
    EXPECT(hetmem_stream_create(other, 0, &theirs), HETMEM_OK);
    EXPECT(hetmem_event_create(other, 0, &their_ev), HETMEM_OK);
    EXPECT(hetmem_event_record(copied, theirs), HETMEM_ERR_FOREIGN_HANDLE);
    EXPECT(hetmem_event_record(their_ev, a), HETMEM_ERR_FOREIGN_HANDLE);
    EXPECT(hetmem_stream_wait_event(a, their_ev), HETMEM_ERR_FOREIGN_HANDLE);
    EXPECT(hetmem_stream_wait_event(theirs, copied), HETMEM_ERR_FOREIGN_HANDLE);
    EXPECT(hetmem_event_record(their_ev, theirs), HETMEM_OK);
    /* Another device: recording is refused (the drivers refuse it), waiting is not. */
    if (devices >= 2) {
        hetmem_stream_t* s1 = NULL;
        EXPECT(hetmem_stream_create(mgr, 1, &s1), HETMEM_OK);
        EXPECT(hetmem_event_record(copied, s1), HETMEM_ERR_INVALID_ARGUMENT);
        EXPECT(hetmem_stream_wait_event(s1, copied), HETMEM_OK);
        EXPECT(hetmem_stream_synchronize(s1), HETMEM_OK);
        EXPECT(hetmem_stream_destroy(s1), HETMEM_OK);
    }
    /* An event outlives its manager; a destroyed event is a dead handle. */
    hetmem_manager_t* gone = NULL;
    hetmem_event_t* orphan = NULL;
    EXPECT(hetmem_manager_create(hetmem_manager_backend(mgr), &gone), HETMEM_OK);
    EXPECT(hetmem_event_create(gone, 0, &orphan), HETMEM_OK);
    EXPECT(hetmem_manager_destroy(gone), HETMEM_OK);
    EXPECT(hetmem_event_query(orphan, &done), HETMEM_OK);
    EXPECT(hetmem_stream_wait_event(a, orphan), HETMEM_ERR_FOREIGN_HANDLE);
    EXPECT(hetmem_event_destroy(orphan), HETMEM_OK);
    EXPECT(hetmem_event_destroy(orphan), HETMEM_ERR_INVALID_HANDLE);
    EXPECT(hetmem_event_query(orphan, &done), HETMEM_ERR_INVALID_HANDLE);
    EXPECT(hetmem_event_record(orphan, a), HETMEM_ERR_INVALID_HANDLE);
    EXPECT(hetmem_stream_wait_event(a, orphan), HETMEM_ERR_INVALID_HANDLE);

    EXPECT(hetmem_event_destroy(their_ev), HETMEM_OK);
    EXPECT(hetmem_stream_destroy(theirs), HETMEM_OK);
    EXPECT(hetmem_event_destroy(copied), HETMEM_OK);
    EXPECT(hetmem_event_destroy(waited), HETMEM_OK);
    EXPECT(hetmem_stream_destroy(a), HETMEM_OK);
    EXPECT(hetmem_stream_destroy(b), HETMEM_OK);
    EXPECT(hetmem_free(mgr, src), HETMEM_OK);
    EXPECT(hetmem_free(mgr, dev), HETMEM_OK);
    EXPECT(hetmem_free(mgr, out), HETMEM_OK);
}

static void test_stats(hetmem_manager_t* mgr, const char* backend) {
    printf("\n== stats as JSON\n");
    void* buf = NULL;
    EXPECT(hetmem_alloc(mgr, HETMEM_DEVICE, 0, 3 * MIB, &buf), HETMEM_OK);
    char* json = stats(mgr, NULL);
    char want[64];
    snprintf(want, sizeof want, "\"backend\":\"%s\"", backend);
    CHECK(contains(json, want), "JSON has %s", want);
    CHECK(contains(json, "\"live_buffers\":1") && contains(json, "\"live_bytes\":3145728"),
          "JSON counts the live buffer");
    CHECK(contains(json, "\"device\":[{\"current\":3145728"), "JSON has device bytes in use");
    CHECK(contains(json, "\"tier\":null"), "no store, tier is null");
    printf("     %s\n", json);
    free(json);
    char small[8];
    size_t needed = 0;
    EXPECT(hetmem_stats_json(mgr, NULL, small, sizeof small, &needed),
           HETMEM_ERR_BUFFER_TOO_SMALL);
    CHECK(needed > sizeof small, "needed %zu", needed);
    EXPECT(hetmem_stats_json(NULL, NULL, small, sizeof small, &needed), HETMEM_ERR_NULL_POINTER);
    EXPECT(hetmem_stats_json(mgr, (hetmem_store_t*)0x10, small, sizeof small, &needed),
           HETMEM_ERR_INVALID_HANDLE);
    EXPECT(hetmem_free(mgr, buf), HETMEM_OK);
}

/* Writes a safetensors file with two U8 tensors, "st.a" (5 bytes) and "st.b" (3). */
static int write_safetensors(const char* path) {
    const char* header =
        "{\"st.a\":{\"dtype\":\"U8\",\"shape\":[5],\"data_offsets\":[0,5]},"
        "\"st.b\":{\"dtype\":\"U8\",\"shape\":[3],\"data_offsets\":[5,8]}}";
    size_t hlen = strlen(header);
    size_t padded = (hlen + 7) / 8 * 8;
    FILE* f = fopen(path, "wb");
    if (!f) return -1;
    unsigned char len[8];
    for (int i = 0; i < 8; i++) len[i] = (unsigned char)((uint64_t)padded >> (8 * i));
    fwrite(len, 1, 8, f);
    fwrite(header, 1, hlen, f);
    for (size_t i = hlen; i < padded; i++) fputc(' ', f);
    const unsigned char data[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    fwrite(data, 1, 8, f);
    return fclose(f);
}

static void test_store(hetmem_manager_t* mgr, const char* scratch) {
    printf("\n== tier store\n");
    hetmem_store_config_t cfg;
    /* Parameters of 12 MiB, room for two on the device. (Sizes of 10 MiB and more
     * keep pools without virtual memory management, ROCm's, within the budget: they
     * get segments of the request's size rather than 20 MiB ones.) */
    EXPECT(hetmem_store_config_init(&cfg, 30 * MIB, 64 * MIB), HETMEM_OK);
    CHECK(cfg.device == 0 && cfg.device_budget == 30 * MIB && cfg.staging_slots >= 2 &&
              cfg.spare_slots == 1 && cfg.planner == HETMEM_PLANNER_BELADY,
          "config defaults (device %d, %zu slots of %zu bytes, %zu spare, planner %d)", cfg.device,
          cfg.staging_slots, cfg.staging_slot_size, cfg.spare_slots, cfg.planner);
    cfg.checksums = 1;
    hetmem_store_t* store = NULL;
    EXPECT(hetmem_store_create(mgr, &cfg, &store), HETMEM_OK);

    enum { N = 4 };
    const size_t size = 12 * MIB;
    unsigned char* data[N];
    uint32_t ids[N];
    for (int i = 0; i < N; i++) {
        char name[32];
        snprintf(name, sizeof name, "layer.%d", i);
        data[i] = malloc(size);
        fill(data[i], size, 10 + (unsigned)i);
        EXPECT(hetmem_store_register(store, name, data[i], size, &ids[i]), HETMEM_OK);
        CHECK(ids[i] == (uint32_t)i, "layer.%d has id %u", i, ids[i]);
    }
    uint32_t id = 0;
    EXPECT(hetmem_store_lookup(store, "layer.2", &id), HETMEM_OK);
    CHECK(id == 2, "lookup layer.2 -> %u", id);
    size_t psize = 0;
    EXPECT(hetmem_store_param_size(store, 3, &psize), HETMEM_OK);
    CHECK(psize == size, "param_size %zu", psize);
    int state = -1;
    uint32_t refs = 99;
    EXPECT(hetmem_store_residency(store, 0, &state, &refs), HETMEM_OK);
    CHECK(state == HETMEM_RESIDENCY_COLD && refs == 0, "a new parameter is cold");

    hetmem_stream_t* s = NULL;
    EXPECT(hetmem_stream_create(mgr, 0, &s), HETMEM_OK);
    hetmem_guard_t* g = NULL;
    void* dptr = NULL;
    EXPECT(hetmem_store_acquire(store, 0, s, &g, &dptr), HETMEM_OK);
    CHECK(g != NULL && dptr != NULL, "acquire gives a guard and a device address (%p)", dptr);
    EXPECT(hetmem_store_residency(store, 0, &state, &refs), HETMEM_OK);
    CHECK((state == HETMEM_RESIDENCY_DEVICE || state == HETMEM_RESIDENCY_LOADING) && refs == 1,
          "acquired: on the device with one guard (state %d, refs %u)", state, refs);
    EXPECT(hetmem_guard_mark_dirty(g), HETMEM_OK);
    EXPECT(hetmem_guard_release(g), HETMEM_OK);
    EXPECT(hetmem_guard_release(g), HETMEM_ERR_INVALID_HANDLE);
    EXPECT(hetmem_guard_mark_dirty(g), HETMEM_ERR_INVALID_HANDLE);
    EXPECT(hetmem_guard_release(NULL), HETMEM_ERR_NULL_POINTER);
    EXPECT(hetmem_stream_synchronize(s), HETMEM_OK);

    /* Stream through all four (two fit in the budget): evictions and write-back. */
    for (int pass = 0; pass < 2; pass++) {
        for (uint32_t i = 0; i < N; i++) {
            hetmem_guard_t* gi = NULL;
            void* pi = NULL;
            EXPECT(hetmem_store_acquire(store, i, pass == 0 ? s : NULL, &gi, &pi), HETMEM_OK);
            EXPECT(hetmem_guard_release(gi), HETMEM_OK);
        }
    }
    unsigned char* back = malloc(size);
    for (int i = 0; i < N; i++) {
        memset(back, 0, size);
        EXPECT(hetmem_store_read(store, (uint32_t)i, back, size), HETMEM_OK);
        CHECK(same(back, data[i], size), "layer.%d reads back byte for byte", i);
    }

    /* Three guards at once do not fit a budget of two. */
    hetmem_guard_t *g0 = NULL, *g1 = NULL, *g2 = (hetmem_guard_t*)0x1;
    EXPECT(hetmem_store_acquire(store, 0, s, &g0, NULL), HETMEM_OK);
    EXPECT(hetmem_store_acquire(store, 1, s, &g1, NULL), HETMEM_OK);
    EXPECT(hetmem_store_acquire(store, 2, s, &g2, NULL), HETMEM_ERR_OUT_OF_MEMORY);
    EXPECT(hetmem_store_acquire_timeout(store, 2, s, 20, &g2, NULL), HETMEM_ERR_OUT_OF_MEMORY);
    EXPECT(hetmem_store_acquire_timeout(store, 2, s, 20, NULL, NULL), HETMEM_ERR_NULL_POINTER);
    CHECK(g2 == NULL, "a failed acquire sets *out to NULL");
    EXPECT(hetmem_store_dont_need(store, 0, &state), HETMEM_OK);
    CHECK(state == 0, "dont_need does not drop a parameter in use");
    EXPECT(hetmem_guard_release(g0), HETMEM_OK);
    EXPECT(hetmem_guard_release(g1), HETMEM_OK);

    printf("\n== tier store: hints\n");
    int flag = -1;
    EXPECT(hetmem_store_dont_need(store, 0, &flag), HETMEM_OK);
    EXPECT(hetmem_store_dont_need(store, 1, NULL), HETMEM_OK);
    EXPECT(hetmem_store_will_need(store, 3, &flag), HETMEM_OK);
    CHECK(flag == 1, "will_need loads into free room");
    EXPECT(hetmem_store_residency(store, 3, &state, NULL), HETMEM_OK);
    CHECK(state == HETMEM_RESIDENCY_DEVICE || state == HETMEM_RESIDENCY_LOADING,
          "will_need put layer.3 on the device (state %d)", state);
    EXPECT(hetmem_store_keep_resident(store, 3, 1), HETMEM_OK);
    EXPECT(hetmem_store_priority(store, 2, 5), HETMEM_OK);
    const uint32_t seq[N] = {0, 1, 2, 3};
    EXPECT(hetmem_store_set_sequence(store, seq, N), HETMEM_OK);
    EXPECT(hetmem_store_set_sequence(store, NULL, 0), HETMEM_OK);
    EXPECT(hetmem_store_keep_resident(store, 3, 0), HETMEM_OK);
    char* json = stats(mgr, store);
    CHECK(contains(json, "\"tier\":{\"params\":4") && contains(json, "\"evictions\":") &&
              contains(json, "\"checksum_mismatches\":0"),
          "stats JSON has the store's counters, no checksum mismatch");
    printf("     %s\n", json);
    free(json);

    printf("\n== tier store: bad input\n");
    uint32_t bad_seq[2] = {0, 99};
    EXPECT(hetmem_store_set_sequence(store, bad_seq, 2), HETMEM_ERR_UNKNOWN_PARAM);
    EXPECT(hetmem_store_set_sequence(store, NULL, 2), HETMEM_ERR_NULL_POINTER);
    EXPECT(hetmem_store_acquire(store, 99, s, &g, &dptr), HETMEM_ERR_UNKNOWN_PARAM);
    EXPECT(hetmem_store_acquire(store, 0, s, NULL, &dptr), HETMEM_ERR_NULL_POINTER);
    EXPECT(hetmem_store_acquire(store, 0, (hetmem_stream_t*)0x40, &g, &dptr),
           HETMEM_ERR_INVALID_HANDLE);
    EXPECT(hetmem_store_acquire(NULL, 0, s, &g, &dptr), HETMEM_ERR_NULL_POINTER);
    EXPECT(hetmem_store_will_need(store, 99, NULL), HETMEM_ERR_UNKNOWN_PARAM);
    EXPECT(hetmem_store_dont_need(store, 99, NULL), HETMEM_ERR_UNKNOWN_PARAM);
    EXPECT(hetmem_store_keep_resident(store, 99, 1), HETMEM_ERR_UNKNOWN_PARAM);
    EXPECT(hetmem_store_priority(store, 99, 1), HETMEM_ERR_UNKNOWN_PARAM);
    EXPECT(hetmem_store_residency(store, 99, &state, NULL), HETMEM_ERR_UNKNOWN_PARAM);
    EXPECT(hetmem_store_residency(store, 0, NULL, NULL), HETMEM_ERR_NULL_POINTER);
    EXPECT(hetmem_store_param_size(store, 99, &psize), HETMEM_ERR_UNKNOWN_PARAM);
    EXPECT(hetmem_store_read(store, 99, back, size), HETMEM_ERR_UNKNOWN_PARAM);
    EXPECT(hetmem_store_read(store, 0, back, size - 1), HETMEM_ERR_BUFFER_TOO_SMALL);
    EXPECT(hetmem_store_read(store, 0, NULL, size), HETMEM_ERR_NULL_POINTER);
    EXPECT(hetmem_store_lookup(store, "layer.9", &id), HETMEM_ERR_UNKNOWN_PARAM);
    EXPECT(hetmem_store_lookup(store, NULL, &id), HETMEM_ERR_NULL_POINTER);
    EXPECT(hetmem_store_register(store, "layer.0", data[0], 16, &id), HETMEM_ERR_INVALID_ARGUMENT);
    EXPECT(hetmem_store_register(store, "empty", data[0], 0, &id), HETMEM_ERR_INVALID_SIZE);
    EXPECT(hetmem_store_register(store, NULL, data[0], 16, &id), HETMEM_ERR_NULL_POINTER);
    EXPECT(hetmem_store_register(store, "x", NULL, 16, &id), HETMEM_ERR_NULL_POINTER);
    EXPECT(hetmem_store_register(store, "x", NULL, 0, &id), HETMEM_ERR_INVALID_SIZE);
    /* Sizes no memory holds are refused before the bytes are touched. */
    EXPECT(hetmem_store_register(store, "x", data[0], SIZE_MAX, &id), HETMEM_ERR_INVALID_SIZE);
    EXPECT(hetmem_store_set_sequence(store, seq, SIZE_MAX / 2), HETMEM_ERR_INVALID_SIZE);
    EXPECT(hetmem_store_register(store, "x", data[0], 16, NULL), HETMEM_ERR_NULL_POINTER);
    EXPECT(hetmem_store_register(store, "\xff\xfe", data[0], 16, &id),
           HETMEM_ERR_INVALID_ARGUMENT);
    unsigned char* big = calloc(1, 31 * MIB);
    EXPECT(hetmem_store_register(store, "too.big", big, 31 * MIB, &id), HETMEM_ERR_OUT_OF_MEMORY);
    free(big);
    hetmem_store_config_t bad_cfg = cfg;
    hetmem_store_t* bad_store = (hetmem_store_t*)0x1;
    bad_cfg.device_budget = 0;
    EXPECT(hetmem_store_create(mgr, &bad_cfg, &bad_store), HETMEM_ERR_INVALID_ARGUMENT);
    CHECK(bad_store == NULL, "a failed store_create sets *out to NULL");
    bad_cfg = cfg;
    bad_cfg.sequence = 7;
    EXPECT(hetmem_store_create(mgr, &bad_cfg, &bad_store), HETMEM_ERR_INVALID_ARGUMENT);
    bad_cfg = cfg;
    bad_cfg.spare_slots = 0;
    EXPECT(hetmem_store_create(mgr, &bad_cfg, &bad_store), HETMEM_ERR_INVALID_ARGUMENT);
    bad_cfg = cfg;
    bad_cfg.planner = 2;
    EXPECT(hetmem_store_create(mgr, &bad_cfg, &bad_store), HETMEM_ERR_INVALID_ARGUMENT);
    bad_cfg = cfg;
    bad_cfg.planner = HETMEM_PLANNER_STATIC;
    EXPECT(hetmem_store_create(mgr, &bad_cfg, &bad_store), HETMEM_OK);
    EXPECT(hetmem_store_destroy(bad_store), HETMEM_OK);
    bad_cfg = cfg;
    bad_cfg.device = 99;
    EXPECT(hetmem_store_create(mgr, &bad_cfg, &bad_store), HETMEM_ERR_UNKNOWN_DEVICE);
    EXPECT(hetmem_store_create(mgr, NULL, &bad_store), HETMEM_ERR_NULL_POINTER);
    EXPECT(hetmem_store_config_init(NULL, 1, 1), HETMEM_ERR_NULL_POINTER);

    printf("\n== tier store: safetensors\n");
    char path[1024];
    snprintf(path, sizeof path, "%s/capi_test.safetensors", scratch);
    CHECK(write_safetensors(path) == 0, "wrote %s", path);
    size_t count = 0;
    EXPECT(hetmem_store_register_safetensors(store, path, NULL, 0, &count),
           HETMEM_ERR_BUFFER_TOO_SMALL);
    CHECK(count == 2, "the file has %zu tensors", count);
    uint32_t st_ids[2] = {0, 0};
    EXPECT(hetmem_store_register_safetensors(store, path, st_ids, 2, &count), HETMEM_OK);
    CHECK(count == 2 && st_ids[0] == N && st_ids[1] == N + 1, "ids %u, %u", st_ids[0],
          st_ids[1]);
    unsigned char small[8] = {0};
    EXPECT(hetmem_store_read(store, st_ids[1], small, sizeof small), HETMEM_OK);
    CHECK(small[0] == 6 && small[1] == 7 && small[2] == 8, "st.b reads 6 7 8");
    hetmem_guard_t* gs = NULL;
    EXPECT(hetmem_store_acquire(store, st_ids[0], NULL, &gs, &dptr), HETMEM_OK);
    EXPECT(hetmem_guard_release(gs), HETMEM_OK);
    EXPECT(hetmem_store_read(store, st_ids[0], small, sizeof small), HETMEM_OK);
    CHECK(small[0] == 1 && small[4] == 5, "st.a reads 1..5 after a load");
    EXPECT(hetmem_store_register_safetensors(store, path, st_ids, 2, &count),
           HETMEM_ERR_INVALID_ARGUMENT); /* the names are taken */
    CHECK(count == 0, "nothing registered the second time");
    snprintf(path, sizeof path, "%s/no-such-file.safetensors", scratch);
    EXPECT(hetmem_store_register_safetensors(store, path, st_ids, 2, &count), HETMEM_ERR_CONFIG);
    EXPECT(hetmem_store_register_safetensors(store, NULL, st_ids, 2, &count),
           HETMEM_ERR_NULL_POINTER);
    EXPECT(hetmem_store_register_safetensors(store, path, NULL, 2, &count),
           HETMEM_ERR_NULL_POINTER);

    /* A guard outlives its store handle. */
    hetmem_guard_t* late = NULL;
    EXPECT(hetmem_store_acquire(store, 1, s, &late, &dptr), HETMEM_OK);
    EXPECT(hetmem_store_destroy(store), HETMEM_OK);
    EXPECT(hetmem_store_destroy(store), HETMEM_ERR_INVALID_HANDLE);
    EXPECT(hetmem_store_read(store, 0, back, size), HETMEM_ERR_INVALID_HANDLE);
    EXPECT(hetmem_guard_release(late), HETMEM_OK);
    EXPECT(hetmem_stream_destroy(s), HETMEM_OK);
    for (int i = 0; i < N; i++) free(data[i]);
    free(back);
}

/* Writes a safetensors file: the JSON `header` (padded with spaces to 8 bytes) and
 * data[0..n]. */
static int write_safetensors_with(const char* path, const char* header,
                                  const unsigned char* data, size_t n) {
    size_t hlen = strlen(header);
    size_t padded = (hlen + 7) / 8 * 8;
    FILE* f = fopen(path, "wb");
    if (!f) return -1;
    unsigned char len[8];
    for (int i = 0; i < 8; i++) len[i] = (unsigned char)((uint64_t)padded >> (8 * i));
    fwrite(len, 1, 8, f);
    fwrite(header, 1, hlen, f);
    for (size_t i = hlen; i < padded; i++) fputc(' ', f);
    fwrite(data, 1, n, f);
    return fclose(f);
}

/* Issue 15's store edges: files that are not regular (a FIFO never blocks), all-or-none
 * registration with an empty tensor, a stream of another device, rings no memory holds,
 * and every store call in a fork()ed child. */
static void test_store_edges(hetmem_manager_t* mgr, int is_sim, const char* scratch) {
    printf("\n== tier store: edges\n");
    hetmem_store_config_t cfg;
    EXPECT(hetmem_store_config_init(&cfg, 8 * MIB, 16 * MIB), HETMEM_OK);
    hetmem_store_t* store = NULL;
    EXPECT(hetmem_store_create(mgr, &cfg, &store), HETMEM_OK);
    if (!store) return;
    char path[1024];
    size_t count = 99;
    uint32_t ids[4] = {0};

    /* A FIFO's open waits for a writer: never opened blocking (the alarm ends a hang). */
    snprintf(path, sizeof path, "%s/edges.fifo", scratch);
    unlink(path);
    CHECK(mkfifo(path, 0600) == 0, "mkfifo %s", path);
    alarm(20);
    EXPECT(hetmem_store_register_safetensors(store, path, ids, 4, &count), HETMEM_ERR_CONFIG);
    alarm(0);
    CHECK(contains(hetmem_last_error(), "not a regular file (a FIFO)"), "%s",
          hetmem_last_error());
    CHECK(count == 0, "nothing registered from a FIFO (*count %zu)", count);
    unlink(path);
    EXPECT(hetmem_store_register_safetensors(store, scratch, ids, 4, &count), HETMEM_ERR_CONFIG);
    CHECK(contains(hetmem_last_error(), "not a regular file (a directory)"), "%s",
          hetmem_last_error());

    /* A zero-element tensor is an empty parameter; a file registers all or none. */
    const unsigned char data[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    snprintf(path, sizeof path, "%s/edges.safetensors", scratch);
    CHECK(write_safetensors_with(
              path,
              "{\"e.a\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4]},"
              "\"e.empty\":{\"dtype\":\"F32\",\"shape\":[0,3],\"data_offsets\":[4,4]},"
              "\"e.b\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[4,8]}}",
              data, 8) == 0,
          "wrote %s", path);
    EXPECT(hetmem_store_register_safetensors(store, path, ids, 4, &count), HETMEM_OK);
    CHECK(count == 3, "three tensors registered, the empty one too (%zu)", count);
    uint32_t empty = 99, a = 99;
    EXPECT(hetmem_store_lookup(store, "e.empty", &empty), HETMEM_OK);
    EXPECT(hetmem_store_lookup(store, "e.a", &a), HETMEM_OK);
    size_t psize = 99;
    EXPECT(hetmem_store_param_size(store, empty, &psize), HETMEM_OK);
    CHECK(psize == 0, "an empty parameter has size 0 (%zu)", psize);
    int state = -1;
    EXPECT(hetmem_store_residency(store, empty, &state, NULL), HETMEM_OK);
    CHECK(state == HETMEM_RESIDENCY_DEVICE, "an empty parameter is on the device (%d)", state);
    hetmem_guard_t* g = NULL;
    void* dptr = (void*)0x1;
    EXPECT(hetmem_store_acquire(store, empty, NULL, &g, &dptr), HETMEM_OK);
    CHECK(g != NULL && dptr == NULL, "an empty parameter acquires to a NULL address");
    EXPECT(hetmem_guard_mark_dirty(g), HETMEM_OK);
    EXPECT(hetmem_guard_release(g), HETMEM_OK);
    unsigned char back[4] = {0};
    EXPECT(hetmem_store_acquire(store, a, NULL, &g, &dptr), HETMEM_OK);
    EXPECT(hetmem_guard_release(g), HETMEM_OK);
    EXPECT(hetmem_store_read(store, a, back, sizeof back), HETMEM_OK);
    CHECK(back[0] == 1 && back[3] == 4, "e.a reads 1..4");
    snprintf(path, sizeof path, "%s/edges-taken.safetensors", scratch);
    CHECK(write_safetensors_with(
              path,
              "{\"e.c\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4]},"
              "\"e.a\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[4,8]}}",
              data, 8) == 0,
          "wrote %s", path);
    count = 99;
    EXPECT(hetmem_store_register_safetensors(store, path, ids, 4, &count),
           HETMEM_ERR_INVALID_ARGUMENT);
    CHECK(count == 0, "nothing registered (*count %zu)", count);
    EXPECT(hetmem_store_lookup(store, "e.c", &a), HETMEM_ERR_UNKNOWN_PARAM);

    /* A stream of another device. */
    hetmem_manager_t* two = NULL;
    int devices = 0;
    EXPECT(hetmem_device_count(mgr, &devices), HETMEM_OK);
    if (devices >= 2) {
        two = mgr;
    } else if (is_sim) {
        setenv("HETMEM_SIM_DEVICES", "2", 1);
        EXPECT(hetmem_manager_create("sim", &two), HETMEM_OK);
        unsetenv("HETMEM_SIM_DEVICES");
    }
    if (two) {
        hetmem_store_t* on0 = NULL;
        hetmem_stream_t* s1 = NULL;
        EXPECT(hetmem_store_create(two, &cfg, &on0), HETMEM_OK);
        EXPECT(hetmem_stream_create(two, 1, &s1), HETMEM_OK);
        uint32_t w = 0;
        EXPECT(hetmem_store_register(on0, "w", data, 8, &w), HETMEM_OK);
        EXPECT(hetmem_store_acquire(on0, w, s1, &g, &dptr), HETMEM_ERR_INVALID_ARGUMENT);
        CHECK(g == NULL && dptr == NULL, "a refused acquire sets *out and *device_ptr to NULL");
        EXPECT(hetmem_stream_destroy(s1), HETMEM_OK);
        EXPECT(hetmem_store_destroy(on0), HETMEM_OK);
        if (two != mgr) EXPECT(hetmem_manager_destroy(two), HETMEM_OK);
    }

    /* Rings no memory holds are refused before anything is pinned. */
    hetmem_store_config_t bad = cfg;
    hetmem_store_t* none = NULL;
    bad.staging_slot_size = (size_t)SSIZE_MAX + 1;
    EXPECT(hetmem_store_create(mgr, &bad, &none), HETMEM_ERR_INVALID_SIZE);
    bad.host_budget = SIZE_MAX;
    EXPECT(hetmem_store_create(mgr, &bad, &none), HETMEM_ERR_INVALID_SIZE);
    bad = cfg;
    bad.host_budget = SIZE_MAX;
    bad.staging_slots = SIZE_MAX;
    EXPECT(hetmem_store_create(mgr, &bad, &none), HETMEM_ERR_INVALID_SIZE);
    bad.staging_slots = (size_t)1 << 40; /* 4 EiB of 4 MiB slots */
    EXPECT(hetmem_store_create(mgr, &bad, &none), HETMEM_ERR_OUT_OF_MEMORY);
    CHECK(contains(hetmem_last_error(), "requested 4611686018427387904 bytes"), "%s",
          hetmem_last_error());
    bad = cfg;
    bad.staging_slots = 1;
    EXPECT(hetmem_store_create(mgr, &bad, &none), HETMEM_ERR_INVALID_ARGUMENT);
    bad = cfg;
    bad.staging_threads = 0;
    EXPECT(hetmem_store_create(mgr, &bad, &none), HETMEM_ERR_INVALID_ARGUMENT);
    CHECK(none == NULL, "no store");

    /* In a fork()ed child every store call is FORKED; releases and destroys succeed. */
    hetmem_guard_t* held = NULL;
    EXPECT(hetmem_store_acquire(store, ids[0], NULL, &held, NULL), HETMEM_OK);
    fflush(stdout);
    int before = failures;
    pid_t pid = fork();
    if (pid == 0) {
        printf("   (in the child)\n");
        uint32_t id = 0;
        size_t n = 0;
        EXPECT(hetmem_store_lookup(store, "e.a", &id), HETMEM_ERR_FORKED);
        EXPECT(hetmem_store_param_size(store, ids[0], &n), HETMEM_ERR_FORKED);
        EXPECT(hetmem_store_residency(store, ids[0], &state, NULL), HETMEM_ERR_FORKED);
        EXPECT(hetmem_store_keep_resident(store, ids[0], 1), HETMEM_ERR_FORKED);
        EXPECT(hetmem_store_priority(store, ids[0], 1), HETMEM_ERR_FORKED);
        EXPECT(hetmem_store_will_need(store, ids[1], NULL), HETMEM_ERR_FORKED);
        EXPECT(hetmem_store_dont_need(store, ids[1], NULL), HETMEM_ERR_FORKED);
        EXPECT(hetmem_store_set_sequence(store, ids, 3), HETMEM_ERR_FORKED);
        EXPECT(hetmem_store_set_sequence(store, NULL, 0), HETMEM_ERR_FORKED);
        EXPECT(hetmem_store_read(store, ids[0], back, sizeof back), HETMEM_ERR_FORKED);
        EXPECT(hetmem_store_register(store, "child", data, 8, &id), HETMEM_ERR_FORKED);
        EXPECT(hetmem_store_acquire(store, ids[1], NULL, &g, NULL), HETMEM_ERR_FORKED);
        EXPECT(hetmem_guard_mark_dirty(held), HETMEM_ERR_FORKED);
        EXPECT(hetmem_guard_release(held), HETMEM_OK);
        EXPECT(hetmem_store_destroy(store), HETMEM_OK);
        fflush(stdout);
        _exit(failures > before ? 1 : 0);
    }
    int status = 0;
    CHECK(pid > 0 && waitpid(pid, &status, 0) == pid && WIFEXITED(status) &&
              WEXITSTATUS(status) == 0,
          "the child's store checks passed (wait status %#x)", status);
    EXPECT(hetmem_guard_release(held), HETMEM_OK);
    EXPECT(hetmem_store_destroy(store), HETMEM_OK);
}

/* A graph pool's filter for the torch tests: the default stream's allocations. */
static int pick_default(void* ctx, void* stream) {
    (void)ctx;
    return stream == NULL;
}
static void count_drop(void* ctx) { ++*(int*)ctx; }

static void test_torch(void) {
    printf("\n== PyTorch allocator entry points\n");
    void* a = hetmem_torch_malloc(1 << 20, 0, NULL);
    CHECK(a != NULL, "torch_malloc 1 MiB on the default stream: %p (%s)", a, hetmem_last_error());
    hetmem_torch_free(a, 1 << 20, 0, NULL);
    CHECK(hetmem_last_error()[0] == '\0', "torch_free of a live block succeeds");
    void* b = hetmem_torch_malloc(1 << 20, 0, NULL);
    CHECK(b == a, "freed memory is reused at once on the same stream (%p == %p)", b, a);
    void* c = hetmem_torch_malloc(3000, 0, NULL);
    CHECK(c != NULL && c != b, "a second live block is another address");

    size_t needed = 0;
    int rc = hetmem_torch_stats_json(NULL, 0, &needed);
    CHECK(rc == HETMEM_ERR_BUFFER_TOO_SMALL && needed > 0, "torch stats need %zu bytes", needed);
    char* json = malloc(needed);
    EXPECT(hetmem_torch_stats_json(json, needed, &needed), HETMEM_OK);
    CHECK(contains(json, "\"live_blocks\":2") && contains(json, "\"allocated_bytes.all.current\":"),
          "torch stats have live blocks and PyTorch's key names");
    free(json);

    /* record_stream: on the block's own (default) stream it changes nothing; NULL is
     * PyTorch's empty tensor; an address inside a block counts as the block. */
    EXPECT(hetmem_torch_record_stream(b, NULL), HETMEM_OK);
    EXPECT(hetmem_torch_record_stream((char*)b + 4096, NULL), HETMEM_OK);
    EXPECT(hetmem_torch_record_stream(NULL, NULL), HETMEM_OK);

    hetmem_torch_free(b, 1 << 20, 0, NULL);
    EXPECT(hetmem_torch_record_stream(b, NULL), HETMEM_ERR_FOREIGN_POINTER);
    CHECK(contains(hetmem_last_error(), "hetmem_torch_record_stream"),
          "record_stream of a freed block is reported: %s", hetmem_last_error());
    int on_the_stack = 0;
    EXPECT(hetmem_torch_record_stream(&on_the_stack, NULL), HETMEM_ERR_FOREIGN_POINTER);
    hetmem_torch_free(c, 3000, 0, NULL);
    hetmem_torch_free(b, 1 << 20, 0, NULL);
    CHECK(contains(hetmem_last_error(), "hetmem_torch_free"), "double free is reported: %s",
          hetmem_last_error());
    int on_stack = 0;
    hetmem_torch_free(&on_stack, 4, 0, NULL);
    CHECK(hetmem_last_error()[0] != '\0', "free of a stack address is reported");
    hetmem_torch_free((void*)(uintptr_t)0xdeadbeef, 4, 0, NULL);
    CHECK(hetmem_last_error()[0] != '\0', "free of a made-up address is reported");
    hetmem_torch_free(NULL, 0, 0, NULL);
    CHECK(hetmem_last_error()[0] == '\0', "free of NULL is a no-op");

    CHECK(hetmem_torch_malloc(0, 0, NULL) == NULL && hetmem_last_error()[0] == '\0',
          "malloc of 0 bytes is NULL without an error");
    CHECK(hetmem_torch_malloc(-5, 0, NULL) == NULL && hetmem_last_error()[0] != '\0',
          "malloc of a negative size fails: %s", hetmem_last_error());
    CHECK(hetmem_torch_malloc((ssize_t)1 << 62, 0, NULL) == NULL &&
              hetmem_last_error()[0] != '\0',
          "malloc of 4 EiB fails: %s", hetmem_last_error());
    CHECK(hetmem_torch_malloc(64, 99, NULL) == NULL &&
              contains(hetmem_last_error(), "unknown device"),
          "malloc on device 99 fails: %s", hetmem_last_error());
    CHECK(hetmem_torch_malloc(64, -1, NULL) == NULL, "malloc on device -1 fails");
    EXPECT(hetmem_torch_empty_cache(), HETMEM_OK);
    void* d = hetmem_torch_malloc(1 << 20, 0, NULL);
    CHECK(d != NULL, "malloc works after empty_cache");
    hetmem_torch_free(d, 1 << 20, 0, NULL);
    EXPECT(hetmem_torch_empty_cache(), HETMEM_OK);

    /* Graph pools: the allocations the filter picks (here the default stream's) come
     * from the private pool; its freed blocks come back only to it until release; the
     * filter's context is let go of exactly once. */
    int drops = 0;
    EXPECT(hetmem_torch_begin_allocate_to_pool(0, 1, 0, pick_default, &drops, count_drop),
           HETMEM_OK);
    EXPECT(hetmem_torch_begin_allocate_to_pool(0, 1, 0, pick_default, &drops, count_drop),
           HETMEM_ERR_INVALID_ARGUMENT);
    CHECK(drops == 1, "a refused begin lets go of its context (%d)", drops);
    void* g = hetmem_torch_malloc(1 << 20, 0, NULL);
    CHECK(g != NULL, "malloc into the graph pool: %s", hetmem_last_error());
    hetmem_torch_free(g, 1 << 20, 0, NULL);
    EXPECT(hetmem_torch_empty_cache(), HETMEM_ERR_STREAM_CAPTURING);
    EXPECT(hetmem_torch_end_allocate_to_pool(0, 1, 0), HETMEM_OK);
    CHECK(drops == 2, "end lets go of the context (%d)", drops);
    EXPECT(hetmem_torch_end_allocate_to_pool(0, 1, 0), HETMEM_ERR_INVALID_ARGUMENT);
    void* o = hetmem_torch_malloc(1 << 20, 0, NULL);
    CHECK(o != NULL && o != g, "the graph's block is not handed out before release");
    hetmem_torch_free(o, 1 << 20, 0, NULL);
    EXPECT(hetmem_torch_release_pool(0, 1, 0), HETMEM_OK);
    EXPECT(hetmem_torch_release_pool(0, 1, 0), HETMEM_OK); /* none left: nothing to do */
    EXPECT(hetmem_torch_empty_cache(), HETMEM_OK);
}

/* A call from a thread's exit, after the library's own thread-locals are gone (a
 * pthread key destructor runs after them): an error code, not an abort. */
static pthread_key_t exit_key;
static int exit_rc = 1;
static void call_at_exit(void* unused) {
    (void)unused;
    exit_rc = hetmem_stream_destroy(NULL);
}
static void* thread_that_exits(void* unused) {
    (void)unused;
    pthread_setspecific(exit_key, (void*)1);
    (void)hetmem_stream_destroy(NULL); /* sets this thread's last error */
    return NULL;
}
static void test_thread_exit(void) {
    printf("\n== a call from a thread's exit\n");
    pthread_key_create(&exit_key, call_at_exit);
    pthread_t t;
    pthread_create(&t, NULL, thread_that_exits, NULL);
    pthread_join(t, NULL);
    CHECK(exit_rc == HETMEM_ERR_NULL_POINTER, "the exiting thread's call returned %d", exit_rc);
}

/* fork() after pinning: in the child every call on the parent's manager and stream is
 * HETMEM_ERR_FORKED, frees and destroys succeed (leaking), and the pinned buffer is not
 * mapped at all (MADV_DONTFORK); the parent carries on as before. */
static void test_fork(hetmem_manager_t* mgr) {
    printf("\n== fork after pinning\n");
    const size_t n = 16 * MIB;
    void *pinned = NULL, *dev = NULL, *p = NULL;
    hetmem_stream_t* s = NULL;
    hetmem_event_t* ev = NULL;
    EXPECT(hetmem_alloc(mgr, HETMEM_PINNED, -1, n, &pinned), HETMEM_OK);
    EXPECT(hetmem_alloc(mgr, HETMEM_DEVICE, 0, n, &dev), HETMEM_OK);
    EXPECT(hetmem_stream_create(mgr, 0, &s), HETMEM_OK);
    EXPECT(hetmem_event_create(mgr, 0, &ev), HETMEM_OK);
    if (!pinned || !dev || !s || !ev) return;
    memset(pinned, 0x42, n);
    fflush(stdout);
    int before = failures;
    pid_t pid = fork();
    if (pid == 0) {
        printf("   (in the child)\n");
        EXPECT(hetmem_alloc(mgr, HETMEM_DEVICE, 0, 4096, &p), HETMEM_ERR_FORKED);
        CHECK(contains(hetmem_last_error(), "forked"), "the message says so: %s",
              hetmem_last_error());
        EXPECT(hetmem_alloc(mgr, HETMEM_HOST, -1, 4096, &p), HETMEM_ERR_FORKED);
        EXPECT(hetmem_copy(mgr, dev, pinned, 4096, NULL), HETMEM_ERR_FORKED);
        EXPECT(hetmem_copy(mgr, dev, pinned, 4096, s), HETMEM_ERR_FORKED);
        EXPECT(hetmem_stream_synchronize(s), HETMEM_ERR_FORKED);
        int done = 0;
        hetmem_event_t* ev2 = NULL;
        EXPECT(hetmem_event_create(mgr, 0, &ev2), HETMEM_ERR_FORKED);
        EXPECT(hetmem_event_record(ev, s), HETMEM_ERR_FORKED);
        EXPECT(hetmem_stream_wait_event(s, ev), HETMEM_ERR_FORKED);
        EXPECT(hetmem_event_query(ev, &done), HETMEM_ERR_FORKED);
        EXPECT(hetmem_event_synchronize(ev), HETMEM_ERR_FORKED);
        EXPECT(hetmem_event_destroy(ev), HETMEM_OK);
        size_t free_b = 0, total_b = 0;
        EXPECT(hetmem_mem_info(mgr, 0, &free_b, &total_b), HETMEM_ERR_FORKED);
        CHECK(strcmp(hetmem_status_string(HETMEM_ERR_FORKED), "HETMEM_ERR_FORKED") == 0,
              "status_string(-15) is HETMEM_ERR_FORKED");
        /* An unmapped range: mincore fails with ENOMEM. */
        unsigned char vec[1];
        errno = 0;
        CHECK(mincore(pinned, 4096, vec) == -1 && errno == ENOMEM,
              "the pinned buffer is not mapped in the child (mincore: %s)", strerror(errno));
        EXPECT(hetmem_free(mgr, pinned), HETMEM_OK);
        EXPECT(hetmem_stream_destroy(s), HETMEM_OK);
        fflush(stdout);
        _exit(failures > before ? 1 : 0);
    }
    int status = 0;
    CHECK(pid > 0 && waitpid(pid, &status, 0) == pid && WIFEXITED(status) &&
              WEXITSTATUS(status) == 0,
          "the child's checks passed (wait status %#x)", status);
    unsigned char* back = malloc(n);
    EXPECT(hetmem_copy(mgr, dev, pinned, n, s), HETMEM_OK);
    EXPECT(hetmem_stream_synchronize(s), HETMEM_OK);
    EXPECT(hetmem_copy_to_host(mgr, back, dev, n), HETMEM_OK);
    int all = back != NULL;
    for (size_t i = 0; all && i < n; i++) all = back[i] == 0x42;
    CHECK(all, "after the child exits the parent copies its pinned bytes intact");
    free(back);
    EXPECT(hetmem_event_record(ev, s), HETMEM_OK);
    EXPECT(hetmem_event_synchronize(ev), HETMEM_OK);
    EXPECT(hetmem_event_destroy(ev), HETMEM_OK);
    EXPECT(hetmem_stream_destroy(s), HETMEM_OK);
    EXPECT(hetmem_free(mgr, pinned), HETMEM_OK);
    EXPECT(hetmem_free(mgr, dev), HETMEM_OK);
}

int main(int argc, char** argv) {
    const char* scratch = argc > 1 ? argv[1] : "/tmp";
    setvbuf(stdout, NULL, _IOLBF, 0);
    test_basics();

    hetmem_manager_t *mgr = NULL, *other = NULL;
    EXPECT(hetmem_manager_create(NULL, &mgr), HETMEM_OK);
    if (!mgr) {
        printf("cannot open a manager: %s\n", hetmem_last_error());
        return 1;
    }
    const char* backend = hetmem_manager_backend(mgr);
    CHECK(backend != NULL, "backend %s", backend ? backend : "(null)");
    const char* env = getenv("HETMEM_BACKEND");
    if (env && *env) CHECK(strcmp(env, backend) == 0, "HETMEM_BACKEND=%s is honoured", env);
    int is_sim = strcmp(backend, "sim") == 0;
    EXPECT(hetmem_manager_create(backend, &other), HETMEM_OK);

    test_alloc_and_copies(mgr, is_sim);
    test_streams(mgr, other, is_sim);
    test_copy_stream_checks(mgr, other);
    test_foreign_pointers(backend);
    test_events(mgr, other, is_sim);
    test_stats(mgr, backend);
    test_store(mgr, scratch);
    test_store_edges(mgr, is_sim, scratch);
    test_torch();
    test_thread_exit();
    test_fork(mgr);

    printf("\n== teardown\n");
    void* leftover = NULL;
    EXPECT(hetmem_alloc(mgr, HETMEM_DEVICE, 0, 4096, &leftover), HETMEM_OK);
    EXPECT(hetmem_manager_destroy(mgr), HETMEM_OK);
    EXPECT(hetmem_manager_destroy(mgr), HETMEM_ERR_INVALID_HANDLE);
    EXPECT(hetmem_free(mgr, leftover), HETMEM_ERR_INVALID_HANDLE);
    EXPECT(hetmem_alloc(mgr, HETMEM_HOST, -1, 64, &leftover), HETMEM_ERR_INVALID_HANDLE);
    CHECK(hetmem_manager_backend(mgr) == NULL, "a destroyed manager has no backend");
    EXPECT(hetmem_manager_destroy(other), HETMEM_OK);

    printf("\n%d checks, %d failed\n", checks, failures);
    return failures ? 1 : 0;
}
