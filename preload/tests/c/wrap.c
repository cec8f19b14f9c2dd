/* Another interposer loaded in front of the shim, as profilers and leak checkers are:
 * it finds the next malloc family with dlsym(RTLD_NEXT), and dlsym itself calls calloc
 * while it does (served from a static buffer meanwhile). Every call then reaches the
 * shim through it: the shim must not notice. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

static void *(*next_malloc)(size_t);
static void (*next_free)(void *);
static void *(*next_calloc)(size_t, size_t);
static void *(*next_realloc)(void *, size_t);
/* volatile: the compiler may not drop the store around calls that cannot see a
 * static variable, and the loader calls back in here while dlsym runs. */
static __thread volatile int resolving;
static char boot[1 << 16];
static size_t boot_used;
static volatile size_t calls;

static void *boot_alloc(size_t n) {
    n = (n + 15) & ~(size_t)15;
    size_t at = __atomic_fetch_add(&boot_used, n, __ATOMIC_RELAXED);
    return at + n <= sizeof boot ? boot + at : NULL;
}
static int is_boot(void *p) { return (char *)p >= boot && (char *)p < boot + sizeof boot; }

static void resolve(void) {
    if (next_malloc || resolving) return;
    resolving = 1;
    next_calloc = (void *(*)(size_t, size_t))dlsym(RTLD_NEXT, "calloc");
    next_realloc = (void *(*)(void *, size_t))dlsym(RTLD_NEXT, "realloc");
    next_free = (void (*)(void *))dlsym(RTLD_NEXT, "free");
    next_malloc = (void *(*)(size_t))dlsym(RTLD_NEXT, "malloc");
    resolving = 0;
}

void *malloc(size_t n) {
    resolve();
    if (!next_malloc) return boot_alloc(n);
    __atomic_fetch_add(&calls, 1, __ATOMIC_RELAXED);
    return next_malloc(n);
}
void *calloc(size_t a, size_t b) {
    resolve();
    if (!next_calloc) {
        void *p = boot_alloc(a * b); /* static: already zero */
        return p;
    }
    __atomic_fetch_add(&calls, 1, __ATOMIC_RELAXED);
    return next_calloc(a, b);
}
void *realloc(void *p, size_t n) {
    resolve();
    if (is_boot(p) || !next_realloc) {
        void *q = malloc(n);
        if (q && p) memcpy(q, p, n); /* boot blocks are never larger than the buffer */
        return q;
    }
    return next_realloc(p, n);
}
void free(void *p) {
    if (!p || is_boot(p)) return;
    resolve();
    if (next_free) next_free(p);
}
