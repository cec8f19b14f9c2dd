/*
 * hetmem.h: the C ABI of libhetmem.so.
 *
 * One allocator for host, pinned, device and managed memory on CUDA, ROCm, a simulated
 * GPU ("sim") and host-only machines; a tiered parameter store that pages model
 * parameters between the device, pinned host memory and their source; and the two
 * entry points PyTorch's CUDAPluggableAllocator loads.
 *
 * Build: `cargo build --release` makes target/release/libhetmem.so.
 * Link:  cc -I include app.c -L target/release -lhetmem -Wl,-rpath,target/release
 *
 * Conventions
 * - Functions return int: HETMEM_OK (0) or a negative HETMEM_ERR_* code. The calling
 *   thread's last error message is hetmem_last_error() ("" after a success).
 * - No function unwinds or aborts on bad input: NULL pointers, unknown handles, sizes
 *   of 0 or SIZE_MAX, double frees and foreign pointers are error codes. A bug inside
 *   hetmem that panics is caught and returned as HETMEM_ERR_PANIC.
 * - Handles (hetmem_manager_t*, ...) are opaque tokens, checked on every call: a
 *   destroyed or made-up handle is HETMEM_ERR_INVALID_HANDLE, never a crash. Handles
 *   may be used from any thread.
 * - Out-pointers (`out`, `id`, ...) are required unless documented "may be NULL".
 *   Out-handles and out-addresses are set to NULL when a call fails.
 * - Memory addresses are plain addresses: a host address for host, pinned and managed
 *   memory, the device address for device memory (not dereferenceable by the CPU;
 *   on the simulator it is a synthetic value).
 * - fork(): in a child, every call on a handle made before the fork returns
 *   HETMEM_ERR_FORKED without reaching the driver, except frees, releases and
 *   destroys, which succeed and leak (the memory is the parent's). Pinned memory is
 *   not mapped in the child at all: do not touch it there.
 * - Codes per call: the comment above each function ends with "Errors:" and every
 *   code it can fail with (the name without HETMEM_ERR_, its causes in parentheses),
 *   "as hetmem_x" for all of another call's, or "none"; nothing follows the list.
 *   HETMEM_ERR_PANIC (a bug) is possible from every call and never listed. For a call
 *   with no status (a string getter, hetmem_torch_malloc, hetmem_torch_free) the list
 *   is of the failures hetmem_last_error() then describes. A code a call returns that
 *   its list lacks is a bug: with HETMEM_CHECK_CODES=1 in the environment the library
 *   aborts there, naming the call and the code (its tests run so). When adding a call
 *   or a way for one to fail, keep its list in this form: tests/it/capi_header.rs parses
 *   every list and fails on a declaration without one.
 *
 * This header is checked against the library's exports by `cargo test`
 * (tests/it/capi_header.rs): keep declarations on the lines "<type> hetmem_...(...);".
 */
#ifndef HETMEM_H
#define HETMEM_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h> /* ssize_t */

