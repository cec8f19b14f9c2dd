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


class cuda:
    synchronized = 0

    @staticmethod
    def current_stream(dev=None):
        return _Stream()

    @classmethod
    def synchronize(cls, dev=None):
        cls.synchronized += 1


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
