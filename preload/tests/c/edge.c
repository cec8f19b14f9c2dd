/* Edge cases an allocator must get right, run with and without libhetmem_preload.so
 * by preload/tests/edge.rs. `edge NAME` runs one case and prints "ok NAME"; any failure
 * prints what failed and exits 1. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <malloc.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define MIB (1024UL * 1024UL)
/* Sizes the compiler must not see (it would warn, or fold the call). */
static size_t V(size_t x) {
    volatile size_t y = x;
    return y;
}
#define CHECK(c)                                                                    \
    do {                                                                            \
        if (!(c)) {                                                                 \
            fprintf(stderr, "%s:%d: check failed: %s (errno %d)\n", __FILE__,       \
                    __LINE__, #c, errno);                                           \
            exit(1);                                                                \
        }                                                                           \
    } while (0)

static void fill(void *p, size_t n, unsigned seed) {
    unsigned char *b = p;
    for (size_t i = 0; i < n; i += 509) b[i] = (unsigned char)(seed + i * 7);
    if (n) b[n - 1] = (unsigned char)(seed ^ 0x5a);
}
static int same(const void *p, size_t n, unsigned seed) {
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i += 509)
        if (b[i] != (unsigned char)(seed + i * 7) && !(i == n - 1)) return 0;
    return n == 0 || b[n - 1] == (unsigned char)(seed ^ 0x5a);
}

/* ---- threads freeing what others allocated ------------------------------------- */
#define SLOTS 256
static void *volatile box[SLOTS];
static size_t box_size[SLOTS];
static pthread_mutex_t box_lock = PTHREAD_MUTEX_INITIALIZER;

static void *churn(void *arg) {
    unsigned seed = (unsigned)(uintptr_t)arg;
    for (int i = 0; i < 4000; i++) {
        seed = seed * 1103515245 + 12345;
        int s = (seed >> 8) % SLOTS;
        size_t n = (seed >> 4) % 11 == 0 ? (1 + (seed >> 16) % 6) * MIB : (seed >> 12) % 3000;
        void *p = malloc(n);
        CHECK(p || n == 0);
        fill(p, n, s);
        pthread_mutex_lock(&box_lock);
        void *old = box[s];
        size_t on = box_size[s];
        box[s] = p;
        box_size[s] = n;
        pthread_mutex_unlock(&box_lock);
        if (old) {
            CHECK(same(old, on, s));
            free(old);
        }
    }
    return NULL;
}

static void cross_thread(void) {
    pthread_t t[4];
    for (int i = 0; i < 4; i++) CHECK(pthread_create(&t[i], NULL, churn, (void *)(uintptr_t)(i + 1)) == 0);
    for (int i = 0; i < 4; i++) pthread_join(t[i], NULL);
    for (int s = 0; s < SLOTS; s++) {
        if (box[s]) CHECK(same(box[s], box_size[s], s));
        free(box[s]);
        box[s] = NULL;
    }
}

/* ---- fork ------------------------------------------------------------------------ */
static volatile int spinning = 1;
static void *alloc_loop(void *arg) {
    (void)arg;
    while (spinning) {
        void *a = malloc(100), *b = malloc(3 * MIB);
        free(a);
        free(b);
    }
    return NULL;
}

static void fork_case(void) {
    char *big = malloc(8 * MIB), *small = malloc(100);
    CHECK(big && small);
    fill(big, 8 * MIB, 1);
    fill(small, 100, 2);
    pthread_t t; /* another thread allocating while we fork: no lock may be inherited held */
    CHECK(pthread_create(&t, NULL, alloc_loop, NULL) == 0);
    for (int round = 0; round < 20; round++) {
        pid_t pid = fork();
        CHECK(pid >= 0);
        if (pid == 0) {
            if (!same(big, 8 * MIB, 1) || !same(small, 100, 2)) _exit(2);
            char *c = malloc(5 * MIB), *d = malloc(50);
            if (!c || !d) _exit(3);
            fill(c, 5 * MIB, 3);
            big = realloc(big, 12 * MIB);
            if (!big || !same(c, 5 * MIB, 3)) _exit(4);
            free(c);
            free(d);
            free(big);
            free(small);
            _exit(0);
        }
        int st;
        CHECK(waitpid(pid, &st, 0) == pid);
        CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    }
    spinning = 0;
    pthread_join(t, NULL);
    char *e = malloc(6 * MIB);
    CHECK(e && same(big, 8 * MIB, 1));
    free(e);
    free(big);
    free(small);
}

