"""The Pythonic layer over the C ABI: Manager, Buffer, Stream, TierStore, Guard.

Every failing C call raises HetmemError with the status code, its name and the
library's last error message. Objects that own a C handle free it on close() (or
leaving a ``with`` block); garbage collection does the same as a safety net.
"""

import ctypes
import json
import os
from ctypes import byref, c_int, c_size_t, c_uint32, c_void_p

from . import _lib
from ._lib import (
    GuardP,
    ManagerP,
    StoreP,
    StreamP,
    hetmem_store_config_t,
)

HOST = _lib.HETMEM_HOST
PINNED = _lib.HETMEM_PINNED
DEVICE = _lib.HETMEM_DEVICE
MANAGED = _lib.HETMEM_MANAGED

_PLACEMENTS = {"host": HOST, "pinned": PINNED, "device": DEVICE, "managed": MANAGED}
_PLACEMENT_NAMES = {v: k for k, v in _PLACEMENTS.items()}

RESIDENCY = {
    _lib.HETMEM_RESIDENCY_COLD: "cold",
    _lib.HETMEM_RESIDENCY_HOST: "host",
    _lib.HETMEM_RESIDENCY_LOADING: "loading",
    _lib.HETMEM_RESIDENCY_DEVICE: "device",
}


# ---- errors --------------------------------------------------------------------------


def status_string(code):
    """The name of a status code ("HETMEM_ERR_NULL_POINTER", ...)."""
    return _lib.load().hetmem_status_string(code).decode()


def last_error():
    """The calling thread's last error message ("" after a success)."""
    return _lib.load().hetmem_last_error().decode("utf-8", "replace")


def version():
    """The library's version string."""
    return _lib.load().hetmem_version().decode()


class _Owned:
    """Something that owns a hetmem object: a context manager, and disposed of (freed,
    closed, released) when garbage-collected, at the latest. Subclasses define
    ``_dispose``, which does nothing the second time."""

    __slots__ = ()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._dispose()

    def __del__(self):
        try:
            if _lib.in_call():
                # Collected while a call is in flight on this thread: calling into C
                # now would clear that call's error message. Later.
                _lib.defer(self._dispose)
            else:
                self._dispose()
        except Exception:
            pass


class HetmemError(Exception):
    """A hetmem call failed: ``.code`` (negative int), ``.name`` (HETMEM_ERR_...) and
    ``.message`` (the library's last error message). A HETMEM_ERR_FORKED failure is
    raised as its subclass ForkedError."""

    def __new__(cls, code=None, message=None):
        # Every "raise HetmemError(rc)" raises the subclass of its code.
        if cls is HetmemError and code == _lib.HETMEM_ERR_FORKED:
            cls = ForkedError
        return super().__new__(cls, code, message)

    def __init__(self, code, message=None):
        self.code = code
        self.name = status_string(code)
        if message is None:
            message = _lib.failure_message(code)
        self.message = last_error() if message is None else message
        super().__init__(f"{self.name} ({code}): {self.message}")


class ForkedError(HetmemError):
    """A call in a process forked (``os.fork``, a ``fork``-started multiprocessing or
    DataLoader worker) from the one that made the hetmem object: GPU driver state does
    not survive fork(), so hetmem refuses instead of calling the driver. Pinned memory
    is not even mapped in the child. Make a new Manager in the child, or start workers
    with the "spawn" method. Closing and freeing still work there (they leak)."""


def _forked(parent):
    return ForkedError(
        _lib.HETMEM_ERR_FORKED,
        f"this process ({os.getpid()}) was forked from process {parent}, where this "
        "hetmem object was made: its pinned memory is not mapped here",
    )


def _check(rc):
    if rc != _lib.HETMEM_OK:
        raise HetmemError(rc)


def _closed(what):
    return HetmemError(_lib.HETMEM_ERR_INVALID_HANDLE, f"the {what} is closed")


def _size(n, what="size"):
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"{what} must be an int, not {type(n).__name__}")
    if n < 0:
        raise ValueError(f"{what} must not be negative ({n})")
    return n


def _address(x):
    """An address from an int, a Buffer, a Guard or a ctypes pointer/object."""
    if isinstance(x, (Buffer, Guard)):
        return x.ptr
    if isinstance(x, bool):
        raise TypeError("an address cannot be a bool")
    if isinstance(x, int):
        return x
    if isinstance(x, c_void_p):
        return x.value or 0
    if isinstance(x, ctypes._Pointer):
        return ctypes.cast(x, c_void_p).value or 0
    if isinstance(x, (ctypes.Array, ctypes.Structure, ctypes.Union, ctypes._SimpleCData)):
        return ctypes.addressof(x)
    raise TypeError(f"cannot take an address from {type(x).__name__}")


