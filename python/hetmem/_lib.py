"""Finds and loads libhetmem.so and declares the C ABI of include/hetmem.h for ctypes.

Every function of the header is declared with its argument and result types, so a
wrong call (a handle of the wrong kind, a str where an address is expected, a missing
argument) raises ``ctypes.ArgumentError`` in Python rather than reaching C.

Where the library is looked for, in order:

1. ``$HETMEM_LIB``: the path of the library file (used alone when set).
2. ``libhetmem.so`` next to this package (a copy installed with it).
3. In the repository this package lives in (``python/hetmem`` -> the repo root) and in
   ``$CARGO_TARGET_DIR`` if set: ``target/release/libhetmem.so``,
   ``target/debug/libhetmem.so``, then ``target/*/deps/libhetmem.so`` (where cargo
   leaves the cdylib when only ``cargo test`` built it).
"""

import ctypes
import glob
import os
import threading
from ctypes import (
    POINTER,
    c_char_p,
    c_int,
    c_size_t,
    c_ssize_t,
    c_uint32,
    c_uint64,
    c_void_p,
)

LIB_NAME = "libhetmem.so"

# ---- constants of include/hetmem.h (checked against the header by the tests) --------

HETMEM_OK = 0
HETMEM_ERR_OUT_OF_MEMORY = -1
HETMEM_ERR_INVALID_SIZE = -2
HETMEM_ERR_UNKNOWN_DEVICE = -3
HETMEM_ERR_UNKNOWN_NUMA_NODE = -4
HETMEM_ERR_NUMA_NODE_WITHOUT_MEMORY = -5
HETMEM_ERR_FOREIGN_HANDLE = -6
HETMEM_ERR_OUT_OF_BOUNDS = -7
HETMEM_ERR_INVALID_ARGUMENT = -8
HETMEM_ERR_UNSUPPORTED = -9
HETMEM_ERR_BACKEND_UNAVAILABLE = -10
HETMEM_ERR_DRIVER = -11
HETMEM_ERR_OS = -12
HETMEM_ERR_CONFIG = -13
HETMEM_ERR_CHECKSUM = -14
HETMEM_ERR_FORKED = -15
HETMEM_ERR_STREAM_CAPTURING = -16
HETMEM_ERR_NULL_POINTER = -20
HETMEM_ERR_INVALID_HANDLE = -21
HETMEM_ERR_FOREIGN_POINTER = -22
HETMEM_ERR_BUFFER_TOO_SMALL = -23
HETMEM_ERR_UNKNOWN_PARAM = -24
HETMEM_ERR_PANIC = -99

HETMEM_HOST = 0
HETMEM_PINNED = 1
HETMEM_DEVICE = 2
HETMEM_MANAGED = 3

HETMEM_ADVISE_SET_READ_MOSTLY = 1
HETMEM_ADVISE_UNSET_READ_MOSTLY = 2
HETMEM_ADVISE_SET_PREFERRED_LOCATION = 3
HETMEM_ADVISE_UNSET_PREFERRED_LOCATION = 4
HETMEM_ADVISE_SET_ACCESSED_BY = 5
HETMEM_ADVISE_UNSET_ACCESSED_BY = 6

HETMEM_SEQUENCE_NONE = 0
HETMEM_SEQUENCE_LEARN = 1

HETMEM_PLANNER_BELADY = 0
HETMEM_PLANNER_STATIC = 1

HETMEM_RESIDENCY_COLD = 0
HETMEM_RESIDENCY_HOST = 1
HETMEM_RESIDENCY_LOADING = 2
HETMEM_RESIDENCY_DEVICE = 3

# ---- types ------------------------------------------------------------------------------


class hetmem_manager_t(ctypes.Structure):
    """Opaque; used only as POINTER(hetmem_manager_t)."""


class hetmem_stream_t(ctypes.Structure):
    """Opaque; used only as POINTER(hetmem_stream_t)."""


class hetmem_store_t(ctypes.Structure):
    """Opaque; used only as POINTER(hetmem_store_t)."""


class hetmem_guard_t(ctypes.Structure):
    """Opaque; used only as POINTER(hetmem_guard_t)."""


