/*
 * A fake HIP runtime for hetmem's tests: it exports the HIP entry points hetmem's
 * ROCm backend loads, with the same C signatures and status codes as ROCm's
 * hip_runtime_api.h, and behaves like a small multi-GPU machine (one file, slightly
 * over 800 lines, for the same reason as fake_cuda.c: one library, one machine state):
 *
 *   - N devices (env FAKE_HIP_DEVICES, default 2; 0 -> hipGetDeviceCount answers
 *     hipErrorNoDevice), each with FAKE_HIP_MEM_BYTES of memory (default 256 MiB;
 *     suffixes K/M/G/T) and per-device accounting, so an allocation past capacity
 *     fails with hipErrorOutOfMemory and hipMemGetInfo reports the truth for the
 *     *current* device (a per-thread setting, as in HIP).
 *   - FAKE_HIP_MANAGED=0 makes devices report no managed-memory support;
 *     FAKE_HIP_INIT_ERROR=<code> makes hipInit fail with that code.
 *   - Device memory is host memory (the pointer is the "device address"). Every copy
 *     first checks that each range that starts in an allocation stays inside it and
 *     that source and destination do not overlap.
 *   - Copies are asynchronous, honestly: hipMemcpyAsync on a stream only enqueues the
 *     copy (dst, src, length) on that stream's queue, and nothing is copied until the
 *     queue runs. A queue runs, in order, (all of it) on hipStreamSynchronize and
 *     hipStreamDestroy (which lets queued work finish); up to an event's record on
 *     hipEventSynchronize, on hipStreamWaitEvent (the producer runs up to the event,
 *     so the waiting stream's later work is ordered after it) and on a hipEventQuery
 *     that found the event pending (the query answers hipErrorNotReady, and the
 *     "GPU" then makes progress so a polling loop ends); and on hipFree or
 *     hipHostUnregister of memory that a queued copy touches (the real runtime's
 *     implicit synchronisation). The null stream (0) is HIP's legacy default stream:
 *     its work (hipMemcpy, hipMemcpyAsync / hipEventRecord on 0) runs at once, after
 *     the work queued so far on the device's blocking streams (hipStreamDefault, and
 *     the per-thread streams) and not after the non-blocking ones' (hetmem's are
 *     hipStreamNonBlocking: a synchronous copy that races a copy queued there sees the
 *     memory as it is); hipStreamSynchronize(0) runs the blocking streams too.
 *     hipStreamPerThread (2) is the calling thread's own per-thread stream of its
 *     current device, a queue made at its first use (one per thread and device).
 *     hipDeviceSynchronize runs every queue of the current device. Prefetches do
 *     nothing to memory and are not queued.
 *   - Events: recording on a stream with queued work enqueues the record, and the
 *     event is pending (hipEventQuery answers hipErrorNotReady) until the queue passes
 *     it; recording on an idle stream or the null stream completes at once; an event
 *     never recorded counts as complete, as in HIP.
 *   - Streams and events are small tracked objects on the device that was current
 *     when they were made; destroyed or unknown handles give hipErrorInvalidHandle,
 *     recording an event on a stream of another device too. Destroyed objects are
 *     REUSED: the next create of the same kind hands out the most recently destroyed
 *     handle value again, as real drivers may, so code that keys anything by a raw
 *     handle value is caught.
 *   - No graphs: hipStreamIsCapturing answers hipStreamCaptureStatusNone for every
 *     live stream (and the special streams).
 *   - Host registrations are tracked; overlapping registration gives
 *     hipErrorHostMemoryAlreadyRegistered, unregistering an unknown pointer
 *     hipErrorHostMemoryNotRegistered. hipFree of an unknown pointer (or a double
 *     free) gives hipErrorInvalidValue.
 *
 * Extra entry points for tests (not HIP): fakeHipConfigure, fakeHipFailNext and
 * fakeHipStat, below. Every call takes one mutex, and queued work runs under it. What
 * this file shares with the fake CUDA driver is in tests/fake_common.h.
 *
 * State is per loaded copy of this library: the dynamic loader shares one copy per
 * file, so tests that need a clean machine load their own copy of the file.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../fake_common.h"

#define EXPORT __attribute__((visibility("default")))

#ifdef FAKE_HIP_REAL_HEADERS
/* Check mode: `cc -DFAKE_HIP_REAL_HEADERS -D__HIP_PLATFORM_AMD__ -I<rocm>/include` makes
 * the compiler compare every definition below with ROCm's own declarations (conflicting
 * types are an error) and use ROCm's constants. */
#include <hip/hip_runtime_api.h>
#else
typedef int hipError_t;
typedef int hipDevice_t;
typedef struct ihipStream_t *hipStream_t;
typedef struct ihipEvent_t *hipEvent_t;
typedef int hipMemcpyKind;
typedef int hipDeviceAttribute_t;
typedef int hipMemoryAdvise;

