/*
 * A fake CUDA driver (libcuda) for hetmem's tests: it exports every driver entry point
 * hetmem's CUDA backend resolves (the table in sys/src/cuda.rs, loaded at run time,
 * called by src/backend/cuda/), with the C signatures and CUresult codes of CUDA 12.x
 * cuda.h, and behaves like a small multi-GPU machine with a strict driver.
 *
 * One file of over 2,000 lines, on purpose: it is one shared library whose entry points
 * all act on one machine (devices, contexts, queues, registrations, VMM, captures) under
 * one lock, and the tests build it from this one source; the sections below follow the
 * groups of cuda.h. What it models:
 *
 *   - Initialisation. Every call before a successful cuInit answers
 *     CUDA_ERROR_NOT_INITIALIZED (cuGetErrorString excepted, as in CUDA). cuInit's
 *     flags must be 0. Environment, read at the first call: FAKE_CUDA_DEVICES (default
 *     2; 0 -> cuInit answers CUDA_ERROR_NO_DEVICE), FAKE_CUDA_MEM_BYTES (per device,
 *     default 256 MiB; suffixes K/M/G/T), FAKE_CUDA_MANAGED=0 (no managed memory:
 *     CU_DEVICE_ATTRIBUTE_MANAGED_MEMORY and _CONCURRENT_MANAGED_ACCESS are 0),
 *     FAKE_CUDA_VMM=0 (CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED is 0 and
 *     the VMM calls answer CUDA_ERROR_NOT_SUPPORTED), FAKE_CUDA_UNIFIED=0 (no unified
 *     addressing), FAKE_CUDA_INIT_ERROR=<code> (cuInit fails with it, every time),
 *     FAKE_CUDA_MAX_REGISTER_BYTES and FAKE_CUDA_MAX_REGISTER_ERROR (largest
 *     cuMemHostRegister and what a larger one answers, below),
 *     FAKE_CUDA_RETAIN_FAIL_DEVICE=<n> and FAKE_CUDA_RETAIN_ERROR=<code> (contexts,
 *     below), FAKE_CUDA_P2P=0 (no device can reach another's memory:
 *     cuDeviceCanAccessPeer answers 0). A test may instead call fakeCudaConfigure
 *     before cuInit (the environment is then not read at all).
 *   - Devices. CUdevice is the ordinal (as on real drivers). Names "Fake NVIDIA H100
 *     <n>", PCI bus ids in the driver's form, upper case ("0000:1A:00.0", bus 0x1A +
 *     n), cuDeviceTotalMem_v2 the configured capacity. cuDeviceGetAttribute models
 *     the attributes hetmem queries (unified addressing 41, managed memory 83,
 *     concurrent managed access 89, virtual memory management 102) and the PCI ids
 *     (33, 34, 50); any other attribute answers CUDA_ERROR_INVALID_VALUE, so a new
 *     query in the backend is noticed here first.
 *   - Contexts. One primary context per device, with a retain count
 *     (cuDevicePrimaryCtxRetain / _Release_v2; releasing one that is not retained is
 *     CUDA_ERROR_INVALID_CONTEXT). Device FAKE_CUDA_RETAIN_FAIL_DEVICE refuses to be
 *     retained, with FAKE_CUDA_RETAIN_ERROR (default CUDA_ERROR_DEVICE_UNAVAILABLE,
 *     what a GPU in EXCLUSIVE_PROCESS mode held by another process, or in PROHIBITED
 *     mode, answers), and retains nothing; its attributes, name and memory still
 *     answer, as they need no context. The current context is per thread
 *     (cuCtxGetCurrent / cuCtxSetCurrent, NULL on a new thread; cuCtxGetDevice gives
 *     its device and needs one). Releasing does not change any thread's current
 *     context ("This function does not change the current context"). Every call whose
 *     cuda.h documentation lists CUDA_ERROR_INVALID_CONTEXT needs a current context:
 *     memory (cuMemAlloc_v2, cuMemFree_v2, cuMemAllocManaged, cuMemGetInfo_v2,
 *     cuMemHostRegister_v2, cuMemHostUnregister, cuMemAllocHost_v2, cuMemFreeHost),
 *     streams, events (cuEventQuery excepted: its documentation lists no context
 *     error) and copies; without one they answer CUDA_ERROR_INVALID_CONTEXT, and with a
 *     primary context that was released to zero still current,
 *     CUDA_ERROR_CONTEXT_IS_DESTROYED. Allocations, streams and events belong to the
 *     current context (and so to its device). When the last reference to a primary
 *     context is released the context is reset, as the documentation says: its queued
 *     work runs, its streams and events are destroyed, its allocations (device,
 *     managed, cuMemAllocHost) freed and its registrations dropped; the CUcontext
 *     value stays the same and a later retain activates it again. The VMM calls
 *     (cuMemCreate, cuMemMap, ...) and cuMemAdvise_v2 need no context: their
 *     documentation lists no context error and VMM memory is owned by the process.
 *   - Device memory is host memory (the address is the "device pointer"). As with
 *     unified addressing on a GPU, device and managed allocations and VMM reservations
 *     come from an address range of their own (reserved PROT_NONE + MAP_NORESERVE at
 *     first use, up to 4 TiB of address space, nothing more), each in whole 2 MiB
 *     pieces, so an address computed past the end of a device allocation is never a
 *     host buffer. Only the pages asked for are mapped (MAP_NORESERVE: large
 *     capacities cost nothing until touched); they are filled with 0xA5 (device memory
 *     is not cleared) and counted against the device of the current context: past
 *     capacity CUDA_ERROR_OUT_OF_MEMORY,
 *     size 0 CUDA_ERROR_INVALID_VALUE, freeing an unknown pointer (or twice)
 *     CUDA_ERROR_INVALID_VALUE. cuMemGetInfo_v2 answers for the current context's
 *     device. Managed memory (cuMemAllocManaged, flags CU_MEM_ATTACH_GLOBAL or _HOST)
 *     is charged to its device too (a real GPU with concurrent managed access would
 *     oversubscribe instead); without managed memory it is CUDA_ERROR_NOT_SUPPORTED.
 *   - Streams (cuStreamCreate, flags CU_STREAM_DEFAULT or CU_STREAM_NON_BLOCKING) and
 *     events (cuEventCreate, flags DEFAULT / BLOCKING_SYNC / DISABLE_TIMING /
 *     INTERPROCESS, the last only with DISABLE_TIMING) are tracked objects; a
 *     destroyed or unknown handle is CUDA_ERROR_INVALID_HANDLE. Destroyed handles are
 *     REUSED: the next create of the same kind hands out the most recently destroyed
 *     value again, as a real driver may.
 *   - Copies are asynchronous, honestly. cuMemcpyAsync / cuMemcpyPeerAsync on a stream
 *     only queue the copy; nothing moves until the queue runs. A queue runs (in order)
 *     on cuStreamSynchronize; up to an event's latest recording on cuEventSynchronize
 *     and on a cuEventQuery that found it pending (the query answers
 *     CUDA_ERROR_NOT_READY, and the "GPU" then makes progress so a polling loop ends);
 *     when a stream that waits for an event (cuStreamWaitEvent queues the wait) runs,
 *     the producer first runs up to the recording the wait captured; and before
 *     cuMemFree_v2 / cuMemHostUnregister / cuMemFreeHost of memory that a queued copy
 *     touches (the driver's implicit synchronisation). cuStreamDestroy does NOT run the
 *     queue: as documented it returns at once and the work finishes later (here: when
 *     something waits for it); the handle is handed out again only once that work has
 *     run. The special handles are queues too, made at first use: NULL and
 *     CU_STREAM_LEGACY the legacy default stream of the current context (one per
 *     context, shared by every thread), CU_STREAM_PER_THREAD the calling thread's
 *     per-thread default stream of the current context (one per thread and context: two
 *     threads queueing on handle 2 queue on two streams, and synchronising it on one
 *     thread runs only that thread's queue). The legacy stream's implicit ordering is
 *     queued as waits: work queued on the legacy stream first waits for the work queued
 *     so far on every blocking stream of its context (made with CU_STREAM_DEFAULT, and
 *     the per-thread streams, which "synchronize with the legacy default stream"), and
 *     work queued on a blocking stream first waits for the work queued so far on the
 *     legacy stream; non-blocking streams take no part either way. cuStreamSynchronize
 *     of the legacy stream also runs the blocking streams' queues; cuCtxSynchronize
 *     runs every queue of the context. Events: a recording on a stream with
 *     queued work is queued and the event is pending until the queue passes it; on an
 *     idle stream it completes at once; an event never recorded is complete.
 *     cuEventRecord on a stream of another context is CUDA_ERROR_INVALID_HANDLE, as
 *     documented; a copy may be queued on a stream of any context (the programming
 *     guide: "a memory copy will succeed even if it is issued to a stream that is not
 *     associated to the current device").
 *   - Copy checks, when the copy is called: a range that starts in a known region
 *     (device or managed allocation, cuMemAllocHost memory, a host registration, a VMM
 *     reservation) must stay inside it; a range that starts elsewhere (pageable host
 *     memory) must not run into one; source and destination must not overlap. A range
 *     in a VMM reservation must lie on mappings that the owning device was given access
 *     to with cuMemSetAccess (read for a source, read-write for a destination):
 *     reserved-but-unmapped or mapped-without-access ranges are CUDA_ERROR_INVALID_VALUE
 *     at the call (chosen: the driver cannot resolve such an address to memory). A copy
 *     runs on the device of its stream (of the current context for the special
 *     streams), whose copy engine touches both ends: every VMM end must be accessible
 *     to that device too (cuMemSetAccess with a descriptor for it), as to its owner.
 *     If it is not, or a queued copy finds its VMM range unmapped when it runs
 *     (unmapped after queueing), that is a device fault: the copy does not happen and
 *     the running context gets the sticky CUDA_ERROR_ILLEGAL_ADDRESS, which the copy on
 *     a special stream and every later call in that context returns until the
 *     context is reset (as on a GPU). (Chosen strictly: a driver may stage a copy
 *     between two devices without peer access through host memory instead.) cuMemcpyPeerAsync needs both
 *     contexts active and each pointer in device memory (cuMemAlloc or VMM) of its
 *     context's device, else CUDA_ERROR_INVALID_CONTEXT / CUDA_ERROR_INVALID_VALUE.
 *   - Managed memory: cuMemPrefetchAsync_v2 / cuMemAdvise_v2 take a CUmemLocation and
 *     accept only ranges inside managed allocations (else CUDA_ERROR_INVALID_VALUE);
 *     a device location must be a valid device with concurrent managed access (else
 *     CUDA_ERROR_INVALID_DEVICE), as must the prefetch stream's device; flags must be
 *     0. Prefetches change nothing and are not queued.
 *   - Host registration (cuMemHostRegister_v2, flags PORTABLE|DEVICEMAP|IOMEMORY|
 *     READ_ONLY): a range overlapping a registration or cuMemAllocHost memory is
 *     CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED; device, managed or VMM memory is
 *     CUDA_ERROR_INVALID_VALUE; a range that is not mapped at all (msync says ENOMEM)
 *     is CUDA_ERROR_INVALID_VALUE; one registration larger than
 *     FAKE_CUDA_MAX_REGISTER_BYTES (default 64 GiB + 2 MiB, so one registration of
 *     more than hetmem's 64 GiB chunk fails) answers FAKE_CUDA_MAX_REGISTER_ERROR:
 *     by default CUDA_ERROR_OUT_OF_MEMORY, as a real r580 driver answers for one
 *     registration of 512 GiB or more (its page-table bookkeeping is capped per
 *     call); some hosts refuse one of about 96-128 GiB with CUDA_ERROR_INVALID_VALUE
 *     instead (fakeCudaSetRegisterLimit changes both at run time). cuMemHostUnregister needs the base address of a
 *     registration, else CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED. cuMemAllocHost_v2 /
 *     cuMemFreeHost give and take pinned host memory (cuMemFreeHost of anything else is
 *     CUDA_ERROR_INVALID_VALUE).
 *   - Virtual memory management: granularity 2 MiB (minimum and recommended; the prop
 *     must be PINNED memory on a valid DEVICE location with no shareable handle type
 *     beyond POSIX_FD, no win32 metadata). cuMemAddressReserve: size a positive
 *     multiple of the host page size (as documented), alignment 0 or a power of two,
 *     flags 0, address a hint; the range is a PROT_NONE mapping aligned to at least the
 *     granularity. cuMemCreate: size a positive multiple of the granularity, flags 0;
 *     the physical memory is a memfd, counted against its device (OOM past capacity).
 *     cuMemMap: ptr, size and offset multiples of the granularity, offset + size within
 *     the handle, the range inside one reservation with nothing mapped there yet, flags
 *     0; it maps the memfd MAP_FIXED over the reservation, still PROT_NONE.
 *     cuMemSetAccess: the range must be fully mapped and cover whole mappings; each
 *     descriptor sets its own device's access on every mapping in it (recorded per
 *     device; the copy checks above read it); a descriptor for another device than a
 *     mapping's owner needs peer access (FAKE_CUDA_P2P), else the call changes nothing
 *     and answers CUDA_ERROR_INVALID_DEVICE (chosen: the documentation names no code).
 *     The pages become readable/writable once any device may (for the fake's memmove).
 *     cuDeviceCanAccessPeer: 1 between two different devices (0 with FAKE_CUDA_P2P=0),
 *     0 for a device and itself. cuMemUnmap: exactly
 *     whole mappings (one or several adjacent); a sub-range is
 *     CUDA_ERROR_INVALID_VALUE. cuMemRelease: an unknown or released handle is
 *     CUDA_ERROR_INVALID_VALUE (undefined in CUDA); the memory is freed once the handle
 *     is released and its last mapping unmapped. cuMemAddressFree: ptr and size must
 *     be exactly one reservation's, and it is refused (CUDA_ERROR_INVALID_VALUE) while
 *     anything is mapped in it. Released handle values are reused like streams.
 *
 *   - Graph capture (cuStreamBeginCapture_v2, cuStreamEndCapture, cuStreamIsCapturing,
 *     cuGraphDestroy), as strict as the programming guide's "prohibited and unhandled
 *     operations": work queued on a capturing stream (copies) is recorded as a node,
 *     not run; an event recorded there is a captured event. A stream not capturing
 *     that waits (cuStreamWaitEvent) for a captured event of a capture under way JOINS
 *     it (a fork: it captures too, counted in capture_joins), and cuStreamEndCapture
 *     answers CUDA_ERROR_STREAM_CAPTURE_UNJOINED if work was captured on a joined
 *     stream after the origin last waited for it. Refused, each INVALIDATING the
 *     capture(s) concerned and counted in capture_violations: cuStreamSynchronize of
 *     a capturing stream (CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED); any use of the legacy
 *     stream (copies, records, waits, synchronisation) while a blocking stream of the
 *     context (a per-thread one included) captures (_IMPLICIT); cuEventQuery / cuEventSynchronize of an event last recorded in a
 *     capture (CUDA_ERROR_CAPTURED_EVENT, also after that capture ended); a capturing
 *     stream waiting for an event recorded outside any capture without
 *     CU_EVENT_WAIT_EXTERNAL (_ISOLATION) or for one of another capture (_MERGE); a
 *     stream not capturing waiting for an event of a capture that has ended
 *     (CUDA_ERROR_CAPTURED_EVENT); cuCtxSynchronize while a stream of the context
 *     captures (_UNSUPPORTED); and the calls that synchronise the device implicitly
 *     (cuMemFree_v2, cuMemFreeHost, cuMemHostUnregister, cuMemUnmap, cuMemRelease,
 *     cuMemAddressFree, cuCtxSynchronize; chosen: cuMemAlloc, cuMemCreate, cuMemMap
 *     and cuMemSetAccess are allowed, as PyTorch makes them during captures) while a
 *     capture in CU_STREAM_CAPTURE_MODE_GLOBAL is under way in any thread, or one in
 *     _THREAD_LOCAL in the calling thread (_UNSUPPORTED; _RELAXED never refuses them).
 *     cuStreamBeginCapture_v2 on the legacy stream is _UNSUPPORTED (a per-thread stream
 *     may capture), on a
 *     capturing stream CUDA_ERROR_ILLEGAL_STATE; cuStreamEndCapture on a stream not
 *     capturing is _ILLEGAL_STATE, on a joined stream _UNMATCHED, from another thread
 *     (modes other than relaxed) _WRONG_THREAD, and after an invalidation
 *     _INVALIDATED with a NULL graph (the capture ends either way). A graph is a
 *     handle with its node count; cuGraphDestroy of an unknown one is
 *     CUDA_ERROR_INVALID_VALUE. Graphs are not launched.
 *
 * Not modelled: kernels, cuMemcpy (synchronous) and the other copy entry points, the
 * per-thread-default-stream (_ptds) entry points,
 * peer access enabling (peer copies always work, as cuMemcpyPeerAsync does without it),
 * contexts other than primary ones (cuCtxCreate, the context stack), stream priorities
 * and callbacks, event timing, IPC, the stream-ordered allocator, managed-memory
 * migration and oversubscription (managed memory is charged to its device), pinning
 * (registration does not fault pages in, and PROT_NONE pages are accepted where a real
 * driver would fail to pin them), page-granular registration conflicts (ranges are
 * compared byte-exact), NUMA placement, concurrency (queued work runs on the calling
 * thread, under the lock, when something waits for it), allocation rounding
 * (cuMemGetInfo counts requested bytes).
 *
 * Extra entry points for tests (not CUDA): fakeCudaConfigure, fakeCudaFailNext,
 * fakeCudaFailAfter, fakeCudaSetRegisterLimit and fakeCudaStat, below. One mutex is taken by every call, and queued work runs under it.
 * What this file shares with the fake HIP runtime is in tests/fake_common.h.
 *
 * State is per loaded copy of the library. hetmem loads the driver as "libcuda.so.1"
 * (the real driver's SONAME; "libcuda.so" only when that is not found) once per
 * process; built with -Wl,-soname,libcuda.so.1 and loaded by absolute path first
 * (tests/common/fake_cuda.rs, FakeCuda::preload), this file answers that dlopen.
 * From a shell:
 *   cc -shared -fPIC -O1 -pthread -Wl,-soname,libcuda.so.1 \
 *      -o target/fake-cuda/libcuda.so.1 tests/fake_cuda/fake_cuda.c
 *   LD_LIBRARY_PATH=target/fake-cuda cargo run --example stream_layers -- --backend cuda
 *
 * Check mode: `cc -DFAKE_CUDA_REAL_HEADERS -I<cuda>/include -fsyntax-only fake_cuda.c`
 * compares every definition below with CUDA's own declarations (a conflicting type is
 * an error) and every constant and struct layout with the static assertions.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <sched.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "../fake_common.h"

#define EXPORT __attribute__((visibility("default")))

#ifdef FAKE_CUDA_REAL_HEADERS
#include <cuda.h>
#else
typedef enum cudaError_enum {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_NOT_INITIALIZED = 3,
    CUDA_ERROR_DEINITIALIZED = 4,
    CUDA_ERROR_STUB_LIBRARY = 34,
    CUDA_ERROR_DEVICE_UNAVAILABLE = 46,
    CUDA_ERROR_NO_DEVICE = 100,
    CUDA_ERROR_INVALID_DEVICE = 101,
    CUDA_ERROR_INVALID_CONTEXT = 201,
    CUDA_ERROR_INVALID_HANDLE = 400,
    CUDA_ERROR_ILLEGAL_STATE = 401,
    CUDA_ERROR_NOT_FOUND = 500,
    CUDA_ERROR_NOT_READY = 600,
    CUDA_ERROR_ILLEGAL_ADDRESS = 700,
    CUDA_ERROR_CONTEXT_IS_DESTROYED = 709,
    CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED = 712,
    CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED = 713,
    CUDA_ERROR_NOT_PERMITTED = 800,
    CUDA_ERROR_NOT_SUPPORTED = 801,
    CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED = 900,
    CUDA_ERROR_STREAM_CAPTURE_INVALIDATED = 901,
    CUDA_ERROR_STREAM_CAPTURE_MERGE = 902,
    CUDA_ERROR_STREAM_CAPTURE_UNMATCHED = 903,
    CUDA_ERROR_STREAM_CAPTURE_UNJOINED = 904,
    CUDA_ERROR_STREAM_CAPTURE_ISOLATION = 905,
    CUDA_ERROR_STREAM_CAPTURE_IMPLICIT = 906,
    CUDA_ERROR_CAPTURED_EVENT = 907,
    CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD = 908,
    CUDA_ERROR_UNKNOWN = 999
} CUresult;
typedef int CUdevice;
typedef struct CUctx_st *CUcontext;
typedef struct CUstream_st *CUstream;
typedef struct CUevent_st *CUevent;
typedef struct CUgraph_st *CUgraph;
typedef enum CUstreamCaptureMode_enum {
    CU_STREAM_CAPTURE_MODE_GLOBAL = 0,
    CU_STREAM_CAPTURE_MODE_THREAD_LOCAL = 1,
    CU_STREAM_CAPTURE_MODE_RELAXED = 2
} CUstreamCaptureMode;
typedef enum CUstreamCaptureStatus_enum {
    CU_STREAM_CAPTURE_STATUS_NONE = 0,
    CU_STREAM_CAPTURE_STATUS_ACTIVE = 1,
    CU_STREAM_CAPTURE_STATUS_INVALIDATED = 2
} CUstreamCaptureStatus;
typedef enum CUevent_wait_flags_enum { CU_EVENT_WAIT_DEFAULT = 0, CU_EVENT_WAIT_EXTERNAL = 1 } CUevent_wait_flags;
typedef unsigned long long CUdeviceptr;
typedef unsigned long long CUmemGenericAllocationHandle;

typedef enum CUdevice_attribute_enum {
    CU_DEVICE_ATTRIBUTE_PCI_BUS_ID = 33,
    CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID = 34,
    CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING = 41,
    CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID = 50,
    CU_DEVICE_ATTRIBUTE_MANAGED_MEMORY = 83,
    CU_DEVICE_ATTRIBUTE_CONCURRENT_MANAGED_ACCESS = 89,
    CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED = 102
} CUdevice_attribute;

typedef enum CUstream_flags_enum { CU_STREAM_DEFAULT = 0, CU_STREAM_NON_BLOCKING = 1 } CUstream_flags;
typedef enum CUevent_flags_enum {
    CU_EVENT_DEFAULT = 0,
    CU_EVENT_BLOCKING_SYNC = 1,
    CU_EVENT_DISABLE_TIMING = 2,
    CU_EVENT_INTERPROCESS = 4
} CUevent_flags;
typedef enum CUmemAttach_flags_enum {
    CU_MEM_ATTACH_GLOBAL = 1,
    CU_MEM_ATTACH_HOST = 2,
    CU_MEM_ATTACH_SINGLE = 4
} CUmemAttach_flags;
typedef enum CUmem_advise_enum {
    CU_MEM_ADVISE_SET_READ_MOSTLY = 1,
    CU_MEM_ADVISE_UNSET_READ_MOSTLY = 2,
    CU_MEM_ADVISE_SET_PREFERRED_LOCATION = 3,
    CU_MEM_ADVISE_UNSET_PREFERRED_LOCATION = 4,
    CU_MEM_ADVISE_SET_ACCESSED_BY = 5,
    CU_MEM_ADVISE_UNSET_ACCESSED_BY = 6
} CUmem_advise;
typedef enum CUmemLocationType_enum {
    CU_MEM_LOCATION_TYPE_INVALID = 0,
    CU_MEM_LOCATION_TYPE_DEVICE = 1,
    CU_MEM_LOCATION_TYPE_HOST = 2,
    CU_MEM_LOCATION_TYPE_HOST_NUMA = 3,
    CU_MEM_LOCATION_TYPE_HOST_NUMA_CURRENT = 4,
    CU_MEM_LOCATION_TYPE_MAX = 0x7FFFFFFF
} CUmemLocationType;
typedef enum CUmemAllocationType_enum {
    CU_MEM_ALLOCATION_TYPE_INVALID = 0,
    CU_MEM_ALLOCATION_TYPE_PINNED = 1,
    CU_MEM_ALLOCATION_TYPE_MAX = 0x7FFFFFFF
} CUmemAllocationType;
typedef enum CUmemAllocationHandleType_enum {
    CU_MEM_HANDLE_TYPE_NONE = 0,
    CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR = 1,
    CU_MEM_HANDLE_TYPE_WIN32 = 2,
    CU_MEM_HANDLE_TYPE_WIN32_KMT = 4,
    CU_MEM_HANDLE_TYPE_FABRIC = 8,
    CU_MEM_HANDLE_TYPE_MAX = 0x7FFFFFFF
} CUmemAllocationHandleType;
typedef enum CUmemAccess_flags_enum {
    CU_MEM_ACCESS_FLAGS_PROT_NONE = 0,
    CU_MEM_ACCESS_FLAGS_PROT_READ = 1,
    CU_MEM_ACCESS_FLAGS_PROT_READWRITE = 3,
    CU_MEM_ACCESS_FLAGS_PROT_MAX = 0x7FFFFFFF
} CUmemAccess_flags;
typedef enum CUmemAllocationGranularity_flags_enum {
    CU_MEM_ALLOC_GRANULARITY_MINIMUM = 0,
    CU_MEM_ALLOC_GRANULARITY_RECOMMENDED = 1
} CUmemAllocationGranularity_flags;

typedef struct CUmemLocation_st {
    CUmemLocationType type;
    int id;
} CUmemLocation;
typedef struct CUmemAllocationProp_st {
    CUmemAllocationType type;
    CUmemAllocationHandleType requestedHandleTypes;
    CUmemLocation location;
    void *win32HandleMetaData;
    struct {
        unsigned char compressionType;
        unsigned char gpuDirectRDMACapable;
        unsigned short usage;
        unsigned char reserved[4];
    } allocFlags;
} CUmemAllocationProp;
typedef struct CUmemAccessDesc_st {
    CUmemLocation location;
    CUmemAccess_flags flags;
} CUmemAccessDesc;

#define CU_STREAM_LEGACY ((CUstream)0x1)
#define CU_STREAM_PER_THREAD ((CUstream)0x2)
#define CU_MEMHOSTREGISTER_PORTABLE 0x01
#define CU_MEMHOSTREGISTER_DEVICEMAP 0x02
#define CU_MEMHOSTREGISTER_IOMEMORY 0x04
#define CU_MEMHOSTREGISTER_READ_ONLY 0x08
#endif

/* The numbers of CUDA 12.x cuda.h (and cudarc's cuda-12080 bindings), checked against
 * cuda.h itself in check mode. */
