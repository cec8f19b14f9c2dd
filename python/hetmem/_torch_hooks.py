"""Builds, caches and loads torch_hooks.cpp: the C++ piece that sets the hooks PyTorch's
C++ CUDAPluggableAllocator has and its Python class does not (record_stream,
empty_cache, graph pools) to hetmem's entry points.

It is compiled at first use with the system's C++ compiler ($CXX, else c++, g++ or
clang++) against the installed torch (its include/ and lib/) and CUDA runtime headers
($CUDA_HOME, $CUDA_PATH, /usr/local/cuda, or the nvidia-cuda-runtime and
nvidia-cuda-crt wheels next to torch), and cached under $HETMEM_CACHE_DIR, else
$XDG_CACHE_HOME/hetmem or ~/.cache/hetmem, keyed by torch's version and a digest of
the source, the paths and the flags. $HETMEM_TORCH_HOOKS_LIB names a library built
already (for the same torch build) and skips the build. Anything missing raises
HooksUnavailable with the reason; hetmem.torch then falls back (see
use_hetmem_allocator).
"""

import ctypes
import glob
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from ctypes import c_char_p, c_int, c_size_t, c_uint32, c_void_p

from . import _lib

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_hooks.cpp")
# torch_hooks.cpp's kVersion: the layout of _Fns.
VERSION = 2
BUILD_TIMEOUT_S = 300


class HooksUnavailable(RuntimeError):
    """The C++ hooks could not be built, loaded or set; the message says why."""


class _Fns(ctypes.Structure):
    """torch_hooks.cpp's struct Fns: hetmem's entry points, by address."""

    _fields_ = [
        ("size", c_uint32),
        ("version", c_uint32),
        ("foreign_pointer", ctypes.c_int32),
        ("alloc_fn", c_void_p),
        ("record_stream", c_void_p),
        ("empty_cache", c_void_p),
        ("begin_allocate_to_pool", c_void_p),
        ("end_allocate_to_pool", c_void_p),
        ("release_pool", c_void_p),
        ("last_error", c_void_p),
    ]


# Libraries and tables in use: PyTorch keeps calling into them for the process's life.
_keep = []


def cache_dir():
    d = os.environ.get("HETMEM_CACHE_DIR")
    if d:
        return d
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "hetmem")


def compiler():
    cxx = os.environ.get("CXX")
    if cxx:
        return cxx
    for name in ("c++", "g++", "clang++"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _cuda_major(torch):
    v = getattr(torch.version, "cuda", None)
    return v.split(".")[0] if v else None


def cuda_include_dirs(torch):
    """The directories with cuda_runtime_api.h and crt/host_defines.h (one, or two)."""
    roots = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            roots.append(os.path.join(os.environ[var], "include"))
    roots.append("/usr/local/cuda/include")
    # The wheels PyTorch depends on: nvidia/cu13/include (CUDA 13), or
    # nvidia/cuda_runtime/include and friends (CUDA 12), beside torch or on sys.path.
    major = _cuda_major(torch)
    sites = [os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__)))] + sys.path
    for site in dict.fromkeys(s for s in sites if s):
        found = sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))
        # This torch's CUDA first: cu13/ before cu12/.
        found.sort(key=lambda d: os.path.basename(os.path.dirname(d)) != f"cu{major}")
        roots.extend(found)
    api = [d for d in roots if os.path.isfile(os.path.join(d, "cuda_runtime_api.h"))]
    crt = [d for d in roots if os.path.isfile(os.path.join(d, "crt", "host_defines.h"))]
    if not api or not crt:
        want = f"=={torch.version.cuda}.*" if getattr(torch.version, "cuda", None) else ""
        missing = "cuda_runtime_api.h" if not api else "crt/host_defines.h"
        raise HooksUnavailable(
            f"no CUDA runtime headers ({missing}) in $CUDA_HOME, $CUDA_PATH, "
            "/usr/local/cuda or the nvidia wheels beside torch: set CUDA_HOME to a CUDA "
            f"toolkit, or `pip install 'nvidia-cuda-runtime{want}' 'nvidia-cuda-crt{want}'`"
        )
    return list(dict.fromkeys([api[0], crt[0]]))