_EMPTY = ctypes.create_string_buffer(1)


class _HostBytes:
    """A pointer to caller-owned host bytes without copying them.

    Accepts an int address (with ``size``), a ctypes pointer (with ``size``), a ctypes
    object (array, structure, ...), bytes, or any C-contiguous buffer (bytearray,
    memoryview, array.array, numpy arrays, ...). Read-only buffers other than bytes are
    copied once. Use as a context manager: the buffer export ends on exit.
    """

    def __init__(self, data, size=None, writable=False):
        self._keep = None
        self._view = None
        if size is not None:
            _size(size)
        if isinstance(data, bool):
            raise TypeError("data cannot be a bool")
        if isinstance(data, int) or isinstance(data, (c_void_p, ctypes._Pointer)):
            if size is None:
                raise TypeError("a raw address needs a size")
            self.addr, self.size = _address(data), size
            return
        if isinstance(data, (ctypes.Array, ctypes.Structure, ctypes.Union, ctypes._SimpleCData)):
            n = ctypes.sizeof(data)
            self.addr, self.size = ctypes.addressof(data), self._fit(n, size)
            return
        if isinstance(data, bytes) and not writable:
            self._keep = data
            n = self._fit(len(data), size)
            self.addr = ctypes.cast(ctypes.c_char_p(data), c_void_p).value
            self.size = n
            return
        try:
            view = memoryview(data)
        except TypeError:
            raise TypeError(
                f"expected bytes, a buffer, a ctypes object or an int address, "
                f"not {type(data).__name__}"
            ) from None
        if not view.c_contiguous:
            view.release()
            raise ValueError("the buffer is not C-contiguous")
        view = view.cast("B") if view.ndim != 1 or view.format != "B" else view
        n = self._fit(view.nbytes, size)
        if view.readonly:
            if writable:
                view.release()
                raise TypeError("the buffer is read-only")
            self._keep = bytes(view[:n])
            view.release()
            self.addr = ctypes.cast(ctypes.c_char_p(self._keep), c_void_p).value
        elif view.nbytes == 0:
            view.release()
            self.addr = ctypes.addressof(_EMPTY)
        else:
            self._view = view
            self._keep = (ctypes.c_char * view.nbytes).from_buffer(view)
            self.addr = ctypes.addressof(self._keep)
        self.size = n

    @staticmethod
    def _fit(n, size):
        if size is None:
            return n
        if size > n:
            raise ValueError(f"size {size} exceeds the {n} bytes given")
        return size

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._keep = None
        if self._view is not None:
            self._view.release()
            self._view = None


# ---- manager, buffers, streams ----------------------------------------------------------------