/* ---- exit from a thread, at-exit frees ------------------------------------------ */
static void *kept_small, *kept_large;
static void at_exit_frees(void) {
    CHECK(same(kept_large, 4 * MIB, 9));
    free(kept_small);
    free(kept_large);
    void *p = malloc(3 * MIB); /* and allocates */
    fill(p, 3 * MIB, 1);
    free(p);
    printf("ok thread_exit\n");
    fflush(stdout);
}
static void *exiter(void *arg) {
    (void)arg;
    usleep(20000);
    exit(0);
}
static void thread_exit(void) {
    kept_small = malloc(64);
    kept_large = malloc(4 * MIB);
    fill(kept_large, 4 * MIB, 9);
    atexit(at_exit_frees);
    pthread_t t[3];
    CHECK(pthread_create(&t[0], NULL, exiter, NULL) == 0);
    CHECK(pthread_create(&t[1], NULL, alloc_loop, NULL) == 0);
    CHECK(pthread_create(&t[2], NULL, alloc_loop, NULL) == 0);
    for (;;) pause();
}

/* ---- dlopen / dlclose ------------------------------------------------------------ */
static void dl(const char *lib) {
    for (int i = 0; i < 3; i++) {
        void *h = dlopen(lib, RTLD_NOW | RTLD_LOCAL);
        CHECK(h);
        char *(*make)(size_t) = (char *(*)(size_t))dlsym(h, "edge_dl_make");
        CHECK(make);
        char *s = make(5 * MIB);
        CHECK(s && s[0] == 'x' && s[5 * MIB - 2] == 'x');
        free(s); /* freed here, allocated there */
        CHECK(dlclose(h) == 0);
    }
}

/* ---- alignment functions ---------------------------------------------------------- */
static void align_case(void) {
    long page = sysconf(_SC_PAGESIZE);
    size_t sizes[] = {1, 100, 5000, 3 * MIB, 9 * MIB};
    for (size_t a = 4096; a <= (1UL << 30); a <<= 1) {
        for (int k = 0; k < 5; k++) {
            size_t n = sizes[k];
            void *p = NULL;
            CHECK(posix_memalign(&p, a, n) == 0 && p && (uintptr_t)p % a == 0);
            CHECK(malloc_usable_size(p) >= n);
            fill(p, n, 1);
            free(p);
            p = aligned_alloc(a, n);
            CHECK(p && (uintptr_t)p % a == 0 && malloc_usable_size(p) >= n);
            fill(p, n, 2);
            free(p);
            p = memalign(a, n);
            CHECK(p && (uintptr_t)p % a == 0 && malloc_usable_size(p) >= n);
            fill(p, n, 3);
            free(p);
        }
    }
    for (int k = 0; k < 5; k++) {
        void *v = valloc(sizes[k]);
        CHECK(v && (uintptr_t)v % page == 0 && malloc_usable_size(v) >= sizes[k]);
        free(v);
        v = pvalloc(sizes[k]);
        CHECK(v && (uintptr_t)v % page == 0 && malloc_usable_size(v) >= (size_t)page);
        free(v);
    }
    void *p = pvalloc(0); /* glibc: a page-aligned block (of less than a page) */
    CHECK(p && (uintptr_t)p % page == 0);
    free(p);
    /* Bad alignments. */
    p = (void *)1;
    CHECK(posix_memalign(&p, 24, 10) == EINVAL && p == (void *)1);
    CHECK(posix_memalign(&p, 4, 10) == EINVAL);
    p = memalign(24, 100); /* glibc: rounded up to 32 */
    CHECK(p && (uintptr_t)p % 32 == 0);
    free(p);
    p = memalign(3 * MIB, 5 * MIB); /* rounded up to 4 MiB */
    CHECK(p && (uintptr_t)p % (4 * MIB) == 0);
    free(p);
    errno = 0;
    CHECK(memalign(V(SIZE_MAX / 2 + 2), 10) == NULL && errno == EINVAL);
    errno = 0;
    p = NULL;
    CHECK(posix_memalign(&p, 4096, V(SIZE_MAX - 4096)) == ENOMEM && p == NULL);
}

/* ---- malloc_usable_size ------------------------------------------------------------ */
static void usable(void) {
    CHECK(malloc_usable_size(NULL) == 0);
    for (size_t n = 0; n < 40 * MIB; n = n * 3 + 1) {
        char *p = malloc(n);
        CHECK(p);
        size_t u = malloc_usable_size(p);
        CHECK(u >= n);
        memset(p, 0xab, u); /* the whole usable size is ours to write */
        free(p);
    }
}

