"""Finds and loads libhetmem.so and declares the C ABI of include/hetmem.h for ctypes,
behind one checked conversion layer.

Every C function is reached only through a `Function` of the `Library` that `load()`
returns: the raw ctypes function pointers live inside those objects and nowhere else.
A `Function` converts each argument through the conversion of its parameter's C type
(`TYPES`, keyed by the C spelling in `DECLARATIONS`, which the tests compare with the
header) before ctypes sees it. ctypes on its own keeps the low bits of an integer that
does not fit (parameter ``2**32 + 1`` becomes 1, address ``2**64 + 8`` becomes 8) and
ends a string at its first NUL; here:

- integers (``int``, ``uint32_t``, ``uint64_t``, ``size_t``, ``ssize_t``,
  ``uintptr_t``, and addresses ``void*``) outside the C type's range raise
  OverflowError; anything that is not an integer (a float, a str, a bool) raises
  TypeError; objects with ``__index__`` (numpy integers) are integers;
- C strings (``const char*``) take str (encoded as UTF-8) or bytes; an embedded NUL
  raises ValueError, a str that cannot be encoded raises ValueError, None raises
  TypeError unless the header lets the parameter be NULL (`MAY_BE_NULL`);
- input arrays (``const uint32_t*``) take a sequence of integers, each converted as
  its element type (or a ctypes array);
- handles, out-pointers and callbacks are ctypes objects, checked by ctypes; its
  ``ctypes.ArgumentError`` is raised as TypeError naming the function.

Struct fields go through the same conversions (`fill`).

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
import operator
import os
import re
import threading
from ctypes import (
    POINTER,
    c_char,
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

# ---- the declarations (copied from include/hetmem.h; the tests compare them) ------------

# One line per function, as the header declares it (comments and line breaks aside).
DECLARATIONS = """
const char* hetmem_last_error(void);
const char* hetmem_status_string(int status);
const char* hetmem_version(void);
int hetmem_manager_create(const char* backend, hetmem_manager_t** out);
int hetmem_manager_destroy(hetmem_manager_t* mgr);
const char* hetmem_manager_backend(hetmem_manager_t* mgr);
int hetmem_device_count(hetmem_manager_t* mgr, int* count);
int hetmem_mem_info(hetmem_manager_t* mgr, int device, size_t* free_bytes, size_t* total_bytes);
int hetmem_alloc(hetmem_manager_t* mgr, int placement, int device_or_node, size_t size, void** out);
int hetmem_free(hetmem_manager_t* mgr, void* ptr);
int hetmem_copy(hetmem_manager_t* mgr, void* dst, const void* src, size_t n, hetmem_stream_t* stream);
int hetmem_copy_from_host(hetmem_manager_t* mgr, void* dst, const void* host_src, size_t n);
int hetmem_copy_to_host(hetmem_manager_t* mgr, void* host_dst, const void* src, size_t n);
int hetmem_stream_create(hetmem_manager_t* mgr, int device, hetmem_stream_t** out);
int hetmem_stream_wrap(hetmem_manager_t* mgr, int device, uintptr_t raw, hetmem_stream_t** out);
int hetmem_stream_raw(hetmem_stream_t* stream, uintptr_t* raw);
int hetmem_stream_synchronize(hetmem_stream_t* stream);
int hetmem_stream_destroy(hetmem_stream_t* stream);
int hetmem_event_create(hetmem_manager_t* mgr, int device, hetmem_event_t** out);
int hetmem_event_record(hetmem_event_t* event, hetmem_stream_t* stream);
int hetmem_stream_wait_event(hetmem_stream_t* stream, hetmem_event_t* event);
int hetmem_event_query(hetmem_event_t* event, int* done);
int hetmem_event_synchronize(hetmem_event_t* event);
int hetmem_event_destroy(hetmem_event_t* event);
int hetmem_prefetch(hetmem_manager_t* mgr, void* ptr, size_t n, int device, hetmem_stream_t* stream);
int hetmem_advise(hetmem_manager_t* mgr, void* ptr, size_t n, int advice, int device);
int hetmem_stats_json(hetmem_manager_t* mgr, hetmem_store_t* store, char* buf, size_t cap, size_t* needed);
int hetmem_profile_start(const char* path);
int hetmem_profile_finish(size_t* events, size_t* dropped);
int hetmem_store_config_init(hetmem_store_config_t* cfg, size_t device_budget, size_t host_budget);
size_t hetmem_store_config_size(void);
int hetmem_store_create(hetmem_manager_t* mgr, const hetmem_store_config_t* cfg, hetmem_store_t** out);
int hetmem_store_destroy(hetmem_store_t* store);
int hetmem_store_register(hetmem_store_t* store, const char* name, const void* data, size_t n, uint32_t* id);
int hetmem_store_register_safetensors(hetmem_store_t* store, const char* path, uint32_t* ids, size_t cap, size_t* count);
int hetmem_store_lookup(hetmem_store_t* store, const char* name, uint32_t* id);
int hetmem_store_param_size(hetmem_store_t* store, uint32_t id, size_t* size);
int hetmem_store_set_sequence(hetmem_store_t* store, const uint32_t* ids, size_t n);
int hetmem_store_will_need(hetmem_store_t* store, uint32_t id, int* on_device);
int hetmem_store_dont_need(hetmem_store_t* store, uint32_t id, int* dropped);
int hetmem_store_keep_resident(hetmem_store_t* store, uint32_t id, int keep);
int hetmem_store_priority(hetmem_store_t* store, uint32_t id, int priority);
int hetmem_store_residency(hetmem_store_t* store, uint32_t id, int* state, uint32_t* refs);
int hetmem_store_acquire(hetmem_store_t* store, uint32_t id, hetmem_stream_t* stream, hetmem_guard_t** out, void** device_ptr);
int hetmem_store_acquire_timeout(hetmem_store_t* store, uint32_t id, hetmem_stream_t* stream, uint64_t timeout_ms, hetmem_guard_t** out, void** device_ptr);
int hetmem_guard_mark_dirty(hetmem_guard_t* guard);
int hetmem_guard_release(hetmem_guard_t* guard);
int hetmem_store_read(hetmem_store_t* store, uint32_t id, void* out, size_t cap);
void* hetmem_torch_malloc(ssize_t size, int device, void* stream);
void* hetmem_torch_malloc_cxx(ssize_t size, int device, void* stream);
void hetmem_torch_free(void* ptr, ssize_t size, int device, void* stream);
int hetmem_torch_record_stream(void* ptr, void* stream);
int hetmem_torch_empty_cache(void);
int hetmem_torch_begin_allocate_to_pool(int device, uint64_t pool_a, uint64_t pool_b, hetmem_stream_filter filter, void* ctx, void (*drop_ctx)(void* ctx));
int hetmem_torch_end_allocate_to_pool(int device, uint64_t pool_a, uint64_t pool_b);
int hetmem_torch_release_pool(int device, uint64_t pool_a, uint64_t pool_b);
int hetmem_torch_stats_json(char* buf, size_t cap, size_t* needed);
"""

# hetmem_store_config_t's fields, as the header declares them.
STORE_CONFIG_FIELDS = (
    ("int", "device"),
    ("size_t", "device_budget"),
    ("size_t", "host_budget"),
    ("size_t", "prefetch_depth"),
    ("int", "sequence"),
    ("int", "checksums"),
    ("size_t", "staging_slots"),
    ("size_t", "staging_slot_size"),
    ("size_t", "staging_threads"),
    ("size_t", "spare_slots"),
    ("int", "planner"),
)

# C string parameters the header lets be NULL (None); every other one must be a string.
MAY_BE_NULL = {("hetmem_manager_create", "backend")}

# Functions that neither set nor clear the thread's last error (see `_tls`).
_ERROR_NEUTRAL = {"hetmem_last_error", "hetmem_status_string", "hetmem_version"}


def _spelling(text):
    """A C type written one way: "const char *" -> "const char*"."""
    text = re.sub(r"\s+", " ", text).strip()
    return re.sub(r"\s*\*", "*", text)


def _split_params(text):
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
            continue
        depth += ch == "("
        depth -= ch == ")"
        cur += ch
    out.append(cur)
    return [p.strip() for p in out]


def _param(text):
    """(C type, name) of one parameter declaration."""
    fp = re.fullmatch(r"(.*?)\(\s*\*\s*(\w+)\s*\)\s*\((.*)\)", text, re.S)
    if fp:
        inner = ", ".join(t for t, _ in (_param(p) for p in _split_params(fp.group(3))))
        return f"{_spelling(fp.group(1))} (*)({inner})", fp.group(2)
    m = re.fullmatch(r"(.*?)(\w+)", text, re.S)
    if m is None:
        raise ValueError(f"cannot read parameter {text!r}")
    return _spelling(m.group(1)), m.group(2)


def parse_declarations(text):
    """{name: (return type, ((param type, param name), ...))} of every ``hetmem_*``
    function declared in C source ``text`` (a header, or `DECLARATIONS`)."""
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    text = re.sub(r"//[^\n]*", " ", text)
    text = re.sub(r"^\s*#[^\n]*", " ", text, flags=re.M)
    out = {}
    for stmt in text.split(";"):
        stmt = re.split(r"[{}]", stmt)[-1].strip()
        m = re.fullmatch(r"(.*?)\b(hetmem_\w+)\s*\((.*)\)", stmt, re.S)
        if m is None or stmt.startswith("typedef"):
            continue
        params = m.group(3).strip()
        plist = () if params in ("", "void") else tuple(_param(p) for p in _split_params(params))
        out[m.group(2)] = (_spelling(m.group(1)), plist)
    return out


# ---- types ------------------------------------------------------------------------------


class hetmem_manager_t(ctypes.Structure):
    """Opaque; used only as POINTER(hetmem_manager_t)."""


class hetmem_stream_t(ctypes.Structure):
    """Opaque; used only as POINTER(hetmem_stream_t)."""


class hetmem_event_t(ctypes.Structure):
    """Opaque; used only as POINTER(hetmem_event_t)."""


class hetmem_store_t(ctypes.Structure):
    """Opaque; used only as POINTER(hetmem_store_t)."""


class hetmem_guard_t(ctypes.Structure):
    """Opaque; used only as POINTER(hetmem_guard_t)."""


# hetmem_stream_filter: int filter(void* ctx, void* stream), and its context's deleter.
STREAM_FILTER = ctypes.CFUNCTYPE(c_int, c_void_p, c_void_p)
DROP_CTX = ctypes.CFUNCTYPE(None, c_void_p)

ManagerP = POINTER(hetmem_manager_t)
StreamP = POINTER(hetmem_stream_t)
EventP = POINTER(hetmem_event_t)
StoreP = POINTER(hetmem_store_t)
GuardP = POINTER(hetmem_guard_t)

# uintptr_t: ctypes has no name for it; the unsigned type of a pointer's width.
c_uintptr = {4: c_uint32, 8: c_uint64}[ctypes.sizeof(c_void_p)]


class CType:
    """One C type of the header: ``spelling`` (as the header writes it), ``ctype`` (the
    ctypes type for ``argtypes``) and ``convert(value, where)``, which returns what
    ctypes is given or raises TypeError, ValueError or OverflowError saying ``where``
    (function, parameter and type)."""

    __slots__ = ("spelling", "ctype", "convert")

    def __init__(self, spelling, ctype, convert):
        self.spelling = spelling
        self.ctype = ctype
        self.convert = convert

    def __repr__(self):
        return f"<CType {self.spelling}>"


def _index(value, where):
    """``value`` as a Python int (ints, and objects with __index__ such as numpy
    integers), or TypeError. A bool is refused: True is no size, id or address."""
    if isinstance(value, bool):
        raise TypeError(f"{where}: expected an integer, not bool")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{where}: expected an integer, not {type(value).__name__}") from None


def _integer(spelling, ctype):
    bits = 8 * ctypes.sizeof(ctype)
    signed = ctype(-1).value < 0
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)

    def convert(value, where):
        if type(value) is not int:
            value = _index(value, where)
        if not lo <= value <= hi:
            raise OverflowError(f"{where}: {value} does not fit a C {spelling} ({lo} to {hi})")
        return value

    return CType(spelling, ctype, convert)


_ADDRESS_MAX = (1 << (8 * ctypes.sizeof(c_void_p))) - 1
# ctypes objects that ctypes itself passes as an address (by reference).
_CTYPES_ADDRESSES = (ctypes.Array, ctypes._Pointer, c_void_p, c_char_p, ctypes._CFuncPtr)


def _address(spelling, const):
    """``void*`` / ``const void*``: an integer address (0 to the pointer's maximum), a
    ctypes object that ctypes passes by address, None (NULL), and for ``const void*``
    bytes (read, never written)."""

    def convert(value, where):
        if value is None or isinstance(value, _CTYPES_ADDRESSES):
            return value
        if const and isinstance(value, bytes):
            return value
        if isinstance(value, (str, bytes, bytearray)):
            raise TypeError(f"{where}: expected an address, not {type(value).__name__}")
        value = _index(value, where)
        if not 0 <= value <= _ADDRESS_MAX:
            raise OverflowError(
                f"{where}: {value} is no address (0 to {_ADDRESS_MAX:#x})"
            )
        return value

    return CType(spelling, c_void_p, convert)


def _c_string(value, where, nullable):
    if value is None:
        if nullable:
            return None
        raise TypeError(f"{where}: expected str or bytes, not None")
    if isinstance(value, str):
        try:
            data = value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"{where}: {value!r} cannot be encoded as UTF-8 ({e.reason})") from None
    elif isinstance(value, bytes):
        data = value
    else:
        raise TypeError(f"{where}: expected str or bytes, not {type(value).__name__}")
    if b"\0" in data:
        # C would see only the part before the NUL: another name, another backend.
        raise ValueError(f"{where}: embedded NUL character in {value!r}")
    return data


def _in_array(spelling, element):
    """``const T*`` of integers: a sequence of integers (each converted as T), a ctypes
    array or pointer, or None (NULL)."""

    def convert(value, where):
        if value is None or isinstance(value, (ctypes.Array, ctypes._Pointer)):
            return value
        if isinstance(value, (str, bytes, bytearray)):
            raise TypeError(f"{where}: expected a sequence of integers, not {type(value).__name__}")
        try:
            items = list(value)
        except TypeError:
            raise TypeError(
                f"{where}: expected a sequence of integers, not {type(value).__name__}"
            ) from None
        check = element.convert
        return (element.ctype * len(items))(
            *[check(x, f"{where}[{i}]") for i, x in enumerate(items)]
        )

    return CType(spelling, POINTER(element.ctype), convert)


def _passed(value, where):
    return value


def _by_ctypes(spelling, ctype):
    """Handles, out-pointers, structs and callbacks: ctypes objects, whose type ctypes
    checks (a wrong one is its ArgumentError, raised as TypeError by `Function`)."""
    return CType(spelling, ctype, _passed)


class hetmem_store_config_t(ctypes.Structure):
    """Settings of a tier store (fill with hetmem_store_config_init, then `fill`)."""


def _types():
    ints = [
        _integer("int", c_int),
        _integer("uint32_t", c_uint32),
        _integer("uint64_t", c_uint64),
        _integer("size_t", c_size_t),
        _integer("ssize_t", c_ssize_t),
        _integer("uintptr_t", c_uintptr),
    ]
    out = {t.spelling: t for t in ints}
    out["void*"] = _address("void*", const=False)
    out["const void*"] = _address("const void*", const=True)
    out["const char*"] = CType("const char*", c_char_p, lambda v, w: _c_string(v, w, False))
    out["char*"] = _by_ctypes("char*", POINTER(c_char))
    out["const uint32_t*"] = _in_array("const uint32_t*", out["uint32_t"])
    for spelling, ctype in (
        ("int*", c_int),
        ("size_t*", c_size_t),
        ("uint32_t*", c_uint32),
        ("uintptr_t*", c_uintptr),
        ("void**", c_void_p),
    ):
        out[spelling] = _by_ctypes(spelling, POINTER(ctype))
    for name, handle in (
        ("hetmem_manager_t", ManagerP),
        ("hetmem_stream_t", StreamP),
        ("hetmem_event_t", EventP),
        ("hetmem_store_t", StoreP),
        ("hetmem_guard_t", GuardP),
    ):
        out[name + "*"] = _by_ctypes(name + "*", handle)
        out[name + "**"] = _by_ctypes(name + "**", POINTER(handle))
    cfg = POINTER(hetmem_store_config_t)
    out["hetmem_store_config_t*"] = _by_ctypes("hetmem_store_config_t*", cfg)
    out["const hetmem_store_config_t*"] = _by_ctypes("const hetmem_store_config_t*", cfg)
    out["hetmem_stream_filter"] = _by_ctypes("hetmem_stream_filter", STREAM_FILTER)
    out["void (*)(void*)"] = _by_ctypes("void (*)(void*)", DROP_CTX)
    return out


# The checked conversion of every parameter type the header uses, by C spelling.
TYPES = _types()

# Result types, by C spelling.
RESULTS = {"int": c_int, "const char*": c_char_p, "size_t": c_size_t, "void*": c_void_p,
           "void": None}

hetmem_store_config_t._fields_ = [(n, TYPES[t].ctype) for t, n in STORE_CONFIG_FIELDS]
hetmem_store_config_t._c_fields = {n: t for t, n in STORE_CONFIG_FIELDS}


def fill(struct, **values):
    """Sets fields of a hetmem struct (hetmem_store_config_t) through the conversions
    of their C types: a ctypes Structure field, like an argument, would keep the low
    bits of an integer that does not fit."""
    fields = type(struct)._c_fields
    for name, value in values.items():
        spelling = fields[name]
        where = f"{type(struct).__name__}.{name} ({spelling})"
        setattr(struct, name, TYPES[spelling].convert(value, where))


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
_loaded = None  # (path, Library)


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


class Function:
    """One C function of libhetmem.so, reached only through here: ``name``,
    ``result`` and ``params`` (C spellings, from `DECLARATIONS`), ``address`` (the C
    function's address, for C callers such as PyTorch's allocator). Calling it converts
    every argument through its C type (`CType`), then calls C and keeps the message of
    a failed status-returning call (see `_tls`)."""

    __slots__ = ("name", "result", "params", "_fn", "_nargs", "_convert", "_status",
                 "_neutral", "_last_error")

    def __init__(self, name, result, params, fn, last_error):
        self.name = name
        self.result = result
        self.params = params
        self._fn = fn
        self._nargs = len(params)
        convert = []  # (index, conversion, where); ctypes objects are left to ctypes
        for i, (spelling, pname) in enumerate(params):
            where = f"{name}: {pname} ({spelling})"
            if (name, pname) in MAY_BE_NULL:
                convert.append((i, lambda v, w: _c_string(v, w, True), where))
            elif TYPES[spelling].convert is not _passed:
                convert.append((i, TYPES[spelling].convert, where))
        self._convert = tuple(convert)
        self._status = result == "int"
        self._neutral = name in _ERROR_NEUTRAL
        self._last_error = last_error

    @property
    def address(self):
        return ctypes.cast(self._fn, c_void_p).value

    def __call__(self, *args):
        if len(args) != self._nargs:
            raise TypeError(f"{self.name}() takes {self._nargs} arguments ({len(args)} given)")
        if self._convert:
            args = list(args)
            for i, convert, where in self._convert:
                args[i] = convert(args[i], where)
        if self._neutral:
            return self._call(args)
        busy = getattr(_tls, "busy", 0)
        if not busy and _pending:
            _drain()
        _tls.busy = busy + 1
        try:
            r = self._call(args)
            if self._status and r != 0:
                _tls.failure = (r, (self._last_error() or b"").decode("utf-8", "replace"))
        finally:
            _tls.busy = busy
        return r

    def _call(self, args):
        try:
            return self._fn(*args)
        except ctypes.ArgumentError as e:
            # A handle of the wrong kind, an out-pointer of the wrong type: ctypes said so.
            raise TypeError(f"{self.name}: {e}") from None

    def __repr__(self):
        return f"<hetmem C function {self.name}>"


class Library:
    """libhetmem.so as `Function` objects, one attribute per declared function, and
    nothing else of the C library (no raw ctypes functions)."""

    def __init__(self, path, functions):
        self.path = path
        self.__dict__.update(functions)

    def functions(self):
        """The declared functions: {name: Function}."""
        return {k: v for k, v in vars(self).items() if isinstance(v, Function)}


def _declare(path, cdll):
    """The Library of ``cdll``, and the names it lacks."""
    decls = parse_declarations(DECLARATIONS)
    missing = [name for name in decls if not hasattr(cdll, name)]
    if missing:
        return None, missing
    raw = {}
    for name, (result, params) in decls.items():
        fn = getattr(cdll, name)
        fn.restype = RESULTS[result]
        fn.argtypes = [TYPES[t].ctype for t, _ in params]
        raw[name] = fn
    last_error = raw["hetmem_last_error"]
    functions = {
        name: Function(name, result, params, raw[name], last_error)
        for name, (result, params) in decls.items()
    }
    return Library(path, functions), []


def load():
    """Loads the library once (thread-safe) and returns its `Library`."""
    global _loaded
    if _loaded is not None:
        return _loaded[1]
    with _lock:
        if _loaded is None:
            path = find_library()
            try:
                cdll = ctypes.CDLL(path)
            except OSError as e:
                raise LibraryNotFound(f"cannot load {path}: {e}") from e
            lib, missing = _declare(path, cdll)
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