# hetmem_stream_filter: int filter(void* ctx, void* stream), and its context's deleter.
STREAM_FILTER = ctypes.CFUNCTYPE(c_int, c_void_p, c_void_p)
DROP_CTX = ctypes.CFUNCTYPE(None, c_void_p)

ManagerP = POINTER(hetmem_manager_t)
StreamP = POINTER(hetmem_stream_t)
StoreP = POINTER(hetmem_store_t)
GuardP = POINTER(hetmem_guard_t)


class hetmem_store_config_t(ctypes.Structure):
    """Settings of a tier store (fill with hetmem_store_config_init)."""

    _fields_ = [
        ("device", c_int),
        ("device_budget", c_size_t),
        ("host_budget", c_size_t),
        ("prefetch_depth", c_size_t),
        ("sequence", c_int),
        ("checksums", c_int),
        ("staging_slots", c_size_t),
        ("staging_slot_size", c_size_t),
        ("staging_threads", c_size_t),
        ("spare_slots", c_size_t),
        ("planner", c_int),
    ]


# uintptr_t: ctypes has no name for it; size_t has its width on every Linux target.
c_uintptr = c_size_t

# name: (restype, argtypes), in header order.
PROTOTYPES = {
    # errors and version
    "hetmem_last_error": (c_char_p, []),
    "hetmem_status_string": (c_char_p, [c_int]),
    "hetmem_version": (c_char_p, []),
    # managers
    "hetmem_manager_create": (c_int, [c_char_p, POINTER(ManagerP)]),
    "hetmem_manager_destroy": (c_int, [ManagerP]),
    "hetmem_manager_backend": (c_char_p, [ManagerP]),
    "hetmem_device_count": (c_int, [ManagerP, POINTER(c_int)]),
    "hetmem_mem_info": (c_int, [ManagerP, c_int, POINTER(c_size_t), POINTER(c_size_t)]),
    # allocation
    "hetmem_alloc": (c_int, [ManagerP, c_int, c_int, c_size_t, POINTER(c_void_p)]),
    "hetmem_free": (c_int, [ManagerP, c_void_p]),
    # copies
    "hetmem_copy": (c_int, [ManagerP, c_void_p, c_void_p, c_size_t, StreamP]),
    "hetmem_copy_from_host": (c_int, [ManagerP, c_void_p, c_void_p, c_size_t]),
    "hetmem_copy_to_host": (c_int, [ManagerP, c_void_p, c_void_p, c_size_t]),
    # streams
    "hetmem_stream_create": (c_int, [ManagerP, c_int, POINTER(StreamP)]),
    "hetmem_stream_wrap": (c_int, [ManagerP, c_int, c_uintptr, POINTER(StreamP)]),
    "hetmem_stream_raw": (c_int, [StreamP, POINTER(c_uintptr)]),
    "hetmem_stream_synchronize": (c_int, [StreamP]),
    "hetmem_stream_destroy": (c_int, [StreamP]),
    # managed memory
    "hetmem_prefetch": (c_int, [ManagerP, c_void_p, c_size_t, c_int, StreamP]),
    "hetmem_advise": (c_int, [ManagerP, c_void_p, c_size_t, c_int, c_int]),
    # stats
    "hetmem_stats_json": (
        c_int,
        [ManagerP, StoreP, c_char_p, c_size_t, POINTER(c_size_t)],
    ),
    # tier store
    "hetmem_store_config_init": (
        c_int,
        [POINTER(hetmem_store_config_t), c_size_t, c_size_t],
    ),
    "hetmem_store_config_size": (c_size_t, []),
    "hetmem_store_create": (
        c_int,
        [ManagerP, POINTER(hetmem_store_config_t), POINTER(StoreP)],
    ),
    "hetmem_store_destroy": (c_int, [StoreP]),
    "hetmem_store_register": (
        c_int,
        [StoreP, c_char_p, c_void_p, c_size_t, POINTER(c_uint32)],
    ),
    "hetmem_store_register_safetensors": (
        c_int,
        [StoreP, c_char_p, POINTER(c_uint32), c_size_t, POINTER(c_size_t)],
    ),
    "hetmem_store_lookup": (c_int, [StoreP, c_char_p, POINTER(c_uint32)]),
    "hetmem_store_param_size": (c_int, [StoreP, c_uint32, POINTER(c_size_t)]),
    "hetmem_store_set_sequence": (c_int, [StoreP, POINTER(c_uint32), c_size_t]),
    "hetmem_store_will_need": (c_int, [StoreP, c_uint32, POINTER(c_int)]),
    "hetmem_store_dont_need": (c_int, [StoreP, c_uint32, POINTER(c_int)]),
    "hetmem_store_keep_resident": (c_int, [StoreP, c_uint32, c_int]),
    "hetmem_store_priority": (c_int, [StoreP, c_uint32, c_int]),
    "hetmem_store_residency": (
        c_int,
        [StoreP, c_uint32, POINTER(c_int), POINTER(c_uint32)],
    ),
    "hetmem_store_acquire": (
        c_int,
        [StoreP, c_uint32, StreamP, POINTER(GuardP), POINTER(c_void_p)],
    ),
    "hetmem_store_acquire_timeout": (
        c_int,
        [StoreP, c_uint32, StreamP, c_uint64, POINTER(GuardP), POINTER(c_void_p)],
    ),
    "hetmem_guard_mark_dirty": (c_int, [GuardP]),
    "hetmem_guard_release": (c_int, [GuardP]),
    "hetmem_store_read": (c_int, [StoreP, c_uint32, c_void_p, c_size_t]),
    # PyTorch's pluggable allocator
    "hetmem_torch_malloc": (c_void_p, [c_ssize_t, c_int, c_void_p]),
    # Throws a C++ exception on failure: for PyTorch's allocator only, never ctypes.
    "hetmem_torch_malloc_cxx": (c_void_p, [c_ssize_t, c_int, c_void_p]),
    "hetmem_torch_free": (None, [c_void_p, c_ssize_t, c_int, c_void_p]),
    "hetmem_torch_record_stream": (c_int, [c_void_p, c_void_p]),
    "hetmem_torch_empty_cache": (c_int, []),
    "hetmem_torch_begin_allocate_to_pool": (
        c_int,
        [c_int, c_uint64, c_uint64, STREAM_FILTER, c_void_p, DROP_CTX],
    ),
    "hetmem_torch_end_allocate_to_pool": (c_int, [c_int, c_uint64, c_uint64]),
    "hetmem_torch_release_pool": (c_int, [c_int, c_uint64, c_uint64]),
    "hetmem_torch_stats_json": (c_int, [c_char_p, c_size_t, POINTER(c_size_t)]),
}