enum {
    hipSuccess = 0,
    hipErrorInvalidValue = 1,
    hipErrorOutOfMemory = 2,
    hipErrorNotInitialized = 3,
    hipErrorNoDevice = 100,
    hipErrorInvalidDevice = 101,
    hipErrorInvalidHandle = 400,
    hipErrorNotReady = 600,
    hipErrorHostMemoryAlreadyRegistered = 712,
    hipErrorHostMemoryNotRegistered = 713,
    hipErrorNotSupported = 801,
    hipErrorUnknown = 999,
};

enum { hipDeviceAttributeManagedMemory = 24 };
enum { hipMemcpyHostToHost = 0, hipMemcpyDefault = 4 };
#define hipStreamNonBlocking 0x01
#define hipMemAttachGlobal 0x01
#define hipMemAttachHost 0x02
#define hipCpuDeviceId ((int)-1)
#endif

#define MAX_DEVICES 64
#define FAKE_RUNTIME_VERSION 50221153

struct alloc {
    char *ptr;
    size_t size;
    int device;
    int managed;
};

enum { OP_COPY = 1, OP_RECORD = 2 };

struct object;

struct op { /* one piece of queued work on a stream */
    int kind;
    char *dst;         /* OP_COPY */
    const char *src;   /* OP_COPY */
    size_t n;          /* OP_COPY */
    struct object *ev; /* OP_RECORD; NULL once the event is destroyed */
    unsigned long long gen; /* OP_RECORD: which recording of `ev` this is */
};

struct object { /* a stream or an event */
    unsigned magic;
    int device;
    int live;
    int kind;
    unsigned flags; /* streams: hipStreamDefault (blocking) or hipStreamNonBlocking */
    int per_thread; /* one thread's hipStreamPerThread queue: no handle of its own */
    struct object *next_free; /* free list of destroyed objects, per kind */
    /* Streams: the queue; ops [qhead, qlen) are pending. */
    struct op *q;
    size_t qhead, qlen, qcap;
    /* Events: recorded `gen` times, the first `done_gen` recordings have passed;
     * `stream` is where the latest pending recording is queued (NULL if none). */
    unsigned long long gen, done_gen;
    struct object *stream;
};
#define MAGIC 0x4649504bu
enum { KIND_STREAM = 1, KIND_EVENT = 2 };

struct registration {
    char *ptr;
    size_t size;
    unsigned flags;
};

static int g_initialized;
static int g_configured;
static int g_devices = 2;
static size_t g_capacity = (size_t)256 << 20;
static int g_managed = 1;
static int g_init_error;
static size_t g_used[MAX_DEVICES];
static __thread int t_current;
/* This thread's per-thread stream (hipStreamPerThread) of each device, made at first use. */
static __thread struct object *t_per_thread[MAX_DEVICES];
#define PER_THREAD_HANDLE ((hipStream_t)(uintptr_t)2)

static struct alloc *g_allocs;
static size_t g_nallocs, g_cap_allocs;
/* Never freed: a stale handle stays detectable until its object is reused. */
static struct object **g_objects;
static size_t g_nobjects, g_cap_objects;
static struct object *g_free_streams, *g_free_events;
static struct registration *g_regs;
static size_t g_nregs, g_cap_regs;

static long long g_copies, g_async_copies, g_async_copies_done, g_prefetches, g_advises;
static long long g_reused_handles;
static long long g_last_prefetch_device = -100, g_last_advice = -100,
                 g_last_advice_device = -100, g_last_register_flags = -100,
                 g_last_stream_flags = -100, g_last_event_flags = -100;
static long long g_set_device_calls;
static long long g_per_thread_streams, g_device_synchronizes;

static void init_locked(void) {
    if (g_initialized) return;
    if (!g_configured) {
        long long n = env_ll("FAKE_HIP_DEVICES", 2);
        g_devices = n < 0 ? 0 : (n > MAX_DEVICES ? MAX_DEVICES : (int)n);
        long long m = env_ll("FAKE_HIP_MEM_BYTES", (long long)256 << 20);
        g_capacity = m < 0 ? 0 : (size_t)m;
        g_managed = env_ll("FAKE_HIP_MANAGED", 1) != 0;
        g_init_error = (int)env_ll("FAKE_HIP_INIT_ERROR", 0);
    }
    g_initialized = 1;
}

#define ENTER(name)                                \
    pthread_mutex_lock(&g_lock);                   \
    init_locked();                                 \
    do {                                           \
        int injected_ = injected_failure(name);    \
        if (injected_) RETURN(injected_);          \
    } while (0)

static int valid_device(int d) { return d >= 0 && d < g_devices; }