#ifdef __cplusplus
extern "C" {
#endif

/* ---- version ---------------------------------------------------------------- */

#define HETMEM_VERSION_MAJOR 0
#define HETMEM_VERSION_MINOR 1
#define HETMEM_VERSION_PATCH 0
/* The library version this header describes; compare with hetmem_version(). */
#define HETMEM_VERSION "0.1.0"

/* ---- status codes -------------------------------------------------------------- */

#define HETMEM_OK 0
/* A tier had too little memory (message: tier, requested and free bytes). */
#define HETMEM_ERR_OUT_OF_MEMORY -1
/* A size of zero, or one no allocator can satisfy (over SSIZE_MAX, ...). */
#define HETMEM_ERR_INVALID_SIZE -2
/* A device ordinal the backend does not have. */
#define HETMEM_ERR_UNKNOWN_DEVICE -3
/* A NUMA node this machine does not have. */
#define HETMEM_ERR_UNKNOWN_NUMA_NODE -4
/* A NUMA node that has no memory. */
#define HETMEM_ERR_NUMA_NODE_WITHOUT_MEMORY -5
/* A stream (or buffer) that belongs to another manager. */
#define HETMEM_ERR_FOREIGN_HANDLE -6
/* A range that runs past the end of its buffer. */
#define HETMEM_ERR_OUT_OF_BOUNDS -7
/* An argument that is wrong in a way no other code describes. */
#define HETMEM_ERR_INVALID_ARGUMENT -8
/* Not possible with this placement or backend. */
#define HETMEM_ERR_UNSUPPORTED -9
/* The backend's driver library is missing or unusable. */
#define HETMEM_ERR_BACKEND_UNAVAILABLE -10
/* A driver call failed (message: the call and the driver's code). */
#define HETMEM_ERR_DRIVER -11
/* A system call failed. */
#define HETMEM_ERR_OS -12
/* A file could not be read or parsed (safetensors, sysfs). */
#define HETMEM_ERR_CONFIG -13
/* A parameter's bytes did not match its checksum (a store made with checksums): its
 * host copy changed since registration, or loads delivered other bytes twice. */
#define HETMEM_ERR_CHECKSUM -14
/* A call in a fork()ed child on a manager (or anything of it) made before the fork:
 * GPU driver state does not survive fork(), so nothing reaches the driver. Pinned
 * memory is not mapped in the child (MADV_DONTFORK). Frees and destroys succeed
 * there, leaking what belongs to the parent. */
#define HETMEM_ERR_FORKED -15
/* Not possible while a stream is capturing a graph (CUDA stream capture): a tier-store
 * acquire of a parameter that is not resident, a copy with a host end, emptying the
 * cache, ... (the message says what to do instead). */
#define HETMEM_ERR_STREAM_CAPTURING -16
/* A required pointer argument was NULL. */
#define HETMEM_ERR_NULL_POINTER -20
/* A handle that is not live: destroyed, released, of another kind, or made up. */
#define HETMEM_ERR_INVALID_HANDLE -21
/* An address the manager did not allocate, or freed already. Nothing was touched. */
#define HETMEM_ERR_FOREIGN_POINTER -22
/* An output buffer too small; the size needed is reported where the call says so. */
#define HETMEM_ERR_BUFFER_TOO_SMALL -23
/* A parameter id or name the tier store does not have. */
#define HETMEM_ERR_UNKNOWN_PARAM -24
/* A panic inside hetmem was caught (a bug: please report the message). */
#define HETMEM_ERR_PANIC -99

/* ---- constants ------------------------------------------------------------------ */

/* Placements for hetmem_alloc. */
#define HETMEM_HOST 0    /* pageable host memory; device_or_node = NUMA node or -1   */
#define HETMEM_PINNED 1  /* page-locked host memory; device_or_node = NUMA node or -1 */
#define HETMEM_DEVICE 2  /* device memory; device_or_node = device (-1: device 0)     */
#define HETMEM_MANAGED 3 /* managed memory; device_or_node = device (-1: device 0)    */

/* Advice for hetmem_advise (the values of cudaMemoryAdvise). */
#define HETMEM_ADVISE_SET_READ_MOSTLY 1
#define HETMEM_ADVISE_UNSET_READ_MOSTLY 2
#define HETMEM_ADVISE_SET_PREFERRED_LOCATION 3 /* device: a device, or -1 for the host */
#define HETMEM_ADVISE_UNSET_PREFERRED_LOCATION 4
#define HETMEM_ADVISE_SET_ACCESSED_BY 5 /* device: a device */
#define HETMEM_ADVISE_UNSET_ACCESSED_BY 6

/* Sequence modes of a tier store (hetmem_store_config_t.sequence). */
#define HETMEM_SEQUENCE_NONE 0  /* LRU eviction until hetmem_store_set_sequence */
#define HETMEM_SEQUENCE_LEARN 1 /* learn the order of acquires from the first pass */

/* Planners of a tier store (hetmem_store_config_t.planner). */
#define HETMEM_PLANNER_BELADY 0 /* Belady's MIN decides what stays: fewest bytes, equal layers */
#define HETMEM_PLANNER_STATIC 1 /* a fixed set, largest first; the rest streamed */

/* Residency states (hetmem_store_residency). */
#define HETMEM_RESIDENCY_COLD 0    /* only in its source */
#define HETMEM_RESIDENCY_HOST 1    /* in pinned host memory */
#define HETMEM_RESIDENCY_LOADING 2 /* on the device, load queued */
#define HETMEM_RESIDENCY_DEVICE 3  /* on the device, loaded */

/* ---- types ----------------------------------------------------------------------- */

/* A manager: one backend, its devices, and the buffers allocated through it. */
typedef struct hetmem_manager hetmem_manager_t;
/* A stream: made by hetmem, or the caller's cudaStream_t / hipStream_t wrapped. */
typedef struct hetmem_stream hetmem_stream_t;
/* An event: a point in a stream that other streams and the host wait for. */
typedef struct hetmem_event hetmem_event_t;
/* A tiered parameter store over one device of a manager. */
typedef struct hetmem_store hetmem_store_t;
/* One acquired parameter; released (consumed) by hetmem_guard_release. */
typedef struct hetmem_guard hetmem_guard_t;

/* Settings of a tier store. Fill with hetmem_store_config_init, then adjust. */
typedef struct hetmem_store_config {
    int device;               /* device the parameters are loaded onto */
    size_t device_budget;     /* most device bytes resident parameters may use (> 0) */
    size_t host_budget;       /* most pinned host bytes: parameter copies + staging ring */
    size_t prefetch_depth;    /* steps of the sequence loads may run ahead (SIZE_MAX: as far
                                 as memory allows, at most a pass) */
    int sequence;             /* HETMEM_SEQUENCE_NONE or HETMEM_SEQUENCE_LEARN */
    int checksums;            /* non-zero: verify every load (slow; tests and debugging) */
    size_t staging_slots;     /* slots of the staging ring (>= 2) */
    size_t staging_slot_size; /* bytes per staging slot */
    size_t staging_threads;   /* host threads that fill a slot */
    size_t spare_slots;       /* largest parameters' worth of the budget kept for loading
                                 ahead (>= 1): 1 moves the fewest bytes, 2 overlaps better
                                 when kernels take about as long as copies */
    int planner;              /* HETMEM_PLANNER_BELADY (default) or HETMEM_PLANNER_STATIC:
                                 fewer bytes with mixed sizes, better overlap with
                                 spare_slots >= 2 */
} hetmem_store_config_t;

/* ---- errors and version ------------------------------------------------------------ */

/* The calling thread's last error message, "" after a call that succeeded. Never NULL;
 * valid until the thread's next hetmem call (other than this one and
 * hetmem_status_string). Owned by hetmem: do not free.
 * Errors: none. */
const char* hetmem_last_error(void);

/* The name of a status code ("HETMEM_ERR_NULL_POINTER", ...); a static string,
 * "HETMEM_ERR_UNKNOWN_STATUS" for a value that is not a code.
 * Errors: none. */
const char* hetmem_status_string(int status);

/* The library's version ("0.1.0"), a static string.
 * Errors: none. */
const char* hetmem_version(void);

/* ---- managers ------------------------------------------------------------------------ */

/* Opens a manager on `backend`: "sim", "host", "cuda" or "rocm"; NULL, "" or "auto"
 * take the HETMEM_BACKEND environment variable, else the first of CUDA, ROCm and sim
 * that works. *out receives the handle; destroy it with hetmem_manager_destroy.
 * Errors: NULL_POINTER (out), INVALID_ARGUMENT (an unknown backend name, a name that is
 * not UTF-8, a bad HETMEM_BACKEND, HETMEM_SIM_DEVICES or HETMEM_SIM_MEMORY),
 * BACKEND_UNAVAILABLE (the driver library is missing, or has no device), DRIVER (the
 * driver failed to start or to list its devices), CONFIG (the NUMA topology in sysfs
 * cannot be read), OS. */
int hetmem_manager_create(const char* backend, hetmem_manager_t** out);

/* Destroys a manager and frees every buffer it still holds (after the copies that use
 * them). Streams and stores made from it stay valid until destroyed themselves.
 * Errors: NULL_POINTER, INVALID_HANDLE (destroyed already). */
int hetmem_manager_destroy(hetmem_manager_t* mgr);

/* The manager's backend: "sim", "host", "cuda" or "rocm" (a static string), or NULL
 * for a handle that is not live (the last error says why).
 * Errors: NULL_POINTER, INVALID_HANDLE. */
const char* hetmem_manager_backend(hetmem_manager_t* mgr);

/* *count = the number of devices (0 on the host backend).
 * Errors: NULL_POINTER (mgr, count), INVALID_HANDLE. */
int hetmem_device_count(hetmem_manager_t* mgr, int* count);

/* Free and total bytes of `device` as the driver reports them.
 * Errors: NULL_POINTER, INVALID_HANDLE, INVALID_ARGUMENT (a negative device),
 * UNKNOWN_DEVICE (the host backend has none), FORKED, DRIVER. */
int hetmem_mem_info(hetmem_manager_t* mgr, int device, size_t* free_bytes, size_t* total_bytes);

/* ---- allocation -------------------------------------------------------------------------- */

/* Allocates `size` bytes with `placement` (HETMEM_HOST, _PINNED, _DEVICE, _MANAGED).
 * `device_or_node`: for host and pinned memory a NUMA node to bind to, or -1 for the
 * default policy; for device and managed memory the device, or -1 for device 0.
 * *out receives the address (device address for HETMEM_DEVICE), owned by the manager
 * until hetmem_free or hetmem_manager_destroy.
 * Errors: NULL_POINTER (mgr, out), INVALID_HANDLE, INVALID_SIZE (0, or over SSIZE_MAX
 * such as SIZE_MAX), OUT_OF_MEMORY, UNKNOWN_DEVICE, UNKNOWN_NUMA_NODE,
 * NUMA_NODE_WITHOUT_MEMORY, UNSUPPORTED (managed memory without support, pinning on the
 * host backend), INVALID_ARGUMENT (a bad placement, a negative device or node other than
 * -1), FORKED, DRIVER, OS (the kernel refused to map, bind or pin host memory). */
int hetmem_alloc(hetmem_manager_t* mgr, int placement, int device_or_node, size_t size,
                 void** out);

/* Frees a buffer by the address hetmem_alloc returned; the memory goes back after the
 * copies still queued on it. An address inside a buffer, one this manager did not
 * return, or one freed already is FOREIGN_POINTER and nothing is touched.
 * Errors: NULL_POINTER, INVALID_HANDLE, FOREIGN_POINTER. */
int hetmem_free(hetmem_manager_t* mgr, void* ptr);

/* ---- copies ------------------------------------------------------------------------------- */

/* Copies n bytes from `src` to `dst`, both addresses anywhere inside buffers of this
 * manager. stream NULL: returns when the bytes have arrived, ordered as cudaMemcpy
 * is: after the work queued before it on the device's legacy default stream (HIP: the
 * null stream) and, through it, on every blocking stream (not after work on
 * non-blocking streams, hetmem's own included). Otherwise the copy is
 * queued on `stream` and the call returns (pageable host memory may make it wait);
 * the buffers stay alive until it is done even if freed. Two ranges in one buffer are
 * copied synchronously, after the work queued on `stream` (overlap allowed). The
 * stream is checked the same way on every path (one buffer or two, any memory, n 0):
 * it must be this manager's, and of a device the copy involves (a copy between host
 * memory may go on any of the manager's streams).
 * Errors: NULL_POINTER (mgr, dst, src), INVALID_HANDLE (mgr, stream), FOREIGN_POINTER
 * (an address outside every buffer of this manager), OUT_OF_BOUNDS (a range that leaves
 * its buffer, n over SSIZE_MAX), FOREIGN_HANDLE (a stream of another manager),
 * INVALID_ARGUMENT (a stream of a device the copy does not involve), OUT_OF_MEMORY (no
 * host memory to stage device memory through), STREAM_CAPTURING (a copy with a host end
 * on a capturing stream), FORKED, DRIVER, OS. */
int hetmem_copy(hetmem_manager_t* mgr, void* dst, const void* src, size_t n,
                hetmem_stream_t* stream);

/* Copies n bytes of caller-owned host memory at `host_src` into `dst` (an address in a
 * buffer of this manager), synchronously. `host_src` must be readable for n bytes;
 * if it lies in a buffer of this manager, this is hetmem_copy.
 * Errors: INVALID_ARGUMENT (host_src runs into a buffer of this manager without starting
 * in one), as hetmem_copy. */
int hetmem_copy_from_host(hetmem_manager_t* mgr, void* dst, const void* host_src, size_t n);

/* Copies n bytes from `src` (an address in a buffer of this manager) into caller-owned
 * host memory at `host_dst`, synchronously. `host_dst` must be writable for n bytes;
 * if it lies in a buffer of this manager, this is hetmem_copy.
 * Errors: INVALID_ARGUMENT (host_dst runs into a buffer of this manager without starting
 * in one), as hetmem_copy. */
int hetmem_copy_to_host(hetmem_manager_t* mgr, void* host_dst, const void* src, size_t n);

/* ---- streams ------------------------------------------------------------------------------- */

/* Creates a stream on `device`, owned by hetmem: destroyed (after its queued work)
 * once the handle is destroyed and no pool block or guard uses it.
 * Errors: NULL_POINTER (mgr, out), INVALID_HANDLE, INVALID_ARGUMENT (a negative device),
 * UNKNOWN_DEVICE (the host backend has none), FORKED, DRIVER. */
int hetmem_stream_create(hetmem_manager_t* mgr, int device, hetmem_stream_t** out);

/* Wraps the caller's stream `raw` of `device` (a cudaStream_t / CUstream or
 * hipStream_t value; 0 = the device's default stream) so hetmem can queue work on it
 * and order its memory by it. hetmem never destroys a wrapped stream:
 * hetmem_stream_destroy only lets go. The stream must be live, of this device and of
 * the driver the manager uses, and stay live while the handle and anything that used
 * it (buffers with queued copies, guards) are alive. On CUDA, 0 (and 1,
 * CU_STREAM_LEGACY) is the legacy default stream of the device's primary context, one
 * for all threads. 2 (cudaStreamPerThread / hipStreamPerThread) is the per-thread
 * default stream with the driver's meaning: work hetmem queues through the handle goes
 * to the per-thread stream of the thread that makes the call, and hetmem keeps the
 * threads apart (a pool block freed on one thread's stream reaches another thread's
 * only behind an event; freed on another thread than its own, after a device-wide
 * wait). On the simulator, `raw` must be 0, 1, 2 or a value hetmem_stream_raw
 * returned for a stream of that device; anything else is INVALID_ARGUMENT.
 * Errors: NULL_POINTER (mgr, out), INVALID_HANDLE, UNKNOWN_DEVICE (the host backend has
 * none), INVALID_ARGUMENT (a negative device, a stream already wrapped for another
 * device, on the simulator a value that is not a stream of the device), FORKED, DRIVER. */
int hetmem_stream_wrap(hetmem_manager_t* mgr, int device, uintptr_t raw,
                       hetmem_stream_t** out);

/* *raw = the driver's stream handle (cudaStream_t / hipStream_t value), to launch the
 * caller's own work on it; for a wrapped stream, the value wrapped.
 * Errors: NULL_POINTER, INVALID_HANDLE. */
int hetmem_stream_raw(hetmem_stream_t* stream, uintptr_t* raw);

/* Blocks until the work queued on `stream` so far is done.
 * Errors: NULL_POINTER, INVALID_HANDLE, FORKED, DRIVER (also: the stream is capturing a
 * graph). */
int hetmem_stream_synchronize(hetmem_stream_t* stream);

/* Destroys a stream handle (see hetmem_stream_create / hetmem_stream_wrap).
 * Errors: NULL_POINTER, INVALID_HANDLE (destroyed already). */
int hetmem_stream_destroy(hetmem_stream_t* stream);

/* ---- events ------------------------------------------------------------------------------- *
 *
 * An event marks a point in a stream. To order your own work after hetmem's (an
 * asynchronous copy) without synchronising the stream: record an event on the copy's
 * stream, then make your stream wait for it (hetmem_stream_wait_event on the handle of
 * your stream, wrapped with hetmem_stream_wrap: the kernels you launch on it after that
 * run after the copy), or wait for it on the host (hetmem_event_synchronize). An event
 * belongs to the manager and device it was made for, and stays valid after its manager
 * is destroyed, until hetmem_event_destroy.
 */

/* Creates an event on `device`, not yet recorded: until it is, it counts as passed
 * (queries say done, waits return at once). *out receives the handle.
 * Errors: NULL_POINTER (mgr, out), INVALID_HANDLE (mgr), INVALID_ARGUMENT (a negative
 * device), UNKNOWN_DEVICE (the host backend has none), FORKED, DRIVER. */
int hetmem_event_create(hetmem_manager_t* mgr, int device, hetmem_event_t** out);

/* Records `event` at the current tail of `stream`: from now on it stands for the work
 * queued there so far. An event may be recorded again; waits queued before keep the
 * point that was current when they were queued.
 * Errors: NULL_POINTER, INVALID_HANDLE, FOREIGN_HANDLE (a stream of another manager),
 * INVALID_ARGUMENT (a stream of another device than the event's), FORKED, DRIVER. */
int hetmem_event_record(hetmem_event_t* event, hetmem_stream_t* stream);

/* Makes the work queued on `stream` from now on wait for the work before `event`'s
 * last recording, without blocking the host. The event may be of another device of
 * the stream's manager (as the drivers allow).
 * Errors: NULL_POINTER, INVALID_HANDLE, FOREIGN_HANDLE (an event of another manager),
 * FORKED, DRIVER. */
int hetmem_stream_wait_event(hetmem_stream_t* stream, hetmem_event_t* event);

/* *done = 1 if the work before the event's last recording is done (or it was never
 * recorded), 0 if not. Does not block.
 * Errors: NULL_POINTER, INVALID_HANDLE, FORKED, DRIVER. */
int hetmem_event_query(hetmem_event_t* event, int* done);

/* Blocks until the work before the event's last recording is done.
 * Errors: NULL_POINTER, INVALID_HANDLE, FORKED, DRIVER. */
int hetmem_event_synchronize(hetmem_event_t* event);

/* Destroys an event handle (waits already queued on the event are unaffected).
 * Errors: NULL_POINTER, INVALID_HANDLE. */
int hetmem_event_destroy(hetmem_event_t* event);

/* ---- managed memory -------------------------------------------------------------------------- */

/* Queues a migration of managed memory ptr..ptr+n to `device` (-1: the host) on
 * `stream` (of any device of the manager, as the drivers allow); with stream NULL, on a
 * stream of the buffer's device, and waits for it.
 * Errors: NULL_POINTER (mgr, ptr), INVALID_HANDLE (mgr, stream), FOREIGN_POINTER,
 * OUT_OF_BOUNDS, INVALID_ARGUMENT (not managed memory, a device below -1),
 * UNKNOWN_DEVICE, UNSUPPORTED (no managed memory on this backend), FOREIGN_HANDLE (a
 * stream of another manager), FORKED, DRIVER. */
int hetmem_prefetch(hetmem_manager_t* mgr, void* ptr, size_t n, int device,
                    hetmem_stream_t* stream);

/* Gives the driver `advice` (HETMEM_ADVISE_*) about managed memory ptr..ptr+n.
 * `device` is the location for SET_PREFERRED_LOCATION (-1: the host) and the device
 * for SET/UNSET_ACCESSED_BY; it is ignored otherwise.
 * Errors: NULL_POINTER (mgr, ptr), INVALID_HANDLE, FOREIGN_POINTER, OUT_OF_BOUNDS,
 * INVALID_ARGUMENT (not managed memory, an unknown advice, a device below 0 where one is
 * needed), UNKNOWN_DEVICE, UNSUPPORTED, FORKED, DRIVER. */
int hetmem_advise(hetmem_manager_t* mgr, void* ptr, size_t n, int advice, int device);

/* ---- stats ------------------------------------------------------------------------------------ */

/* Writes the manager's stats (and `store`'s, if not NULL) as NUL-terminated JSON into
 * buf[0..cap] if it fits; *needed (may be NULL) is always set to the bytes needed,
 * NUL included. Keys: backend, devices[] {ordinal, name, total_memory, numa_node},
 * live_buffers, live_bytes, host / pinned {current, peak, count}, device[] and
 * managed[] (per device, same keys), tier (null, or the store's counters: params,
 * hits, misses, loads, prefetches, bytes_loaded, staged_loads, evictions, writebacks,
 * writeback_bytes, checksum_mismatches, sequences_learnt, sequences_dropped,
 * device_bytes, device_peak_bytes, host_bytes, host_peak_bytes, mapped_bytes).
 * Errors: NULL_POINTER (mgr), INVALID_HANDLE (mgr, store), BUFFER_TOO_SMALL (call again
 * with *needed bytes). */
int hetmem_stats_json(hetmem_manager_t* mgr, hetmem_store_t* store, char* buf, size_t cap,
                      size_t* needed);

/* ---- profiling -------------------------------------------------------------------------------- */

/* Starts recording every event hetmem knows (allocations per placement, pool segments,
 * out-of-memory, budgets, the tier store's loads, evictions, write-backs, acquires) to
 * the file `path` ("%p": the process id), in the format of src/record.rs, read by
 * `cargo run --example prof`; as HETMEM_PROFILE=path does at the first manager. One
 * recording per process at a time.
 * Errors: NULL_POINTER (path), INVALID_ARGUMENT (path not UTF-8), CONFIG (a recording is
 * on already, or the file cannot be made). */
int hetmem_profile_start(const char* path);

/* Stops recording: writes what is queued and the end event, closes the file. *events and
 * *dropped (each may be NULL) get the events written and lost; both 0 when nothing was
 * recorded.
 * Errors: CONFIG (the writer thread did not finish the record). */
int hetmem_profile_finish(size_t* events, size_t* dropped);

/* ---- tier store -------------------------------------------------------------------------------- */

/* Each call below lists every code it can return besides HETMEM_OK (HETMEM_ERR_PANIC
 * only for a bug). FORKED: a store, guard or manager made before a fork(), used in the
 * child. */

/* Fills *cfg with defaults for these budgets: device 0, prefetch depth SIZE_MAX (as far
 * as memory allows), no sequence, no checksums, a staging ring of 4 slots of 4 MiB
 * filled by 2 threads (so host_budget must be at least 16 MiB).
 * Errors: NULL_POINTER. */
int hetmem_store_config_init(hetmem_store_config_t* cfg, size_t device_budget,
                             size_t host_budget);

/* sizeof(hetmem_store_config_t) as the library sees it: compare with the header's.
 * Errors: none. */
size_t hetmem_store_config_size(void);

/* Creates a tier store over mgr's device cfg->device with its own device pool, pinned
 * host pool, copy stream and staging ring. Destroy with hetmem_store_destroy. Nothing
 * is pinned for a ring that cannot be (the memory available, the address space).
 * Where no filler thread can be started (a thread or pids limit) the calling thread
 * fills the ring alone.
 * Errors: NULL_POINTER (mgr, cfg, out), INVALID_HANDLE (mgr), INVALID_ARGUMENT (zero
 * device budget or one above the device's memory, host budget below the staging ring,
 * fewer than 2 staging slots, 0 staging threads, 0 spare slots, bad sequence mode or
 * planner, negative device), INVALID_SIZE (a staging slot of 0 bytes or over SSIZE_MAX,
 * slots that together overflow the address space), UNKNOWN_DEVICE (the host backend has
 * none), OUT_OF_MEMORY (the ring is more than the host memory available, or cannot be
 * pinned), UNKNOWN_NUMA_NODE, NUMA_NODE_WITHOUT_MEMORY (the device's node, where the
 * ring is placed), OS, DRIVER, FORKED, UNSUPPORTED (the host backend). */
int hetmem_store_create(hetmem_manager_t* mgr, const hetmem_store_config_t* cfg,
                        hetmem_store_t** out);

/* Destroys a store handle; guards not yet released keep what they use alive.
 * Errors: NULL_POINTER, INVALID_HANDLE (destroyed already). */
int hetmem_store_destroy(hetmem_store_t* store);

/* Registers a parameter `name` whose bytes are a copy of data[0..n] (hetmem keeps the
 * copy; the caller may free `data` at once). *id receives its id (0, 1, ... in
 * registration order).
 * Errors: NULL_POINTER (store, name, id, data unless n is 0), INVALID_HANDLE, INVALID_SIZE
 * (n 0, or over SSIZE_MAX), OUT_OF_MEMORY (larger than the device budget, or no host
 * memory for the copy), INVALID_ARGUMENT (name taken, or not UTF-8), FORKED. */
int hetmem_store_register(hetmem_store_t* store, const char* name, const void* data, size_t n,
                          uint32_t* id);

/* Registers every tensor of the safetensors file at `path` (mapped, never copied
 * whole), in file order, under its own name; ids[0..*count] receive the ids. All or
 * none: if the file has more than `cap` tensors nothing is registered, *count is their
 * number and the call fails with BUFFER_TOO_SMALL (ids may be NULL when cap is 0); on
 * any other failure nothing is registered and *count is 0. A tensor of zero elements
 * is an empty parameter: size 0, always HETMEM_RESIDENCY_DEVICE, never loaded, and
 * acquired to a guard whose device pointer is NULL.
 * Errors: NULL_POINTER (store, path, count, ids unless cap is 0), INVALID_HANDLE,
 * CONFIG (file missing, not a regular file, such as a directory or a FIFO, which is
 * never opened blocking; malformed), BUFFER_TOO_SMALL, OUT_OF_MEMORY (a tensor larger
 * than the device budget), INVALID_ARGUMENT (a name taken, path not UTF-8), FORKED, OS,
 * as hetmem_store_register. */
int hetmem_store_register_safetensors(hetmem_store_t* store, const char* path, uint32_t* ids,
                                      size_t cap, size_t* count);

/* *id = the id of the parameter called `name`.
 * Errors: NULL_POINTER, INVALID_HANDLE, UNKNOWN_PARAM, INVALID_ARGUMENT (name not
 * UTF-8), FORKED. */
int hetmem_store_lookup(hetmem_store_t* store, const char* name, uint32_t* id);

/* *size = the size in bytes of parameter `id` (0 for an empty one).
 * Errors: NULL_POINTER, INVALID_HANDLE, UNKNOWN_PARAM, FORKED. */
int hetmem_store_param_size(hetmem_store_t* store, uint32_t id, size_t* size);

/* Installs the execution sequence ids[0..n] (one pass; ids may repeat): eviction then
 * drops what is needed farthest in the future, and acquires prefetch what comes next.
 * n 0 drops the sequence (LRU again; learning again in learn mode); ids may then be
 * NULL.
 * Errors: NULL_POINTER (store, ids unless n is 0), INVALID_HANDLE, UNKNOWN_PARAM,
 * INVALID_SIZE (n ids are more than memory holds), OUT_OF_MEMORY (no host memory for a
 * copy of them), FORKED, INVALID_ARGUMENT. */
int hetmem_store_set_sequence(hetmem_store_t* store, const uint32_t* ids, size_t n);

/* Hint: `id` is needed soon. It is loaded now if room can be made without evicting
 * anything acquired, kept resident, or needed sooner. *on_device (may be NULL) = 1 if
 * it is on the device afterwards.
 * Errors: NULL_POINTER (store), INVALID_HANDLE, UNKNOWN_PARAM, OUT_OF_MEMORY (the
 * device has no memory for it), CHECKSUM, DRIVER, FORKED, INVALID_ARGUMENT, CONFIG,
 * STREAM_CAPTURING, OS. */
int hetmem_store_will_need(hetmem_store_t* store, uint32_t id, int* on_device);

/* Hint: `id` is not needed for a while. Its device copy is dropped now (written back
 * first if dirty) unless a guard holds it. *dropped (may be NULL) = 1 if it was.
 * Errors: NULL_POINTER (store), INVALID_HANDLE, UNKNOWN_PARAM, DRIVER, FORKED,
 * OUT_OF_MEMORY, INVALID_ARGUMENT, CHECKSUM, STREAM_CAPTURING, OS. */
int hetmem_store_dont_need(hetmem_store_t* store, uint32_t id, int* dropped);

/* keep non-zero: `id` stays on the device once loaded; 0: it may be evicted again.
 * Errors: NULL_POINTER, INVALID_HANDLE, UNKNOWN_PARAM, FORKED. */
int hetmem_store_keep_resident(hetmem_store_t* store, uint32_t id, int keep);

/* Sets `id`'s eviction priority (default 0; the lowest priority is evicted first).
 * Errors: NULL_POINTER, INVALID_HANDLE, UNKNOWN_PARAM, FORKED. */
int hetmem_store_priority(hetmem_store_t* store, uint32_t id, int priority);

/* *state = where `id` is (HETMEM_RESIDENCY_*); *refs (may be NULL) = guards held.
 * Errors: NULL_POINTER (store, state), INVALID_HANDLE, UNKNOWN_PARAM, DRIVER, FORKED. */
int hetmem_store_residency(hetmem_store_t* store, uint32_t id, int* state, uint32_t* refs);

/* Acquires `id` for work on `stream`: *device_ptr (may be NULL) receives its device
 * address, valid for work queued on `stream` from now until the guard is released
 * (NULL for an empty parameter, which has no memory); the stream waits for the load,
 * the host does not. With stream NULL the load runs on the store's copy stream and the
 * call waits for it, so the address is valid at once (order your own work before the
 * release). *out receives the guard.
 * Errors: NULL_POINTER (store, out), INVALID_HANDLE (store, stream), UNKNOWN_PARAM,
 * FOREIGN_HANDLE (a stream of another manager), INVALID_ARGUMENT (a stream of another
 * device), OUT_OF_MEMORY (everything resident is in use, at once; or the device has no
 * memory for it: the message has the bytes asked for and free), STREAM_CAPTURING (a
 * parameter not resident, on a capturing stream), CHECKSUM, DRIVER, FORKED. */
int hetmem_store_acquire(hetmem_store_t* store, uint32_t id, hetmem_stream_t* stream,
                         hetmem_guard_t** out, void** device_ptr);

/* hetmem_store_acquire, but when the budget is full it waits up to `timeout_ms`
 * milliseconds for other threads to release guards (or hints to free room) before
 * failing with OUT_OF_MEMORY (hetmem_store_acquire fails at once).
 * Errors: as hetmem_store_acquire. */
int hetmem_store_acquire_timeout(hetmem_store_t* store, uint32_t id, hetmem_stream_t* stream,
                                 uint64_t timeout_ms, hetmem_guard_t** out, void** device_ptr);

/* Says the parameter's device copy will be written by work queued on the guard's
 * stream after this call: it is copied back to the host before it is ever dropped, the
 * stream first waits for earlier (released) uses on other streams, and later acquires
 * on any stream wait for the write. Nothing for an empty parameter.
 * Errors: NULL_POINTER, INVALID_HANDLE (released already), FORKED, INVALID_ARGUMENT
 * (released by another thread during the call). */
int hetmem_guard_mark_dirty(hetmem_guard_t* guard);

/* Ends a use and consumes the guard: the parameter's memory is not reused before the
 * work queued on the guard's stream until now is done.
 * Errors: NULL_POINTER, INVALID_HANDLE (released already). */
int hetmem_guard_release(hetmem_guard_t* guard);

/* Copies `id`'s current bytes (from the device if resident there, after the work
 * queued on it) into out[0..cap], synchronously.
 * Errors: NULL_POINTER (store, out), INVALID_HANDLE, UNKNOWN_PARAM, BUFFER_TOO_SMALL
 * (see hetmem_store_param_size), DRIVER, FORKED. */
int hetmem_store_read(hetmem_store_t* store, uint32_t id, void* out, size_t cap);

/* ---- PyTorch's pluggable allocator ------------------------------------------------------------------
 *
 *   torch.cuda.memory.change_current_allocator(torch.cuda.memory.CUDAPluggableAllocator(
 *       "libhetmem.so", "hetmem_torch_malloc_cxx", "hetmem_torch_free"))
 *
 * One process-wide manager (backend from HETMEM_BACKEND, else automatic), one caching
 * device pool per device, and PyTorch's stream semantics: a block belongs to the stream
 * it was allocated for; freed, it is reused at once on that stream and on other streams
 * only after the work queued on its stream before the free. `stream` is a cudaStream_t
 * (NULL: the default stream; 2, cudaStreamPerThread: the calling thread's per-thread
 * default stream, a different stream on each thread); it must stay live until
 * hetmem_torch_empty_cache is called with nothing allocated on it, or the process ends
 * (PyTorch's streams do).
 */

/* Returns `size` bytes of device memory on `device` for `stream`, or NULL with the last
 * error set. Size 0 returns NULL and is not an error.
 * Errors: INVALID_SIZE (a negative size, or more than a pool can hold), INVALID_ARGUMENT
 * (a negative device, on the simulator a stream that is not one of the device's, a graph
 * pool's filter that failed), UNKNOWN_DEVICE, OUT_OF_MEMORY, BACKEND_UNAVAILABLE (first
 * use: no GPU backend opens), CONFIG (first use: the NUMA topology), FORKED, DRIVER, OS. */
void* hetmem_torch_malloc(ssize_t size, int device, void* stream);

/* hetmem_torch_malloc for C++ callers (PyTorch's allocator interface has no error
 * return, and uses a NULL as the tensor's address): where hetmem_torch_malloc returns
 * NULL for a size above 0, this throws std::runtime_error(<last error message>)
 * instead. It returns NULL only in a process without libstdc++ loaded. Call it only
 * from C++ that lets the exception reach a catch.
 * Errors: as hetmem_torch_malloc. */
void* hetmem_torch_malloc_cxx(ssize_t size, int device, void* stream);

/* Gives back memory from hetmem_torch_malloc. NULL is ignored; an address hetmem did
 * not return (or freed already) is logged, sets the last error (FOREIGN_POINTER) and
 * is otherwise ignored.
 * Errors: FOREIGN_POINTER. */
void hetmem_torch_free(void* ptr, ssize_t size, int device, void* stream);

/* Marks the block containing `ptr` (from hetmem_torch_malloc) as used by the work
 * queued on `stream` too (tensor.record_stream(stream)): once freed, it is not reused on
 * any stream before the work queued on `stream` until the free is done (the reusing
 * stream waits for an event, no host sync). The block's own stream, or a stream
 * recorded already, changes nothing; NULL is ignored. `stream` is as for
 * hetmem_torch_malloc, of the block's device.
 * Errors: FOREIGN_POINTER (in no live block: freed already, or not hetmem's; PyTorch's
 * hook ignores it, as PyTorch's allocator ignores memory it did not make),
 * INVALID_ARGUMENT (on the simulator, not a stream of the block's device), FORKED,
 * DRIVER. */
int hetmem_torch_record_stream(void* ptr, void* stream);

/* Gives cached, unused device memory of every pool back to the driver and lets go of
 * wrapped streams nothing allocated uses (torch.cuda.empty_cache(), once
 * hetmem.torch.use_hetmem_allocator() has set PyTorch's hook).
 * Errors: STREAM_CAPTURING (a graph pool is being allocated to), FORKED, DRIVER. */
int hetmem_torch_empty_cache(void);

/* A graph pool's stream filter: 1 when an allocation on `stream` (the raw stream passed
 * to hetmem_torch_malloc; NULL for the default stream) goes to the pool, 0 when not,
 * negative when the filter failed (the allocation then fails). */
typedef int (*hetmem_stream_filter)(void* ctx, void* stream);

/* PyTorch's graph-pool hooks (torch.cuda.graph, torch.cuda.use_mem_pool,
 * torch.compile(mode="reduce-overhead")), with pool = (pool_a, pool_b), PyTorch's
 * MempoolId_t. PyTorch calls release from destructors: a hook must not throw there.
 */

/* begin: from now on the allocations on `device` whose stream `filter` picks (NULL:
 * every allocation of the device) come from private pool `pool` (made on first use;
 * each begin counts a use), until end. Blocks of the pool, freed, are reused only by
 * the pool's own later allocations until release has undone every begin: a graph
 * replays into their addresses. While any pool is being allocated to, hetmem makes no
 * event query, synchronisation or unmapping on the device (the driver refuses them in
 * a capture), and hetmem_torch_empty_cache fails with STREAM_CAPTURING. `filter(ctx,
 * stream)` runs on every allocation of the device meanwhile, from any thread, under
 * hetmem's locks (it must not call hetmem); hetmem owns `ctx` from the call on, failed
 * or not, and calls drop_ctx(ctx) (if not NULL) exactly once: at end, or at once when
 * begin fails.
 * Errors: INVALID_ARGUMENT (allocations already go to that pool, a negative device),
 * UNKNOWN_DEVICE, BACKEND_UNAVAILABLE (first use: no GPU backend opens), CONFIG (first
 * use: the NUMA topology), FORKED, DRIVER, OS. */
int hetmem_torch_begin_allocate_to_pool(int device, uint64_t pool_a, uint64_t pool_b,
                                        hetmem_stream_filter filter, void* ctx,
                                        void (*drop_ctx)(void* ctx));

/* end: allocations stop going to the pool (after the capture ended); its memory stays
 * its own.
 * Errors: INVALID_ARGUMENT (allocations do not go to that pool, a negative device),
 * FORKED, DRIVER. */
int hetmem_torch_end_allocate_to_pool(int device, uint64_t pool_a, uint64_t pool_b);

/* release: undoes one begin (a graph that used the pool was reset or destroyed). When
 * none is left the device is synchronised (replays may still run) and the pool's free
 * blocks join the common pool, its live ones when freed; empty_cache can then give
 * the memory to the driver. A pool hetmem does not have (released already, never
 * begun) is no error.
 * Errors: INVALID_ARGUMENT (still being allocated to, a negative device), FORKED,
 * DRIVER. */
int hetmem_torch_release_pool(int device, uint64_t pool_a, uint64_t pool_b);

/* Writes the allocator's stats as NUL-terminated JSON into buf[0..cap] if it fits;
 * *needed (may be NULL) is always set to the bytes needed, NUL included. Keys: backend
 * (null before the first allocation), live_blocks, live_bytes, streams, devices[]
 * {device, budget, reserved, private_pools[] {id: [a, b], uses, allocating,
 * allocated_bytes, free_bytes}, stats} with PyTorch's memory_stats() key names
 * ("allocated_bytes.all.current", ...).
 * Errors: BUFFER_TOO_SMALL. */
int hetmem_torch_stats_json(char* buf, size_t cap, size_t* needed);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* HETMEM_H */
