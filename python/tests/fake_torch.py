"""A tiny stand-in for the parts of PyTorch that hetmem.torch.offload uses, so that its
plumbing (registration, hooks, placeholders, zero-copy tensors from
__cuda_array_interface__, guards, remove_offload) runs here on the sim backend.

It models only what offload touches, and checks the way it is used (for example that
__cuda_array_interface__ is well formed). It is no proof that real PyTorch behaves the
same: python/bench/torch_check.py checks that on a GPU.
"""

import ctypes
import math
from contextlib import contextmanager

__version__ = "0.0-fake"


class dtype:
    def __init__(self, name, itemsize):
        self.name, self.itemsize = name, itemsize

    def __repr__(self):
        return f"torch.{self.name}"


float16 = dtype("float16", 2)
bfloat16 = dtype("bfloat16", 2)
float32 = dtype("float32", 4)
uint8 = dtype("uint8", 1)


class device:
    def __init__(self, type, index=None):
        if isinstance(type, device):
            type, index = type.type, type.index
        elif ":" in type:
            type, i = type.split(":")
            index = int(i)
        self.type, self.index = type, index

    def __eq__(self, other):
        other = device(other) if isinstance(other, str) else other
        return isinstance(other, device) and (self.type, self.index) == (other.type, other.index)

    def __hash__(self):
        return hash((self.type, self.index))

    def __repr__(self):
        return f"device({self.type!r}, {self.index})"


CPU = device("cpu")


def _numel(shape):
    return math.prod(shape) if shape else 1