/* The allocation containing p, or NULL. */
static struct alloc *find_alloc(const void *p) {
    const char *c = p;
    for (size_t i = 0; i < g_nallocs; i++)
        if (c >= g_allocs[i].ptr && c < g_allocs[i].ptr + g_allocs[i].size) return &g_allocs[i];
    return NULL;
}

/* A range is acceptable if it does not start in an allocation, or lies inside it. */
static int range_ok(const void *p, size_t n) {
    struct alloc *a = find_alloc(p);
    if (!a) return 1;
    return (size_t)((const char *)p - a->ptr) + n <= a->size;
}

static int managed_range(const void *p, size_t n) {
    struct alloc *a = find_alloc(p);
    return a && a->managed && range_ok(p, n);
}

static struct object *find_object(const void *h, int kind) {
    for (size_t i = 0; i < g_nobjects; i++)
        if ((const void *)g_objects[i] == h)
            return g_objects[i]->kind == kind && g_objects[i]->live && !g_objects[i]->per_thread
                       ? g_objects[i]
                       : NULL;
    return NULL;
}

static struct object **free_list(int kind) {
    return kind == KIND_STREAM ? &g_free_streams : &g_free_events;
}

static struct object *new_object(int kind) {
    struct object **head = free_list(kind);
    struct object *o = *head;
    if (o) {
        /* Reuse the most recently destroyed handle, as a real driver may. */
        *head = o->next_free;
        g_reused_handles++;
    } else {
        struct object **n = grow(g_objects, &g_cap_objects, g_nobjects + 1, sizeof *g_objects);
        if (!n) return NULL;
        g_objects = n;
        o = calloc(1, sizeof *o);
        if (!o) return NULL;
        o->magic = MAGIC;
        o->kind = kind;
        g_objects[g_nobjects++] = o;
    }
    o->device = t_current;
    o->live = 1;
    o->flags = 0;
    o->per_thread = 0;
    o->next_free = NULL;
    o->qhead = o->qlen = 0; /* the queue buffer (o->q) is kept for reuse */
    o->gen = o->done_gen = 0;
    o->stream = NULL;
    return o;
}

static void retire_object(struct object *o) {
    struct object **head = free_list(o->kind);
    o->live = 0;
    o->next_free = *head;
    *head = o;
}

/* ------------------------------------------------------------- stream queues */

static int event_done(const struct object *e) { return e->done_gen >= e->gen; }

static int enqueue(struct object *s, struct op op) {
    struct op *n = grow(s->q, &s->qcap, s->qlen + 1, sizeof *s->q);
    if (!n) return 0;
    s->q = n;
    s->q[s->qlen++] = op;
    return 1;
}

static void run_op(struct op *op) {
    if (op->kind == OP_COPY) {
        memmove(op->dst, op->src, op->n);
        g_async_copies_done++;
    } else if (op->kind == OP_RECORD && op->ev && op->gen > op->ev->done_gen) {
        op->ev->done_gen = op->gen;
    }
}

/* Runs stream s's queued ops, in order, up to and including index `last`. */
static void run_through(struct object *s, size_t last) {
    while (s->qhead < s->qlen && s->qhead <= last) run_op(&s->q[s->qhead++]);
    if (s->qhead == s->qlen) s->qhead = s->qlen = 0;
}

static void run_all(struct object *s) {
    if (s->qlen > 0) run_through(s, s->qlen - 1);
}

/* Runs the queue that holds event e's latest recording up to that recording. */
static void run_to_event(struct object *e) {
    struct object *s = e->stream;
    if (event_done(e) || !s) return;
    for (size_t i = s->qhead; i < s->qlen; i++) {
        if (s->q[i].kind == OP_RECORD && s->q[i].ev == e && s->q[i].gen == e->gen) {
            run_through(s, i);
            return;
        }
    }
}

/* Runs every queue that has a pending copy touching p..p+n (implicit sync). */
static void run_queues_touching(const char *p, size_t n) {
    for (size_t i = 0; i < g_nobjects; i++) {
        struct object *s = g_objects[i];
        if (s->kind != KIND_STREAM || !s->live) continue;
        for (size_t k = s->qhead; k < s->qlen; k++) {
            struct op *op = &s->q[k];
            if (op->kind == OP_COPY &&
                (overlaps(op->dst, op->n, p, n) || overlaps(op->src, op->n, p, n))) {
                run_all(s);
                break;
            }
        }
    }
}

/* The calling thread's per-thread stream of its current device, made at first use
 * (never on the free list, never destroyed); NULL when out of memory. */
static struct object *per_thread_stream(void) {
    struct object **slot = &t_per_thread[t_current];
    if (*slot) return *slot;
    struct object **n = grow(g_objects, &g_cap_objects, g_nobjects + 1, sizeof *g_objects);
    if (!n) return NULL;
    g_objects = n;
    struct object *o = calloc(1, sizeof *o);
    if (!o) return NULL;
    o->magic = MAGIC;
    o->kind = KIND_STREAM;
    o->device = t_current;
    o->live = 1;
    o->per_thread = 1;
    g_objects[g_nobjects++] = o;
    g_per_thread_streams++;
    return *slot = o;
}