class Manager(_Owned):
    """One backend and the buffers allocated through it.

    ``backend``: "sim", "host", "cuda", "rocm", or None/"auto" (then $HETMEM_BACKEND,
    else the first of CUDA, ROCm and sim that works).
    """

    def __init__(self, backend=None):
        self._lib = _lib.load()
        h = ManagerP()
        name = None if backend is None else str(backend).encode()
        _check(self._lib.hetmem_manager_create(name, byref(h)))
        self._h = h
        # host_view() reads memory without a C call: it checks the process itself.
        self._pid = os.getpid()

    @property
    def handle(self):
        """The ``hetmem_manager_t*`` (for ctypes calls of your own)."""
        if self._h is None:
            raise _closed("manager")
        return self._h

    @property
    def closed(self):
        return self._h is None

    @property
    def backend(self):
        name = self._lib.hetmem_manager_backend(self.handle)
        if name is None:
            raise HetmemError(_lib.HETMEM_ERR_INVALID_HANDLE)
        return name.decode()

    @property
    def device_count(self):
        n = c_int()
        _check(self._lib.hetmem_device_count(self.handle, byref(n)))
        return n.value

    def mem_info(self, device=0):
        """(free, total) bytes of ``device``."""
        free, total = c_size_t(), c_size_t()
        _check(self._lib.hetmem_mem_info(self.handle, device, byref(free), byref(total)))
        return free.value, total.value

    def alloc(self, placement, size, device=-1):
        """Allocates ``size`` bytes: placement HOST/PINNED/DEVICE/MANAGED (or its name).
        ``device``: the device (device/managed memory; -1: device 0) or the NUMA node
        (host/pinned memory; -1: the default policy)."""
        if isinstance(placement, str):
            try:
                placement = _PLACEMENTS[placement.lower()]
            except KeyError:
                raise ValueError(
                    f"placement {placement!r}: expected one of {sorted(_PLACEMENTS)}"
                ) from None
        out = c_void_p()
        _check(self._lib.hetmem_alloc(self.handle, placement, device, _size(size), byref(out)))
        return Buffer(self, out.value, size, placement, device)

    def free(self, ptr):
        """Frees a buffer by its address (see also Buffer.free)."""
        _check(self._lib.hetmem_free(self.handle, _address(ptr)))

    def copy(self, dst, src, n, stream=None):
        """Copies n bytes between addresses in this manager's buffers (ints, Buffers or
        Guards); asynchronous on ``stream`` if given, else synchronous."""
        _check(
            self._lib.hetmem_copy(
                self.handle, _address(dst), _address(src), _size(n), _stream_handle(stream)
            )
        )

    def copy_from_host(self, dst, data, n=None):
        """Copies caller-owned host bytes (bytes, a buffer, a ctypes object, or an int
        address with ``n``) into ``dst`` (an address in a buffer of this manager)."""
        with _HostBytes(data, n) as src:
            _check(self._lib.hetmem_copy_from_host(self.handle, _address(dst), src.addr, src.size))

    def copy_to_host(self, out, src, n=None):
        """Copies from ``src`` (an address in a buffer of this manager) into caller-owned
        writable host memory ``out`` (a writable buffer, a ctypes object, or an int
        address with ``n``)."""
        with _HostBytes(out, n, writable=True) as dst:
            _check(self._lib.hetmem_copy_to_host(self.handle, dst.addr, _address(src), dst.size))

    def read(self, src, n):
        """n bytes from ``src`` (an address in a buffer of this manager) as bytes."""
        out = ctypes.create_string_buffer(_size(n))
        if n:
            _check(self._lib.hetmem_copy_to_host(self.handle, out, _address(src), n))
        return out.raw

    def prefetch(self, ptr, n, device, stream=None):
        """Migrates managed memory to ``device`` (-1: the host)."""
        _check(
            self._lib.hetmem_prefetch(
                self.handle, _address(ptr), _size(n), device, _stream_handle(stream)
            )
        )

    def advise(self, ptr, n, advice, device=0):
        """Gives the driver advice (HETMEM_ADVISE_*) about managed memory."""
        _check(self._lib.hetmem_advise(self.handle, _address(ptr), _size(n), advice, device))

    def stream(self, device=0):
        """A new stream owned by hetmem."""
        return Stream(self, device)

    def wrap_stream(self, raw, device=0):
        """The caller's stream ``raw`` (cudaStream_t value; 0 = default) as a Stream."""
        return Stream.wrap(self, raw, device)

    def stats(self, store=None):
        """The manager's stats (and ``store``'s under "tier") as a dict."""
        sh = StoreP() if store is None else store.handle
        return _read_json(lambda buf, cap, need: self._lib.hetmem_stats_json(
            self.handle, sh, buf, cap, need))

    def close(self):
        """Destroys the manager: every buffer it still holds is freed."""
        h, self._h = self._h, None
        if h is not None:
            _check(self._lib.hetmem_manager_destroy(h))

    def _dispose(self):
        self.close()

    def __repr__(self):
        if self._h is None:
            return "<hetmem.Manager closed>"
        return f"<hetmem.Manager {self.backend}>"


def _read_json(call):
    """Calls a (buf, cap, needed) JSON writer of the C ABI until the buffer is big
    enough, and parses the text."""
    need = c_size_t(0)
    buf, cap = None, 0
    for _ in range(8):  # the text may grow between two calls; it settles at once
        rc = call(buf, cap, byref(need))
        if rc == _lib.HETMEM_OK and buf is not None:
            return json.loads(buf.value.decode())
        if rc not in (_lib.HETMEM_OK, _lib.HETMEM_ERR_BUFFER_TOO_SMALL):
            raise HetmemError(rc)
        cap = need.value
        buf = ctypes.create_string_buffer(cap)
    raise HetmemError(_lib.HETMEM_ERR_BUFFER_TOO_SMALL, "the stats kept growing")


def _stream_handle(stream):
    if stream is None:
        return StreamP()
    if isinstance(stream, Stream):
        return stream.handle
    raise TypeError(f"expected a hetmem.Stream or None, not {type(stream).__name__}")