_Static_assert(CUDA_ERROR_INVALID_VALUE == 1, "");
_Static_assert(CUDA_ERROR_OUT_OF_MEMORY == 2, "");
_Static_assert(CUDA_ERROR_NOT_INITIALIZED == 3, "");
_Static_assert(CUDA_ERROR_STUB_LIBRARY == 34, "");
_Static_assert(CUDA_ERROR_DEVICE_UNAVAILABLE == 46, "");
_Static_assert(CUDA_ERROR_NO_DEVICE == 100, "");
_Static_assert(CUDA_ERROR_INVALID_DEVICE == 101, "");
_Static_assert(CUDA_ERROR_INVALID_CONTEXT == 201, "");
_Static_assert(CUDA_ERROR_INVALID_HANDLE == 400, "");
_Static_assert(CUDA_ERROR_NOT_READY == 600, "");
_Static_assert(CUDA_ERROR_ILLEGAL_ADDRESS == 700, "");
_Static_assert(CUDA_ERROR_CONTEXT_IS_DESTROYED == 709, "");
_Static_assert(CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED == 712, "");
_Static_assert(CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED == 713, "");
_Static_assert(CUDA_ERROR_NOT_SUPPORTED == 801, "");
_Static_assert(CUDA_ERROR_UNKNOWN == 999, "");
_Static_assert(CUDA_ERROR_ILLEGAL_STATE == 401, "");
_Static_assert(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED == 900, "");
_Static_assert(CUDA_ERROR_STREAM_CAPTURE_INVALIDATED == 901, "");
_Static_assert(CUDA_ERROR_STREAM_CAPTURE_MERGE == 902, "");
_Static_assert(CUDA_ERROR_STREAM_CAPTURE_UNMATCHED == 903, "");
_Static_assert(CUDA_ERROR_STREAM_CAPTURE_UNJOINED == 904, "");
_Static_assert(CUDA_ERROR_STREAM_CAPTURE_ISOLATION == 905, "");
_Static_assert(CUDA_ERROR_STREAM_CAPTURE_IMPLICIT == 906, "");
_Static_assert(CUDA_ERROR_CAPTURED_EVENT == 907, "");
_Static_assert(CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD == 908, "");
_Static_assert(CU_STREAM_CAPTURE_MODE_GLOBAL == 0 && CU_STREAM_CAPTURE_MODE_RELAXED == 2, "");
_Static_assert(CU_STREAM_CAPTURE_STATUS_ACTIVE == 1 && CU_STREAM_CAPTURE_STATUS_INVALIDATED == 2, "");
_Static_assert(CU_EVENT_WAIT_EXTERNAL == 1, "");
_Static_assert(CU_DEVICE_ATTRIBUTE_PCI_BUS_ID == 33, "");
_Static_assert(CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID == 34, "");
_Static_assert(CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING == 41, "");
_Static_assert(CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID == 50, "");
_Static_assert(CU_DEVICE_ATTRIBUTE_MANAGED_MEMORY == 83, "");
_Static_assert(CU_DEVICE_ATTRIBUTE_CONCURRENT_MANAGED_ACCESS == 89, "");
_Static_assert(CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED == 102, "");
_Static_assert(CU_STREAM_NON_BLOCKING == 1, "");
_Static_assert(CU_EVENT_DISABLE_TIMING == 2 && CU_EVENT_INTERPROCESS == 4, "");
_Static_assert(CU_MEM_ATTACH_GLOBAL == 1 && CU_MEM_ATTACH_HOST == 2, "");
_Static_assert(CU_MEM_ADVISE_SET_READ_MOSTLY == 1 && CU_MEM_ADVISE_UNSET_ACCESSED_BY == 6, "");
_Static_assert(CU_MEM_LOCATION_TYPE_DEVICE == 1 && CU_MEM_LOCATION_TYPE_HOST == 2, "");
_Static_assert(CU_MEM_LOCATION_TYPE_HOST_NUMA == 3 && CU_MEM_LOCATION_TYPE_HOST_NUMA_CURRENT == 4, "");
_Static_assert(CU_MEM_ALLOCATION_TYPE_PINNED == 1, "");
_Static_assert(CU_MEM_HANDLE_TYPE_NONE == 0 && CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR == 1, "");
_Static_assert(CU_MEM_ACCESS_FLAGS_PROT_READ == 1 && CU_MEM_ACCESS_FLAGS_PROT_READWRITE == 3, "");
_Static_assert(CU_MEM_ALLOC_GRANULARITY_MINIMUM == 0 && CU_MEM_ALLOC_GRANULARITY_RECOMMENDED == 1, "");
_Static_assert(CU_MEMHOSTREGISTER_PORTABLE == 1 && CU_MEMHOSTREGISTER_READ_ONLY == 8, "");
_Static_assert(sizeof(CUmemLocation) == 8, "CUmemLocation is { type, id } before CUDA 13.2");
_Static_assert(offsetof(CUmemLocation, id) == 4, "");
_Static_assert(sizeof(CUmemAllocationProp) == 32, "4 + 4 + 8 + 8 + 8 bytes");
_Static_assert(offsetof(CUmemAllocationProp, location) == 8, "");
_Static_assert(offsetof(CUmemAllocationProp, win32HandleMetaData) == 16, "");
_Static_assert(offsetof(CUmemAllocationProp, allocFlags) == 24, "");
_Static_assert(sizeof(CUmemAccessDesc) == 12, "");
_Static_assert(offsetof(CUmemAccessDesc, flags) == 8, "");
_Static_assert(sizeof(CUdeviceptr) == 8 && sizeof(CUmemGenericAllocationHandle) == 8, "");