/* Resolves a stream argument: NULL (*s NULL) is the null stream of the current device,
 * hipStreamPerThread the calling thread's per-thread stream of it. */
static hipError_t resolve_stream(hipStream_t stream, struct object **s) {
    *s = NULL;
    if (!stream) return hipSuccess;
    if (stream == PER_THREAD_HANDLE) {
        *s = per_thread_stream();
        return *s ? hipSuccess : hipErrorOutOfMemory;
    }
    *s = find_object(stream, KIND_STREAM);
    return *s ? hipSuccess : hipErrorInvalidHandle;
}

/* The null stream's work runs at once, after the work queued so far on the blocking
 * streams of its device (hipStreamDefault ones and the per-thread streams); it does
 * not wait for non-blocking streams. */
static void run_blocking_streams(int device) {
    for (size_t i = 0; i < g_nobjects; i++) {
        struct object *s = g_objects[i];
        if (s->kind == KIND_STREAM && s->live && s->device == device &&
            !(s->flags & hipStreamNonBlocking))
            run_all(s);
    }
}

static long long pending_per_thread(void) {
    long long r = 0;
    for (size_t i = 0; i < g_nobjects; i++)
        if (g_objects[i]->per_thread) r += (long long)(g_objects[i]->qlen - g_objects[i]->qhead);
    return r;
}

static long long queued_ops(void) {
    long long r = 0;
    for (size_t i = 0; i < g_nobjects; i++)
        if (g_objects[i]->kind == KIND_STREAM && g_objects[i]->live)
            r += (long long)(g_objects[i]->qlen - g_objects[i]->qhead);
    return r;
}

static long long live_objects(int kind) {
    long long n = 0;
    for (size_t i = 0; i < g_nobjects; i++)
        n += g_objects[i]->kind == kind && g_objects[i]->live && !g_objects[i]->per_thread;
    return n;
}

/* ---------------------------------------------------------------- test hooks */

/* Sets the machine before first use (overrides the environment). */
EXPORT int fakeHipConfigure(int devices, unsigned long long mem_bytes, int managed) {
    pthread_mutex_lock(&g_lock);
    if (g_initialized || devices < 0 || devices > MAX_DEVICES) {
        pthread_mutex_unlock(&g_lock);
        return hipErrorInvalidValue;
    }
    g_devices = devices;
    g_capacity = (size_t)mem_bytes;
    g_managed = managed != 0;
    g_configured = 1;
    pthread_mutex_unlock(&g_lock);
    return hipSuccess;
}

/* The next `times` calls of `call` (e.g. "hipMalloc") return `code` and do nothing. */
EXPORT void fakeHipFailNext(const char *call, int code, int times) {
    fail_next(call, code, times);
}

/* Counters by name; -1 for an unknown name. "used:N" is device N's bytes in use;
 * "async_copies" counts copies queued, "async_copies_done" those that have run,
 * "queued_ops" the work still pending on live streams, "reused_handles" how often a
 * create handed out a destroyed handle again, "per_thread_streams" the per-thread
 * streams made (one per thread and device that used hipStreamPerThread),
 * "per_thread_pending" the work still pending on them, "device_synchronizes" the
 * hipDeviceSynchronize calls. */
EXPORT long long fakeHipStat(const char *name) {
    long long r = -1;
    int d;
    pthread_mutex_lock(&g_lock);
    if (!strcmp(name, "allocations")) SUM_OVER(r, g_nallocs, !g_allocs[i].managed);
    else if (!strcmp(name, "managed_allocations")) SUM_OVER(r, g_nallocs, g_allocs[i].managed);
    else if (!strcmp(name, "streams")) r = live_objects(KIND_STREAM);
    else if (!strcmp(name, "events")) r = live_objects(KIND_EVENT);
    else if (!strcmp(name, "registrations")) r = (long long)g_nregs;
    else if (!strcmp(name, "registered_bytes")) SUM_OVER(r, g_nregs, g_regs[i].size);
    else if (!strcmp(name, "copies")) r = g_copies;
    else if (!strcmp(name, "async_copies")) r = g_async_copies;
    else if (!strcmp(name, "async_copies_done")) r = g_async_copies_done;
    else if (!strcmp(name, "queued_ops")) r = queued_ops();
    else if (!strcmp(name, "reused_handles")) r = g_reused_handles;
    else if (!strcmp(name, "prefetches")) r = g_prefetches;
    else if (!strcmp(name, "advises")) r = g_advises;
    else if (!strcmp(name, "last_prefetch_device")) r = g_last_prefetch_device;
    else if (!strcmp(name, "last_advice")) r = g_last_advice;
    else if (!strcmp(name, "last_advice_device")) r = g_last_advice_device;
    else if (!strcmp(name, "last_register_flags")) r = g_last_register_flags;
    else if (!strcmp(name, "last_stream_flags")) r = g_last_stream_flags;
    else if (!strcmp(name, "last_event_flags")) r = g_last_event_flags;
    else if (!strcmp(name, "set_device_calls")) r = g_set_device_calls;
    else if (!strcmp(name, "per_thread_streams")) r = g_per_thread_streams;
    else if (!strcmp(name, "per_thread_pending")) r = pending_per_thread();
    else if (!strcmp(name, "device_synchronizes")) r = g_device_synchronizes;
    else if ((d = stat_device(name, "used:", MAX_DEVICES)) >= 0) r = (long long)g_used[d];
    pthread_mutex_unlock(&g_lock);
    return r;
}