class Buffer(_Owned):
    """Memory from Manager.alloc: ``.ptr`` (int address; a device address for device
    memory), ``.size``, ``.placement``, ``.device``. Freed by free() or on collection."""

    def __init__(self, mgr, ptr, size, placement, device):
        self.manager = mgr
        self.ptr = ptr
        self.size = size
        self.placement = placement
        self.device = device
        self._freed = False

    @property
    def freed(self):
        return self._freed

    def _live(self):
        if self._freed:
            raise HetmemError(
                _lib.HETMEM_ERR_FOREIGN_POINTER, f"buffer {self.ptr:#x} was freed already"
            )
        if self.manager.closed:
            raise HetmemError(
                _lib.HETMEM_ERR_INVALID_HANDLE,
                f"buffer {self.ptr:#x}: its manager is closed (which freed it)",
            )

    def free(self):
        """Gives the memory back (after copies still queued on it). A second free raises
        HetmemError (FOREIGN_POINTER) without calling into C."""
        self._live()
        self._freed = True
        self.manager.free(self.ptr)

    def write(self, data, offset=0, n=None):
        """Copies host bytes (bytes, buffer, ctypes object, or int address with n) into
        the buffer at ``offset``."""
        self._live()
        self.manager.copy_from_host(self.ptr + _size(offset, "offset"), data, n)

    def read(self, n=None, offset=0):
        """The buffer's bytes [offset, offset + n) (default: to the end) as bytes."""
        self._live()
        if n is None:
            n = self.size - offset
        return self.manager.read(self.ptr + _size(offset, "offset"), n)

    def read_into(self, out, n=None, offset=0):
        """Copies into caller-owned writable memory ``out``."""
        self._live()
        self.manager.copy_to_host(out, self.ptr + _size(offset, "offset"), n)

    def copy_from(self, src, n=None, stream=None, offset=0, src_offset=0):
        """Copies from another buffer (or address) of the same manager into this one."""
        self._live()
        if n is None:
            n = (src.size - src_offset) if isinstance(src, Buffer) else self.size - offset
        self.manager.copy(self.ptr + offset, _address(src) + src_offset, n, stream)

    def copy_to(self, dst, n=None, stream=None, offset=0, dst_offset=0):
        """Copies from this buffer into another buffer (or address) of the manager."""
        self._live()
        if n is None:
            n = self.size - offset
        self.manager.copy(_address(dst) + dst_offset, self.ptr + offset, n, stream)

    def host_view(self):
        """The bytes as a ctypes char array (host, pinned and managed memory only). The
        array keeps the buffer alive; it is valid until the buffer is freed
        explicitly (``free()``, or its manager closed), like any pointer into it."""
        self._live()
        if self.placement == DEVICE:
            raise ValueError("device memory is not addressable by the CPU")
        if os.getpid() != self.manager._pid:
            raise _forked(self.manager._pid)
        view = (ctypes.c_char * self.size).from_address(self.ptr)
        view._hetmem_buffer = self
        return view

    def _dispose(self):
        # Once the manager is closed, its buffers are gone with it.
        if not self._freed and not self.manager.closed:
            self.free()

    def __int__(self):
        return self.ptr

    def __repr__(self):
        place = _PLACEMENT_NAMES.get(self.placement, self.placement)
        state = " freed" if self._freed else ""
        return f"<hetmem.Buffer {place} {self.size} bytes at {self.ptr:#x}{state}>"


class Stream(_Owned):
    """A stream: created by hetmem (``Stream(mgr, device)``) or the caller's own raw
    cudaStream_t / hipStream_t wrapped (``Stream.wrap(mgr, raw, device)``)."""

    def __init__(self, mgr, device=0, _handle=None):
        self.manager = mgr
        self.device = device
        if _handle is None:
            _handle = StreamP()
            _check(mgr._lib.hetmem_stream_create(mgr.handle, device, byref(_handle)))
        self._h = _handle

    @classmethod
    def wrap(cls, mgr, raw, device=0):
        """Wraps the caller's stream ``raw`` (an int: cudaStream_t value, 0 for the
        default stream, 2 for the per-thread default stream: each thread that uses it
        uses its own). hetmem never destroys it; it must outlive this object."""
        h = StreamP()
        _check(mgr._lib.hetmem_stream_wrap(mgr.handle, device, _size(raw, "raw"), byref(h)))
        return cls(mgr, device, _handle=h)

    @property
    def handle(self):
        if self._h is None:
            raise _closed("stream")
        return self._h

    @property
    def raw(self):
        """The driver's stream handle (int)."""
        v = _lib.c_uintptr()
        _check(self.manager._lib.hetmem_stream_raw(self.handle, byref(v)))
        return v.value

    def synchronize(self):
        _check(self.manager._lib.hetmem_stream_synchronize(self.handle))

    def close(self):
        h, self._h = self._h, None
        if h is not None:
            _check(self.manager._lib.hetmem_stream_destroy(h))

    destroy = close

    def _dispose(self):
        self.close()