class LibraryNotFound(ImportError):
    """libhetmem.so could not be found or loaded."""


def _repo_root():
    # python/hetmem/_lib.py -> the repository root
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def candidates():
    """The paths tried, in order, when $HETMEM_LIB is not set."""
    here = os.path.dirname(os.path.abspath(__file__))
    out = [os.path.join(here, LIB_NAME)]
    targets = []
    if os.environ.get("CARGO_TARGET_DIR"):
        targets.append(os.path.abspath(os.environ["CARGO_TARGET_DIR"]))
    targets.append(os.path.join(_repo_root(), "target"))
    for t in targets:
        out.append(os.path.join(t, "release", LIB_NAME))
        out.append(os.path.join(t, "debug", LIB_NAME))
    for t in targets:
        out.append(os.path.join(t, "*", "deps", LIB_NAME))
    return out


def find_library():
    """The path of the libhetmem.so to load, or LibraryNotFound saying where we looked."""
    env = os.environ.get("HETMEM_LIB")
    if env:
        if os.path.isfile(env):
            return os.path.realpath(env)
        raise LibraryNotFound(
            f"HETMEM_LIB={env!r} is not a file. Point it at libhetmem.so "
            "(built by `cargo build --release` into target/release/), or unset it to "
            "search the repository."
        )
    looked = []
    for pattern in candidates():
        looked.append(pattern)
        if "*" in pattern:
            hits = sorted(glob.glob(pattern), key=os.path.getmtime, reverse=True)
            if hits:
                return os.path.realpath(hits[0])
        elif os.path.isfile(pattern):
            return os.path.realpath(pattern)
    raise LibraryNotFound(
        "cannot find libhetmem.so. Looked in:\n  "
        + "\n  ".join(looked)
        + "\nRun `cargo build --release` in the repository, or set HETMEM_LIB to the "
        "path of libhetmem.so."
    )