/* ------------------------------------------------------------------- HIP API */

EXPORT hipError_t hipInit(unsigned int flags) {
    ENTER("hipInit");
    if (g_init_error) RETURN(g_init_error);
    RETURN(flags == 0 ? hipSuccess : hipErrorInvalidValue);
}

EXPORT hipError_t hipRuntimeGetVersion(int *version) {
    ENTER("hipRuntimeGetVersion");
    if (!version) RETURN(hipErrorInvalidValue);
    *version = FAKE_RUNTIME_VERSION;
    RETURN(hipSuccess);
}

EXPORT hipError_t hipGetDeviceCount(int *count) {
    ENTER("hipGetDeviceCount");
    if (!count) RETURN(hipErrorInvalidValue);
    *count = g_devices;
    RETURN(g_devices == 0 ? hipErrorNoDevice : hipSuccess);
}

EXPORT hipError_t hipDeviceGet(hipDevice_t *device, int ordinal) {
    ENTER("hipDeviceGet");
    if (!device) RETURN(hipErrorInvalidValue);
    if (!valid_device(ordinal)) RETURN(hipErrorInvalidDevice);
    *device = ordinal;
    RETURN(hipSuccess);
}

EXPORT hipError_t hipDeviceGetName(char *name, int len, hipDevice_t device) {
    ENTER("hipDeviceGetName");
    if (!name || len <= 0) RETURN(hipErrorInvalidValue);
    if (!valid_device(device)) RETURN(hipErrorInvalidDevice);
    snprintf(name, (size_t)len, "Fake AMD Instinct %d", device);
    RETURN(hipSuccess);
}

EXPORT hipError_t hipDeviceTotalMem(size_t *bytes, hipDevice_t device) {
    ENTER("hipDeviceTotalMem");
    if (!bytes) RETURN(hipErrorInvalidValue);
    if (!valid_device(device)) RETURN(hipErrorInvalidDevice);
    *bytes = g_capacity;
    RETURN(hipSuccess);
}

EXPORT hipError_t hipDeviceGetPCIBusId(char *pci_bus_id, int len, int device) {
    ENTER("hipDeviceGetPCIBusId");
    if (!pci_bus_id || len < 13) RETURN(hipErrorInvalidValue);
    if (!valid_device(device)) RETURN(hipErrorInvalidDevice);
    /* Upper case on purpose: the backend must normalise to sysfs form. */
    snprintf(pci_bus_id, (size_t)len, "0000:%02X:00.0", 0x3B + device);
    RETURN(hipSuccess);
}

EXPORT hipError_t hipDeviceGetAttribute(int *value, hipDeviceAttribute_t attr, int device) {
    ENTER("hipDeviceGetAttribute");
    if (!value) RETURN(hipErrorInvalidValue);
    if (!valid_device(device)) RETURN(hipErrorInvalidDevice);
    if (attr != hipDeviceAttributeManagedMemory) RETURN(hipErrorInvalidValue);
    *value = g_managed;
    RETURN(hipSuccess);
}

EXPORT hipError_t hipSetDevice(int device) {
    ENTER("hipSetDevice");
    if (!valid_device(device)) RETURN(hipErrorInvalidDevice);
    t_current = device;
    g_set_device_calls++;
    RETURN(hipSuccess);
}

EXPORT hipError_t hipMemGetInfo(size_t *free_bytes, size_t *total) {
    ENTER("hipMemGetInfo");
    if (!free_bytes || !total) RETURN(hipErrorInvalidValue);
    if (!valid_device(t_current)) RETURN(hipErrorNoDevice);
    *free_bytes = g_capacity - g_used[t_current];
    *total = g_capacity;
    RETURN(hipSuccess);
}

