"""hetmem for Python: ctypes over libhetmem.so, no build step.

    import hetmem
    with hetmem.Manager("sim") as mgr:
        buf = mgr.alloc(hetmem.DEVICE, 1 << 20)
        buf.write(b"hello")
        assert buf.read(5) == b"hello"

The library is found through $HETMEM_LIB, else in the repository's target/ directory
(see hetmem._lib). PyTorch integration (allocator switch, offload) is in hetmem.torch,
which imports torch only when its functions are called.
"""

from . import _lib
from ._lib import LibraryNotFound
from .core import (
    DEVICE,
    HOST,
    MANAGED,
    PINNED,
    Buffer,
    ForkedError,
    Guard,
    HetmemError,
    Manager,
    Stream,
    TierStore,
    last_error,
    status_string,
    version,
)


def library_path():
    """The path of the libhetmem.so in use (loading it if needed)."""
    return _lib.library_path()


__all__ = [
    "DEVICE",
    "HOST",
    "MANAGED",
    "PINNED",
    "Buffer",
    "ForkedError",
    "Guard",
    "HetmemError",
    "LibraryNotFound",
    "Manager",
    "Stream",
    "TierStore",
    "last_error",
    "library_path",
    "status_string",
    "version",
]