/* ---- realloc across the threshold ------------------------------------------------- */
static void realloc_case(void) {
    size_t steps[] = {10, 1000, 1 * MIB, 2 * MIB, 3 * MIB, 17 * MIB, 64 * MIB, 5 * MIB, 2 * MIB - 1, 4000, 12, 40 * MIB, 3};
    char *p = NULL;
    size_t have = 0;
    for (int i = 0; i < (int)(sizeof steps / sizeof *steps); i++) {
        size_t n = steps[i];
        char *q = realloc(p, n);
        CHECK(q);
        size_t keep = have < n ? have : n;
        for (size_t j = 0; j < keep; j += 4093) CHECK(q[j] == (char)(j * 31 + 7));
        if (keep && keep == have) CHECK(q[keep - 1] == (char)((keep - 1) * 31 + 7));
        for (size_t j = 0; j < n; j += 4093) q[j] = (char)(j * 31 + 7);
        q[n - 1] = (char)((n - 1) * 31 + 7);
        p = q;
        have = n;
    }
    /* Grow a large block many times (in place or moved) with a neighbour in the way. */
    char *a = malloc(3 * MIB), *b = malloc(3 * MIB);
    fill(a, 3 * MIB, 4);
    for (size_t n = 4 * MIB; n <= 64 * MIB; n += 3 * MIB) {
        a = realloc(a, n);
        CHECK(a && same(a, 3 * MIB, 4));
    }
    free(b);
    free(a);
    free(p);
    errno = 0;
    p = malloc(3 * MIB);
    CHECK(realloc(p, V(SIZE_MAX - 100)) == NULL && errno == ENOMEM); /* p untouched */
    fill(p, 3 * MIB, 5);
    CHECK(same(p, 3 * MIB, 5));
    CHECK(realloc(p, 0) == NULL); /* glibc: frees */
    CHECK(reallocarray(NULL, V(SIZE_MAX / 2), 3) == NULL && errno == ENOMEM);
    p = reallocarray(NULL, 3, MIB);
    CHECK(p);
    free(p);
}

/* ---- calloc ------------------------------------------------------------------------- */
static void calloc_case(void) {
    errno = 0;
    CHECK(calloc(V(SIZE_MAX / 2), 3) == NULL && errno == ENOMEM);
    errno = 0;
    CHECK(calloc(V((size_t)1 << 33), V((size_t)1 << 33)) == NULL && errno == ENOMEM);
    for (int i = 0; i < 6; i++) {
        /* A dirty large block freed, then calloc of the same size: zero anyway. */
        char *d = malloc(6 * MIB);
        memset(d, 0xff, 6 * MIB);
        free(d);
        char *z = calloc(1, 6 * MIB - i * 4096);
        CHECK(z);
        for (size_t j = 0; j < 6 * MIB - i * 4096; j += 512) CHECK(z[j] == 0);
        free(z);
        z = calloc(100, 10);
        for (int j = 0; j < 1000; j++) CHECK(z[j] == 0);
        free(z);
    }
}

/* ---- out of memory ------------------------------------------------------------------ */
static void enomem(void) {
    errno = 0;
    CHECK(malloc(V(SIZE_MAX)) == NULL && errno == ENOMEM);
    errno = 0;
    CHECK(malloc(V((size_t)1 << 62)) == NULL && errno == ENOMEM);
    errno = 0;
    CHECK(malloc(V((size_t)64 << 40)) == NULL && errno == ENOMEM); /* 64 TiB */
    errno = 0;
    CHECK(aligned_alloc(1 << 21, V((size_t)64 << 40)) == NULL && errno == ENOMEM);
    void *p = malloc(5 * MIB); /* still works afterwards */
    CHECK(p);
    free(p);
}

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    const char *c = argv[1];
    if (!strcmp(c, "cross_thread")) cross_thread();
    else if (!strcmp(c, "fork")) fork_case();
    else if (!strcmp(c, "thread_exit")) thread_exit();
    else if (!strcmp(c, "dlopen")) dl(argc > 2 ? argv[2] : "./libedge_dl.so");
    else if (!strcmp(c, "align")) align_case();
    else if (!strcmp(c, "usable")) usable();
    else if (!strcmp(c, "realloc")) realloc_case();
    else if (!strcmp(c, "calloc")) calloc_case();
    else if (!strcmp(c, "enomem")) enomem();
    else return 2;
    printf("ok %s\n", c);
    return 0;
}
