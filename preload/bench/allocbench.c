/* Multi-threaded allocator stress in the manner of mimalloc-bench's larson (server
 * threads replacing random blocks, handing their arrays to fresh threads),
 * xmalloc-test (producers allocate, consumers free) and cache-scratch (objects written
 * by other threads than their allocator). Fixed operation counts, so the output (a
 * checksum) is the same under any allocator; time it from outside.
 *
 *   allocbench larson|xmalloc|cscratch|mixed THREADS SCALE */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int threads = 2;
static long scale = 1;

static uint64_t rnd(uint64_t *s) {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

/* ---- larson ---- */
#define LSLOTS 1000
struct larson {
    char *blk[LSLOTS];
    uint64_t seed, sum;
    int gen;
};

static void *larson_thread(void *arg) {
    struct larson *l = arg;
    long rounds = 20000 * scale;
    for (long i = 0; i < rounds; i++) {
        int s = rnd(&l->seed) % LSLOTS;
        size_t n = 8 + rnd(&l->seed) % 1000;
        if (l->blk[s]) {
            l->sum += (unsigned char)l->blk[s][0];
            free(l->blk[s]);
        }
        l->blk[s] = malloc(n);
        memset(l->blk[s], (int)(i & 0xff), n < 64 ? n : 64);
    }
    if (l->gen-- > 0) { /* hand the array to a fresh thread, which frees our blocks */
        pthread_t t;
        pthread_create(&t, NULL, larson_thread, l);
        pthread_join(t, NULL);
    }
    return NULL;
}

static uint64_t larson(void) {
    pthread_t t[64];
    struct larson *ls = calloc(threads, sizeof *ls);
    for (int i = 0; i < threads; i++) {
        ls[i].seed = 88172645463325252ULL + i;
        ls[i].gen = 4;
        pthread_create(&t[i], NULL, larson_thread, &ls[i]);
    }
    uint64_t sum = 0;
    for (int i = 0; i < threads; i++) {
        pthread_join(t[i], NULL);
        sum += ls[i].sum;
        for (int s = 0; s < LSLOTS; s++) free(ls[i].blk[s]);
    }
    free(ls);
    return sum;
}

/* ---- xmalloc-test: a ring of blocks from producers to consumers ---- */
#define RING 4096
static void *ring[RING];
static long head, tail;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t not_full = PTHREAD_COND_INITIALIZER, not_empty = PTHREAD_COND_INITIALIZER;
static long produced_total;

static void *producer(void *arg) {
    uint64_t seed = (uintptr_t)arg + 1;
    long n = 50000 * scale;
    for (long i = 0; i < n; i++) {
        size_t sz = 16 + rnd(&seed) % 256;
        char *p = malloc(sz);
        p[0] = (char)sz;
        pthread_mutex_lock(&mu);
        while (tail - head == RING) pthread_cond_wait(&not_full, &mu);
        ring[tail++ % RING] = p;
        pthread_cond_signal(&not_empty);
        pthread_mutex_unlock(&mu);
    }
    return NULL;
}

static void *consumer(void *arg) {
    uint64_t *sum = arg;
    for (;;) {
        pthread_mutex_lock(&mu);
        while (head == tail && head < produced_total) pthread_cond_wait(&not_empty, &mu);
        if (head == produced_total) {
            pthread_cond_broadcast(&not_empty);
            pthread_mutex_unlock(&mu);
            return NULL;
        }
        char *p = ring[head++ % RING];
        pthread_cond_signal(&not_full);
        pthread_mutex_unlock(&mu);
        *sum += (unsigned char)p[0];
        free(p);
    }
}

static uint64_t xmalloc(void) {
    int np = threads > 1 ? threads / 2 : 1, nc = threads > 1 ? threads - np : 1;
    produced_total = np * 50000 * scale;
    pthread_t t[128];
    uint64_t sums[64] = {0};
    for (int i = 0; i < np; i++) pthread_create(&t[i], NULL, producer, (void *)(uintptr_t)i);
    for (int i = 0; i < nc; i++) pthread_create(&t[np + i], NULL, consumer, &sums[i]);
    uint64_t sum = 0;
    for (int i = 0; i < np + nc; i++) pthread_join(t[i], NULL);
    for (int i = 0; i < nc; i++) sum += sums[i];
    return sum;
}

/* ---- cache-scratch: each thread frees an object another allocated, then churns ---- */
static void *scratch_thread(void *arg) {
    char *obj = arg;
    uint64_t sum = 0;
    free(obj);
    for (long i = 0; i < 2000 * scale; i++) {
        char *o = malloc(8);
        memset(o, 0, 8);
        for (int k = 0; k < 50; k++) o[k % 8] += (char)k;
        sum += (unsigned char)o[3];
        free(o);
    }
    return (void *)(uintptr_t)sum;
}

static uint64_t cscratch(void) {
    pthread_t t[64];
    char *objs[64];
    for (int i = 0; i < threads; i++) objs[i] = malloc(8);
    for (int i = 0; i < threads; i++) pthread_create(&t[i], NULL, scratch_thread, objs[i]);
    uint64_t sum = 0;
    for (int i = 0; i < threads; i++) {
        void *r;
        pthread_join(t[i], &r);
        sum += (uintptr_t)r;
    }
    return sum;
}

/* ---- mixed: sizes from 16 B to 8 MiB, realloc growth, as a loader or a batcher ---- */
static void *mixed_thread(void *arg) {
    uint64_t seed = (uintptr_t)arg + 7, sum = 0;
    for (long i = 0; i < 200 * scale; i++) {
        size_t big = (1 + rnd(&seed) % 8) << 20;
        char *b = malloc(big);
        memset(b, 1, big);
        char *v = NULL;
        size_t cap = 0;
        for (size_t n = 0; n < 40000; n += 1000) {
            if (n >= cap) {
                cap = cap ? cap * 2 : 4096;
                v = realloc(v, cap * 8);
            }
            v[n * 8] = (char)n;
        }
        for (int k = 0; k < 200; k++) {
            char *s = malloc(16 + rnd(&seed) % 200);
            s[0] = 1;
            sum += (unsigned char)s[0];
            free(s);
        }
        sum += (unsigned char)b[big - 1] + (unsigned char)v[8000];
        free(v);
        free(b);
    }
    return (void *)(uintptr_t)sum;
}

static uint64_t mixed(void) {
    pthread_t t[64];
    for (int i = 0; i < threads; i++) pthread_create(&t[i], NULL, mixed_thread, (void *)(uintptr_t)i);
    uint64_t sum = 0;
    for (int i = 0; i < threads; i++) {
        void *r;
        pthread_join(t[i], &r);
        sum += (uintptr_t)r;
    }
    return sum;
}

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    if (argc > 2) threads = atoi(argv[2]);
    if (argc > 3) scale = atol(argv[3]);
    if (threads < 1 || threads > 64 || scale < 1) return 2;
    uint64_t sum;
    if (!strcmp(argv[1], "larson")) sum = larson();
    else if (!strcmp(argv[1], "xmalloc")) sum = xmalloc();
    else if (!strcmp(argv[1], "cscratch")) sum = cscratch();
    else if (!strcmp(argv[1], "mixed")) sum = mixed();
    else return 2;
    printf("%s threads=%d scale=%ld checksum=%llu\n", argv[1], threads, scale, (unsigned long long)sum);
    return 0;
}