# ---- tier store -----------------------------------------------------------------------------------


class TierStore(_Owned):
    """A tiered parameter store over ``device`` of ``mgr``.

    ``device_budget``: most device bytes resident parameters use. ``host_budget``: most
    pinned host bytes (parameter copies plus a staging ring, 16 MiB by default).
    ``learn``: learn the execution order from the first pass of acquires (Belady
    eviction and prefetching along it afterwards). ``planner``: ``"belady"`` (the
    library's default: the fewest bytes for layers of one size) or ``"static"`` (a
    fixed resident set, largest parameters first, the rest streamed: fewer bytes with
    mixed sizes). Other settings default to the library's (hetmem_store_config_init).
    """

    def __init__(
        self,
        mgr,
        device_budget,
        host_budget,
        learn=True,
        device=0,
        prefetch_depth=None,
        checksums=False,
        staging_slots=None,
        staging_slot_size=None,
        staging_threads=None,
        spare_slots=None,
        planner=None,
    ):
        self.manager = mgr
        lib = self._lib = mgr._lib
        cfg = hetmem_store_config_t()
        _check(lib.hetmem_store_config_init(byref(cfg), _size(device_budget), _size(host_budget)))
        cfg.device = device
        cfg.sequence = _lib.HETMEM_SEQUENCE_LEARN if learn else _lib.HETMEM_SEQUENCE_NONE
        cfg.checksums = 1 if checksums else 0
        if planner is not None:
            planners = {"belady": _lib.HETMEM_PLANNER_BELADY, "static": _lib.HETMEM_PLANNER_STATIC}
            if planner not in planners:
                raise ValueError(f"planner {planner!r}: expected 'belady' or 'static'")
            cfg.planner = planners[planner]
        for field, value in (
            ("prefetch_depth", prefetch_depth),
            ("staging_slots", staging_slots),
            ("staging_slot_size", staging_slot_size),
            ("staging_threads", staging_threads),
            ("spare_slots", spare_slots),
        ):
            if value is not None:
                setattr(cfg, field, _size(value, field))
        self.config = cfg
        self.device = device
        h = StoreP()
        _check(lib.hetmem_store_create(mgr.handle, byref(cfg), byref(h)))
        self._h = h

    @property
    def handle(self):
        if self._h is None:
            raise _closed("store")
        return self._h

    def register(self, name, data, size=None):
        """Registers parameter ``name`` with a copy of ``data``: bytes, any C-contiguous
        buffer, a ctypes object, or an int address (e.g. a CPU tensor's data_ptr())
        with ``size`` -- read in place, never copied into a Python object first. The
        caller's memory may be freed once this returns. Returns the id."""
        pid = c_uint32()
        with _HostBytes(data, size) as src:
            _check(
                self._lib.hetmem_store_register(
                    self.handle, str(name).encode(), src.addr, src.size, byref(pid)
                )
            )
        return pid.value

    def register_safetensors(self, path):
        """Registers every tensor of a safetensors file (mapped, not copied) under its
        own name, in file order; returns the ids."""
        p = os.fsencode(path)
        count = c_size_t(0)
        rc = self._lib.hetmem_store_register_safetensors(self.handle, p, None, 0, byref(count))
        if rc == _lib.HETMEM_OK:
            return []
        if rc != _lib.HETMEM_ERR_BUFFER_TOO_SMALL:
            raise HetmemError(rc)
        ids = (c_uint32 * count.value)()
        _check(
            self._lib.hetmem_store_register_safetensors(
                self.handle, p, ids, count.value, byref(count)
            )
        )
        return list(ids[: count.value])

    def lookup(self, name):
        pid = c_uint32()
        _check(self._lib.hetmem_store_lookup(self.handle, str(name).encode(), byref(pid)))
        return pid.value

    def param_size(self, pid):
        n = c_size_t()
        _check(self._lib.hetmem_store_param_size(self.handle, pid, byref(n)))
        return n.value

    def set_sequence(self, ids):
        """Installs the execution sequence (one pass; ids may repeat). An empty
        sequence drops it (LRU again; learning again in learn mode)."""
        ids = list(ids or [])
        arr = (c_uint32 * len(ids))(*ids) if ids else None
        _check(self._lib.hetmem_store_set_sequence(self.handle, arr, len(ids)))

    def will_need(self, pid):
        """Hint: needed soon. Returns whether it is on the device afterwards."""
        flag = c_int()
        _check(self._lib.hetmem_store_will_need(self.handle, pid, byref(flag)))
        return bool(flag.value)

    def dont_need(self, pid):
        """Hint: not needed for a while. Returns whether its device copy was dropped."""
        flag = c_int()
        _check(self._lib.hetmem_store_dont_need(self.handle, pid, byref(flag)))
        return bool(flag.value)

    def keep_resident(self, pid, keep=True):
        _check(self._lib.hetmem_store_keep_resident(self.handle, pid, 1 if keep else 0))

    def priority(self, pid, priority):
        _check(self._lib.hetmem_store_priority(self.handle, pid, priority))

    def residency(self, pid):
        """(state, refs): state is "cold", "host", "loading" or "device"."""
        state, refs = c_int(), c_uint32()
        _check(self._lib.hetmem_store_residency(self.handle, pid, byref(state), byref(refs)))
        return RESIDENCY.get(state.value, state.value), refs.value

    def acquire(self, pid, stream=None, timeout=None):
        """A Guard whose ``.ptr`` is the parameter's device address, valid for work
        queued on ``stream`` until release (with no stream, valid at once). When the
        budget is full of guards, fails at once (OUT_OF_MEMORY) or, with ``timeout``
        (seconds), waits that long for other threads to release some."""
        g = GuardP()
        ptr = c_void_p()
        if timeout is None:
            status = self._lib.hetmem_store_acquire(
                self.handle, pid, _stream_handle(stream), byref(g), byref(ptr)
            )
        else:
            status = self._lib.hetmem_store_acquire_timeout(
                self.handle, pid, _stream_handle(stream), max(0, int(timeout * 1000)),
                byref(g), byref(ptr)
            )
        _check(status)
        return Guard(self, pid, g, ptr.value or 0)

    def read(self, pid):
        """The parameter's current bytes (synchronously, after work queued on it)."""
        n = self.param_size(pid)
        out = ctypes.create_string_buffer(n)
        _check(self._lib.hetmem_store_read(self.handle, pid, out, n))
        return out.raw

    def read_into(self, pid, out, n=None):
        """Copies the parameter's bytes into caller-owned writable memory."""
        with _HostBytes(out, n, writable=True) as dst:
            _check(self._lib.hetmem_store_read(self.handle, pid, dst.addr, dst.size))

    def stats(self):
        """The store's counters (the "tier" object of Manager.stats) as a dict."""
        return self.manager.stats(self)["tier"]

    def close(self):
        """Destroys the store handle (unreleased guards keep what they use alive)."""
        h, self._h = self._h, None
        if h is not None:
            _check(self._lib.hetmem_store_destroy(h))

    def _dispose(self):
        self.close()