static hipError_t do_alloc(void **ptr, size_t size, int managed) {
    if (!ptr) return hipErrorInvalidValue;
    if (size == 0) {
        *ptr = NULL;
        return hipSuccess;
    }
    if (!valid_device(t_current)) return hipErrorNoDevice;
    if (size > g_capacity - g_used[t_current]) return hipErrorOutOfMemory;
    struct alloc *n = grow(g_allocs, &g_cap_allocs, g_nallocs + 1, sizeof *g_allocs);
    if (!n) return hipErrorOutOfMemory;
    g_allocs = n;
    void *p = NULL;
    if (posix_memalign(&p, 256, size) != 0) return hipErrorOutOfMemory;
    memset(p, 0xA5, size); /* device memory is not zeroed */
    g_allocs[g_nallocs++] = (struct alloc){p, size, t_current, managed};
    g_used[t_current] += size;
    *ptr = p;
    return hipSuccess;
}

EXPORT hipError_t hipMalloc(void **ptr, size_t size) {
    ENTER("hipMalloc");
    RETURN(do_alloc(ptr, size, 0));
}

EXPORT hipError_t hipMallocManaged(void **ptr, size_t size, unsigned int flags) {
    ENTER("hipMallocManaged");
    if (flags != hipMemAttachGlobal && flags != hipMemAttachHost) RETURN(hipErrorInvalidValue);
    if (!g_managed) RETURN(hipErrorNotSupported);
    RETURN(do_alloc(ptr, size, 1));
}

EXPORT hipError_t hipFree(void *ptr) {
    ENTER("hipFree");
    if (!ptr) RETURN(hipSuccess);
    for (size_t i = 0; i < g_nallocs; i++) {
        if (g_allocs[i].ptr == ptr) {
            /* hipFree synchronises: queued copies touching the memory finish first. */
            run_queues_touching(g_allocs[i].ptr, g_allocs[i].size);
            g_used[g_allocs[i].device] -= g_allocs[i].size;
            free(g_allocs[i].ptr);
            g_allocs[i] = g_allocs[--g_nallocs];
            RETURN(hipSuccess);
        }
    }
    RETURN(hipErrorInvalidValue);
}

EXPORT hipError_t hipHostRegister(void *host_ptr, size_t size, unsigned int flags) {
    ENTER("hipHostRegister");
    if (!host_ptr || size == 0 || (flags & ~0xFu)) RETURN(hipErrorInvalidValue);
    char *p = host_ptr;
    for (size_t i = 0; i < g_nregs; i++)
        if (overlaps(p, size, g_regs[i].ptr, g_regs[i].size))
            RETURN(hipErrorHostMemoryAlreadyRegistered);
    struct registration *n = grow(g_regs, &g_cap_regs, g_nregs + 1, sizeof *g_regs);
    if (!n) RETURN(hipErrorOutOfMemory);
    g_regs = n;
    g_regs[g_nregs++] = (struct registration){p, size, flags};
    g_last_register_flags = flags;
    RETURN(hipSuccess);
}

EXPORT hipError_t hipHostUnregister(void *host_ptr) {
    ENTER("hipHostUnregister");
    for (size_t i = 0; i < g_nregs; i++) {
        if (g_regs[i].ptr == host_ptr) {
            /* As hipFree: queued copies touching the range finish first. */
            run_queues_touching(g_regs[i].ptr, g_regs[i].size);
            g_regs[i] = g_regs[--g_nregs];
            RETURN(hipSuccess);
        }
    }
    RETURN(hipErrorHostMemoryNotRegistered);
}

/* Checks a copy's arguments; hipSuccess when it may run. */
static hipError_t check_copy(void *dst, const void *src, size_t n, hipMemcpyKind kind) {
    if (kind < hipMemcpyHostToHost || kind > hipMemcpyDefault) return hipErrorInvalidValue;
    if (n == 0) return hipSuccess;
    if (!dst || !src) return hipErrorInvalidValue;
    if (!range_ok(dst, n) || !range_ok(src, n)) return hipErrorInvalidValue;
    if (overlaps(dst, n, src, n)) return hipErrorInvalidValue;
    return hipSuccess;
}

static hipError_t do_copy(void *dst, const void *src, size_t n, hipMemcpyKind kind) {
    hipError_t rc = check_copy(dst, src, n, kind);
    if (rc == hipSuccess && n > 0) memmove(dst, src, n);
    return rc;
}

EXPORT hipError_t hipMemcpy(void *dst, const void *src, size_t n, hipMemcpyKind kind) {
    ENTER("hipMemcpy");
    /* On the null stream of the current device. */
    hipError_t rc = check_copy(dst, src, n, kind);
    if (rc != hipSuccess) RETURN(rc);
    run_blocking_streams(t_current);
    rc = do_copy(dst, src, n, kind);
    if (rc == hipSuccess) g_copies++;
    RETURN(rc);
}