#define MAX_DEVICES 16
#define GRANULARITY ((size_t)2 << 20)
#define HOST_PAGE ((size_t)4096)

/* ------------------------------------------------------------------------- state */

struct ctx {
    unsigned magic;
    int device;
    int refcount;
    int active;
    CUresult sticky; /* a device fault: every later call in the context returns it */
};
#define CTX_MAGIC 0x43545846u

enum { MEM_DEVICE = 1, MEM_MANAGED = 2, MEM_HOST = 3 /* cuMemAllocHost */ };

struct alloc {
    char *ptr;
    size_t size;   /* bytes asked for: the range checks use this */
    size_t mapped; /* bytes mmapped (page-rounded) */
    int kind;
    int device;
    struct ctx *ctx;
};

struct registration {
    char *ptr;
    size_t size;
    unsigned flags;
    struct ctx *ctx;
};

struct phys { /* cuMemCreate */
    unsigned long long handle;
    int live;     /* handle not yet released */
    int freed;    /* memory given back (released and unmapped) */
    int device;
    size_t size;
    int fd;
    int mappings;
};

struct reservation {
    char *base;
    size_t size; /* as asked for: cuMemAddressFree must name it */
    size_t va;   /* taken from the device address range (granularity multiple) */
};

struct mapping {
    char *ptr;
    size_t size;
    struct phys *phys;
    unsigned access[MAX_DEVICES]; /* CUmemAccess_flags per device */
};

enum { OP_COPY = 1, OP_RECORD = 2, OP_WAIT = 3 };

struct object;

struct op { /* one piece of queued work on a stream */
    int kind;
    unsigned long long seq; /* global order of enqueueing */
    /* OP_COPY */
    char *dst;
    const char *src;
    size_t n;
    int dst_vmm, src_vmm; /* recheck the VMM range when it runs */
    /* OP_RECORD */
    struct object *ev;
    unsigned long long ev_incarnation, gen;
    /* OP_WAIT: run `wait_stream` through the op numbered `wait_seq` first */
    struct object *wait_stream;
    unsigned long long wait_seq;
};

struct object { /* a stream or an event */
    unsigned magic;
    int kind;
    int implicit; /* IMPLICIT_*: a special stream's queue, which has no handle of its own */
    int live;   /* the handle is valid */
    int zombie; /* stream destroyed with work still queued: runs later, not reusable */
    unsigned long long incarnation;
    struct ctx *ctx;
    unsigned flags;
    struct object *next_free;
    /* Streams: the queue; ops [qhead, qlen) are pending. */
    struct op *q;
    size_t qhead, qlen, qcap;
    /* Events: recorded `gen` times, of which the recordings up to `done_gen` passed;
     * the latest pending one is op `rec_seq` of `rec_stream`. */
    unsigned long long gen, done_gen, rec_seq;
    struct object *rec_stream;
    /* Capture. Streams: the capture recording them (NULL: none), work captured on them
     * (cap_work), and, for a joined stream, how much of it the origin waited for.
     * Events: the capture their latest recording was made in (NULL: none; the capture
     * may have ended), its stream, and that stream's cap_work then. */
    struct capture *cap;
    unsigned long long cap_work, cap_joined_upto;
    struct capture *rec_cap;
    struct object *rec_cap_stream;
    unsigned long long rec_cap_work;
};

struct capture {
    unsigned long long id;
    int live, invalidated;
    CUstreamCaptureMode mode;
    pthread_t thread;
    struct object *origin;
    unsigned long long nodes;
};

struct graph {
    unsigned magic;
    int live;
    unsigned long long nodes;
};
#define GRAPH_MAGIC 0x47524150u
#define OBJ_MAGIC 0x4355444fu
enum { KIND_STREAM = 1, KIND_EVENT = 2 };
/* The queues behind the special stream handles: one legacy default stream per context
 * (NULL or CU_STREAM_LEGACY), one per-thread default stream per thread and context
 * (CU_STREAM_PER_THREAD). Made at first use, never destroyed (a context reset drains
 * them), never handed out as a handle. */
enum { IMPLICIT_NONE = 0, IMPLICIT_LEGACY = 1, IMPLICIT_PER_THREAD = 2 };

static int g_env_read, g_configured, g_initialized;
static int g_devices = 2;
static size_t g_capacity = (size_t)256 << 20;
static int g_managed = 1, g_vmm = 1, g_unified = 1;
static int g_init_error;
static size_t g_max_register = ((size_t)64 << 30) + GRANULARITY;
static CUresult g_max_register_error = CUDA_ERROR_OUT_OF_MEMORY;
static int g_retain_fail_device = -1;
static CUresult g_retain_error = CUDA_ERROR_DEVICE_UNAVAILABLE;
static int g_p2p = 1;
static size_t g_used[MAX_DEVICES];
static struct ctx g_ctx[MAX_DEVICES];
static __thread struct ctx *t_current;
/* The legacy stream of each context, and this thread's per-thread stream of each. */
static struct object *g_legacy[MAX_DEVICES];
static __thread struct object *t_per_thread[MAX_DEVICES];

static struct alloc *g_allocs;
static size_t g_nallocs, g_cap_allocs;
static struct registration *g_regs;
static size_t g_nregs, g_cap_regs;
/* Never freed: a stale handle stays detectable until its value is handed out again. */
static struct object **g_objects;
static size_t g_nobjects, g_cap_objects;
static struct object *g_free_streams, *g_free_events;
static struct phys **g_phys;
static size_t g_nphys, g_cap_phys;
static struct reservation *g_res;
static size_t g_nres, g_cap_res;
static struct mapping *g_maps;
static size_t g_nmaps, g_cap_maps;
static unsigned long long g_next_seq = 1, g_next_incarnation = 1, g_next_handle = 0x100;

static long long g_copies, g_async_copies, g_async_copies_done, g_peer_copies;
static long long g_reused_handles, g_prefetches, g_advises, g_faults;
static long long g_last_prefetch_type = -100, g_last_prefetch_id = -100;
static long long g_last_advice = -100, g_last_advice_type = -100, g_last_advice_id = -100;
static long long g_last_register_flags = -100, g_register_calls;
static long long g_last_stream_flags = -100, g_last_event_flags = -100;
static long long g_ctx_set_current, g_ctx_retains, g_ctx_resets, g_no_context_errors;
static long long g_set_access_calls, g_last_set_access_count = -100;
static long long g_per_thread_streams, g_legacy_ops, g_per_thread_ops, g_implicit_waits;
static long long g_ctx_synchronizes;
/* Never freed: an event keeps pointing at the capture it was recorded in. */
static struct capture **g_captures;
static size_t g_ncaptures, g_cap_captures;
static struct graph **g_graphs;
static size_t g_ngraphs, g_cap_graphs;
static long long g_capture_violations, g_capture_joins, g_captured_ops;

static void read_env_locked(void) {
    if (g_env_read) return;
    g_env_read = 1;
    for (int d = 0; d < MAX_DEVICES; d++) g_ctx[d] = (struct ctx){CTX_MAGIC, d, 0, 0, CUDA_SUCCESS};
    if (g_configured) return;
    long long n = env_ll("FAKE_CUDA_DEVICES", 2);
    g_devices = n < 0 ? 0 : (n > MAX_DEVICES ? MAX_DEVICES : (int)n);
    long long m = env_ll("FAKE_CUDA_MEM_BYTES", (long long)256 << 20);
    g_capacity = m < 0 ? 0 : (size_t)m;
    g_managed = env_ll("FAKE_CUDA_MANAGED", 1) != 0;
    g_vmm = env_ll("FAKE_CUDA_VMM", 1) != 0;
    g_unified = env_ll("FAKE_CUDA_UNIFIED", 1) != 0;
    g_init_error = (int)env_ll("FAKE_CUDA_INIT_ERROR", 0);
    long long r = env_ll("FAKE_CUDA_MAX_REGISTER_BYTES", (long long)g_max_register);
    if (r > 0) g_max_register = (size_t)r;
    g_max_register_error = (CUresult)env_ll("FAKE_CUDA_MAX_REGISTER_ERROR", CUDA_ERROR_OUT_OF_MEMORY);
    g_retain_fail_device = (int)env_ll("FAKE_CUDA_RETAIN_FAIL_DEVICE", -1);
    g_retain_error = (CUresult)env_ll("FAKE_CUDA_RETAIN_ERROR", CUDA_ERROR_DEVICE_UNAVAILABLE);
    g_p2p = env_ll("FAKE_CUDA_P2P", 1) != 0;
}

/* Every entry point but cuInit and cuGetErrorString. */
#define ENTER(name)                                \
    pthread_mutex_lock(&g_lock);                   \
    read_env_locked();                             \
    note_call(name);                               \
    do {                                           \
        int injected_ = injected_failure(name);    \
        if (injected_) RETURN(injected_);          \
        if (!g_initialized) RETURN(CUDA_ERROR_NOT_INITIALIZED); \
    } while (0)

/* The calling thread's current context, which must be live. */
static CUresult need_ctx(struct ctx **out) {
    struct ctx *c = t_current;
    if (!c) {
        g_no_context_errors++;
        return CUDA_ERROR_INVALID_CONTEXT;
    }
    if (!c->active) {
        g_no_context_errors++;
        return CUDA_ERROR_CONTEXT_IS_DESTROYED;
    }
    if (c->sticky) return c->sticky;
    if (out) *out = c;
    return CUDA_SUCCESS;
}

#define NEED_CTX(var)                              \
    do {                                           \
        CUresult nc_ = need_ctx(&(var));           \
        if (nc_) RETURN(nc_);                      \
    } while (0)

/* For the calls that need a current context but not its identity. */
#define REQUIRE_CTX()                              \
    do {                                           \
        CUresult nc_ = need_ctx(NULL);             \
        if (nc_) RETURN(nc_);                      \
    } while (0)

/* The VMM entry points that answer CUDA_ERROR_NOT_SUPPORTED before checking anything
 * else when the devices lack VMM. */
#define ENTER_VMM(name)                            \
    ENTER(name);                                   \
    if (!g_vmm) RETURN(CUDA_ERROR_NOT_SUPPORTED)

static int valid_device(int d) { return d >= 0 && d < g_devices; }

static struct ctx *as_ctx(CUcontext c) {
    struct ctx *p = (struct ctx *)(void *)c;
    for (int d = 0; d < g_devices; d++)
        if (p == &g_ctx[d]) return p;
    return NULL;
}

/* ------------------------------------------------------------ device address space */

/* As with unified addressing on a real GPU, device memory (cuMemAlloc, managed memory)
 * and VMM reservations live in an address range of their own, reserved at the first
 * use (PROT_NONE, MAP_NORESERVE: address space only), never next to host memory: an
 * address computed past the end of a device allocation is not some host buffer. Each
 * piece is a multiple of the granularity, placed first fit. */
static uintptr_t g_arena;
static size_t g_arena_len;
struct range {
    uintptr_t start;
    size_t len;
};
static struct range *g_free_va; /* sorted by start, coalesced */
static size_t g_nfree_va, g_cap_free_va;

static size_t round_up(size_t x, size_t to) { return (x + to - 1) / to * to; }

static int arena_init(void) {
    if (g_arena) return 1;
    for (size_t len = (size_t)4 << 40; len >= ((size_t)64 << 30); len /= 2) {
        void *p = mmap(NULL, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) continue;
        uintptr_t start = round_up((uintptr_t)p, GRANULARITY);
        struct range *n = grow(g_free_va, &g_cap_free_va, 1, sizeof *g_free_va);
        if (!n) {
            munmap(p, len);
            return 0;
        }
        g_free_va = n;
        g_arena = start;
        g_arena_len = (len - (start - (uintptr_t)p)) / GRANULARITY * GRANULARITY;
        g_free_va[0] = (struct range){g_arena, g_arena_len};
        g_nfree_va = 1;
        return 1;
    }
    return 0;
}

/* Takes `len` bytes (a multiple of the granularity) aligned to `align`, at `hint` if
 * that is free; NULL when the arena is full. */
static char *arena_take(size_t len, size_t align, uintptr_t hint) {
    if (!arena_init()) return NULL;
    for (int pass = hint ? 0 : 1; pass < 2; pass++) {
        for (size_t i = 0; i < g_nfree_va; i++) {
            struct range r = g_free_va[i];
            uintptr_t at = pass == 0 ? hint : round_up(r.start, align);
            if (at < r.start || at + len > r.start + r.len || at % align) continue;
            /* Split r into [r.start, at) and [at + len, end). */
            struct range before = {r.start, at - r.start};
            struct range after = {at + len, r.start + r.len - (at + len)};
            if (before.len && after.len) {
                struct range *n = grow(g_free_va, &g_cap_free_va, g_nfree_va + 1, sizeof *g_free_va);
                if (!n) return NULL;
                g_free_va = n;
                memmove(&g_free_va[i + 2], &g_free_va[i + 1], (g_nfree_va - i - 1) * sizeof *g_free_va);
                g_free_va[i] = before;
                g_free_va[i + 1] = after;
                g_nfree_va++;
            } else if (before.len) {
                g_free_va[i] = before;
            } else if (after.len) {
                g_free_va[i] = after;
            } else {
                memmove(&g_free_va[i], &g_free_va[i + 1], (g_nfree_va - i - 1) * sizeof *g_free_va);
                g_nfree_va--;
            }
            return (char *)at;
        }
    }
    return NULL;
}

/* Gives a piece back: its pages are dropped and the range is bare address space again. */
static void arena_give(char *p, size_t len) {
    mmap(p, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0);
    uintptr_t s = (uintptr_t)p;
    size_t i = 0;
    while (i < g_nfree_va && g_free_va[i].start < s) i++;
    struct range *n = grow(g_free_va, &g_cap_free_va, g_nfree_va + 1, sizeof *g_free_va);
    if (!n) return; /* leaks the range: harmless */
    g_free_va = n;
    memmove(&g_free_va[i + 1], &g_free_va[i], (g_nfree_va - i) * sizeof *g_free_va);
    g_free_va[i] = (struct range){s, len};
    g_nfree_va++;
    /* Coalesce with the neighbours. */
    if (i + 1 < g_nfree_va && g_free_va[i].start + g_free_va[i].len == g_free_va[i + 1].start) {
        g_free_va[i].len += g_free_va[i + 1].len;
        memmove(&g_free_va[i + 1], &g_free_va[i + 2], (g_nfree_va - i - 2) * sizeof *g_free_va);
        g_nfree_va--;
    }
    if (i > 0 && g_free_va[i - 1].start + g_free_va[i - 1].len == g_free_va[i].start) {
        g_free_va[i - 1].len += g_free_va[i].len;
        memmove(&g_free_va[i], &g_free_va[i + 1], (g_nfree_va - i - 1) * sizeof *g_free_va);
        g_nfree_va--;
    }
}

/* ------------------------------------------------------------------ lookups */

static struct alloc *find_alloc(const char *p) {
    for (size_t i = 0; i < g_nallocs; i++)
        if (p >= g_allocs[i].ptr && p < g_allocs[i].ptr + g_allocs[i].size) return &g_allocs[i];
    return NULL;
}

static struct registration *find_reg(const char *p) {
    for (size_t i = 0; i < g_nregs; i++)
        if (p >= g_regs[i].ptr && p < g_regs[i].ptr + g_regs[i].size) return &g_regs[i];
    return NULL;
}

static struct reservation *find_res(const char *p) {
    for (size_t i = 0; i < g_nres; i++)
        if (p >= g_res[i].base && p < g_res[i].base + g_res[i].size) return &g_res[i];
    return NULL;
}

