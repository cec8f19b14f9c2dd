"""The Pythonic layer over the C ABI: Manager, Buffer, Stream, TierStore, Guard.

Errors. A failing C call raises the subclass of HetmemError for its status code
(`ERRORS`: OutOfMemoryError for HETMEM_ERR_OUT_OF_MEMORY, ...), with the code, its
name and the library's last error message. Every method that reaches C may also raise
InvalidHandleError (the object, or the one it belongs to, is closed), NullPointerError
(an address 0 where memory is needed), ForkedError (in a process forked from the one
that made the object) and PanicError (a bug in hetmem); each method's docstring lists
the others. Arguments that do not fit their C type never reach C: OverflowError for
integers out of range, TypeError for values of the wrong kind (None for a name, a
float for a size), ValueError for strings with an embedded NUL (see hetmem._lib).

Objects that own a C handle free it on close() (or leaving a ``with`` block); garbage
collection does the same as a safety net. Memory that Python code can read directly
(Buffer.host_view) cannot be freed under a live view: see Buffer.host_view.
"""

import ctypes
import gc
import json
import operator
import os
import threading
import weakref
from ctypes import byref, c_int, c_size_t, c_uint32, c_void_p

from . import _lib
from ._lib import (
    EventP,
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
    """The name of a status code ("HETMEM_ERR_NULL_POINTER", ...);
    "HETMEM_ERR_UNKNOWN_STATUS" for an int that is no code.

    Raises:
        OverflowError: ``code`` does not fit a C int.
        TypeError: ``code`` is not an integer.
    """
    return _lib.load().hetmem_status_string(code).decode()


def last_error():
    """The calling thread's last error message ("" after a success)."""
    return _lib.load().hetmem_last_error().decode("utf-8", "replace")


def version():
    """The library's version string."""
    return _lib.load().hetmem_version().decode()


def profile_start(path):
    """Starts recording every event hetmem knows to the file ``path`` ("%p": the process
    id), as HETMEM_PROFILE does; read it with ``cargo run --example prof -- report``.

    Raises:
        ConfigError: a recording is on already, or the file cannot be made.
    """
    _check(_lib.load().hetmem_profile_start(os.fsencode(path)))


def profile_finish():
    """Stops recording; returns (events written, events dropped)."""
    events, dropped = c_size_t(0), c_size_t(0)
    _check(_lib.load().hetmem_profile_finish(byref(events), byref(dropped)))
    return events.value, dropped.value


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
    ``.message`` (the library's last error message).

    ``HetmemError(code)`` makes the subclass of the code (`ERRORS`), so ``except
    OutOfMemoryError`` catches exactly one code and ``except HetmemError`` all of
    them; a code this package does not know (a newer library) stays a HetmemError.
    Any call that reaches C may raise InvalidHandleError, NullPointerError,
    ForkedError and PanicError; the docstrings of the methods list the other codes
    their calls return."""

    code = None  # the status code of a subclass

    def __new__(cls, code=None, message=None):
        # Every "raise HetmemError(rc)" raises the subclass of its code.
        if cls is HetmemError:
            cls = ERRORS.get(code, HetmemError)
        return super().__new__(cls, code, message)

    def __init__(self, code=None, message=None):
        if code is None:
            code = type(self).code
        self.code = code
        self.name = status_string(code)
        if message is None:
            message = _lib.failure_message(code)
        self.message = last_error() if message is None else message
        super().__init__(f"{self.name} ({code}): {self.message}")

    def __reduce__(self):
        # Pickled (multiprocessing) as its code and message, not its formatted text.
        return (type(self), (self.code, self.message))


class OutOfMemoryError(HetmemError):
    """HETMEM_ERR_OUT_OF_MEMORY: a tier had too little memory (the message says which,
    and the bytes requested and free); for a tier store, everything resident is in use
    by guards, or a parameter is larger than the device budget."""

    code = _lib.HETMEM_ERR_OUT_OF_MEMORY


class InvalidSizeError(HetmemError):
    """HETMEM_ERR_INVALID_SIZE: a size of zero, or one no allocator can satisfy (over
    SSIZE_MAX, ...)."""

    code = _lib.HETMEM_ERR_INVALID_SIZE


class UnknownDeviceError(HetmemError):
    """HETMEM_ERR_UNKNOWN_DEVICE: a device ordinal the backend does not have."""

    code = _lib.HETMEM_ERR_UNKNOWN_DEVICE


class UnknownNumaNodeError(HetmemError):
    """HETMEM_ERR_UNKNOWN_NUMA_NODE: a NUMA node this machine does not have."""

    code = _lib.HETMEM_ERR_UNKNOWN_NUMA_NODE


class NumaNodeWithoutMemoryError(HetmemError):
    """HETMEM_ERR_NUMA_NODE_WITHOUT_MEMORY: a NUMA node that has no memory."""

    code = _lib.HETMEM_ERR_NUMA_NODE_WITHOUT_MEMORY


class ForeignHandleError(HetmemError):
    """HETMEM_ERR_FOREIGN_HANDLE: a stream (or buffer) of another manager."""

    code = _lib.HETMEM_ERR_FOREIGN_HANDLE


class OutOfBoundsError(HetmemError):
    """HETMEM_ERR_OUT_OF_BOUNDS: a range that runs past the end of its buffer."""

    code = _lib.HETMEM_ERR_OUT_OF_BOUNDS


class InvalidArgumentError(HetmemError):
    """HETMEM_ERR_INVALID_ARGUMENT: an argument wrong in a way no other code describes
    (the message says which)."""

    code = _lib.HETMEM_ERR_INVALID_ARGUMENT


class UnsupportedError(HetmemError):
    """HETMEM_ERR_UNSUPPORTED: not possible with this placement or backend."""

    code = _lib.HETMEM_ERR_UNSUPPORTED


class BackendUnavailableError(HetmemError):
    """HETMEM_ERR_BACKEND_UNAVAILABLE: the backend's driver library is missing or
    unusable."""

    code = _lib.HETMEM_ERR_BACKEND_UNAVAILABLE


class DriverError(HetmemError):
    """HETMEM_ERR_DRIVER: a driver call failed (the message names the call and the
    driver's code)."""

    code = _lib.HETMEM_ERR_DRIVER


class SystemCallError(HetmemError):
    """HETMEM_ERR_OS: a system call failed."""

    code = _lib.HETMEM_ERR_OS


class ConfigError(HetmemError):
    """HETMEM_ERR_CONFIG: a file could not be read or parsed (safetensors, sysfs)."""

    code = _lib.HETMEM_ERR_CONFIG


class ChecksumError(HetmemError):
    """HETMEM_ERR_CHECKSUM: a parameter's bytes did not match its checksum (a store
    made with checksums): its host copy changed since registration, or loads delivered
    other bytes twice."""

    code = _lib.HETMEM_ERR_CHECKSUM


class ForkedError(HetmemError):
    """HETMEM_ERR_FORKED: a call in a process forked (``os.fork``, a ``fork``-started
    multiprocessing or DataLoader worker) from the one that made the hetmem object: GPU
    driver state does not survive fork(), so hetmem refuses instead of calling the
    driver. Pinned memory is not even mapped in the child. Make a new Manager in the
    child, or start workers with the "spawn" method. Closing and freeing still work
    there (they leak)."""

    code = _lib.HETMEM_ERR_FORKED


class StreamCapturingError(HetmemError):
    """HETMEM_ERR_STREAM_CAPTURING: not possible while a stream is capturing a CUDA
    graph (a tier-store acquire of a parameter that is not resident, a copy with a host
    end, emptying the cache, ...); the message says what to do instead."""

    code = _lib.HETMEM_ERR_STREAM_CAPTURING


class NullPointerError(HetmemError):
    """HETMEM_ERR_NULL_POINTER: a required pointer (an address, a data pointer) was 0."""

    code = _lib.HETMEM_ERR_NULL_POINTER


class InvalidHandleError(HetmemError):
    """HETMEM_ERR_INVALID_HANDLE: the object (or the one it belongs to) is closed,
    released or destroyed."""

    code = _lib.HETMEM_ERR_INVALID_HANDLE


class ForeignPointerError(HetmemError):
    """HETMEM_ERR_FOREIGN_POINTER: an address the manager did not allocate, or freed
    already; nothing was touched."""

    code = _lib.HETMEM_ERR_FOREIGN_POINTER


class BufferTooSmallError(HetmemError):
    """HETMEM_ERR_BUFFER_TOO_SMALL: an output buffer too small for the result."""

    code = _lib.HETMEM_ERR_BUFFER_TOO_SMALL


class UnknownParamError(HetmemError):
    """HETMEM_ERR_UNKNOWN_PARAM: a parameter id or name the tier store does not have."""

    code = _lib.HETMEM_ERR_UNKNOWN_PARAM


class PanicError(HetmemError):
    """HETMEM_ERR_PANIC: a panic inside hetmem was caught (a bug: please report the
    message)."""

    code = _lib.HETMEM_ERR_PANIC


# Status code -> the HetmemError subclass raised for it.
ERRORS = {
    cls.code: cls
    for cls in (
        OutOfMemoryError, InvalidSizeError, UnknownDeviceError, UnknownNumaNodeError,
        NumaNodeWithoutMemoryError, ForeignHandleError, OutOfBoundsError,
        InvalidArgumentError, UnsupportedError, BackendUnavailableError, DriverError,
        SystemCallError, ConfigError, ChecksumError, ForkedError, StreamCapturingError,
        NullPointerError, InvalidHandleError, ForeignPointerError, BufferTooSmallError,
        UnknownParamError, PanicError,
    )
}


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
    return InvalidHandleError(_lib.HETMEM_ERR_INVALID_HANDLE, f"the {what} is closed")


def _size(n, what="size"):
    """A non-negative Python int (sizes, offsets); the C type's upper bound is checked
    where it reaches C (hetmem._lib)."""
    if isinstance(n, bool):
        raise TypeError(f"{what} must be an int, not bool")
    try:
        n = operator.index(n)
    except TypeError:
        raise TypeError(f"{what} must be an int, not {type(n).__name__}") from None
    if n < 0:
        raise ValueError(f"{what} must not be negative ({n})")
    return n


def _address(x):
    """An address from an int, a Buffer, a Guard or a ctypes pointer/object (its range
    is checked where it reaches C)."""
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
    if hasattr(type(x), "__index__"):
        return operator.index(x)
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
            size = _size(size)
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

    Raises:
        InvalidArgumentError: no backend of that name (or a name that is not UTF-8),
            or a bad $HETMEM_BACKEND, $HETMEM_SIM_DEVICES or $HETMEM_SIM_MEMORY.
        BackendUnavailableError: the backend's driver is missing or has no device (or
            no backend works, for None/"auto").
        DriverError: the driver failed to start or to list its devices.
        ConfigError: the NUMA topology in sysfs cannot be read.
        SystemCallError: a system call failed.
        TypeError: ``backend`` is not a str, bytes or None.
        ValueError: ``backend`` has an embedded NUL.
    """

    def __init__(self, backend=None):
        self._lib = _lib.load()
        # Guards the buffers' host views against a concurrent free()/close().
        self._lock = threading.RLock()
        # address -> the live Buffer of this manager at that address.
        self._buffers = weakref.WeakValueDictionary()
        self._h = None
        h = ManagerP()
        _check(self._lib.hetmem_manager_create(backend, byref(h)))
        self._h = h
        # host_view() reads memory without a C call: it checks the process itself.
        self._pid = os.getpid()

    @property
    def handle(self):
        """The ``hetmem_manager_t*`` (for ctypes calls of your own).

        Raises:
            InvalidHandleError: the manager is closed.
        """
        if self._h is None:
            raise _closed("manager")
        return self._h

    @property
    def closed(self):
        """Whether close() has destroyed the manager."""
        return self._h is None

    @property
    def backend(self):
        """The backend's name: "sim", "host", "cuda" or "rocm"."""
        name = self._lib.hetmem_manager_backend(self.handle)
        if name is None:
            raise HetmemError(_lib.HETMEM_ERR_INVALID_HANDLE)
        return name.decode()

    @property
    def device_count(self):
        """The number of devices (0 on the host backend)."""
        n = c_int()
        _check(self._lib.hetmem_device_count(self.handle, byref(n)))
        return n.value

    def mem_info(self, device=0):
        """(free, total) bytes of ``device``.

        Raises:
            UnknownDeviceError: the backend has no such device.
            InvalidArgumentError: ``device`` is negative.
            DriverError: the driver failed.
            OverflowError: ``device`` does not fit a C int.
        """
        free, total = c_size_t(), c_size_t()
        _check(self._lib.hetmem_mem_info(self.handle, device, byref(free), byref(total)))
        return free.value, total.value

    def alloc(self, placement, size, device=-1):
        """Allocates ``size`` bytes: placement HOST/PINNED/DEVICE/MANAGED (or its name).
        ``device``: the device (device/managed memory; -1: device 0) or the NUMA node
        (host/pinned memory; -1: the default policy). Returns a Buffer.

        Raises:
            InvalidSizeError: ``size`` is 0, or more than any allocator can give
                (over SSIZE_MAX).
            OutOfMemoryError: the tier has too little free memory.
            UnknownDeviceError: no such device.
            UnknownNumaNodeError: no such NUMA node.
            NumaNodeWithoutMemoryError: the NUMA node has no memory.
            UnsupportedError: managed memory where the backend has none, or pinned
                memory on the host backend.
            InvalidArgumentError: an unknown placement number, or a negative device or
                node other than -1.
            DriverError: the driver failed.
            SystemCallError: the kernel refused to map, bind or pin host memory.
            ValueError: an unknown placement name, or a negative size.
            OverflowError: ``size``, ``placement`` or ``device`` does not fit its C
                type.
        """
        if isinstance(placement, str):
            try:
                placement = _PLACEMENTS[placement.lower()]
            except KeyError:
                raise ValueError(
                    f"placement {placement!r}: expected one of {sorted(_PLACEMENTS)}"
                ) from None
        out = c_void_p()
        size = _size(size)
        _check(self._lib.hetmem_alloc(self.handle, placement, device, size, byref(out)))
        buf = Buffer(self, out.value, size, placement, device)
        self._buffers[buf.ptr] = buf
        return buf

    def free(self, ptr):
        """Frees a buffer by its address (as Buffer.free does for a Buffer; a Buffer of
        this manager at that address is marked freed).

        Raises:
            BufferError: host views of that buffer are alive (see Buffer.host_view).
            ForeignPointerError: this manager did not allocate ``ptr`` (or it is not
                the start of a buffer), or it was freed already.
            NullPointerError: ``ptr`` is 0.
            OverflowError: ``ptr`` is no address (negative, or over 64 bits).
        """
        addr = _address(ptr)
        with self._lock:
            buf = self._buffers.get(addr) if self._h is not None else None
            if buf is not None:
                buf.free()
            else:
                _check(self._lib.hetmem_free(self.handle, addr))

    def copy(self, dst, src, n, stream=None):
        """Copies n bytes between addresses in this manager's buffers (ints, Buffers or
        Guards); asynchronous on ``stream`` if given, else synchronous.

        Raises:
            ForeignPointerError: an address outside every buffer of this manager.
            OutOfBoundsError: a range that runs past the end of its buffer.
            ForeignHandleError: ``stream`` belongs to another manager.
            InvalidArgumentError: ``stream`` is of a device the copy does not involve.
            OutOfMemoryError: no host memory to stage device memory through.
            StreamCapturingError: a copy with a host end on a stream capturing a
                CUDA graph.
            DriverError: the driver failed.
            SystemCallError: a system call failed.
            OverflowError: an address or ``n`` does not fit its C type.
        """
        _check(
            self._lib.hetmem_copy(
                self.handle, _address(dst), _address(src), _size(n), _stream_handle(stream)
            )
        )

    def copy_from_host(self, dst, data, n=None):
        """Copies caller-owned host bytes (bytes, a buffer, a ctypes object, or an int
        address with ``n``) into ``dst`` (an address in a buffer of this manager).

        Raises:
            ForeignPointerError: ``dst`` is outside every buffer of this manager.
            OutOfBoundsError: the bytes run past the end of ``dst``'s buffer.
            InvalidArgumentError: ``data`` runs into a buffer of this manager without
                starting in one.
            ForeignHandleError: as Manager.copy (when ``data`` lies in a buffer of
                this manager, this is that copy).
            OutOfMemoryError: no host memory to stage device memory through.
            StreamCapturingError: a copy with a host end on a stream capturing a
                CUDA graph.
            DriverError: the driver failed.
            SystemCallError: a system call failed.
            OverflowError: an address or ``n`` does not fit its C type.
        """
        with _HostBytes(data, n) as src:
            _check(self._lib.hetmem_copy_from_host(self.handle, _address(dst), src.addr, src.size))

    def copy_to_host(self, out, src, n=None):
        """Copies from ``src`` (an address in a buffer of this manager) into caller-owned
        writable host memory ``out`` (a writable buffer, a ctypes object, or an int
        address with ``n``).

        Raises:
            ForeignPointerError: ``src`` is outside every buffer of this manager.
            OutOfBoundsError: the range runs past the end of ``src``'s buffer.
            InvalidArgumentError: ``out`` runs into a buffer of this manager without
                starting in one.
            ForeignHandleError: as Manager.copy (when ``out`` lies in a buffer of this
                manager, this is that copy).
            OutOfMemoryError: no host memory to stage device memory through.
            StreamCapturingError: a copy with a host end on a stream capturing a
                CUDA graph.
            DriverError: the driver failed.
            SystemCallError: a system call failed.
            OverflowError: an address or ``n`` does not fit its C type.
        """
        with _HostBytes(out, n, writable=True) as dst:
            _check(self._lib.hetmem_copy_to_host(self.handle, dst.addr, _address(src), dst.size))

    def read(self, src, n):
        """n bytes from ``src`` (an address in a buffer of this manager) as bytes.

        Raises:
            ForeignPointerError: ``src`` is outside every buffer of this manager.
            OutOfBoundsError: the range runs past the end of ``src``'s buffer.
            ForeignHandleError, InvalidArgumentError: as Manager.copy_to_host.
            OutOfMemoryError: no host memory to stage device memory through.
            StreamCapturingError: a copy with a host end on a stream capturing a
                CUDA graph.
            DriverError: the driver failed.
            SystemCallError: a system call failed.
        """
        out = ctypes.create_string_buffer(_size(n))
        if n:
            _check(self._lib.hetmem_copy_to_host(self.handle, out, _address(src), n))
        return out.raw

    def prefetch(self, ptr, n, device, stream=None):
        """Migrates managed memory to ``device`` (-1: the host).

        Raises:
            InvalidArgumentError: not managed memory, or ``stream`` of another device.
            ForeignPointerError: ``ptr`` is outside every buffer of this manager.
            OutOfBoundsError: the range runs past the end of the buffer.
            UnknownDeviceError: no such device.
            UnsupportedError: the backend cannot prefetch.
            ForeignHandleError: ``stream`` belongs to another manager.
            DriverError: the driver failed.
        """
        _check(
            self._lib.hetmem_prefetch(
                self.handle, _address(ptr), _size(n), device, _stream_handle(stream)
            )
        )

    def advise(self, ptr, n, advice, device=0):
        """Gives the driver advice (HETMEM_ADVISE_*) about managed memory.

        Raises:
            InvalidArgumentError: not managed memory, or an unknown advice.
            ForeignPointerError: ``ptr`` is outside every buffer of this manager.
            OutOfBoundsError: the range runs past the end of the buffer.
            UnknownDeviceError: no such device.
            UnsupportedError: the backend takes no advice.
            ForeignHandleError: as Manager.prefetch.
            DriverError: the driver failed.
        """
        _check(self._lib.hetmem_advise(self.handle, _address(ptr), _size(n), advice, device))

    def stream(self, device=0):
        """A new stream owned by hetmem (see Stream).

        Raises:
            InvalidArgumentError: a negative device.
            UnknownDeviceError: no such device (the host backend has none).
            DriverError: the driver failed.
        """
        return Stream(self, device)

    def event(self, device=0):
        """A new Event on ``device`` (see Event).

        Raises:
            InvalidArgumentError: a negative device.
            UnknownDeviceError: no such device (the host backend has none).
            DriverError: the driver failed.
        """
        return Event(self, device)

    def wrap_stream(self, raw, device=0):
        """The caller's stream ``raw`` (cudaStream_t value; 0 = default) as a Stream
        (see Stream.wrap).

        Raises:
            InvalidArgumentError: a negative device, a stream wrapped for another
                device already (on the simulator: a value that is no stream of the
                device).
            UnknownDeviceError: no such device (the host backend has none).
            DriverError: the driver failed.
        """
        return Stream.wrap(self, raw, device)

    def stats(self, store=None):
        """The manager's stats (and ``store``'s under "tier") as a dict."""
        sh = StoreP() if store is None else store.handle
        return _read_json(lambda buf, cap, need: self._lib.hetmem_stats_json(
            self.handle, sh, buf, cap, need))

    def close(self):
        """Destroys the manager: every buffer it still holds is freed. Closing twice
        does nothing.

        Raises:
            BufferError: host views of its buffers are alive (see Buffer.host_view);
                the manager stays open.
        """
        with self._lock:
            if self._h is None:
                return
            viewed = [b for b in list(self._buffers.values()) if b._view_count()]
            if viewed:
                gc.collect()  # see Buffer._views_alive
                viewed = [b for b in viewed if b._view_count()]
            if viewed:
                raise BufferError(
                    f"cannot close the manager: {len(viewed)} of its buffers have host "
                    f"views alive ({viewed[0]!r}, ...); drop the views first "
                    "(Buffer.host_view)"
                )
            h, self._h = self._h, None
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
    memory), ``.size``, ``.placement``, ``.device``. Freed by free(), by leaving a
    ``with`` block, by its manager's close(), or on collection. Every method raises
    ForeignPointerError once it is freed and InvalidHandleError once its manager is
    closed, without calling into C."""

    def __init__(self, mgr, ptr, size, placement, device):
        self.manager = mgr
        self.ptr = ptr
        self.size = size
        self.placement = placement
        self.device = device
        self._freed = False
        self._views = ()  # weak references to the host views made (see host_view)

    @property
    def freed(self):
        """Whether the buffer was freed (free(), Manager.free)."""
        return self._freed

    def _live(self):
        if self._freed:
            raise ForeignPointerError(
                _lib.HETMEM_ERR_FOREIGN_POINTER, f"buffer {self.ptr:#x} was freed already"
            )
        if self.manager.closed:
            raise InvalidHandleError(
                _lib.HETMEM_ERR_INVALID_HANDLE,
                f"buffer {self.ptr:#x}: its manager is closed (which freed it)",
            )

    def _view_count(self):
        return sum(1 for r in self._views if r() is not None)

    def _views_alive(self):
        """The number of host views alive. A view dropped inside a reference cycle
        (``ctypes.cast`` makes one) lives until the collector runs: collect once
        before answering that views are alive."""
        if not self._view_count():
            return 0
        gc.collect()
        return self._view_count()

    def free(self):
        """Gives the memory back (after copies still queued on it). A second free raises
        ForeignPointerError without calling into C.

        Raises:
            BufferError: host views of the buffer are alive (see host_view); the
                buffer stays allocated.
            ForeignPointerError: freed already.
            InvalidHandleError: its manager is closed (which freed it).
        """
        mgr = self.manager
        with mgr._lock:
            self._live()
            views = self._views_alive()
            if views:
                raise BufferError(
                    f"cannot free buffer {self.ptr:#x}: {views} host view(s) of it are "
                    "alive; drop them first (the array host_view() returned, and "
                    "memoryviews or arrays made from it)"
                )
            self._freed = True
            if mgr._buffers.get(self.ptr) is self:
                del mgr._buffers[self.ptr]
            _check(mgr._lib.hetmem_free(mgr.handle, self.ptr))

    def write(self, data, offset=0, n=None):
        """Copies host bytes (bytes, buffer, ctypes object, or int address with n) into
        the buffer at ``offset``.

        Raises:
            OutOfBoundsError: the bytes run past the end of the buffer.
            ForeignPointerError: freed already (or ``offset`` is past its end).
            ForeignHandleError, InvalidArgumentError: as Manager.copy_from_host.
            OutOfMemoryError: no host memory to stage device memory through.
            StreamCapturingError: a copy with a host end on a stream capturing a
                CUDA graph.
            DriverError: the driver failed.
            SystemCallError: a system call failed.
            ValueError: a negative ``offset``, or ``n`` over the bytes given.
            OverflowError: ``ptr + offset`` or ``n`` does not fit its C type.
        """
        self._live()
        self.manager.copy_from_host(self.ptr + _size(offset, "offset"), data, n)

    def read(self, n=None, offset=0):
        """The buffer's bytes [offset, offset + n) (default: to the end) as bytes.

        Raises:
            OutOfBoundsError: the range runs past the end of the buffer.
            ForeignPointerError: freed already (or ``offset`` is past its end).
            ForeignHandleError, InvalidArgumentError: as Manager.copy_to_host.
            OutOfMemoryError: no host memory to stage device memory through.
            StreamCapturingError: a copy with a host end on a stream capturing a
                CUDA graph.
            DriverError: the driver failed.
            SystemCallError: a system call failed.
            ValueError: a negative ``offset`` or ``n``.
            OverflowError: ``ptr + offset`` does not fit an address.
        """
        self._live()
        offset = _size(offset, "offset")
        if n is None:
            n = self.size - offset
        return self.manager.read(self.ptr + offset, n)

    def read_into(self, out, n=None, offset=0):
        """Copies into caller-owned writable memory ``out``.

        Raises:
            OutOfBoundsError: the range runs past the end of the buffer.
            ForeignPointerError: freed already (or ``offset`` is past its end).
            ForeignHandleError, InvalidArgumentError: as Manager.copy_to_host.
            OutOfMemoryError: no host memory to stage device memory through.
            StreamCapturingError: a copy with a host end on a stream capturing a
                CUDA graph.
            DriverError: the driver failed.
            SystemCallError: a system call failed.
            ValueError: a negative ``offset``, or ``n`` over the size of ``out``.
            OverflowError: ``ptr + offset`` or ``n`` does not fit its C type.
        """
        self._live()
        self.manager.copy_to_host(out, self.ptr + _size(offset, "offset"), n)

    def copy_from(self, src, n=None, stream=None, offset=0, src_offset=0):
        """Copies from another buffer (or address) of the same manager into this one.

        Raises:
            ForeignPointerError: ``src`` is no buffer of this manager, or one is freed.
            OutOfBoundsError: a range runs past the end of its buffer.
            ForeignHandleError: ``stream`` belongs to another manager.
            InvalidArgumentError: ``stream`` is of a device the copy does not involve.
            OutOfMemoryError: no host memory to stage device memory through.
            StreamCapturingError: a copy with a host end on a stream capturing a
                CUDA graph.
            DriverError: the driver failed.
            SystemCallError: a system call failed.
            ValueError: a negative offset or ``n``.
        """
        self._live()
        offset, src_offset = _size(offset, "offset"), _size(src_offset, "src_offset")
        if n is None:
            n = (src.size - src_offset) if isinstance(src, Buffer) else self.size - offset
        self.manager.copy(self.ptr + offset, _address(src) + src_offset, n, stream)

    def copy_to(self, dst, n=None, stream=None, offset=0, dst_offset=0):
        """Copies from this buffer into another buffer (or address) of the manager.

        Raises:
            ForeignPointerError: ``dst`` is no buffer of this manager, or one is freed.
            OutOfBoundsError: a range runs past the end of its buffer.
            ForeignHandleError: ``stream`` belongs to another manager.
            InvalidArgumentError: ``stream`` is of a device the copy does not involve.
            OutOfMemoryError: no host memory to stage device memory through.
            StreamCapturingError: a copy with a host end on a stream capturing a
                CUDA graph.
            DriverError: the driver failed.
            SystemCallError: a system call failed.
            ValueError: a negative offset or ``n``.
        """
        self._live()
        offset, dst_offset = _size(offset, "offset"), _size(dst_offset, "dst_offset")
        if n is None:
            n = self.size - offset
        self.manager.copy(_address(dst) + dst_offset, self.ptr + offset, n, stream)

    def host_view(self):
        """The bytes as a ctypes char array over the buffer's memory, no copy (host,
        pinned and managed memory).

        The array is an export of the buffer, as a memoryview is of a bytearray or an
        mmap: while it is alive (it, or anything made from it that holds it:
        ``memoryview(view)``, ``numpy.frombuffer(view)``, ``ctypes.cast(view, ...)``),
        free(), Manager.free of its address, the manager's close() and leaving their
        ``with`` blocks raise BufferError and the memory stays; and the view holds its
        Buffer (and so the Manager) alive, so garbage collection cannot free the memory
        under it. Drop the views (``del view``), then free.

        Why refuse rather than keep the memory until the last view goes: free() and
        close() promise the memory back now (pinned and device-backed memory are
        scarce, and the manager's stats and the driver count it); quietly deferring
        them would break that promise where nothing shows it. ``mmap.close()`` and
        resizing an exported bytearray refuse in the same way.

        One way remains that no Python check can see: in a process ``fork()``ed from
        this one, pinned memory is not mapped (see ForkedError), so a view of pinned
        memory made before the fork must not be read there.

        Raises:
            ValueError: device memory (not addressable by the CPU).
            ForeignPointerError: freed already.
            InvalidHandleError: its manager is closed.
            ForkedError: in a process forked from the one that made the manager.
        """
        mgr = self.manager
        with mgr._lock:
            self._live()
            if self.placement == DEVICE:
                raise ValueError("device memory is not addressable by the CPU")
            if os.getpid() != mgr._pid:
                raise _forked(mgr._pid)
            view = (ctypes.c_char * self.size).from_address(self.ptr)
            view._hetmem_buffer = self  # the view keeps the Buffer, and so the memory
            # ctypes arrays are unhashable (no WeakSet): a list, pruned here.
            self._views = [r for r in self._views if r() is not None]
            self._views.append(weakref.ref(view))
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
    cudaStream_t / hipStream_t wrapped (``Stream.wrap(mgr, raw, device)``).

    Raises:
        InvalidArgumentError: a negative device.
        UnknownDeviceError: no such device (the host backend has none).
        DriverError: the driver failed.
        OverflowError: ``device`` does not fit a C int.
    """

    def __init__(self, mgr, device=0, _handle=None):
        self.manager = mgr
        self.device = device
        self._h = None
        if _handle is None:
            _handle = StreamP()
            _check(mgr._lib.hetmem_stream_create(mgr.handle, device, byref(_handle)))
        self._h = _handle

    @classmethod
    def wrap(cls, mgr, raw, device=0):
        """Wraps the caller's stream ``raw`` (an int: cudaStream_t value, 0 for the
        default stream, 2 for the per-thread default stream: each thread that uses it
        uses its own). hetmem never destroys it; it must outlive this object.

        Raises:
            InvalidArgumentError: a negative device, a stream wrapped for another
                device already (on the simulator: a value that is no stream of the
                device).
            UnknownDeviceError: no such device (the host backend has none).
            DriverError: the driver failed.
            ValueError: a negative ``raw``.
            OverflowError: ``raw`` does not fit a uintptr_t, or ``device`` an int.
        """
        h = StreamP()
        _check(mgr._lib.hetmem_stream_wrap(mgr.handle, device, _size(raw, "raw"), byref(h)))
        return cls(mgr, device, _handle=h)

    @property
    def handle(self):
        """The ``hetmem_stream_t*``.

        Raises:
            InvalidHandleError: the stream is closed.
        """
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
        """Blocks until the work queued on the stream so far is done.

        Raises:
            DriverError: the driver failed (or the stream is capturing a CUDA graph).
        """
        _check(self.manager._lib.hetmem_stream_synchronize(self.handle))

    def wait_event(self, event):
        """Makes the work queued on this stream from now on wait for the work before
        ``event``'s last recording (an Event of this manager, any device), without
        blocking the host.

        Raises:
            ForeignHandleError: ``event`` belongs to another manager.
            DriverError: the driver failed.
            TypeError: ``event`` is not an Event.
        """
        if not isinstance(event, Event):
            raise TypeError(f"wait_event needs a hetmem.Event, not {type(event).__name__}")
        _check(self.manager._lib.hetmem_stream_wait_event(self.handle, event.handle))

    def close(self):
        """Destroys the handle (a wrapped stream is only let go). Closing twice does
        nothing."""
        h, self._h = self._h, None
        if h is not None:
            _check(self.manager._lib.hetmem_stream_destroy(h))

    destroy = close

    def _dispose(self):
        self.close()


class Event(_Owned):
    """A point in a stream (``Event(mgr, device)`` or Manager.event): record() it on a
    stream after work there (an asynchronous copy), then make another stream wait for
    it (Stream.wait_event: the work queued on that stream afterwards runs after it,
    the host does not block) or wait on the host (synchronize). Until it is first
    recorded it counts as passed. An event stays usable after its manager is closed.

    Raises:
        InvalidArgumentError: a negative device.
        UnknownDeviceError: no such device (the host backend has none).
        DriverError: the driver failed.
        OverflowError: ``device`` does not fit a C int.
    """

    def __init__(self, mgr, device=0):
        self.manager = mgr
        self.device = device
        self._lib = mgr._lib
        self._h = None
        h = EventP()
        _check(self._lib.hetmem_event_create(mgr.handle, device, byref(h)))
        self._h = h

    @property
    def handle(self):
        """The ``hetmem_event_t*``.

        Raises:
            InvalidHandleError: the event is closed.
        """
        if self._h is None:
            raise _closed("event")
        return self._h

    def record(self, stream):
        """Marks the current tail of ``stream`` (a Stream): from now on the event stands
        for the work queued there so far. Recording again moves it; waits queued before
        keep the point they saw.

        Raises:
            ForeignHandleError: ``stream`` belongs to another manager.
            InvalidArgumentError: ``stream`` is of another device than the event.
            DriverError: the driver failed.
            TypeError: ``stream`` is not a Stream.
        """
        if not isinstance(stream, Stream):
            raise TypeError(f"record needs a hetmem.Stream, not {type(stream).__name__}")
        _check(self._lib.hetmem_event_record(self.handle, stream.handle))

    def query(self):
        """Whether the work before the last recording is done (True if never recorded);
        does not block.

        Raises:
            DriverError: the driver failed.
        """
        done = c_int()
        _check(self._lib.hetmem_event_query(self.handle, byref(done)))
        return bool(done.value)

    def synchronize(self):
        """Blocks until the work before the last recording is done.

        Raises:
            DriverError: the driver failed.
        """
        _check(self._lib.hetmem_event_synchronize(self.handle))

    def close(self):
        """Destroys the event handle (waits queued on it already are unaffected).
        Closing twice does nothing."""
        h, self._h = self._h, None
        if h is not None:
            _check(self._lib.hetmem_event_destroy(h))

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

    Raises:
        InvalidArgumentError: a zero device budget or one above the device's memory,
            a host budget below the staging ring, fewer than 2 staging slots, no
            staging threads or spare slots.
        InvalidSizeError: a staging slot of 0 bytes or over SSIZE_MAX, or slots that
            together overflow the address space.
        UnknownDeviceError: no such device.
        OutOfMemoryError: the staging ring is more than the host memory available,
            or cannot be pinned.
        UnknownNumaNodeError, NumaNodeWithoutMemoryError: the device's NUMA node,
            where the ring is placed, is unknown or has no memory.
        UnsupportedError: the host backend (no device to store onto).
        SystemCallError: a system call failed.
        DriverError: the driver failed.
        ValueError: an unknown planner, or a negative budget or setting.
        OverflowError: a budget or setting does not fit its C type.
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
        self._h = None
        lib = self._lib = mgr._lib
        cfg = hetmem_store_config_t()
        _check(lib.hetmem_store_config_init(byref(cfg), _size(device_budget), _size(host_budget)))
        fields = {
            "device": device,
            "sequence": _lib.HETMEM_SEQUENCE_LEARN if learn else _lib.HETMEM_SEQUENCE_NONE,
            "checksums": 1 if checksums else 0,
        }
        if planner is not None:
            planners = {"belady": _lib.HETMEM_PLANNER_BELADY, "static": _lib.HETMEM_PLANNER_STATIC}
            if planner not in planners:
                raise ValueError(f"planner {planner!r}: expected 'belady' or 'static'")
            fields["planner"] = planners[planner]
        for field, value in (
            ("prefetch_depth", prefetch_depth),
            ("staging_slots", staging_slots),
            ("staging_slot_size", staging_slot_size),
            ("staging_threads", staging_threads),
            ("spare_slots", spare_slots),
        ):
            if value is not None:
                fields[field] = _size(value, field)
        _lib.fill(cfg, **fields)
        self.config = cfg
        self.device = device
        h = StoreP()
        _check(lib.hetmem_store_create(mgr.handle, byref(cfg), byref(h)))
        self._h = h

    @property
    def handle(self):
        """The ``hetmem_store_t*``.

        Raises:
            InvalidHandleError: the store is closed.
        """
        if self._h is None:
            raise _closed("store")
        return self._h

    def register(self, name, data, size=None):
        """Registers parameter ``name`` (a str, or UTF-8 bytes) with a copy of ``data``:
        bytes, any C-contiguous buffer, a ctypes object, or an int address (e.g. a CPU
        tensor's data_ptr()) with ``size`` -- read in place, never copied into a Python
        object first. The caller's memory may be freed once this returns. Returns the
        id.

        Raises:
            InvalidArgumentError: the name is taken, or not UTF-8.
            InvalidSizeError: no bytes.
            OutOfMemoryError: larger than the device budget.
            TypeError: ``name`` is not a str or bytes (None included).
            ValueError: ``name`` has an embedded NUL, or ``size`` exceeds the bytes
                given.
        """
        pid = c_uint32()
        with _HostBytes(data, size) as src:
            _check(
                self._lib.hetmem_store_register(
                    self.handle, name, src.addr, src.size, byref(pid)
                )
            )
        return pid.value

    def register_safetensors(self, path):
        """Registers every tensor of a safetensors file (mapped, not copied) under its
        own name, in file order; returns the ids.

        Raises:
            ConfigError: the file is missing, not a regular file, or malformed.
            SystemCallError: a system call failed (mapping the file).
            InvalidArgumentError, InvalidSizeError, OutOfMemoryError: as register (a
                name taken, an empty tensor, one larger than the device budget); the
                tensors before it stay registered.
            TypeError: ``path`` is not a str, bytes or os.PathLike.
            ValueError: ``path`` has an embedded NUL.
        """
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
        """The id of parameter ``name``.

        Raises:
            UnknownParamError: no parameter of that name.
            InvalidArgumentError: ``name`` is bytes that are not UTF-8.
            TypeError: ``name`` is not a str or bytes.
            ValueError: ``name`` has an embedded NUL.
        """
        pid = c_uint32()
        _check(self._lib.hetmem_store_lookup(self.handle, name, byref(pid)))
        return pid.value

    def param_size(self, pid):
        """The size in bytes of parameter ``pid``.

        Raises:
            UnknownParamError: no parameter of that id.
            OverflowError: ``pid`` does not fit a uint32_t.
        """
        n = c_size_t()
        _check(self._lib.hetmem_store_param_size(self.handle, pid, byref(n)))
        return n.value

    def set_sequence(self, ids):
        """Installs the execution sequence (one pass; ids may repeat). An empty
        sequence drops it (LRU again; learning again in learn mode).

        Raises:
            UnknownParamError: an id the store does not have.
            InvalidSizeError: more ids than memory holds.
            OutOfMemoryError: no host memory for a copy of them.
            InvalidArgumentError: the store refused the sequence (the message says
                why).
            OverflowError: an id does not fit a uint32_t.
            TypeError: an id is not an integer.
        """
        ids = [] if ids is None else list(ids)
        _check(self._lib.hetmem_store_set_sequence(self.handle, ids or None, len(ids)))

    def will_need(self, pid):
        """Hint: needed soon. Returns whether it is on the device afterwards.

        Raises:
            UnknownParamError: no parameter of that id.
            OutOfMemoryError: the device has no memory for it.
            ChecksumError: its bytes do not match its checksum (a store made with
                checksums).
            ConfigError: its source (a safetensors file) cannot be read.
            StreamCapturingError: the store's copy stream is capturing a CUDA graph.
            InvalidArgumentError: the store refused (the message says why).
            DriverError: the driver failed.
            SystemCallError: a system call failed.
            OverflowError: ``pid`` does not fit a uint32_t.
        """
        flag = c_int()
        _check(self._lib.hetmem_store_will_need(self.handle, pid, byref(flag)))
        return bool(flag.value)

    def dont_need(self, pid):
        """Hint: not needed for a while. Returns whether its device copy was dropped.

        Raises:
            UnknownParamError: no parameter of that id.
            OutOfMemoryError: no host memory to write a dirty copy back to.
            ChecksumError: its bytes do not match its checksum (a store made with
                checksums).
            ConfigError: its source cannot be read.
            StreamCapturingError: the store's copy stream is capturing a CUDA graph.
            InvalidArgumentError: the store refused (the message says why).
            DriverError: the driver failed.
            SystemCallError: a system call failed.
            OverflowError: ``pid`` does not fit a uint32_t.
        """
        flag = c_int()
        _check(self._lib.hetmem_store_dont_need(self.handle, pid, byref(flag)))
        return bool(flag.value)

    def keep_resident(self, pid, keep=True):
        """Keeps ``pid`` on the device once loaded (``keep``), or lets it be evicted.

        Raises:
            UnknownParamError: no parameter of that id.
            OverflowError: ``pid`` does not fit a uint32_t.
        """
        _check(self._lib.hetmem_store_keep_resident(self.handle, pid, 1 if keep else 0))

    def priority(self, pid, priority):
        """Sets ``pid``'s eviction priority (default 0; the lowest goes first).

        Raises:
            UnknownParamError: no parameter of that id.
            OverflowError: ``pid`` does not fit a uint32_t, or ``priority`` an int.
        """
        _check(self._lib.hetmem_store_priority(self.handle, pid, priority))

    def residency(self, pid):
        """(state, refs): state is "cold", "host", "loading" or "device".

        Raises:
            UnknownParamError: no parameter of that id.
            DriverError: the driver failed (asking whether a load is done).
            OverflowError: ``pid`` does not fit a uint32_t.
        """
        state, refs = c_int(), c_uint32()
        _check(self._lib.hetmem_store_residency(self.handle, pid, byref(state), byref(refs)))
        return RESIDENCY.get(state.value, state.value), refs.value

    def acquire(self, pid, stream=None, timeout=None):
        """A Guard whose ``.ptr`` is the parameter's device address, valid for work
        queued on ``stream`` until release (with no stream, valid at once). When the
        budget is full of guards, fails at once (OutOfMemoryError) or, with ``timeout``
        (seconds), waits that long for other threads to release some.

        Raises:
            UnknownParamError: no parameter of that id.
            OutOfMemoryError: everything resident is in use (after ``timeout``), or
                the device has no memory for it (the message says how much).
            ForeignHandleError: ``stream`` belongs to another manager.
            InvalidArgumentError: ``stream`` is of another device.
            StreamCapturingError: the parameter is not resident and ``stream`` is
                capturing a CUDA graph (a load would be recorded into it).
            ChecksumError: its bytes do not match its checksum (a store made with
                checksums).
            DriverError: the driver failed.
            OverflowError: ``pid`` does not fit a uint32_t, or ``timeout`` in
                milliseconds a uint64_t.
        """
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
        """The parameter's current bytes (synchronously, after work queued on it).

        Raises:
            UnknownParamError: no parameter of that id.
            DriverError: the driver failed.
            OverflowError: ``pid`` does not fit a uint32_t.
        """
        n = self.param_size(pid)
        out = ctypes.create_string_buffer(n)
        _check(self._lib.hetmem_store_read(self.handle, pid, out, n))
        return out.raw

    def read_into(self, pid, out, n=None):
        """Copies the parameter's bytes into caller-owned writable memory.

        Raises:
            UnknownParamError: no parameter of that id.
            BufferTooSmallError: ``out`` (or ``n``) is smaller than the parameter.
            DriverError: the driver failed.
            OverflowError: ``pid`` does not fit a uint32_t.
        """
        with _HostBytes(out, n, writable=True) as dst:
            _check(self._lib.hetmem_store_read(self.handle, pid, dst.addr, dst.size))

    def stats(self):
        """The store's counters (the "tier" object of Manager.stats) as a dict."""
        return self.manager.stats(self)["tier"]

    def close(self):
        """Destroys the store handle (unreleased guards keep what they use alive).
        Closing twice does nothing."""
        h, self._h = self._h, None
        if h is not None:
            _check(self._lib.hetmem_store_destroy(h))

    def _dispose(self):
        self.close()


class Guard(_Owned):
    """An acquired parameter: ``.ptr`` (device address), ``.size``, ``.id``.
    release() ends the use (also on leaving a ``with`` block, or on collection). A
    guard has no host view: its memory is the device's."""

    __slots__ = ("store", "id", "ptr", "_h", "_size", "__weakref__")

    def __init__(self, store, pid, handle, ptr):
        self.store = store
        self.id = pid
        self.ptr = ptr
        self._h = handle
        self._size = None

    @property
    def size(self):
        """The parameter's size in bytes."""
        if self._size is None:
            self._size = self.store.param_size(self.id)
        return self._size

    @property
    def released(self):
        """Whether release() ended the use."""
        return self._h is None

    def mark_dirty(self):
        """The device copy will be written by work queued on the stream after this call
        (written back before it is dropped; ordered after earlier uses, and later acquires
        wait for it).

        Raises:
            InvalidHandleError: the guard is released.
            InvalidArgumentError: another thread released it during the call.
        """
        if self._h is None:
            raise _closed("guard")
        _check(self.store._lib.hetmem_guard_mark_dirty(self._h))

    def release(self):
        """Ends the use; the memory is not reused before work queued so far on the
        guard's stream is done. Releasing twice raises InvalidHandleError."""
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