EXPORT hipError_t hipMemcpyAsync(void *dst, const void *src, size_t n, hipMemcpyKind kind,
                                 hipStream_t stream) {
    ENTER("hipMemcpyAsync");
    struct object *s;
    hipError_t rs = resolve_stream(stream, &s);
    if (rs != hipSuccess) RETURN(rs);
    if (!s) { /* the null stream: at once, after the blocking streams */
        hipError_t rc = check_copy(dst, src, n, kind);
        if (rc != hipSuccess) RETURN(rc);
        run_blocking_streams(t_current);
        rc = do_copy(dst, src, n, kind);
        if (rc == hipSuccess) g_async_copies++, g_async_copies_done++;
        RETURN(rc);
    }
    hipError_t rc = check_copy(dst, src, n, kind);
    if (rc != hipSuccess) RETURN(rc);
    g_async_copies++;
    if (n == 0) {
        g_async_copies_done++;
        RETURN(hipSuccess);
    }
    struct op op = {OP_COPY, dst, src, n, NULL, 0};
    if (!enqueue(s, op)) RETURN(hipErrorOutOfMemory);
    RETURN(hipSuccess);
}

EXPORT hipError_t hipStreamCreateWithFlags(hipStream_t *stream, unsigned int flags) {
    ENTER("hipStreamCreateWithFlags");
    if (!stream || (flags & ~(unsigned)hipStreamNonBlocking)) RETURN(hipErrorInvalidValue);
    struct object *o = new_object(KIND_STREAM);
    if (!o) RETURN(hipErrorOutOfMemory);
    o->flags = flags;
    g_last_stream_flags = flags;
    *stream = (hipStream_t)(void *)o;
    RETURN(hipSuccess);
}

EXPORT hipError_t hipStreamDestroy(hipStream_t stream) {
    ENTER("hipStreamDestroy");
    struct object *o = find_object(stream, KIND_STREAM);
    if (!o) RETURN(hipErrorInvalidHandle);
    /* Queued work finishes first; then no event refers to this stream any more. */
    run_all(o);
    for (size_t i = 0; i < g_nobjects; i++)
        if (g_objects[i]->kind == KIND_EVENT && g_objects[i]->stream == o)
            g_objects[i]->stream = NULL;
    retire_object(o);
    RETURN_YIELDING(hipSuccess);
}

EXPORT hipError_t hipStreamSynchronize(hipStream_t stream) {
    ENTER("hipStreamSynchronize");
    struct object *s;
    hipError_t rc = resolve_stream(stream, &s);
    if (rc != hipSuccess) RETURN(rc);
    /* The null stream waits for the blocking streams, not the non-blocking ones. */
    if (s) run_all(s);
    else run_blocking_streams(t_current);
    RETURN(hipSuccess);
}

/* Waits for every stream of the current device: the per-thread streams of all threads
 * included. */
EXPORT hipError_t hipDeviceSynchronize(void) {
    ENTER("hipDeviceSynchronize");
    g_device_synchronizes++;
    for (size_t i = 0; i < g_nobjects; i++) {
        struct object *s = g_objects[i];
        if (s->kind == KIND_STREAM && s->live && s->device == t_current) run_all(s);
    }
    RETURN(hipSuccess);
}

/* The fake records no graphs: no stream is ever capturing. */
EXPORT hipError_t hipStreamIsCapturing(hipStream_t stream, int *status) {
    ENTER("hipStreamIsCapturing");
    if (!status) RETURN(hipErrorInvalidValue);
    struct object *s;
    hipError_t rc = resolve_stream(stream, &s);
    if (rc != hipSuccess) RETURN(rc);
    *status = 0; /* hipStreamCaptureStatusNone */
    RETURN(hipSuccess);
}

EXPORT hipError_t hipEventCreateWithFlags(hipEvent_t *event, unsigned int flags) {
    ENTER("hipEventCreateWithFlags");
    /* hipEventDefault 0, BlockingSync 1, DisableTiming 2, Interprocess 4. */
    if (!event || (flags & ~0x7u)) RETURN(hipErrorInvalidValue);
    struct object *o = new_object(KIND_EVENT);
    if (!o) RETURN(hipErrorOutOfMemory);
    g_last_event_flags = flags;
    *event = (hipEvent_t)(void *)o;
    RETURN(hipSuccess);
}

EXPORT hipError_t hipEventDestroy(hipEvent_t event) {
    ENTER("hipEventDestroy");
    struct object *o = find_object(event, KIND_EVENT);
    if (!o) RETURN(hipErrorInvalidHandle);
    /* A pending recording stays queued (ordering nothing); it must not touch whatever
     * event reuses this object. */
    for (size_t i = 0; i < g_nobjects; i++) {
        struct object *s = g_objects[i];
        if (s->kind != KIND_STREAM || !s->live) continue;
        for (size_t k = s->qhead; k < s->qlen; k++)
            if (s->q[k].kind == OP_RECORD && s->q[k].ev == o) s->q[k].ev = NULL;
    }
    retire_object(o);
    RETURN_YIELDING(hipSuccess);
}