static struct mapping *find_map(const char *p) {
    for (size_t i = 0; i < g_nmaps; i++)
        if (p >= g_maps[i].ptr && p < g_maps[i].ptr + g_maps[i].size) return &g_maps[i];
    return NULL;
}

/* Whether a known region (of any kind) overlaps p..p+n. */
static int touches_known_region(const char *p, size_t n) {
    for (size_t i = 0; i < g_nallocs; i++)
        if (overlaps(p, n, g_allocs[i].ptr, g_allocs[i].size)) return 1;
    for (size_t i = 0; i < g_nregs; i++)
        if (overlaps(p, n, g_regs[i].ptr, g_regs[i].size)) return 1;
    for (size_t i = 0; i < g_nres; i++)
        if (overlaps(p, n, g_res[i].base, g_res[i].size)) return 1;
    return 0;
}

/* Whether p..p+n lies in one reservation, wholly on mappings that device `dev` may
 * read (and, for `write`, write); `dev` < 0: each mapping's own device (the owner). */
static int vmm_accessible(const char *p, size_t n, int write, int dev) {
    struct reservation *r = find_res(p);
    if (!r || (size_t)(p - r->base) + n > r->size) return 0;
    unsigned need = write ? CU_MEM_ACCESS_FLAGS_PROT_READWRITE : CU_MEM_ACCESS_FLAGS_PROT_READ;
    const char *cur = p, *end = p + n;
    while (cur < end) {
        struct mapping *m = find_map(cur);
        if (!m) return 0;
        if ((m->access[dev < 0 ? m->phys->device : dev] & need) != need) return 0;
        cur = m->ptr + m->size;
    }
    return 1;
}

/* Whether the copy engine of device `dev` may run a copy between these ends: every VMM
 * end must be accessible to that device (cuMemSetAccess for it), not only to its owner. */
static int copy_reachable(int dev, const char *dst, const char *src, size_t n, int dst_vmm, int src_vmm) {
    return (!dst_vmm || vmm_accessible(dst, n, 1, dev)) && (!src_vmm || vmm_accessible(src, n, 0, dev));
}

/* Checks one end of a copy; sets *vmm when it lies in a VMM reservation. */
static CUresult check_end(const char *p, size_t n, int write, int *vmm) {
    *vmm = 0;
    struct alloc *a = find_alloc(p);
    if (a) return (size_t)(p - a->ptr) + n <= a->size ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
    struct registration *g = find_reg(p);
    if (g) return (size_t)(p - g->ptr) + n <= g->size ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
    if (find_res(p)) {
        *vmm = 1;
        return vmm_accessible(p, n, write, -1) ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
    }
    /* Pageable host memory: it must not run into memory the driver knows. */
    return touches_known_region(p, n) ? CUDA_ERROR_INVALID_VALUE : CUDA_SUCCESS;
}

/* Checks one end of a peer copy: device memory (cuMemAlloc or VMM) of c's device. */
static CUresult check_peer_end(const char *p, size_t n, int write, struct ctx *c, int *vmm) {
    *vmm = 0;
    struct alloc *a = find_alloc(p);
    if (a) {
        if (a->kind != MEM_DEVICE || a->device != c->device) return CUDA_ERROR_INVALID_VALUE;
        return (size_t)(p - a->ptr) + n <= a->size ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
    }
    if (!find_res(p) || !vmm_accessible(p, n, write, -1)) return CUDA_ERROR_INVALID_VALUE;
    for (const char *cur = p; cur < p + n;) {
        struct mapping *m = find_map(cur);
        if (m->phys->device != c->device) return CUDA_ERROR_INVALID_VALUE;
        cur = m->ptr + m->size;
    }
    *vmm = 1;
    return CUDA_SUCCESS;
}

/* ------------------------------------------------------------------- objects */

static struct object *find_object(const void *h, int kind) {
    for (size_t i = 0; i < g_nobjects; i++)
        if ((const void *)g_objects[i] == h)
            return g_objects[i]->kind == kind && g_objects[i]->live && !g_objects[i]->implicit
                       ? g_objects[i]
                       : NULL;
    return NULL;
}

static struct object **free_list(int kind) {
    return kind == KIND_STREAM ? &g_free_streams : &g_free_events;
}

static struct object *new_object(int kind, struct ctx *c, unsigned flags) {
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
        o->magic = OBJ_MAGIC;
        o->kind = kind;
        g_objects[g_nobjects++] = o;
    }
    o->live = 1;
    o->zombie = 0;
    o->implicit = IMPLICIT_NONE;
    o->incarnation = g_next_incarnation++;
    o->ctx = c;
    o->flags = flags;
    o->next_free = NULL;
    o->qhead = o->qlen = 0; /* the queue buffer (o->q) is kept for reuse */
    o->gen = o->done_gen = o->rec_seq = 0;
    o->rec_stream = NULL;
    o->cap = NULL;
    o->cap_work = o->cap_joined_upto = 0;
    o->rec_cap = NULL;
    o->rec_cap_stream = NULL;
    o->rec_cap_work = 0;
    return o;
}

/* Puts a destroyed object on its free list (its value may be handed out again). */
static void retire_object(struct object *o) {
    struct object **head = free_list(o->kind);
    o->live = 0;
    o->zombie = 0;
    o->next_free = *head;
    *head = o;
}

static int is_stream(const struct object *o) {
    return o->kind == KIND_STREAM && (o->live || o->zombie);
}

/* ------------------------------------------------------------- stream queues */

static int event_done(const struct object *e) { return e->done_gen >= e->gen; }

static CUresult enqueue_raw(struct object *s, struct op op) {
    struct op *n = grow(s->q, &s->qcap, s->qlen + 1, sizeof *s->q);
    if (!n) return CUDA_ERROR_OUT_OF_MEMORY;
    s->q = n;
    op.seq = g_next_seq++;
    s->q[s->qlen++] = op;
    if (s->implicit == IMPLICIT_LEGACY) g_legacy_ops++;
    else if (s->implicit == IMPLICIT_PER_THREAD) g_per_thread_ops++;
    return CUDA_SUCCESS;
}

static int pending(const struct object *s) { return s->qhead < s->qlen; }

/* Blocking streams take part in the legacy stream's ordering: streams made with
 * CU_STREAM_DEFAULT, and the per-thread streams ("not a non-blocking stream"). */
static int blocking(const struct object *s) {
    return s->implicit != IMPLICIT_LEGACY && !(s->flags & CU_STREAM_NON_BLOCKING);
}

/* ------------------------------------------------------------------ capture */

/* An illegal call: invalidates `c` (if under way) and counts it; returns `code`. */
static CUresult capture_violation(struct capture *c, CUresult code) {
    if (c && c->live) c->invalidated = 1;
    g_capture_violations++;
    return code;
}

/* A capture under way on a blocking stream of context `c` (a per-thread one included):
 * what any use of the legacy stream would depend on implicitly. */
static struct capture *blocking_capture(struct ctx *c) {
    for (size_t i = 0; i < g_nobjects; i++) {
        struct object *s = g_objects[i];
        if (is_stream(s) && s->ctx == c && s->cap && blocking(s)) return s->cap;
    }
    return NULL;
}

/* The legacy stream used while a blocking stream of its context captures: refused,
 * invalidating that capture. */
static CUresult legacy_use(struct object *s) {
    struct capture *cap = s->implicit == IMPLICIT_LEGACY ? blocking_capture(s->ctx) : NULL;
    return cap ? capture_violation(cap, CUDA_ERROR_STREAM_CAPTURE_IMPLICIT) : CUDA_SUCCESS;
}

/* A call that synchronises the device implicitly: refused (invalidating the captures
 * concerned) while a global-mode capture is under way in any thread, or a thread-local
 * one in this thread. */
static CUresult unsafe_call(void) {
    CUresult rc = CUDA_SUCCESS;
    for (size_t i = 0; i < g_ncaptures; i++) {
        struct capture *c = g_captures[i];
        if (!c->live) continue;
        int hit = c->mode == CU_STREAM_CAPTURE_MODE_GLOBAL ||
                  (c->mode == CU_STREAM_CAPTURE_MODE_THREAD_LOCAL && pthread_equal(c->thread, pthread_self()));
        if (hit) rc = capture_violation(c, CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED);
    }
    return rc;
}

#define UNSAFE_CALL()                              \
    do {                                           \
        CUresult uc_ = unsafe_call();              \
        if (uc_) RETURN(uc_);                      \
    } while (0)

/* Queues on `s` a wait for everything queued on `on` so far. */
static CUresult wait_for_tail(struct object *s, struct object *on) {
    struct op op = {0};
    op.kind = OP_WAIT;
    op.wait_stream = on;
    op.wait_seq = on->q[on->qlen - 1].seq;
    g_implicit_waits++;
    return enqueue_raw(s, op);
}

/* The legacy stream's rule, before `s` takes new work: "the legacy stream first waits
 * on all blocking streams, the action is queued in the legacy stream, and then all
 * blocking streams wait on the legacy stream". So work on the legacy stream follows the
 * work queued so far on every blocking stream of its context, and work on a blocking
 * stream follows the work queued so far on the legacy stream. Non-blocking streams
 * take no part either way. */
static CUresult order_implicitly(struct object *s) {
    struct ctx *c = s->ctx;
    CUresult lu = legacy_use(s);
    if (lu) return lu;
    if (s->implicit == IMPLICIT_LEGACY) {
        for (size_t i = 0; i < g_nobjects; i++) {
            struct object *b = g_objects[i];
            if (b == s || !is_stream(b) || b->ctx != c || !blocking(b) || !pending(b)) continue;
            CUresult rc = wait_for_tail(s, b);
            if (rc) return rc;
        }
        return CUDA_SUCCESS;
    }
    struct object *l = g_legacy[c->device];
    if (blocking(s) && l && l->ctx == c && pending(l)) return wait_for_tail(s, l);
    return CUDA_SUCCESS;
}

/* Queues `op` on `s`, after the legacy stream's implicit ordering. */
static CUresult enqueue(struct object *s, struct op op) {
    CUresult rc = order_implicitly(s);
    return rc ? rc : enqueue_raw(s, op);
}

static void run_until(struct object *s, unsigned long long seq);

static void run_op(struct object *s, const struct op *op) {
    switch (op->kind) {
    case OP_COPY:
        /* A VMM range unmapped since the copy was queued, or one the stream's device
         * has no access to: the device faults. */
        if (!copy_reachable(s->ctx->device, op->dst, op->src, op->n, op->dst_vmm, op->src_vmm)) {
            g_faults++;
            if (!s->ctx->sticky) s->ctx->sticky = CUDA_ERROR_ILLEGAL_ADDRESS;
            return;
        }
        memmove(op->dst, op->src, op->n);
        g_async_copies_done++;
        break;
    case OP_RECORD:
        if (op->ev && op->ev->incarnation == op->ev_incarnation && op->gen > op->ev->done_gen)
            op->ev->done_gen = op->gen;
        break;
    case OP_WAIT:
        run_until(op->wait_stream, op->wait_seq);
        break;
    default:
        break;
    }
}

/* Runs stream s's queued ops, in order, through the op numbered `seq`. */
static void run_until(struct object *s, unsigned long long seq) {
    while (s->qhead < s->qlen && s->q[s->qhead].seq <= seq) {
        struct op op = s->q[s->qhead++];
        run_op(s, &op);
    }
    if (s->qhead == s->qlen) {
        s->qhead = s->qlen = 0;
        if (s->zombie) retire_object(s); /* destroyed earlier; its work is done now */
    }
}

static void run_all(struct object *s) { run_until(s, ULLONG_MAX); }

/* Runs the queue holding event e's latest recording up to that recording. */
static void run_to_event(struct object *e) {
    if (!event_done(e) && e->rec_stream) run_until(e->rec_stream, e->rec_seq);
}