class Tensor:
    """Bytes at ``ptr`` (CPU: a ctypes buffer kept in ``_mem``; "cuda": a sim device
    address, or a fake copy of CPU bytes for buffers moved there)."""

    def __init__(self, ptr, dtype, shape, device, mem=None, expanded=False):
        self.ptr, self.dtype, self.shape = ptr, dtype, tuple(shape)
        self.device, self._mem, self.expanded = device, mem, expanded

    @classmethod
    def from_bytes(cls, data, dtype, shape, device=CPU):
        mem = ctypes.create_string_buffer(bytes(data), len(data))
        return cls(ctypes.addressof(mem), dtype, shape, device, mem)

    def bytes(self):
        assert self._mem is not None, "device memory is not readable here"
        return ctypes.string_at(self.ptr, self.numel() * self.element_size())

    def data_ptr(self):
        return self.ptr

    def numel(self):
        return _numel(self.shape)

    def element_size(self):
        return self.dtype.itemsize

    def contiguous(self):
        return self

    def detach(self):
        return self

    def to(self, dev):
        dev = device(dev) if isinstance(dev, str) else dev
        if dev == self.device:
            return self
        return Tensor.from_bytes(self.bytes(), self.dtype, self.shape, dev)

    def view(self, arg):
        if isinstance(arg, dtype):
            nbytes = self.numel() * self.element_size()
            assert len(self.shape) == 1 and nbytes % arg.itemsize == 0
            return Tensor(self.ptr, arg, (nbytes // arg.itemsize,), self.device, self._mem)
        shape = tuple(arg)
        assert _numel(shape) == self.numel(), (shape, self.shape)
        return Tensor(self.ptr, self.dtype, shape, self.device, self._mem, self.expanded)

    def expand(self, shape):
        assert self.numel() == 1
        return Tensor(self.ptr, self.dtype, shape, self.device, self._mem, expanded=True)


class Parameter:
    def __init__(self, data, requires_grad=True):
        self.data, self.requires_grad = data, requires_grad

    def numel(self):
        return self.data.numel()

    def element_size(self):
        return self.data.element_size()

    @property
    def shape(self):
        return self.data.shape


def zeros(n, dtype, device):
    return Tensor.from_bytes(bytes(n * dtype.itemsize), dtype, (n,), device)


def empty(shape, dtype, device="cpu"):
    shape = tuple(shape)
    dev = globals()["device"](device) if isinstance(device, str) else device
    return Tensor.from_bytes(bytes(_numel(shape) * dtype.itemsize), dtype, shape, dev)


def as_tensor(obj, device):
    cai = obj.__cuda_array_interface__
    assert set(cai) >= {"shape", "typestr", "data", "version"}, cai
    assert cai["version"] == 3 and cai["typestr"] == "|u1" and cai.get("strides") is None
    ptr, readonly = cai["data"]
    assert isinstance(ptr, int) and readonly is False
    dev = globals()["device"](device) if isinstance(device, str) else device
    assert dev.type == "cuda"
    return Tensor(ptr, uint8, cai["shape"], dev)


_grad = [True]
_inference = [False]


def is_grad_enabled():
    return _grad[-1]


def is_inference_mode_enabled():
    return _inference[-1]


@contextmanager
def no_grad():
    _grad.append(False)
    try:
        yield
    finally:
        _grad.pop()


@contextmanager
def inference_mode(mode=True):
    _inference.append(mode)
    try:
        yield
    finally:
        _inference.pop()


class _Stream:
    cuda_stream = 0


# ---- the allocator: PyTorch's C++ CUDAPluggableAllocator, minimally -------------------------
#
# PyTorch's Python CUDAPluggableAllocator sets only malloc and free; its C++ class also has
# hooks (set_record_stream_fn, set_reset_fn, set_begin_allocate_to_pool,
# set_end_allocate_to_pool_fn, set_release_pool) that PyTorch calls when set and skips
# when not: tensor.record_stream does nothing, empty_cache reaches no one, and a capture
# goes ahead. hetmem's torch_hooks.cpp sets them; FakeHooksLibrary stands in for it.


class _PluggableAllocator:
    """torch::cuda::CUDAPluggableAllocator: the functions it was made with, and hooks."""

    def __init__(self, alloc_fn, free_fn):
        self.alloc_fn, self.free_fn = alloc_fn, free_fn
        self.record_stream_fn = self.reset_fn = None
        self.begin_allocate_to_pool_fn = self.end_allocate_to_pool_fn = None
        self.release_pool_fn = None


class _Allocators:
    current = None  # the C++ allocator PyTorch uses (None: its own caching allocator)
    initialized = False  # set by the first CUDA allocation; then no swap


class CUDAPluggableAllocator:
    """torch.cuda.memory.CUDAPluggableAllocator: loads the two symbols by name."""

    def __init__(self, path, alloc_fn_name, free_fn_name):
        lib = ctypes.CDLL(path)
        alloc_fn = ctypes.cast(getattr(lib, alloc_fn_name), ctypes.c_void_p).value
        free_fn = ctypes.cast(getattr(lib, free_fn_name), ctypes.c_void_p).value
        self._allocator = _PluggableAllocator(alloc_fn, free_fn)

    def allocator(self):
        return self._allocator


def _change_current_allocator(allocator):
    if _Allocators.initialized:
        raise RuntimeError("Can't swap an already initialized allocator")
    _Allocators.current = allocator.allocator()


def _empty_cache():
    a = _Allocators.current
    if a is not None and a.reset_fn is not None:
        a.reset_fn()


def _hook(name):
    a = _Allocators.current
    return None if a is None else getattr(a, name)


class CUDAGraph:
    _next_pool = 1

    def capture_begin(self, pool=None, capture_error_mode="global"):
        if pool is None:
            pool = (CUDAGraph._next_pool, 0)
            CUDAGraph._next_pool += 1
        self.pool = pool
        begin = _hook("begin_allocate_to_pool_fn")
        if begin is not None:
            begin(0, pool, lambda stream: True)
        self.capturing = True  # without a hook: the capture goes ahead (the danger)

    def capture_end(self):
        end = _hook("end_allocate_to_pool_fn")
        if end is not None:
            end(0, self.pool)
        self.capturing = False


@contextmanager
def _graph(cuda_graph, pool=None, stream=None):
    cuda.empty_cache()
    cuda_graph.capture_begin(pool)
    try:
        yield
    finally:
        cuda_graph.capture_end()


class MemPool:
    _next = 1

    def __init__(self):
        self.id = (0, MemPool._next)
        MemPool._next += 1


@contextmanager
def _use_mem_pool(pool, device=None):
    begin = _hook("begin_allocate_to_pool_fn")
    if begin is not None:
        begin(0, pool.id, lambda stream: True)
    try:
        yield
    finally:
        for name in ("end_allocate_to_pool_fn", "release_pool_fn"):
            f = _hook(name)
            if f is not None:
                f(0, pool.id)


class Stream:
    def __init__(self, raw=0):
        self.cuda_stream = raw


def _record_stream(self, stream):
    f = _hook("record_stream_fn")
    if f is not None:  # no hook: PyTorch does nothing
        f(self.ptr, stream.cuda_stream)


class cuda:
    synchronized = 0
    Stream = Stream
    CUDAGraph = CUDAGraph
    MemPool = MemPool
    graph = staticmethod(_graph)
    use_mem_pool = staticmethod(_use_mem_pool)
    empty_cache = staticmethod(_empty_cache)

    class memory:
        CUDAPluggableAllocator = CUDAPluggableAllocator
        change_current_allocator = staticmethod(_change_current_allocator)
        empty_cache = staticmethod(_empty_cache)
        use_mem_pool = staticmethod(_use_mem_pool)

    class graphs:
        CUDAGraph = CUDAGraph

    @staticmethod
    def current_stream(dev=None):
        return _Stream()

    @classmethod
    def synchronize(cls, dev=None):
        cls.synchronized += 1


class version:
    cuda = "13.0"


def _reset_allocator():
    """Back to PyTorch's own allocator with no hooks, undoing hetmem's Python fallback."""
    _Allocators.current = None
    _Allocators.initialized = False
    Tensor.record_stream = _record_stream
    cuda.empty_cache = cuda.memory.empty_cache = staticmethod(_empty_cache)
    cuda.use_mem_pool = cuda.memory.use_mem_pool = staticmethod(_use_mem_pool)
    CUDAGraph.capture_begin = _capture_begin


_capture_begin = CUDAGraph.capture_begin


class FakeHooksLibrary:
    """What hetmem/torch_hooks.cpp does, for this fake: hetmem_torch_hooks_install reads
    the table of hetmem's entry points, checks that the current allocator is the
    pluggable one made with table.alloc_fn, and sets its hooks to call them through
    their addresses, raising RuntimeError(hetmem's last error) where one fails (as the
    C++ hooks throw), except release, which PyTorch calls from destructors (it prints),
    and record_stream of memory that is not hetmem's (ignored, as PyTorch's own
    allocator ignores memory it did not allocate)."""

    def __init__(self):
        self.release_messages = []

    def hetmem_torch_hooks_install(self, fns_ref, err, cap):
        f = fns_ref._obj
        if f.size != ctypes.sizeof(f) or f.version != 1:
            err.value = b"hetmem torch hooks: the caller's table has another layout"
            return 2
        a = _Allocators.current
        if not isinstance(a, _PluggableAllocator) or a.alloc_fn != f.alloc_fn:
            err.value = b"PyTorch's current CUDA allocator is not hetmem's pluggable one"
            return 1
        c_int, c_void_p, c_uint64 = ctypes.c_int, ctypes.c_void_p, ctypes.c_uint64
        pool_fn = ctypes.CFUNCTYPE(c_int, c_int, c_uint64, c_uint64)
        record = ctypes.CFUNCTYPE(c_int, c_void_p, c_void_p)(f.record_stream)
        empty = ctypes.CFUNCTYPE(c_int)(f.empty_cache)
        begin, end, release = (pool_fn(f.begin_allocate_to_pool),
                               pool_fn(f.end_allocate_to_pool), pool_fn(f.release_pool))
        last_error = ctypes.CFUNCTYPE(ctypes.c_char_p)(f.last_error)

        def check(rc, what):
            if rc != 0:
                raise RuntimeError((last_error() or b"").decode() or what)

        def release_pool(device, pool):
            if release(device, *pool) != 0:
                self.release_messages.append(last_error().decode())

        def record_stream(ptr, stream):
            rc = record(ptr, stream)
            if rc != f.foreign_pointer:  # not hetmem's memory: ignored, as PyTorch does
                check(rc, "record_stream")

        a.record_stream_fn = record_stream
        a.reset_fn = lambda: check(empty(), "empty_cache")
        a.begin_allocate_to_pool_fn = lambda device, pool, filt: check(
            begin(device, *pool), "begin_allocate_to_pool")
        a.end_allocate_to_pool_fn = lambda device, pool: check(
            end(device, *pool), "end_allocate_to_pool")
        a.release_pool_fn = release_pool
        return 0


class _Handle:
    def __init__(self, hooks, item):
        self.hooks, self.item = hooks, item

    def remove(self):
        if self.item in self.hooks:
            self.hooks.remove(self.item)


class nn:
    Parameter = Parameter

    class Module:
        def __init__(self):
            self._parameters, self._buffers, self._modules = {}, {}, {}
            self._pre, self._post = [], []

        def __setattr__(self, name, value):
            if isinstance(value, Parameter):
                self._parameters[name] = value
            elif isinstance(value, nn.Module) and name not in ("_parameters",):
                self._modules[name] = value
            object.__setattr__(self, name, value)

        def register_buffer(self, name, t):
            self._buffers[name] = t

        def modules(self):
            yield self
            for m in self._modules.values():
                yield from m.modules()

        def named_parameters(self, prefix="", remove_duplicate=True, _seen=None):
            seen = set() if _seen is None else _seen
            for n, p in self._parameters.items():
                if p is None or (remove_duplicate and id(p) in seen):
                    continue
                seen.add(id(p))
                yield prefix + n, p
            for mn, m in self._modules.items():
                yield from m.named_parameters(prefix + mn + ".", remove_duplicate, seen)

        def register_forward_pre_hook(self, hook):
            self._pre.append(hook)
            return _Handle(self._pre, hook)

        def register_forward_hook(self, hook, always_call=False):
            item = (hook, always_call)
            self._post.append(item)
            return _Handle(self._post, item)

        def __call__(self, *args):
            for h in list(self._pre):
                h(self, args)
            try:
                out = self.forward(*args)
            except BaseException:
                for h, always in list(self._post):
                    if always:
                        h(self, args, None)
                raise
            for h, _ in list(self._post):
                h(self, args, out)
            return out


Tensor.record_stream = _record_stream