EXPORT hipError_t hipEventRecord(hipEvent_t event, hipStream_t stream) {
    ENTER("hipEventRecord");
    struct object *e = find_object(event, KIND_EVENT);
    if (!e) RETURN(hipErrorInvalidHandle);
    int device = t_current;
    struct object *s;
    hipError_t rc = resolve_stream(stream, &s);
    if (rc != hipSuccess) RETURN(rc);
    if (s) device = s->device;
    /* An event can only be recorded on a stream of its own device. */
    if (device != e->device) RETURN(hipErrorInvalidHandle);
    if (!s) run_blocking_streams(device); /* the null stream's record follows them */
    unsigned long long gen = e->gen + 1;
    if (s && s->qhead < s->qlen) {
        struct op op = {OP_RECORD, NULL, NULL, 0, e, gen};
        if (!enqueue(s, op)) RETURN(hipErrorOutOfMemory);
        e->gen = gen;
        e->stream = s;
    } else {
        /* Nothing queued before it: passed at once. */
        e->gen = e->done_gen = gen;
        e->stream = NULL;
    }
    RETURN(hipSuccess);
}

EXPORT hipError_t hipStreamWaitEvent(hipStream_t stream, hipEvent_t event, unsigned int flags) {
    ENTER("hipStreamWaitEvent");
    if (flags != 0) RETURN(hipErrorInvalidValue);
    struct object *s;
    hipError_t rc = resolve_stream(stream, &s);
    if (rc != hipSuccess) RETURN(rc);
    struct object *e = find_object(event, KIND_EVENT);
    if (!e) RETURN(hipErrorInvalidHandle);
    /* Later work on `stream` must follow the event: simplest, pass it now. */
    run_to_event(e);
    RETURN(hipSuccess);
}

EXPORT hipError_t hipEventSynchronize(hipEvent_t event) {
    ENTER("hipEventSynchronize");
    struct object *e = find_object(event, KIND_EVENT);
    if (!e) RETURN(hipErrorInvalidHandle);
    run_to_event(e);
    RETURN(hipSuccess);
}

EXPORT hipError_t hipEventQuery(hipEvent_t event) {
    ENTER("hipEventQuery");
    struct object *e = find_object(event, KIND_EVENT);
    if (!e) RETURN(hipErrorInvalidHandle);
    if (event_done(e)) RETURN(hipSuccess);
    /* Not yet: say so, then let the "GPU" progress so that polling terminates. */
    run_to_event(e);
    RETURN(hipErrorNotReady);
}

EXPORT hipError_t hipMemPrefetchAsync(const void *ptr, size_t count, int device, hipStream_t stream) {
    ENTER("hipMemPrefetchAsync");
    if (!ptr || count == 0 || !managed_range(ptr, count)) RETURN(hipErrorInvalidValue);
    if (device != hipCpuDeviceId && !valid_device(device)) RETURN(hipErrorInvalidDevice);
    struct object *s;
    hipError_t rc = resolve_stream(stream, &s);
    if (rc != hipSuccess) RETURN(rc);
    g_prefetches++;
    g_last_prefetch_device = device;
    RETURN(hipSuccess);
}

EXPORT hipError_t hipMemAdvise(const void *ptr, size_t count, hipMemoryAdvise advice, int device) {
    ENTER("hipMemAdvise");
    if (!ptr || count == 0 || !managed_range(ptr, count)) RETURN(hipErrorInvalidValue);
    if (!((advice >= 1 && advice <= 6) || advice == 100 || advice == 101))
        RETURN(hipErrorInvalidValue);
    if (device != hipCpuDeviceId && !valid_device(device)) RETURN(hipErrorInvalidValue);
    g_advises++;
    g_last_advice = advice;
    g_last_advice_device = device;
    RETURN(hipSuccess);
}

EXPORT const char *hipGetErrorString(hipError_t error) {
    switch (error) {
    case hipSuccess: return "no error";
    case hipErrorInvalidValue: return "invalid argument";
    case hipErrorOutOfMemory: return "out of memory";
    case hipErrorNotInitialized: return "initialization error";
    case hipErrorNoDevice: return "no ROCm-capable device is detected";
    case hipErrorInvalidDevice: return "invalid device ordinal";
    case hipErrorInvalidHandle: return "invalid resource handle";
    case hipErrorNotReady: return "device not ready";
    case hipErrorHostMemoryAlreadyRegistered: return "part or all of the requested memory range is already mapped";
    case hipErrorHostMemoryNotRegistered: return "pointer does not correspond to a registered memory region";
    case hipErrorNotSupported: return "operation not supported";
    default: return "unknown error";
    }
}