class Guard(_Owned):
    """An acquired parameter: ``.ptr`` (device address), ``.size``, ``.id``.
    release() ends the use (also on leaving a ``with`` block, or on collection)."""

    __slots__ = ("store", "id", "ptr", "_h", "_size", "__weakref__")

    def __init__(self, store, pid, handle, ptr):
        self.store = store
        self.id = pid
        self.ptr = ptr
        self._h = handle
        self._size = None

    @property
    def size(self):
        if self._size is None:
            self._size = self.store.param_size(self.id)
        return self._size

    @property
    def released(self):
        return self._h is None

    def mark_dirty(self):
        """The device copy will be written by work queued on the stream after this call
        (written back before it is dropped; ordered after earlier uses, and later acquires
        wait for it)."""
        if self._h is None:
            raise _closed("guard")
        _check(self.store._lib.hetmem_guard_mark_dirty(self._h))

    def release(self):
        """Ends the use; the memory is not reused before work queued so far on the
        guard's stream is done. Releasing twice raises HetmemError (INVALID_HANDLE)."""
        h, self._h = self._h, None
        if h is None:
            raise _closed("guard")
        _check(self.store._lib.hetmem_guard_release(h))

    def _dispose(self):
        if self._h is not None:
            self.release()

    def __repr__(self):
        state = "released" if self._h is None else f"at {self.ptr:#x}"
        return f"<hetmem.Guard param {self.id} {state}>"