/* Runs every queue with a pending copy touching p..p+n (implicit synchronisation). */
static void run_queues_touching(const char *p, size_t n) {
    for (size_t i = 0; i < g_nobjects; i++) {
        struct object *s = g_objects[i];
        if (!is_stream(s)) continue;
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

/* cuStreamSynchronize of the legacy stream waits for the context's blocking streams
 * too (their work before the call), and cuCtxSynchronize (`all`) for every stream. */
static void run_context(struct ctx *c, int all) {
    for (size_t i = 0; i < g_nobjects; i++) {
        struct object *s = g_objects[i];
        if (is_stream(s) && s->ctx == c && (all || blocking(s) || s->implicit == IMPLICIT_LEGACY))
            run_all(s);
    }
}

static long long queued_ops(void) {
    long long r = 0;
    for (size_t i = 0; i < g_nobjects; i++)
        if (is_stream(g_objects[i])) r += (long long)(g_objects[i]->qlen - g_objects[i]->qhead);
    return r;
}

static long long count_objects(int kind, int zombies) {
    long long n = 0;
    for (size_t i = 0; i < g_nobjects; i++)
        n += g_objects[i]->kind == kind && !g_objects[i]->implicit &&
             (zombies ? g_objects[i]->zombie : g_objects[i]->live);
    return n;
}

/* Ops still pending on the special streams of one kind. */
static long long pending_implicit(int implicit) {
    long long n = 0;
    for (size_t i = 0; i < g_nobjects; i++)
        if (g_objects[i]->implicit == implicit) n += (long long)(g_objects[i]->qlen - g_objects[i]->qhead);
    return n;
}

/* A special stream's queue, made at first use: never on the free list, no handle. */
static struct object *new_implicit(struct ctx *c, int implicit) {
    struct object **n = grow(g_objects, &g_cap_objects, g_nobjects + 1, sizeof *g_objects);
    if (!n) return NULL;
    g_objects = n;
    struct object *o = calloc(1, sizeof *o);
    if (!o) return NULL;
    o->magic = OBJ_MAGIC;
    o->kind = KIND_STREAM;
    o->implicit = implicit;
    o->live = 1;
    o->incarnation = g_next_incarnation++;
    o->ctx = c;
    o->flags = CU_STREAM_DEFAULT;
    g_objects[g_nobjects++] = o;
    return o;
}

/* Resolves a stream argument in the context `c` current on the calling thread (NULL
 * if none): the special handles name the legacy stream of `c` or the calling thread's
 * per-thread stream of `c`, which need one. */
static CUresult resolve_stream(CUstream h, struct ctx *c, struct object **s) {
    *s = NULL;
    if (h == NULL || h == CU_STREAM_LEGACY || h == CU_STREAM_PER_THREAD) {
        if (!c) {
            CUresult rc = need_ctx(&c);
            if (rc) return rc;
        }
        struct object **slot = h == CU_STREAM_PER_THREAD ? &t_per_thread[c->device] : &g_legacy[c->device];
        if (!*slot) {
            *slot = new_implicit(c, h == CU_STREAM_PER_THREAD ? IMPLICIT_PER_THREAD : IMPLICIT_LEGACY);
            if (!*slot) return CUDA_ERROR_OUT_OF_MEMORY;
            if (h == CU_STREAM_PER_THREAD) g_per_thread_streams++;
        }
        *s = *slot;
        return c->sticky;
    }
    *s = find_object(h, KIND_STREAM);
    if (!*s) return CUDA_ERROR_INVALID_HANDLE;
    if ((*s)->ctx->sticky) return (*s)->ctx->sticky;
    return CUDA_SUCCESS;
}

/* ------------------------------------------------------------------- memory */

static void free_alloc_at(size_t i) {
    struct alloc *a = &g_allocs[i];
    run_queues_touching(a->ptr, a->size);
    if (a->kind != MEM_HOST) {
        g_used[a->device] -= a->size;
        arena_give(a->ptr, a->mapped);
    } else {
        munmap(a->ptr, a->mapped);
    }
    g_allocs[i] = g_allocs[--g_nallocs];
}

static void phys_maybe_free(struct phys *p) {
    if (!p->live && p->mappings == 0 && !p->freed) {
        p->freed = 1;
        close(p->fd);
        p->fd = -1;
        g_used[p->device] -= p->size;
    }
}

/* Resets a primary context whose last reference was released. */
static void reset_ctx(struct ctx *c) {
    for (size_t i = 0; i < g_nobjects; i++) {
        struct object *o = g_objects[i];
        if (is_stream(o) && o->ctx == c) run_all(o);
    }
    for (size_t i = 0; i < g_nobjects; i++) {
        struct object *o = g_objects[i];
        if (o->ctx == c && (o->live || o->zombie) && !o->implicit) {
            if (o->kind == KIND_EVENT) {
                for (size_t k = 0; k < g_nobjects; k++) {
                    struct object *s = g_objects[k];
                    if (!is_stream(s)) continue;
                    for (size_t j = s->qhead; j < s->qlen; j++)
                        if (s->q[j].ev == o) s->q[j].ev = NULL;
                }
            }
            retire_object(o);
        }
    }
    for (size_t i = g_nallocs; i-- > 0;)
        if (g_allocs[i].ctx == c) free_alloc_at(i);
    for (size_t i = g_nregs; i-- > 0;)
        if (g_regs[i].ctx == c) g_regs[i] = g_regs[--g_nregs];
    c->sticky = CUDA_SUCCESS;
    c->active = 0;
    g_ctx_resets++;
}

/* ---------------------------------------------------------------- test hooks */

/* Sets the machine before cuInit (overrides the environment). */
EXPORT int fakeCudaConfigure(int devices, uint64_t mem_bytes, int managed, int vmm) {
    pthread_mutex_lock(&g_lock);
    if (g_initialized || devices < 0 || devices > MAX_DEVICES) {
        pthread_mutex_unlock(&g_lock);
        return CUDA_ERROR_INVALID_VALUE;
    }
    g_configured = 1;
    read_env_locked();
    g_devices = devices;
    g_capacity = (size_t)mem_bytes;
    g_managed = managed != 0;
    g_vmm = vmm != 0;
    pthread_mutex_unlock(&g_lock);
    return CUDA_SUCCESS;
}

/* The next `times` calls of `call` (the exported name, e.g. "cuMemAlloc_v2") return
 * `code` and do nothing. */
EXPORT void fakeCudaFailNext(const char *call, int code, int times) {
    fail_next(call, code, times);
}

/* The same after `skip` calls of `call` that run as usual (the second piece of a copy
 * cut in two, say). */
EXPORT void fakeCudaFailAfter(const char *call, int code, int times, int skip) {
    fail_after(call, code, times, skip);
}

/* The largest single cuMemHostRegister (bytes; 0 keeps it) and what a larger one
 * answers (a nonzero CUresult), from now on; as FAKE_CUDA_MAX_REGISTER_BYTES /
 * FAKE_CUDA_MAX_REGISTER_ERROR, for a test that restores them afterwards. */
EXPORT int fakeCudaSetRegisterLimit(uint64_t bytes, int code) {
    pthread_mutex_lock(&g_lock);
    read_env_locked();
    if (code == CUDA_SUCCESS) {
        pthread_mutex_unlock(&g_lock);
        return CUDA_ERROR_INVALID_VALUE;
    }
    if (bytes) g_max_register = (size_t)bytes;
    g_max_register_error = (CUresult)code;
    pthread_mutex_unlock(&g_lock);
    return CUDA_SUCCESS;
}

/* Counters by name; -1 for an unknown name (and "last_*" before the first such call).
 *   "calls:NAME": calls of entry point NAME (as exported: "calls:cuEventCreate"), failed
 *     ones included
 *   allocations / managed_allocations / host_allocations: live cuMemAlloc /
 *     cuMemAllocManaged / cuMemAllocHost allocations; "used:N" device N's bytes in use
 *     (allocations, managed, VMM physical memory); "capacity"
 *   streams, events: live handles; zombie_streams: destroyed with work still queued
 *   queued_ops: work pending on streams; copies: copies queued on a special stream
 *     (legacy or per-thread); async_copies: queued (on any stream); async_copies_done:
 *     queued copies that ran;
 *   per_thread_streams: per-thread streams made (one per thread and context that used
 *     CU_STREAM_PER_THREAD); legacy_ops / per_thread_ops: ops queued on those streams
 *     (their implicit waits included); legacy_pending / per_thread_pending: ops still
 *     pending there; implicit_waits: waits the legacy stream's ordering queued;
 *     ctx_synchronizes: cuCtxSynchronize calls
 *     peer_copies: cuMemcpyPeerAsync calls accepted; faults: copies that hit VMM
 *     memory unmapped or not accessible to the device running them
 *   reused_handles: creates (streams, events, VMM handles) that handed out a
 *     destroyed value again
 *   registrations, registered_bytes, register_calls, last_register_flags,
 *     max_register_bytes, max_register_error
 *   prefetches, advises, last_prefetch_type/_id, last_advice, last_advice_type/_id
 *   last_stream_flags, last_event_flags
 *   ctx_set_current (cuCtxSetCurrent calls), ctx_retains (successful
 *     cuDevicePrimaryCtxRetain calls), ctx_resets, "ctx_refcount:N",
 *     retained_contexts (devices whose primary context is retained now),
 *     no_context_errors (calls refused for want of a live context), "sticky:N"
 *     (device N's context's sticky error)
 *   vmm_reservations, vmm_reserved_bytes, vmm_handles (not yet released),
 *     vmm_physical_bytes (not yet freed), vmm_mappings, vmm_mapped_bytes,
 *     vmm_accessible_bytes (to each mapping's own device), "vmm_accessible_bytes:N"
 *     (to device N), set_access_calls (cuMemSetAccess calls that changed access),
 *     last_set_access_count (descriptors in the latest)
 *   capture_violations (calls refused because of a capture; each invalidated it),
 *     capture_joins (streams pulled into a capture by a wait), captured_ops (copies
 *     recorded into captures), captures (under way), graphs (not destroyed)
 *   initialized, devices */
EXPORT long long fakeCudaStat(const char *name) {
    long long r = -1;
    int d;
    pthread_mutex_lock(&g_lock);
    read_env_locked();
    if (!strncmp(name, "calls:", 6)) r = call_count(name + 6);
    else if (!strcmp(name, "allocations")) SUM_OVER(r, g_nallocs, g_allocs[i].kind == MEM_DEVICE);
    else if (!strcmp(name, "managed_allocations"))
        SUM_OVER(r, g_nallocs, g_allocs[i].kind == MEM_MANAGED);
    else if (!strcmp(name, "host_allocations")) SUM_OVER(r, g_nallocs, g_allocs[i].kind == MEM_HOST);
    else if (!strcmp(name, "streams")) r = count_objects(KIND_STREAM, 0);
    else if (!strcmp(name, "zombie_streams")) r = count_objects(KIND_STREAM, 1);
    else if (!strcmp(name, "events")) r = count_objects(KIND_EVENT, 0);
    else if (!strcmp(name, "queued_ops")) r = queued_ops();
    else if (!strcmp(name, "copies")) r = g_copies;
    else if (!strcmp(name, "per_thread_streams")) r = g_per_thread_streams;
    else if (!strcmp(name, "legacy_ops")) r = g_legacy_ops;
    else if (!strcmp(name, "per_thread_ops")) r = g_per_thread_ops;
    else if (!strcmp(name, "legacy_pending")) r = pending_implicit(IMPLICIT_LEGACY);
    else if (!strcmp(name, "per_thread_pending")) r = pending_implicit(IMPLICIT_PER_THREAD);
    else if (!strcmp(name, "implicit_waits")) r = g_implicit_waits;
    else if (!strcmp(name, "ctx_synchronizes")) r = g_ctx_synchronizes;
    else if (!strcmp(name, "async_copies")) r = g_async_copies;
    else if (!strcmp(name, "async_copies_done")) r = g_async_copies_done;
    else if (!strcmp(name, "peer_copies")) r = g_peer_copies;
    else if (!strcmp(name, "faults")) r = g_faults;
    else if (!strcmp(name, "reused_handles")) r = g_reused_handles;
    else if (!strcmp(name, "registrations")) r = (long long)g_nregs;
    else if (!strcmp(name, "registered_bytes")) SUM_OVER(r, g_nregs, g_regs[i].size);
    else if (!strcmp(name, "register_calls")) r = g_register_calls;
    else if (!strcmp(name, "last_register_flags")) r = g_last_register_flags;
    else if (!strcmp(name, "max_register_bytes")) r = (long long)g_max_register;
    else if (!strcmp(name, "prefetches")) r = g_prefetches;
    else if (!strcmp(name, "advises")) r = g_advises;
    else if (!strcmp(name, "last_prefetch_type")) r = g_last_prefetch_type;
    else if (!strcmp(name, "last_prefetch_id")) r = g_last_prefetch_id;
    else if (!strcmp(name, "last_advice")) r = g_last_advice;
    else if (!strcmp(name, "last_advice_type")) r = g_last_advice_type;
    else if (!strcmp(name, "last_advice_id")) r = g_last_advice_id;
    else if (!strcmp(name, "last_stream_flags")) r = g_last_stream_flags;
    else if (!strcmp(name, "last_event_flags")) r = g_last_event_flags;
    else if (!strcmp(name, "ctx_set_current")) r = g_ctx_set_current;
    else if (!strcmp(name, "ctx_retains")) r = g_ctx_retains;
    else if (!strcmp(name, "ctx_resets")) r = g_ctx_resets;
    else if (!strcmp(name, "retained_contexts")) SUM_OVER(r, (size_t)g_devices, g_ctx[i].refcount > 0);
    else if (!strcmp(name, "set_access_calls")) r = g_set_access_calls;
    else if (!strcmp(name, "last_set_access_count")) r = g_last_set_access_count;
    else if (!strcmp(name, "max_register_error")) r = g_max_register_error;
    else if (!strcmp(name, "no_context_errors")) r = g_no_context_errors;
    else if (!strcmp(name, "vmm_reservations")) r = (long long)g_nres;
    else if (!strcmp(name, "vmm_reserved_bytes")) SUM_OVER(r, g_nres, g_res[i].size);
    else if (!strcmp(name, "vmm_handles")) SUM_OVER(r, g_nphys, g_phys[i]->live);
    else if (!strcmp(name, "vmm_physical_bytes"))
        SUM_OVER(r, g_nphys, g_phys[i]->freed ? 0 : g_phys[i]->size);
    else if (!strcmp(name, "vmm_mappings")) r = (long long)g_nmaps;
    else if (!strcmp(name, "vmm_mapped_bytes")) SUM_OVER(r, g_nmaps, g_maps[i].size);
    else if (!strcmp(name, "vmm_accessible_bytes"))
        SUM_OVER(r, g_nmaps, g_maps[i].access[g_maps[i].phys->device] ? g_maps[i].size : 0);
    else if (!strcmp(name, "capture_violations")) r = g_capture_violations;
    else if (!strcmp(name, "capture_joins")) r = g_capture_joins;
    else if (!strcmp(name, "captured_ops")) r = g_captured_ops;
    else if (!strcmp(name, "captures")) SUM_OVER(r, g_ncaptures, g_captures[i]->live);
    else if (!strcmp(name, "graphs")) SUM_OVER(r, g_ngraphs, g_graphs[i]->live);
    else if (!strcmp(name, "initialized")) r = g_initialized;
    else if (!strcmp(name, "devices")) r = g_devices;
    else if (!strcmp(name, "capacity")) r = (long long)g_capacity;
    else if ((d = stat_device(name, "used:", MAX_DEVICES)) >= 0) r = (long long)g_used[d];
    else if ((d = stat_device(name, "ctx_refcount:", MAX_DEVICES)) >= 0) r = g_ctx[d].refcount;
    else if ((d = stat_device(name, "sticky:", MAX_DEVICES)) >= 0) r = (long long)g_ctx[d].sticky;
    else if ((d = stat_device(name, "vmm_accessible_bytes:", MAX_DEVICES)) >= 0)
        SUM_OVER(r, g_nmaps, g_maps[i].access[d] ? g_maps[i].size : 0);
    pthread_mutex_unlock(&g_lock);
    return r;
}

/* ------------------------------------------------------------ initialisation */

EXPORT CUresult cuGetErrorString(CUresult error, const char **pStr) {
    const char *s;
    switch ((int)error) {
    case CUDA_SUCCESS: s = "no error"; break;
    case CUDA_ERROR_INVALID_VALUE: s = "invalid argument"; break;
    case CUDA_ERROR_OUT_OF_MEMORY: s = "out of memory"; break;
    case CUDA_ERROR_NOT_INITIALIZED: s = "initialization error"; break;
    case CUDA_ERROR_DEINITIALIZED: s = "driver shutting down"; break;
    case CUDA_ERROR_STUB_LIBRARY: s = "CUDA driver is a stub library"; break;
    case CUDA_ERROR_DEVICE_UNAVAILABLE: s = "CUDA-capable device(s) is/are busy or unavailable"; break;
    case CUDA_ERROR_NO_DEVICE: s = "no CUDA-capable device is detected"; break;
    case CUDA_ERROR_INVALID_DEVICE: s = "invalid device ordinal"; break;
    case CUDA_ERROR_INVALID_CONTEXT: s = "invalid device context"; break;
    case CUDA_ERROR_INVALID_HANDLE: s = "invalid resource handle"; break;
    case CUDA_ERROR_NOT_FOUND: s = "named symbol not found"; break;
    case CUDA_ERROR_NOT_READY: s = "device not ready"; break;
    case CUDA_ERROR_ILLEGAL_ADDRESS: s = "an illegal memory access was encountered"; break;
    case CUDA_ERROR_CONTEXT_IS_DESTROYED: s = "context is destroyed"; break;
    case CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED:
        s = "part or all of the requested memory range is already mapped";
        break;
    case CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED:
        s = "pointer does not correspond to a registered memory region";
        break;
    case CUDA_ERROR_NOT_PERMITTED: s = "operation not permitted"; break;
    case CUDA_ERROR_NOT_SUPPORTED: s = "operation not supported"; break;
    case CUDA_ERROR_ILLEGAL_STATE: s = "the operation cannot be performed in the present state"; break;
    case CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED: s = "operation not permitted when stream is capturing"; break;
    case CUDA_ERROR_STREAM_CAPTURE_INVALIDATED:
        s = "operation failed due to a previous error during capture";
        break;
    case CUDA_ERROR_STREAM_CAPTURE_MERGE: s = "operation would result in a merge of separate capture sequences"; break;
    case CUDA_ERROR_STREAM_CAPTURE_UNMATCHED: s = "capture was not ended in the same stream as it began"; break;
    case CUDA_ERROR_STREAM_CAPTURE_UNJOINED: s = "capturing stream has unjoined work"; break;
    case CUDA_ERROR_STREAM_CAPTURE_ISOLATION:
        s = "dependency created on uncaptured work in another stream";
        break;
    case CUDA_ERROR_STREAM_CAPTURE_IMPLICIT:
        s = "operation would make the legacy stream depend on a capturing blocking stream";
        break;
    case CUDA_ERROR_CAPTURED_EVENT: s = "operation not permitted on an event last recorded in a capturing stream"; break;
    case CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD:
        s = "attempt to terminate a thread-local capture sequence from another thread";
        break;
    case CUDA_ERROR_UNKNOWN: s = "unknown error"; break;
    default:
        if (pStr) *pStr = NULL;
        return CUDA_ERROR_INVALID_VALUE;
    }
    if (!pStr) return CUDA_ERROR_INVALID_VALUE;
    *pStr = s;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuInit(unsigned int Flags) {
    pthread_mutex_lock(&g_lock);
    read_env_locked();
    int injected = injected_failure("cuInit");
    if (injected) RETURN(injected);
    if (Flags != 0) RETURN(CUDA_ERROR_INVALID_VALUE);
    if (g_init_error) RETURN(g_init_error);
    if (g_devices == 0) RETURN(CUDA_ERROR_NO_DEVICE);
    g_initialized = 1;
    RETURN(CUDA_SUCCESS);
}

/* ------------------------------------------------------------------ devices */

EXPORT CUresult cuDeviceGetCount(int *count) {
    ENTER("cuDeviceGetCount");
    if (!count) RETURN(CUDA_ERROR_INVALID_VALUE);
    *count = g_devices;
    RETURN(CUDA_SUCCESS);
}

EXPORT CUresult cuDeviceGet(CUdevice *device, int ordinal) {
    ENTER("cuDeviceGet");
    if (!device) RETURN(CUDA_ERROR_INVALID_VALUE);
    if (!valid_device(ordinal)) RETURN(CUDA_ERROR_INVALID_DEVICE);
    *device = ordinal;
    RETURN(CUDA_SUCCESS);
}

EXPORT CUresult cuDeviceGetName(char *name, int len, CUdevice dev) {
    ENTER("cuDeviceGetName");
    if (!name || len <= 0) RETURN(CUDA_ERROR_INVALID_VALUE);
    if (!valid_device(dev)) RETURN(CUDA_ERROR_INVALID_DEVICE);
    snprintf(name, (size_t)len, "Fake NVIDIA H100 %d", dev);
    RETURN(CUDA_SUCCESS);
}

EXPORT CUresult cuDeviceTotalMem_v2(size_t *bytes, CUdevice dev) {
    ENTER("cuDeviceTotalMem_v2");
    if (!bytes) RETURN(CUDA_ERROR_INVALID_VALUE);
    if (!valid_device(dev)) RETURN(CUDA_ERROR_INVALID_DEVICE);
    *bytes = g_capacity;
    RETURN(CUDA_SUCCESS);
}

EXPORT CUresult cuDeviceGetPCIBusId(char *pciBusId, int len, CUdevice dev) {
    ENTER("cuDeviceGetPCIBusId");
    if (!pciBusId || len < 13) RETURN(CUDA_ERROR_INVALID_VALUE);
    if (!valid_device(dev)) RETURN(CUDA_ERROR_INVALID_DEVICE);
    /* The driver's form: upper-case hex, 4-digit domain. */
    snprintf(pciBusId, (size_t)len, "%04X:%02X:%02X.%X", 0, 0x1A + dev, 0, 0);
    RETURN(CUDA_SUCCESS);
}

EXPORT CUresult cuDeviceGetAttribute(int *pi, CUdevice_attribute attrib, CUdevice dev) {
    ENTER("cuDeviceGetAttribute");
    if (!pi) RETURN(CUDA_ERROR_INVALID_VALUE);
    if (!valid_device(dev)) RETURN(CUDA_ERROR_INVALID_DEVICE);
    switch ((int)attrib) {
    case CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING: *pi = g_unified; break;
    case CU_DEVICE_ATTRIBUTE_MANAGED_MEMORY: *pi = g_managed; break;
    case CU_DEVICE_ATTRIBUTE_CONCURRENT_MANAGED_ACCESS: *pi = g_managed; break;
    case CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED: *pi = g_vmm; break;
    case CU_DEVICE_ATTRIBUTE_PCI_BUS_ID: *pi = 0x1A + dev; break;
    case CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID: *pi = 0; break;
    case CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID: *pi = 0; break;
    default: RETURN(CUDA_ERROR_INVALID_VALUE); /* not modelled: noticed, not guessed */
    }
    RETURN(CUDA_SUCCESS);
}

/* ----------------------------------------------------------------- contexts */

EXPORT CUresult cuDevicePrimaryCtxRetain(CUcontext *pctx, CUdevice dev) {
    ENTER("cuDevicePrimaryCtxRetain");
    if (!pctx) RETURN(CUDA_ERROR_INVALID_VALUE);
    if (!valid_device(dev)) RETURN(CUDA_ERROR_INVALID_DEVICE);
    /* A device that refuses contexts (another process's in EXCLUSIVE_PROCESS mode,
     * PROHIBITED mode, a fallen-off GPU): nothing is retained. */
    if (dev == g_retain_fail_device) RETURN(g_retain_error);
    struct ctx *c = &g_ctx[dev];
    c->refcount++;
    c->active = 1;
    g_ctx_retains++;
    *pctx = (CUcontext)(void *)c;
    RETURN(CUDA_SUCCESS);
}

EXPORT CUresult cuDevicePrimaryCtxRelease_v2(CUdevice dev) {
    ENTER("cuDevicePrimaryCtxRelease_v2");
    if (!valid_device(dev)) RETURN(CUDA_ERROR_INVALID_DEVICE);
    struct ctx *c = &g_ctx[dev];
    if (c->refcount <= 0) RETURN(CUDA_ERROR_INVALID_CONTEXT);
    if (--c->refcount == 0) reset_ctx(c);
    RETURN(CUDA_SUCCESS);
}

EXPORT CUresult cuCtxGetCurrent(CUcontext *pctx) {
    ENTER("cuCtxGetCurrent");
    if (!pctx) RETURN(CUDA_ERROR_INVALID_VALUE);
    *pctx = (CUcontext)(void *)t_current;
    RETURN(CUDA_SUCCESS);
}

EXPORT CUresult cuCtxSetCurrent(CUcontext ctx) {
    ENTER("cuCtxSetCurrent");
    g_ctx_set_current++;
    if (ctx == NULL) {
        t_current = NULL;
        RETURN(CUDA_SUCCESS);
    }
    struct ctx *c = as_ctx(ctx);
    if (!c) RETURN(CUDA_ERROR_INVALID_CONTEXT);
    t_current = c;
    RETURN(CUDA_SUCCESS);
}

EXPORT CUresult cuCtxGetDevice(CUdevice *device) {
    ENTER("cuCtxGetDevice");
    struct ctx *c;
    NEED_CTX(c);
    if (!device) RETURN(CUDA_ERROR_INVALID_VALUE);
    *device = c->device;
    RETURN(CUDA_SUCCESS);
}

EXPORT CUresult cuDeviceCanAccessPeer(int *canAccessPeer, CUdevice dev, CUdevice peerDev) {
    ENTER("cuDeviceCanAccessPeer");
    if (!canAccessPeer) RETURN(CUDA_ERROR_INVALID_VALUE);
    if (!valid_device(dev) || !valid_device(peerDev)) RETURN(CUDA_ERROR_INVALID_DEVICE);
    /* A device is not its own peer (as cuDeviceCanAccessPeer answers). */
    *canAccessPeer = dev != peerDev && g_p2p;
    RETURN(CUDA_SUCCESS);
}

/* ------------------------------------------------------------------- memory */

EXPORT CUresult cuMemGetInfo_v2(size_t *free_bytes, size_t *total) {
    ENTER("cuMemGetInfo_v2");
    struct ctx *c;
    NEED_CTX(c);
    if (!free_bytes || !total) RETURN(CUDA_ERROR_INVALID_VALUE);
    *free_bytes = g_capacity - g_used[c->device];
    *total = g_capacity;
    RETURN(CUDA_SUCCESS);
}

static CUresult do_alloc(CUdeviceptr *dptr, size_t size, int kind, struct ctx *c) {
    if (!dptr || size == 0) return CUDA_ERROR_INVALID_VALUE;
    if (kind != MEM_HOST && size > g_capacity - g_used[c->device]) return CUDA_ERROR_OUT_OF_MEMORY;
    struct alloc *n = grow(g_allocs, &g_cap_allocs, g_nallocs + 1, sizeof *g_allocs);
    if (!n) return CUDA_ERROR_OUT_OF_MEMORY;
    g_allocs = n;
    size_t mapped;
    void *p;
    if (kind == MEM_HOST) {
        mapped = round_up(size, HOST_PAGE);
        p = mmap(NULL, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
    } else {
        /* In the device address range; only the pages asked for are accessible. */
        mapped = round_up(size, GRANULARITY);
        p = arena_take(mapped, GRANULARITY, 0);
        if (!p) return CUDA_ERROR_OUT_OF_MEMORY;
        if (mmap(p, round_up(size, HOST_PAGE), PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0) == MAP_FAILED) {
            arena_give(p, mapped);
            return CUDA_ERROR_OUT_OF_MEMORY;
        }
    }
    if (kind != MEM_HOST) memset(p, 0xA5, size); /* device memory is not cleared */
    g_allocs[g_nallocs++] = (struct alloc){p, size, mapped, kind, c->device, c};
    if (kind != MEM_HOST) g_used[c->device] += size;
    *dptr = (CUdeviceptr)(uintptr_t)p;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuMemAlloc_v2(CUdeviceptr *dptr, size_t bytesize) {
    ENTER("cuMemAlloc_v2");
    struct ctx *c;
    NEED_CTX(c);
    RETURN(do_alloc(dptr, bytesize, MEM_DEVICE, c));
}

EXPORT CUresult cuMemAllocManaged(CUdeviceptr *dptr, size_t bytesize, unsigned int flags) {
    ENTER("cuMemAllocManaged");
    struct ctx *c;
    NEED_CTX(c);
    if (flags != CU_MEM_ATTACH_GLOBAL && flags != CU_MEM_ATTACH_HOST) RETURN(CUDA_ERROR_INVALID_VALUE);
    if (!g_managed) RETURN(CUDA_ERROR_NOT_SUPPORTED);
    RETURN(do_alloc(dptr, bytesize, MEM_MANAGED, c));
}

/* Frees the allocation of `kind`s starting exactly at p. */
static CUresult free_kind(const char *p, int kind1, int kind2) {
    for (size_t i = 0; i < g_nallocs; i++) {
        if (g_allocs[i].ptr == p && (g_allocs[i].kind == kind1 || g_allocs[i].kind == kind2)) {
            /* Implicit synchronisation: queued copies touching it finish first. */
            free_alloc_at(i);
            return CUDA_SUCCESS;
        }
    }
    return CUDA_ERROR_INVALID_VALUE;
}

EXPORT CUresult cuMemFree_v2(CUdeviceptr dptr) {
    ENTER("cuMemFree_v2");
    REQUIRE_CTX();
    UNSAFE_CALL();
    RETURN(free_kind((const char *)(uintptr_t)dptr, MEM_DEVICE, MEM_MANAGED));
}

EXPORT CUresult cuMemAllocHost_v2(void **pp, size_t bytesize) {
    ENTER("cuMemAllocHost_v2");
    struct ctx *c;
    NEED_CTX(c);
    if (!pp) RETURN(CUDA_ERROR_INVALID_VALUE);
    CUdeviceptr d = 0;
    CUresult rc = do_alloc(&d, bytesize, MEM_HOST, c);
    if (rc == CUDA_SUCCESS) *pp = (void *)(uintptr_t)d;
    RETURN(rc);
}

EXPORT CUresult cuMemFreeHost(void *p) {
    ENTER("cuMemFreeHost");
    REQUIRE_CTX();
    UNSAFE_CALL();
    RETURN(free_kind(p, MEM_HOST, MEM_HOST));
}

EXPORT CUresult cuMemHostRegister_v2(void *p, size_t bytesize, unsigned int Flags) {
    ENTER("cuMemHostRegister_v2");
    struct ctx *c;
    NEED_CTX(c);
    g_register_calls++;
    unsigned known = CU_MEMHOSTREGISTER_PORTABLE | CU_MEMHOSTREGISTER_DEVICEMAP |
                     CU_MEMHOSTREGISTER_IOMEMORY | CU_MEMHOSTREGISTER_READ_ONLY;
    if (!p || bytesize == 0 || (Flags & ~known)) RETURN(CUDA_ERROR_INVALID_VALUE);
    char *b = p;
    /* Device, managed or VMM memory is not host memory to register. */
    for (size_t i = 0; i < g_nallocs; i++)
        if (overlaps(b, bytesize, g_allocs[i].ptr, g_allocs[i].size))
            RETURN(g_allocs[i].kind == MEM_HOST ? CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED
                                                : CUDA_ERROR_INVALID_VALUE);
    for (size_t i = 0; i < g_nres; i++)
        if (overlaps(b, bytesize, g_res[i].base, g_res[i].size)) RETURN(CUDA_ERROR_INVALID_VALUE);
    for (size_t i = 0; i < g_nregs; i++)
        if (overlaps(b, bytesize, g_regs[i].ptr, g_regs[i].size))
            RETURN(CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED);
    /* One registration's size is capped (r580: 512 GiB, code 2; here configurable). */
    if (bytesize > g_max_register) RETURN(g_max_register_error);
    /* The pages must exist to be pinned. */
    uintptr_t lo = (uintptr_t)b & ~(uintptr_t)(HOST_PAGE - 1);
    uintptr_t hi = ((uintptr_t)b + bytesize + HOST_PAGE - 1) & ~(uintptr_t)(HOST_PAGE - 1);
    if (msync((void *)lo, hi - lo, MS_ASYNC) != 0 && errno == ENOMEM) RETURN(CUDA_ERROR_INVALID_VALUE);
    struct registration *n = grow(g_regs, &g_cap_regs, g_nregs + 1, sizeof *g_regs);
    if (!n) RETURN(CUDA_ERROR_OUT_OF_MEMORY);
    g_regs = n;
    g_regs[g_nregs++] = (struct registration){b, bytesize, Flags, c};
    g_last_register_flags = Flags;
    RETURN(CUDA_SUCCESS);
}

EXPORT CUresult cuMemHostUnregister(void *p) {
    ENTER("cuMemHostUnregister");
    REQUIRE_CTX();
    UNSAFE_CALL();
    for (size_t i = 0; i < g_nregs; i++) {
        if (g_regs[i].ptr == p) {
            /* Queued copies touching the range finish first. */
            run_queues_touching(g_regs[i].ptr, g_regs[i].size);
            g_regs[i] = g_regs[--g_nregs];
            RETURN(CUDA_SUCCESS);
        }
    }
    RETURN(CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED);
}

/* ------------------------------------------------------------------ streams */

EXPORT CUresult cuStreamCreate(CUstream *phStream, unsigned int Flags) {
    ENTER("cuStreamCreate");
    struct ctx *c;
    NEED_CTX(c);
    if (!phStream || (Flags & ~(unsigned)CU_STREAM_NON_BLOCKING)) RETURN(CUDA_ERROR_INVALID_VALUE);
    struct object *o = new_object(KIND_STREAM, c, Flags);
    if (!o) RETURN(CUDA_ERROR_OUT_OF_MEMORY);
    g_last_stream_flags = Flags;
    *phStream = (CUstream)(void *)o;
    RETURN(CUDA_SUCCESS);
}

EXPORT CUresult cuStreamDestroy_v2(CUstream hStream) {
    ENTER("cuStreamDestroy_v2");
    REQUIRE_CTX();
    struct object *o = find_object(hStream, KIND_STREAM);
    if (!o) RETURN(CUDA_ERROR_INVALID_HANDLE);
    if (o->cap) {
        /* Chosen: destroying a capturing stream invalidates its capture. */
        (void)capture_violation(o->cap, CUDA_SUCCESS);
        if (o->cap->origin == o) o->cap->origin = NULL;
        o->cap = NULL;
    }
    if (o->qhead < o->qlen) {
        /* Returns at once; the queued work finishes later, then the handle is free. */
        o->live = 0;
        o->zombie = 1;
    } else {
        retire_object(o);
    }
    RETURN_YIELDING(CUDA_SUCCESS);
}

EXPORT CUresult cuStreamSynchronize(CUstream hStream) {
    ENTER("cuStreamSynchronize");
    struct ctx *c;
    NEED_CTX(c);
    struct object *s;
    CUresult rc = resolve_stream(hStream, c, &s);
    if (rc) RETURN(rc);
    if (s->cap) RETURN(capture_violation(s->cap, CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED));
    if ((rc = legacy_use(s))) RETURN(rc);
    if (s->implicit == IMPLICIT_LEGACY) run_context(s->ctx, 0);
    else run_all(s);
    RETURN(s->ctx->sticky);
}

EXPORT CUresult cuStreamWaitEvent(CUstream hStream, CUevent hEvent, unsigned int Flags) {
    ENTER("cuStreamWaitEvent");
    struct ctx *c;
    NEED_CTX(c);
    if (Flags & ~(unsigned)CU_EVENT_WAIT_EXTERNAL) RETURN(CUDA_ERROR_INVALID_VALUE);
    struct object *s;
    CUresult rc = resolve_stream(hStream, c, &s);
    if (rc) RETURN(rc);
    struct object *e = find_object(hEvent, KIND_EVENT);
    if (!e) RETURN(CUDA_ERROR_INVALID_HANDLE);
    struct capture *waiter = s->cap;
    /* "This flag is invalid when used outside of capture." */
    if ((Flags & CU_EVENT_WAIT_EXTERNAL) && !waiter) RETURN(CUDA_ERROR_INVALID_VALUE);
    if (waiter) {
        if (e->rec_cap == waiter) {
            /* An edge of the graph; the origin waiting joins the other stream back. */
            struct object *from = e->rec_cap_stream;
            if (s == waiter->origin && from && from->cap == waiter && e->rec_cap_work > from->cap_joined_upto)
                from->cap_joined_upto = e->rec_cap_work;
            waiter->nodes++;
            RETURN(CUDA_SUCCESS);
        }
        if (e->rec_cap) {
            /* Two captures would merge: both are invalidated. */
            if (e->rec_cap->live) e->rec_cap->invalidated = 1;
            RETURN(capture_violation(waiter, CUDA_ERROR_STREAM_CAPTURE_MERGE));
        }
        if (!(Flags & CU_EVENT_WAIT_EXTERNAL))
            RETURN(capture_violation(waiter, CUDA_ERROR_STREAM_CAPTURE_ISOLATION));
        waiter->nodes++; /* an external event wait node */
        RETURN(CUDA_SUCCESS);
    }
    if (e->rec_cap) {
        if (!e->rec_cap->live) RETURN(capture_violation(e->rec_cap, CUDA_ERROR_CAPTURED_EVENT));
        if (s->implicit == IMPLICIT_LEGACY)
            RETURN(capture_violation(e->rec_cap, CUDA_ERROR_STREAM_CAPTURE_IMPLICIT));
        /* A fork: the waiting stream joins the capture. */
        s->cap = e->rec_cap;
        s->cap_work = s->cap_joined_upto = 0;
        g_capture_joins++;
        RETURN(CUDA_SUCCESS);
    }
    /* An action on the legacy stream orders it, and the blocking streams after it, even
     * when the event has passed. */
    if ((rc = order_implicitly(s))) RETURN(rc);
    if (event_done(e)) RETURN(CUDA_SUCCESS);
    /* Later work on s follows the work the event captured now (its latest recording). */
    struct op op = {0};
    op.kind = OP_WAIT;
    op.wait_stream = e->rec_stream;
    op.wait_seq = e->rec_seq;
    RETURN(enqueue_raw(s, op));
}

/* Waits for every stream of the current context: its legacy stream, the per-thread
 * streams of every thread, and the streams made in it. */
EXPORT CUresult cuCtxSynchronize(void) {
    ENTER("cuCtxSynchronize");
    struct ctx *c;
    NEED_CTX(c);
    for (size_t i = 0; i < g_nobjects; i++) {
        struct object *s = g_objects[i];
        /* "Invalid to synchronise a broader handle ... when any associated stream is in
         * capture mode." */
        if (is_stream(s) && s->ctx == c && s->cap)
            RETURN(capture_violation(s->cap, CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED));
    }
    UNSAFE_CALL();
    g_ctx_synchronizes++;
    run_context(c, 1);
    RETURN(c->sticky);
}

/* ------------------------------------------------------------------- events */

EXPORT CUresult cuEventCreate(CUevent *phEvent, unsigned int Flags) {
    ENTER("cuEventCreate");
    struct ctx *c;
    NEED_CTX(c);
    unsigned known = CU_EVENT_BLOCKING_SYNC | CU_EVENT_DISABLE_TIMING | CU_EVENT_INTERPROCESS;
    if (!phEvent || (Flags & ~known)) RETURN(CUDA_ERROR_INVALID_VALUE);
    if ((Flags & CU_EVENT_INTERPROCESS) && !(Flags & CU_EVENT_DISABLE_TIMING))
        RETURN(CUDA_ERROR_INVALID_VALUE);
    struct object *o = new_object(KIND_EVENT, c, Flags);
    if (!o) RETURN(CUDA_ERROR_OUT_OF_MEMORY);
    g_last_event_flags = Flags;
    *phEvent = (CUevent)(void *)o;
    RETURN(CUDA_SUCCESS);
}

EXPORT CUresult cuEventDestroy_v2(CUevent hEvent) {
    ENTER("cuEventDestroy_v2");
    REQUIRE_CTX();
    struct object *o = find_object(hEvent, KIND_EVENT);
    if (!o) RETURN(CUDA_ERROR_INVALID_HANDLE);
    /* A pending recording stays queued (waits that captured it still wait for its
     * stream) but must not touch whatever event reuses this object: the incarnation in
     * the op no longer matches. */
    retire_object(o);
    RETURN_YIELDING(CUDA_SUCCESS);
}

EXPORT CUresult cuEventRecord(CUevent hEvent, CUstream hStream) {
    ENTER("cuEventRecord");
    struct ctx *c;
    NEED_CTX(c);
    struct object *e = find_object(hEvent, KIND_EVENT);
    if (!e) RETURN(CUDA_ERROR_INVALID_HANDLE);
    struct object *s;
    CUresult rc = resolve_stream(hStream, c, &s);
    if (rc) RETURN(rc);
    /* "hEvent and hStream must be from the same context otherwise
     * CUDA_ERROR_INVALID_HANDLE is returned." */
    if (s->ctx != e->ctx) RETURN(CUDA_ERROR_INVALID_HANDLE);
    if (s->cap) {
        /* A node of the graph: the event is a captured event from now on. */
        e->rec_cap = s->cap;
        e->rec_cap_stream = s;
        e->rec_cap_work = s->cap_work;
        s->cap->nodes++;
        RETURN(CUDA_SUCCESS);
    }
    if ((rc = order_implicitly(s))) RETURN(rc);
    e->rec_cap = NULL;
    e->rec_cap_stream = NULL;
    unsigned long long gen = e->gen + 1;
    if (pending(s)) {
        struct op op = {0};
        op.kind = OP_RECORD;
        op.ev = e;
        op.ev_incarnation = e->incarnation;
        op.gen = gen;
        rc = enqueue_raw(s, op);
        if (rc) RETURN(rc);
        e->gen = gen;
        e->rec_stream = s;
        e->rec_seq = s->q[s->qlen - 1].seq;
    } else {
        /* Nothing queued before it: passed at once. */
        e->gen = e->done_gen = gen;
        e->rec_stream = NULL;
    }
    RETURN(CUDA_SUCCESS);
}

EXPORT CUresult cuEventSynchronize(CUevent hEvent) {
    ENTER("cuEventSynchronize");
    REQUIRE_CTX();
    struct object *e = find_object(hEvent, KIND_EVENT);
    if (!e) RETURN(CUDA_ERROR_INVALID_HANDLE);
    if (e->rec_cap) RETURN(capture_violation(e->rec_cap, CUDA_ERROR_CAPTURED_EVENT));
    run_to_event(e);
    RETURN(e->ctx->sticky);
}

EXPORT CUresult cuEventQuery(CUevent hEvent) {
    ENTER("cuEventQuery");
    /* No current context needed: the documentation lists no context error. */
    struct object *e = find_object(hEvent, KIND_EVENT);
    if (!e) RETURN(CUDA_ERROR_INVALID_HANDLE);
    if (e->rec_cap) RETURN(capture_violation(e->rec_cap, CUDA_ERROR_CAPTURED_EVENT));
    if (e->ctx->sticky) RETURN(e->ctx->sticky);
    if (event_done(e)) RETURN(CUDA_SUCCESS);
    /* Not yet: say so, then let the "GPU" progress so that polling terminates. */
    run_to_event(e);
    RETURN(CUDA_ERROR_NOT_READY);
}

/* -------------------------------------------------------------- stream capture */

EXPORT CUresult cuStreamBeginCapture_v2(CUstream hStream, CUstreamCaptureMode mode) {
    ENTER("cuStreamBeginCapture_v2");
    struct ctx *cx;
    NEED_CTX(cx);
    struct object *s;
    CUresult rc = resolve_stream(hStream, cx, &s);
    if (rc) RETURN(rc);
    if (s->implicit == IMPLICIT_LEGACY) RETURN(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED);
    if ((unsigned)mode > CU_STREAM_CAPTURE_MODE_RELAXED) RETURN(CUDA_ERROR_INVALID_VALUE);
    if (s->cap) RETURN(CUDA_ERROR_ILLEGAL_STATE);
    struct capture **n = grow(g_captures, &g_cap_captures, g_ncaptures + 1, sizeof *g_captures);
    if (!n) RETURN(CUDA_ERROR_OUT_OF_MEMORY);
    g_captures = n;
    struct capture *c = calloc(1, sizeof *c);
    if (!c) RETURN(CUDA_ERROR_OUT_OF_MEMORY);
    c->id = g_ncaptures + 1;
    c->live = 1;
    c->mode = mode;
    c->thread = pthread_self();
    c->origin = s;
    g_captures[g_ncaptures++] = c;
    s->cap = c;
    s->cap_work = s->cap_joined_upto = 0;
    RETURN(CUDA_SUCCESS);
}

EXPORT CUresult cuStreamEndCapture(CUstream hStream, CUgraph *phGraph) {
    ENTER("cuStreamEndCapture");
    struct ctx *cx;
    NEED_CTX(cx);
    if (!phGraph) RETURN(CUDA_ERROR_INVALID_VALUE);
    struct object *s;
    CUresult rc = resolve_stream(hStream, cx, &s);
    if (rc) RETURN(rc);
    if (!s->cap) RETURN(CUDA_ERROR_ILLEGAL_STATE);
    struct capture *c = s->cap;
    if (c->origin != s) RETURN(CUDA_ERROR_STREAM_CAPTURE_UNMATCHED);
    if (c->mode != CU_STREAM_CAPTURE_MODE_RELAXED && !pthread_equal(c->thread, pthread_self()))
        RETURN(CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD);
    int unjoined = 0;
    for (size_t i = 0; i < g_nobjects; i++) {
        struct object *o = g_objects[i];
        if (!is_stream(o) || o->cap != c) continue;
        if (o != s && o->cap_work > o->cap_joined_upto) unjoined = 1;
        o->cap = NULL;
    }
    c->live = 0;
    *phGraph = NULL;
    if (c->invalidated) RETURN(CUDA_ERROR_STREAM_CAPTURE_INVALIDATED);
    if (unjoined) RETURN(CUDA_ERROR_STREAM_CAPTURE_UNJOINED);
    struct graph **gn = grow(g_graphs, &g_cap_graphs, g_ngraphs + 1, sizeof *g_graphs);
    if (!gn) RETURN(CUDA_ERROR_OUT_OF_MEMORY);
    g_graphs = gn;
    struct graph *g = calloc(1, sizeof *g);
    if (!g) RETURN(CUDA_ERROR_OUT_OF_MEMORY);
    g->magic = GRAPH_MAGIC;
    g->live = 1;
    g->nodes = c->nodes;
    g_graphs[g_ngraphs++] = g;
    *phGraph = (CUgraph)(void *)g;
    RETURN(CUDA_SUCCESS);
}

EXPORT CUresult cuStreamIsCapturing(CUstream hStream, CUstreamCaptureStatus *captureStatus) {
    ENTER("cuStreamIsCapturing");
    struct ctx *c;
    NEED_CTX(c);
    if (!captureStatus) RETURN(CUDA_ERROR_INVALID_VALUE);
    struct object *s;
    CUresult rc = resolve_stream(hStream, c, &s);
    if (rc) RETURN(rc);
    /* The legacy stream while a blocking stream captures: the implicit dependency. */
    if (s->implicit == IMPLICIT_LEGACY && blocking_capture(c)) RETURN(CUDA_ERROR_STREAM_CAPTURE_IMPLICIT);
    if (!s->cap) *captureStatus = CU_STREAM_CAPTURE_STATUS_NONE;
    else *captureStatus = s->cap->invalidated ? CU_STREAM_CAPTURE_STATUS_INVALIDATED : CU_STREAM_CAPTURE_STATUS_ACTIVE;
    RETURN(CUDA_SUCCESS);
}

EXPORT CUresult cuGraphDestroy(CUgraph hGraph) {
    ENTER("cuGraphDestroy");
    for (size_t i = 0; i < g_ngraphs; i++) {
        if ((void *)g_graphs[i] == (void *)hGraph && g_graphs[i]->live) {
            g_graphs[i]->live = 0;
            RETURN(CUDA_SUCCESS);
        }
    }
    RETURN(CUDA_ERROR_INVALID_VALUE);
}

/* ------------------------------------------------------------------- copies */

static CUresult queue_copy(struct object *s, char *dst, const char *src, size_t n, int dst_vmm,
                           int src_vmm) {
    if (s->cap) {
        /* Recorded as a node of the graph, not run. */
        s->cap->nodes++;
        s->cap_work++;
        g_captured_ops++;
        return CUDA_SUCCESS;
    }
    struct op op = {0};
    op.kind = OP_COPY;
    op.dst = dst;
    op.src = src;
    op.n = n;
    op.dst_vmm = dst_vmm;
    op.src_vmm = src_vmm;
    CUresult rc = enqueue(s, op);
    if (rc == CUDA_SUCCESS) {
        g_async_copies++;
        if (s->implicit) g_copies++;
    }
    return rc;
}

EXPORT CUresult cuMemcpyAsync(CUdeviceptr dst, CUdeviceptr src, size_t ByteCount, CUstream hStream) {
    ENTER("cuMemcpyAsync");
    struct ctx *c;
    NEED_CTX(c);
    if (!g_unified) RETURN(CUDA_ERROR_INVALID_VALUE); /* "only allowed ... with unified addressing" */
    struct object *s;
    CUresult rc = resolve_stream(hStream, c, &s);
    if (rc) RETURN(rc);
    if (ByteCount == 0) RETURN(CUDA_SUCCESS);
    char *d = (char *)(uintptr_t)dst;
    const char *p = (const char *)(uintptr_t)src;
    if (!d || !p) RETURN(CUDA_ERROR_INVALID_VALUE);
    int dv, sv;
    if ((rc = check_end(d, ByteCount, 1, &dv)) || (rc = check_end(p, ByteCount, 0, &sv))) RETURN(rc);
    if (overlaps(d, ByteCount, p, ByteCount)) RETURN(CUDA_ERROR_INVALID_VALUE);
    RETURN(queue_copy(s, d, p, ByteCount, dv, sv));
}

EXPORT CUresult cuMemcpyPeerAsync(CUdeviceptr dstDevice, CUcontext dstContext, CUdeviceptr srcDevice,
                                  CUcontext srcContext, size_t ByteCount, CUstream hStream) {
    ENTER("cuMemcpyPeerAsync");
    struct ctx *c;
    NEED_CTX(c);
    struct ctx *dc = as_ctx(dstContext), *sc = as_ctx(srcContext);
    if (!dc || !sc || !dc->active || !sc->active) RETURN(CUDA_ERROR_INVALID_CONTEXT);
    struct object *s;
    CUresult rc = resolve_stream(hStream, c, &s);
    if (rc) RETURN(rc);
    if (ByteCount == 0) RETURN(CUDA_SUCCESS);
    char *d = (char *)(uintptr_t)dstDevice;
    const char *p = (const char *)(uintptr_t)srcDevice;
    int dv, sv;
    if ((rc = check_peer_end(d, ByteCount, 1, dc, &dv)) || (rc = check_peer_end(p, ByteCount, 0, sc, &sv)))
        RETURN(rc);
    if (overlaps(d, ByteCount, p, ByteCount)) RETURN(CUDA_ERROR_INVALID_VALUE);
    rc = queue_copy(s, d, p, ByteCount, dv, sv);
    if (rc == CUDA_SUCCESS) g_peer_copies++;
    RETURN(rc);
}

/* ----------------------------------------------------------- managed memory */

static int managed_range(const char *p, size_t n) {
    struct alloc *a = find_alloc(p);
    return a && a->kind == MEM_MANAGED && (size_t)(p - a->ptr) + n <= a->size;
}

/* A location for prefetch / advice; `host_numa` allows the HOST_NUMA kinds. */
static CUresult check_location(CUmemLocation loc, int host_numa) {
    switch ((int)loc.type) {
    case CU_MEM_LOCATION_TYPE_DEVICE:
        if (!valid_device(loc.id) || !g_managed) return CUDA_ERROR_INVALID_DEVICE;
        return CUDA_SUCCESS;
    case CU_MEM_LOCATION_TYPE_HOST: return CUDA_SUCCESS;
    case CU_MEM_LOCATION_TYPE_HOST_NUMA:
        return host_numa && loc.id == 0 ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
    case CU_MEM_LOCATION_TYPE_HOST_NUMA_CURRENT:
        return host_numa ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
    default: return CUDA_ERROR_INVALID_VALUE;
    }
}

EXPORT CUresult cuMemPrefetchAsync_v2(CUdeviceptr devPtr, size_t count, CUmemLocation location,
                                      unsigned int flags, CUstream hStream) {
    ENTER("cuMemPrefetchAsync_v2");
    if (flags != 0) RETURN(CUDA_ERROR_INVALID_VALUE);
    const char *p = (const char *)(uintptr_t)devPtr;
    if (!p || count == 0 || !managed_range(p, count)) RETURN(CUDA_ERROR_INVALID_VALUE);
    CUresult rc = check_location(location, 1);
    if (rc) RETURN(rc);
    struct object *s;
    /* The special streams are the current context's: they need one. */
    rc = resolve_stream(hStream, NULL, &s);
    if (rc) RETURN(rc);
    /* "hStream must be associated with a device that has concurrent managed access"
     * for a device destination: here every device has it or none does (checked above). */
    g_prefetches++;
    g_last_prefetch_type = location.type;
    g_last_prefetch_id = location.id;
    RETURN(CUDA_SUCCESS);
}

EXPORT CUresult cuMemAdvise_v2(CUdeviceptr devPtr, size_t count, CUmem_advise advice, CUmemLocation location) {
    ENTER("cuMemAdvise_v2");
    const char *p = (const char *)(uintptr_t)devPtr;
    if (!p || count == 0 || !managed_range(p, count)) RETURN(CUDA_ERROR_INVALID_VALUE);
    CUresult rc = CUDA_SUCCESS;
    switch ((int)advice) {
    case CU_MEM_ADVISE_SET_READ_MOSTLY:
    case CU_MEM_ADVISE_UNSET_READ_MOSTLY:
    case CU_MEM_ADVISE_UNSET_PREFERRED_LOCATION:
        break; /* "the location argument is ignored" */
    case CU_MEM_ADVISE_SET_PREFERRED_LOCATION: rc = check_location(location, 1); break;
    case CU_MEM_ADVISE_SET_ACCESSED_BY:
    case CU_MEM_ADVISE_UNSET_ACCESSED_BY:
        /* "must be either DEVICE ... or HOST ... All other location types are invalid." */
        rc = check_location(location, 0);
        break;
    default: rc = CUDA_ERROR_INVALID_VALUE;
    }
    if (rc) RETURN(rc);
    g_advises++;
    g_last_advice = advice;
    g_last_advice_type = location.type;
    g_last_advice_id = location.id;
    RETURN(CUDA_SUCCESS);
}

/* ------------------------------------------------- virtual memory management */

static CUresult check_prop(const CUmemAllocationProp *prop) {
    if (!prop) return CUDA_ERROR_INVALID_VALUE;
    if (prop->type != CU_MEM_ALLOCATION_TYPE_PINNED) return CUDA_ERROR_INVALID_VALUE;
    if (prop->location.type != CU_MEM_LOCATION_TYPE_DEVICE) return CUDA_ERROR_INVALID_VALUE;
    if (!valid_device(prop->location.id)) return CUDA_ERROR_INVALID_DEVICE;
    if (prop->requestedHandleTypes != CU_MEM_HANDLE_TYPE_NONE &&
        prop->requestedHandleTypes != CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR)
        return CUDA_ERROR_NOT_SUPPORTED;
    if (prop->win32HandleMetaData) return CUDA_ERROR_INVALID_VALUE;
    if (prop->allocFlags.compressionType || prop->allocFlags.usage) return CUDA_ERROR_NOT_SUPPORTED;
    if (!g_vmm) return CUDA_ERROR_NOT_SUPPORTED;
    return CUDA_SUCCESS;
}

/* Whether p..p+size is covered by whole mappings, with no gap between them. */
static int whole_mappings(const char *p, size_t size) {
    for (const char *cur = p; cur < p + size;) {
        struct mapping *m = find_map(cur);
        if (!m || m->ptr != cur || m->size > (size_t)(p + size - cur)) return 0;
        cur = m->ptr + m->size;
    }
    return 1;
}

static struct phys *find_phys(CUmemGenericAllocationHandle h) {
    for (size_t i = 0; i < g_nphys; i++)
        if (g_phys[i]->handle == h && g_phys[i]->live) return g_phys[i];
    return NULL;
}

EXPORT CUresult cuMemGetAllocationGranularity(size_t *granularity, const CUmemAllocationProp *prop,
                                              CUmemAllocationGranularity_flags option) {
    ENTER("cuMemGetAllocationGranularity");
    if (!granularity) RETURN(CUDA_ERROR_INVALID_VALUE);
    if (option != CU_MEM_ALLOC_GRANULARITY_MINIMUM && option != CU_MEM_ALLOC_GRANULARITY_RECOMMENDED)
        RETURN(CUDA_ERROR_INVALID_VALUE);
    CUresult rc = check_prop(prop);
    if (rc) RETURN(rc);
    *granularity = GRANULARITY;
    RETURN(CUDA_SUCCESS);
}

EXPORT CUresult cuMemAddressReserve(CUdeviceptr *ptr, size_t size, size_t alignment, CUdeviceptr addr,
                                    unsigned long long flags) {
    ENTER_VMM("cuMemAddressReserve");
    if (!ptr || flags != 0 || size == 0 || size % HOST_PAGE || addr % HOST_PAGE)
        RETURN(CUDA_ERROR_INVALID_VALUE);
    if (alignment & (alignment - 1)) RETURN(CUDA_ERROR_INVALID_VALUE);
    size_t align = alignment > GRANULARITY ? alignment : GRANULARITY;
    struct reservation *n = grow(g_res, &g_cap_res, g_nres + 1, sizeof *g_res);
    if (!n) RETURN(CUDA_ERROR_OUT_OF_MEMORY);
    g_res = n;
    size_t va = round_up(size, GRANULARITY);
    /* The address is a hint: elsewhere when it is not free. */
    char *base = arena_take(va, align, (uintptr_t)addr);
    if (!base) RETURN(CUDA_ERROR_OUT_OF_MEMORY);
    g_res[g_nres++] = (struct reservation){base, size, va};
    *ptr = (CUdeviceptr)(uintptr_t)base;
    RETURN(CUDA_SUCCESS);
}

EXPORT CUresult cuMemAddressFree(CUdeviceptr ptr, size_t size) {
    ENTER_VMM("cuMemAddressFree");
    UNSAFE_CALL();
    char *p = (char *)(uintptr_t)ptr;
    for (size_t i = 0; i < g_nres; i++) {
        if (g_res[i].base != p) continue;
        if (g_res[i].size != size) RETURN(CUDA_ERROR_INVALID_VALUE);
        for (size_t k = 0; k < g_nmaps; k++)
            if (overlaps(g_maps[k].ptr, g_maps[k].size, p, size)) RETURN(CUDA_ERROR_INVALID_VALUE);
        arena_give(p, g_res[i].va);
        g_res[i] = g_res[--g_nres];
        RETURN(CUDA_SUCCESS);
    }
    RETURN(CUDA_ERROR_INVALID_VALUE);
}

EXPORT CUresult cuMemCreate(CUmemGenericAllocationHandle *handle, size_t size, const CUmemAllocationProp *prop,
                            unsigned long long flags) {
    ENTER("cuMemCreate");
    if (!handle || flags != 0 || size == 0 || size % GRANULARITY) RETURN(CUDA_ERROR_INVALID_VALUE);
    CUresult rc = check_prop(prop);
    if (rc) RETURN(rc);
    int dev = prop->location.id;
    if (size > g_capacity - g_used[dev]) RETURN(CUDA_ERROR_OUT_OF_MEMORY);
    int fd = memfd_create("fake-cuda-physical", MFD_CLOEXEC);
    if (fd < 0) RETURN(CUDA_ERROR_OUT_OF_MEMORY);
    if (ftruncate(fd, (off_t)size) != 0) {
        close(fd);
        RETURN(CUDA_ERROR_OUT_OF_MEMORY);
    }
    /* Reuse the record (and handle value) of the most recently freed allocation. */
    struct phys *ph = NULL;
    for (size_t i = g_nphys; i-- > 0;)
        if (g_phys[i]->freed) {
            ph = g_phys[i];
            g_reused_handles++;
            break;
        }
    if (!ph) {
        struct phys **n = grow(g_phys, &g_cap_phys, g_nphys + 1, sizeof *g_phys);
        if (!n || !(ph = calloc(1, sizeof *ph))) {
            close(fd);
            RETURN(CUDA_ERROR_OUT_OF_MEMORY);
        }
        g_phys = n;
        g_phys[g_nphys++] = ph;
        ph->handle = g_next_handle;
        g_next_handle += 0x10;
    }
    ph->live = 1;
    ph->freed = 0;
    ph->device = dev;
    ph->size = size;
    ph->fd = fd;
    ph->mappings = 0;
    g_used[dev] += size;
    *handle = ph->handle;
    RETURN(CUDA_SUCCESS);
}

EXPORT CUresult cuMemRelease(CUmemGenericAllocationHandle handle) {
    ENTER_VMM("cuMemRelease");
    UNSAFE_CALL();
    struct phys *ph = find_phys(handle);
    if (!ph) RETURN(CUDA_ERROR_INVALID_VALUE); /* undefined in CUDA; refused here */
    ph->live = 0;
    phys_maybe_free(ph); /* now if unmapped, else at its last unmap */
    RETURN(CUDA_SUCCESS);
}

EXPORT CUresult cuMemMap(CUdeviceptr ptr, size_t size, size_t offset, CUmemGenericAllocationHandle handle,
                         unsigned long long flags) {
    ENTER_VMM("cuMemMap");
    char *p = (char *)(uintptr_t)ptr;
    if (flags != 0 || size == 0 || ptr % GRANULARITY || size % GRANULARITY || offset % GRANULARITY)
        RETURN(CUDA_ERROR_INVALID_VALUE);
    struct phys *ph = find_phys(handle);
    if (!ph || offset > ph->size || size > ph->size - offset) RETURN(CUDA_ERROR_INVALID_VALUE);
    struct reservation *r = find_res(p);
    if (!r || (size_t)(p - r->base) + size > r->size) RETURN(CUDA_ERROR_INVALID_VALUE);
    for (size_t i = 0; i < g_nmaps; i++)
        if (overlaps(g_maps[i].ptr, g_maps[i].size, p, size)) RETURN(CUDA_ERROR_INVALID_VALUE);
    struct mapping *n = grow(g_maps, &g_cap_maps, g_nmaps + 1, sizeof *g_maps);
    if (!n) RETURN(CUDA_ERROR_OUT_OF_MEMORY);
    g_maps = n;
    /* Not accessible until cuMemSetAccess. */
    void *m = mmap(p, size, PROT_NONE, MAP_SHARED | MAP_FIXED, ph->fd, (off_t)offset);
    if (m == MAP_FAILED) RETURN(CUDA_ERROR_OUT_OF_MEMORY);
    struct mapping mp;
    memset(&mp, 0, sizeof mp);
    mp.ptr = p;
    mp.size = size;
    mp.phys = ph;
    g_maps[g_nmaps++] = mp;
    ph->mappings++;
    RETURN(CUDA_SUCCESS);
}

EXPORT CUresult cuMemSetAccess(CUdeviceptr ptr, size_t size, const CUmemAccessDesc *desc, size_t count) {
    ENTER_VMM("cuMemSetAccess");
    char *p = (char *)(uintptr_t)ptr;
    if (!desc || count == 0 || size == 0) RETURN(CUDA_ERROR_INVALID_VALUE);
    for (size_t k = 0; k < count; k++) {
        if (desc[k].location.type != CU_MEM_LOCATION_TYPE_DEVICE) RETURN(CUDA_ERROR_INVALID_VALUE);
        if (!valid_device(desc[k].location.id)) RETURN(CUDA_ERROR_INVALID_DEVICE);
        unsigned f = desc[k].flags;
        if (f != CU_MEM_ACCESS_FLAGS_PROT_NONE && f != CU_MEM_ACCESS_FLAGS_PROT_READ &&
            f != CU_MEM_ACCESS_FLAGS_PROT_READWRITE)
            RETURN(CUDA_ERROR_INVALID_VALUE);
    }
    /* "The range must be a fully mapped address range containing all allocations":
     * whole mappings, no gaps. */
    if (!whole_mappings(p, size)) RETURN(CUDA_ERROR_INVALID_VALUE);
    /* Another device reaches a device's memory only over a peer link (chosen code: the
     * documentation names none); checked for every mapping before any changes. */
    for (const char *cur = p; cur < p + size;) {
        struct mapping *m = find_map(cur);
        for (size_t k = 0; k < count; k++)
            if (desc[k].location.id != m->phys->device && !g_p2p && desc[k].flags)
                RETURN(CUDA_ERROR_INVALID_DEVICE);
        cur = m->ptr + m->size;
    }
    g_set_access_calls++;
    g_last_set_access_count = (long long)count;
    for (const char *cur = p; cur < p + size;) {
        struct mapping *m = find_map(cur);
        /* One entry per device: each descriptor sets its own device's access. */
        for (size_t k = 0; k < count; k++) m->access[desc[k].location.id] = desc[k].flags;
        unsigned any = 0;
        for (int d = 0; d < g_devices; d++) any |= m->access[d];
        int prot = any == CU_MEM_ACCESS_FLAGS_PROT_READWRITE ? PROT_READ | PROT_WRITE
                   : any ? PROT_READ : PROT_NONE;
        if (mprotect(m->ptr, m->size, prot) != 0) RETURN(CUDA_ERROR_UNKNOWN);
        cur = m->ptr + m->size;
    }
    RETURN(CUDA_SUCCESS);
}

EXPORT CUresult cuMemUnmap(CUdeviceptr ptr, size_t size) {
    ENTER_VMM("cuMemUnmap");
    UNSAFE_CALL();
    char *p = (char *)(uintptr_t)ptr;
    if (size == 0) RETURN(CUDA_ERROR_INVALID_VALUE);
    /* Whole mappings only ("cannot unmap a sub-range"), with no gap between them. */
    if (!whole_mappings(p, size)) RETURN(CUDA_ERROR_INVALID_VALUE);
    /* Back to a bare reservation. Queued work is NOT waited for: a copy that still
     * targets the range faults when it runs. */
    if (mmap(p, size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0) == MAP_FAILED)
        RETURN(CUDA_ERROR_UNKNOWN);
    for (size_t i = g_nmaps; i-- > 0;) {
        if (g_maps[i].ptr >= p && g_maps[i].ptr < p + size) {
            struct phys *ph = g_maps[i].phys;
            ph->mappings--;
            g_maps[i] = g_maps[--g_nmaps];
            phys_maybe_free(ph);
        }
    }
    RETURN(CUDA_SUCCESS);
}