_lock = threading.Lock()
_loaded = None  # (path, CDLL)


def _int_range(t):
    bits = 8 * ctypes.sizeof(t)
    signed = t(-1).value < 0
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


_INT_TYPES = (c_int, c_uint32, c_uint64, c_size_t, c_ssize_t)


# Per thread: calls in flight and the message of the last one that failed. A Python
# finalizer (a Buffer or Guard collected by the garbage collector) that runs between a
# failing call and the read of its message would call into C and clear the message;
# so the wrapper reads it at once, and finalizers that run while a call is in flight on
# their thread queue their C call for later (see `defer`).
_tls = threading.local()
_pending = []
_pending_lock = threading.Lock()


def in_call():
    """Whether a library call is in flight on this thread (a finalizer then defers)."""
    return getattr(_tls, "busy", 0) > 0


def defer(fn):
    """Runs ``fn`` (a finalizer's C call) before the next library call."""
    with _pending_lock:
        _pending.append(fn)


def _drain():
    while True:
        with _pending_lock:
            if not _pending:
                return
            batch, _pending[:] = _pending[:], []
        for fn in batch:
            try:
                fn()
            except Exception:
                pass


def failure_message(code):
    """The message of this thread's last failed call, if it failed with ``code``."""
    last, _tls.failure = getattr(_tls, "failure", None), None
    return last[1] if last is not None and last[0] == code else None


def _wrapped(name, fn, argtypes, restype, last_error):
    """``fn``, refusing integer arguments that do not fit their C type (ctypes would
    silently keep the low bits: parameter 2**32 + 1 would be parameter 1), and keeping
    the message of a failed status-returning call (see `_tls`)."""
    checks = [(i, *_int_range(t), t.__name__) for i, t in enumerate(argtypes) if t in _INT_TYPES]
    status = restype is c_int

    def call(*args):
        for i, lo, hi, tname in checks:
            a = args[i] if i < len(args) else None
            if isinstance(a, int) and not lo <= a <= hi:
                raise OverflowError(f"{name}: argument {i + 1} ({a}) does not fit a C {tname}")
        busy = getattr(_tls, "busy", 0)
        if not busy and _pending:
            _drain()
        _tls.busy = busy + 1
        try:
            r = fn(*args)
            if status and r != 0:
                _tls.failure = (r, (last_error() or b"").decode("utf-8", "replace"))
        finally:
            _tls.busy = busy
        return r

    call.__name__ = name
    call.raw = fn
    return call


def _declare(lib):
    missing = []
    for name, (restype, argtypes) in PROTOTYPES.items():
        try:
            fn = getattr(lib, name)
        except AttributeError:
            missing.append(name)
            continue
        fn.restype = restype
        fn.argtypes = argtypes
    # Reads of static or thread-local strings stay as they are; every other call is
    # wrapped.
    plain = {"hetmem_last_error", "hetmem_status_string", "hetmem_version"}
    last_error = getattr(lib, "hetmem_last_error", None)
    for name, (restype, argtypes) in PROTOTYPES.items():
        if name not in plain and name not in missing:
            fn = getattr(lib, name)
            setattr(lib, name, _wrapped(name, fn, argtypes, restype, last_error))
    return missing


def load():
    """Loads the library once (thread-safe) and returns the ctypes.CDLL."""
    global _loaded
    if _loaded is not None:
        return _loaded[1]
    with _lock:
        if _loaded is None:
            path = find_library()
            try:
                lib = ctypes.CDLL(path)
            except OSError as e:
                raise LibraryNotFound(f"cannot load {path}: {e}") from e
            missing = _declare(lib)
            if missing:
                raise LibraryNotFound(
                    f"{path} lacks {', '.join(missing)}: it is older than this package; "
                    "rebuild it with `cargo build --release`."
                )
            want = (
                lib.hetmem_store_config_size(),
                ctypes.sizeof(hetmem_store_config_t),
            )
            if want[0] != want[1]:
                raise LibraryNotFound(
                    f"{path}: hetmem_store_config_t is {want[0]} bytes in the library, "
                    f"{want[1]} in this package"
                )
            _loaded = (path, lib)
    return _loaded[1]


def library_path():
    """The path of the library (loading it if needed)."""
    load()
    return _loaded[0]
