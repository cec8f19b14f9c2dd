"""hetmem for Python: ctypes over libhetmem.so, no build step.

    import hetmem
    with hetmem.Manager("sim") as mgr:
        buf = mgr.alloc(hetmem.DEVICE, 1 << 20)
        buf.write(b"hello")
        assert buf.read(5) == b"hello"

The library is found through $HETMEM_LIB, else in the repository's target/ directory
(see hetmem._lib). PyTorch integration (allocator switch, offload) is in hetmem.torch,
which imports torch only when its functions are called.

A failing call raises the HetmemError subclass of its status code (``hetmem.ERRORS``);
arguments that do not fit their C type raise OverflowError, TypeError or ValueError
before reaching C.
"""

from . import _lib
from ._lib import LibraryNotFound
from .core import (
    DEVICE,
    ERRORS,
    HOST,
    MANAGED,
    PINNED,
    BackendUnavailableError,
    Buffer,
    BufferTooSmallError,
    ChecksumError,
    ConfigError,
    DriverError,
    Event,
    ForeignHandleError,
    ForeignPointerError,
    ForkedError,
    Guard,
    HetmemError,
    InvalidArgumentError,
    InvalidHandleError,
    InvalidSizeError,
    Manager,
    NullPointerError,
    NumaNodeWithoutMemoryError,
    OutOfBoundsError,
    OutOfMemoryError,
    PanicError,
    Stream,
    StreamCapturingError,
    SystemCallError,
    TierStore,
    UnknownDeviceError,
    UnknownNumaNodeError,
    UnknownParamError,
    UnsupportedError,
    last_error,
    profile_finish,
    profile_start,
    status_string,
    version,
)


def library_path():
    """The path of the libhetmem.so in use (loading it if needed)."""
    return _lib.library_path()


__all__ = [
    "DEVICE",
    "ERRORS",
    "HOST",
    "MANAGED",
    "PINNED",
    "BackendUnavailableError",
    "Buffer",
    "BufferTooSmallError",
    "ChecksumError",
    "ConfigError",
    "DriverError",
    "Event",
    "ForeignHandleError",
    "ForeignPointerError",
    "ForkedError",
    "Guard",
    "HetmemError",
    "InvalidArgumentError",
    "InvalidHandleError",
    "InvalidSizeError",
    "LibraryNotFound",
    "Manager",
    "NullPointerError",
    "NumaNodeWithoutMemoryError",
    "OutOfBoundsError",
    "OutOfMemoryError",
    "PanicError",
    "Stream",
    "StreamCapturingError",
    "SystemCallError",
    "TierStore",
    "UnknownDeviceError",
    "UnknownNumaNodeError",
    "UnknownParamError",
    "UnsupportedError",
    "last_error",
    "profile_finish",
    "profile_start",
    "library_path",
    "status_string",
    "version",
]
