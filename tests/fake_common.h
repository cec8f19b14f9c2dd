/*
 * What the fake drivers share: tests/fake_hip/fake_hip.c (HIP runtime) and
 * tests/fake_cuda/fake_cuda.c (CUDA driver) include this file as "../fake_common.h",
 * a path relative to themselves, so they build with no include directory (and their
 * check modes against the real headers too).
 *
 * It holds only what does not depend on the API being faked: the one mutex every call
 * takes and the macros that return through it, growable arrays, range overlap, numbers
 * from the environment, the failure injection behind the fail-next test hook, and
 * helpers of the stat test hook. Status codes are plain ints here; each fake gives
 * them their type. What depends on a fake's own records (its streams, events, queues
 * and allocations, which the two model differently) stays in that fake.
 */
#ifndef HETMEM_FAKE_COMMON_H
#define HETMEM_FAKE_COMMON_H

#include <pthread.h>
#include <sched.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Taken by every entry point and test hook; queued work runs under it. */
static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;

/* Returns `code` from an entry point, releasing g_lock. */
#define RETURN(code)                               \
    do {                                           \
        int rc_ = (int)(code);                     \
        pthread_mutex_unlock(&g_lock);             \
        return rc_;                                \
    } while (0)

/* For destroys: the handle is free for reuse from the moment the lock is dropped, and
 * giving up the CPU before returning widens the window in which another thread's create
 * gets the same value back, so that a caller still using the old value (or updating
 * its bookkeeping too late) is caught. */
#define RETURN_YIELDING(code)                      \
    do {                                           \
        int rc_ = (int)(code);                     \
        pthread_mutex_unlock(&g_lock);             \
        sched_yield();                             \
        return rc_;                                \
    } while (0)

/* Makes room for `need` elements of `elem` bytes in `arr` (capacity *cap), doubling;
 * the array, moved or not, or NULL when out of memory (then `arr` is unchanged). */
static void *grow(void *arr, size_t *cap, size_t need, size_t elem) {
    if (need <= *cap) return arr;
    size_t ncap = *cap ? *cap * 2 : 16;
    while (ncap < need) ncap *= 2;
    void *n = realloc(arr, ncap * elem);
    if (!n) return NULL;
    *cap = ncap;
    return n;
}

/* Whether a..a+an and b..b+bn overlap. */
static int overlaps(const char *a, size_t an, const char *b, size_t bn) {
    return a < b + bn && b < a + an;
}

/* An integer from the environment, with an optional K/M/G/T suffix (binary; "Ki", "KB"
 * and "KiB" too); `dflt` when the variable is unset, empty or not such a number. */
static long long env_ll(const char *name, long long dflt) {
    const char *v = getenv(name);
    if (!v || !*v) return dflt;
    char *end;
    long long x = strtoll(v, &end, 0);
    int shift = 0;
    switch (*end) {
    case 'K': case 'k': shift = 10; end++; break;
    case 'M': case 'm': shift = 20; end++; break;
    case 'G': case 'g': shift = 30; end++; break;
    case 'T': case 't': shift = 40; end++; break;
    default: break;
    }
    if (*end == 'i' || *end == 'B') end++;
    if (*end == 'B') end++;
    return *end ? dflt : x << shift;
}

/* ------------------------------------------------------------ failure injection */

static char g_fail_call[64];
static int g_fail_code, g_fail_times, g_fail_skip;

/* The fail-after test hook: after `skip` calls of `call` (its exported name) that run
 * as usual, the next `times` return `code` and do nothing. */
static void fail_after(const char *call, int code, int times, int skip) {
    pthread_mutex_lock(&g_lock);
    snprintf(g_fail_call, sizeof g_fail_call, "%s", call ? call : "");
    g_fail_code = code;
    g_fail_times = times;
    g_fail_skip = skip;
    pthread_mutex_unlock(&g_lock);
}

/* The fail-next test hook: the next `times` calls of `call` fail. */
static void fail_next(const char *call, int code, int times) {
    fail_after(call, code, times, 0);
}

/* Nonzero (the code) when the test asked this call to fail. Under g_lock. */
static int injected_failure(const char *call) {
    if (g_fail_times > 0 && strcmp(call, g_fail_call) == 0) {
        if (g_fail_skip > 0) {
            g_fail_skip--;
            return 0;
        }
        g_fail_times--;
        return g_fail_code;
    }
    return 0;
}

/* ------------------------------------------------------------------- counters */

/* Calls by entry point name (the name string an entry point passes to its ENTER macro,
 * compared by content), for the "calls:NAME" stat. Under g_lock. */
static struct {
    const char *name;
    long long n;
} g_calls[256];
static size_t g_ncalls;

__attribute__((unused)) static void note_call(const char *name) {
    for (size_t i = 0; i < g_ncalls; i++) {
        if (g_calls[i].name == name || strcmp(g_calls[i].name, name) == 0) {
            g_calls[i].n++;
            return;
        }
    }
    if (g_ncalls < sizeof g_calls / sizeof g_calls[0]) {
        g_calls[g_ncalls].name = name;
        g_calls[g_ncalls++].n = 1;
    }
}

/* Calls of entry point `name` so far (0 for one never called). Under g_lock. */
__attribute__((unused)) static long long call_count(const char *name) {
    for (size_t i = 0; i < g_ncalls; i++)
        if (strcmp(g_calls[i].name, name) == 0) return g_calls[i].n;
    return 0;
}

/* For the stat hooks: sets `r` to the sum of `term`, an expression of `i`, over i in
 * 0..count. */
#define SUM_OVER(r, count, term)                                      \
    do {                                                              \
        r = 0;                                                        \
        for (size_t i = 0; i < (count); i++) r += (long long)(term);  \
    } while (0)

/* For the stat hooks' per-device counters, named `prefix` and a device number
 * ("used:1"): that number, when `name` is such a name and the number is below `limit`;
 * else -1. */
static int stat_device(const char *name, const char *prefix, int limit) {
    size_t n = strlen(prefix);
    if (strncmp(name, prefix, n) != 0) return -1;
    int d = atoi(name + n);
    return d >= 0 && d < limit ? d : -1;
}

#endif