def build_command(torch, out, source=SOURCE):
    """The compiler command that builds ``source`` into ``out`` against this torch."""
    cxx = compiler()
    if cxx is None:
        raise HooksUnavailable("no C++ compiler ($CXX, c++, g++ or clang++) on PATH")
    tdir = os.path.dirname(os.path.abspath(torch.__file__))
    inc, lib = os.path.join(tdir, "include"), os.path.join(tdir, "lib")
    header = os.path.join(inc, "torch", "csrc", "cuda", "CUDAPluggableAllocator.h")
    if not os.path.isfile(header):
        raise HooksUnavailable(
            f"this PyTorch ({torch.__version__}) has no {header}: a CUDA build of "
            "PyTorch with its C++ headers is needed"
        )
    abi = int(bool(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True)))
    cmd = [cxx, "-shared", "-fPIC", "-O2", "-std=c++17", "-Wall", "-Wextra",
           f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-isystem", inc]
    for d in cuda_include_dirs(torch):
        cmd += ["-isystem", d]
    cmd += [source, "-o", out, "-L", lib, "-lc10", "-lc10_cuda", "-ltorch_cuda",
            f"-Wl,-rpath,{lib}"]
    return cmd


def version_tag(torch):
    """torch's version as it appears in the library's file name."""
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in torch.__version__)


def build(torch):
    """The path of the hooks library for this torch, built now if not cached."""
    tag = version_tag(torch)
    prebuilt = os.environ.get("HETMEM_TORCH_HOOKS_LIB")
    if prebuilt:
        if not os.path.isfile(prebuilt):
            raise HooksUnavailable(f"$HETMEM_TORCH_HOOKS_LIB={prebuilt} is not a file")
        base = os.path.basename(prebuilt)
        # Named by build() or scripts/device-check.sh: it must be this torch's.
        if base.startswith("torch_hooks-") and not (
                base.startswith(f"torch_hooks-{tag}-") or base == f"torch_hooks-{tag}.so"):
            raise HooksUnavailable(
                f"$HETMEM_TORCH_HOOKS_LIB={prebuilt} was built for another PyTorch than "
                f"this one ({torch.__version__})")
        return prebuilt
    try:
        with open(SOURCE, "rb") as f:
            src = f.read()
    except OSError as e:
        raise HooksUnavailable(f"cannot read {SOURCE}: {e}") from e
    cmd = build_command(torch, "OUT")
    key = hashlib.sha256(src + "\0".join(cmd).encode() + str(VERSION).encode()).hexdigest()
    d = cache_dir()
    out = os.path.join(d, f"torch_hooks-{tag}-{key[:16]}.so")
    if os.path.isfile(out):
        return out
    try:
        os.makedirs(d, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".torch_hooks-", suffix=".so", dir=d)
        os.close(fd)
    except OSError as e:
        raise HooksUnavailable(f"cannot write to the cache directory {d}: {e}") from e
    try:
        cmd = build_command(torch, tmp)
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise HooksUnavailable(f"{cmd[0]} could not run: {e}") from e
        if p.returncode != 0:
            tail = "\n".join((p.stderr or p.stdout).strip().splitlines()[-12:])
            raise HooksUnavailable(
                f"building {os.path.basename(SOURCE)} failed ({' '.join(cmd)}):\n{tail}")
        # Another process may have built it meanwhile: the same bytes, replaced whole.
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def load(torch):
    """The hooks library (a ctypes.CDLL), built first if needed."""
    path = build(torch)
    try:
        hooks = ctypes.CDLL(path)
        fn = hooks.hetmem_torch_hooks_install
    except (OSError, AttributeError) as e:
        raise HooksUnavailable(f"cannot load {path}: {e}") from e
    fn.restype = c_int
    fn.argtypes = [ctypes.POINTER(_Fns), c_char_p, c_size_t]
    return hooks


def _addr(lib, name):
    return getattr(lib, name).address


def install(torch, lib, alloc_fn_name):
    """Sets PyTorch's current allocator's hooks to ``lib``'s entry points; the
    allocator must be the CUDAPluggableAllocator made with ``lib``'s ``alloc_fn_name``.
    Raises HooksUnavailable."""
    hooks = load(torch)
    fns = _Fns(
        size=ctypes.sizeof(_Fns),
        version=VERSION,
        foreign_pointer=_lib.HETMEM_ERR_FOREIGN_POINTER,
        alloc_fn=_addr(lib, alloc_fn_name),
        record_stream=_addr(lib, "hetmem_torch_record_stream"),
        empty_cache=_addr(lib, "hetmem_torch_empty_cache"),
        begin_allocate_to_pool=_addr(lib, "hetmem_torch_begin_allocate_to_pool"),
        end_allocate_to_pool=_addr(lib, "hetmem_torch_end_allocate_to_pool"),
        release_pool=_addr(lib, "hetmem_torch_release_pool"),
        last_error=_addr(lib, "hetmem_last_error"),
    )
    err = ctypes.create_string_buffer(2048)
    rc = hooks.hetmem_torch_hooks_install(ctypes.byref(fns), err, len(err))
    if rc != 0:
        raise HooksUnavailable(err.value.decode("utf-8", "replace") or f"install returned {rc}")
    _keep.append((hooks, fns))
