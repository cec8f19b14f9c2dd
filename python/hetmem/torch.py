"""PyTorch integration. torch is imported only inside these functions, so this module
imports (and its errors are clear) where PyTorch is absent.

- use_hetmem_allocator(): hetmem as PyTorch's CUDA allocator (one call, before any
  CUDA allocation), with tensor.record_stream, torch.cuda.empty_cache() and graph
  capture wired to hetmem; hetmem_allocator_stats(), empty_cache(), allocator_hooks().
- offload(model, device_budget): a drop-in for accelerate.cpu_offload(model) backed by
  hetmem's tier store; remove_offload(model).
"""

import os
import warnings

from . import _lib, _torch_hooks
from .core import Manager, Stream, TierStore, _check, _read_json

__all__ = [
    "use_hetmem_allocator",
    "hetmem_allocator_stats",
    "empty_cache",
    "allocator_hooks",
    "offload",
    "remove_offload",
]


def _torch():
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            "hetmem.torch needs PyTorch, which is not installed in this Python "
            f"({e}). The rest of hetmem works without it."
        ) from e
    return torch


# ---- hetmem as PyTorch's CUDA allocator -------------------------------------------------------

_allocator = None
# The malloc PyTorch's allocator is made with (the C++ one: it throws where malloc fails).
_ALLOC_FN = "hetmem_torch_malloc_cxx"
# None: not tried yet; "": the C++ hooks are set; else why they are not.
_hooks_error = None

# What the Python fallback raises at a capture: graph pools need the C++ hooks.
GRAPHS_NEED_HOOKS = "CUDA graph capture with hetmem's allocator needs its C++ hooks"


def use_hetmem_allocator():
    """Makes hetmem PyTorch's CUDA allocator for this process, through
    ``torch.cuda.memory.CUDAPluggableAllocator(libhetmem.so, "hetmem_torch_malloc_cxx",
    "hetmem_torch_free")`` and ``torch.cuda.memory.change_current_allocator``. An
    allocation hetmem cannot make (out of memory) raises RuntimeError("hetmem_torch_malloc:
    out of memory ...") in Python, where PyTorch would otherwise be handed a NULL address.

    It then sets the hooks PyTorch's C++ allocator class has and its Python class leaves
    empty, through a small C++ library built against the installed torch at first use
    and cached (hetmem/torch_hooks.cpp; needs a C++ compiler and the CUDA runtime
    headers, see hetmem._torch_hooks): ``tensor.record_stream(s)`` keeps the block from
    reuse until the work queued on ``s`` before its free is done;
    ``torch.cuda.empty_cache()`` gives hetmem's cached memory back; and CUDA graph
    capture (``torch.cuda.graph``, ``torch.cuda.use_mem_pool``,
    ``torch.compile(mode="reduce-overhead")``) allocates from a private pool of
    hetmem's device pool: memory freed during the capture is reused only by that graph
    (it replays into those addresses) until the graph is reset or destroyed, and hetmem
    makes no event query, synchronisation or unmapping while a capture is under way
    (``torch.cuda.empty_cache()`` inside a capture raises). If that library cannot be
    built or loaded, a RuntimeWarning says why and what can be done comes from Python
    instead, short of C++ callers: ``Tensor.record_stream`` raises RuntimeError (never
    a silent no-op that lets a side stream read reused memory),
    ``torch.cuda.empty_cache`` also empties hetmem's cache, and
    ``CUDAGraph.capture_begin`` and ``use_mem_pool`` raise RuntimeError("CUDA graph
    capture with hetmem's allocator needs its C++ hooks ..."). allocator_hooks() says
    which.

    Call it before the first CUDA allocation of the process (before any tensor is put
    on a CUDA device, before torch.cuda.init() or anything that initialises CUDA in
    torch); importing torch first is fine. PyTorch refuses to swap an allocator that
    has been used, and so does this function (RuntimeError). Calling it again after
    it succeeded returns the same allocator.

    hetmem's process-wide manager takes its backend from $HETMEM_BACKEND, else the
    automatic choice (CUDA where a GPU is). Returns the torch allocator object.
    """
    global _allocator
    if _allocator is not None:
        return _allocator
    torch = _torch()
    path = _lib.library_path()
    memory = torch.cuda.memory
    if not hasattr(memory, "CUDAPluggableAllocator"):
        raise RuntimeError(
            f"this PyTorch ({torch.__version__}) has no "
            "torch.cuda.memory.CUDAPluggableAllocator (PyTorch 2.0 or later has it)"
        )
    alloc = memory.CUDAPluggableAllocator(path, _ALLOC_FN, "hetmem_torch_free")
    try:
        memory.change_current_allocator(alloc)
    except RuntimeError as e:
        raise RuntimeError(
            "too late to make hetmem PyTorch's CUDA allocator: PyTorch has already "
            "initialised its own (some CUDA tensor or CUDA call came first). Call "
            "hetmem.torch.use_hetmem_allocator() at the start of the process, before "
            f"anything touches CUDA. PyTorch said: {e}"
        ) from e
    _allocator = alloc
    _set_hooks(torch)
    return alloc


def allocator_hooks():
    """Whether use_hetmem_allocator() set PyTorch's C++ hooks: ``{"installed": True}``,
    or ``{"installed": False, "reason": ...}`` (the Python fallback is in place), or
    None before use_hetmem_allocator()."""
    if _hooks_error is None:
        return None
    if not _hooks_error:
        return {"installed": True}
    return {"installed": False, "reason": _hooks_error}


def _set_hooks(torch):
    global _hooks_error
    try:
        _torch_hooks.install(torch, _lib.load(), _ALLOC_FN)
        _hooks_error = ""
        return
    except _torch_hooks.HooksUnavailable as e:
        _hooks_error = str(e)
    warnings.warn(
        "hetmem.torch: PyTorch's allocator hooks could not be set from C++ "
        f"({_hooks_error}). Falling back to Python: tensor.record_stream() raises "
        "RuntimeError (keep a tensor used on a side stream alive until that stream is "
        "done instead), torch.cuda.empty_cache() also empties hetmem's cache, and CUDA "
        "graph capture raises; calls PyTorch makes from C++ (record_stream inside "
        "collectives) are not covered.",
        RuntimeWarning,
        stacklevel=3,
    )
    _python_fallback(torch, _hooks_error)


def _python_fallback(torch, reason):
    def record_stream(self, stream):
        raise RuntimeError(
            "tensor.record_stream is not available with hetmem's allocator here: its C++ "
            f"hook could not be set ({reason}). Keep the tensor alive until the other "
            "stream is done with it (synchronise it, or free the tensor after "
            "torch.cuda.current_stream().wait_stream(stream))."
        )

    torch.Tensor.record_stream = record_stream

    original_empty_cache = torch.cuda.memory.empty_cache

    def empty_cache_both():
        original_empty_cache()
        empty_cache()

    empty_cache_both.__doc__ = original_empty_cache.__doc__
    torch.cuda.memory.empty_cache = empty_cache_both
    torch.cuda.empty_cache = empty_cache_both

    def refuse_capture(*args, **kwargs):
        raise RuntimeError(
            f"{GRAPHS_NEED_HOOKS} ({reason}): without them PyTorch would serve the "
            "capture from hetmem's common pool, which could hand memory the graph "
            "replays into to other tensors"
        )

    graphs = getattr(torch.cuda, "graphs", None)
    if graphs is not None and hasattr(graphs, "CUDAGraph"):
        graphs.CUDAGraph.capture_begin = refuse_capture
    for mod in (torch.cuda, torch.cuda.memory):
        if hasattr(mod, "use_mem_pool"):
            mod.use_mem_pool = refuse_capture


def hetmem_allocator_stats():
    """The stats of hetmem as PyTorch's allocator (hetmem_torch_stats_json) as a dict:
    backend, live_blocks, live_bytes, streams, devices[] with PyTorch's
    memory_stats() key names."""
    lib = _lib.load()
    return _read_json(lambda buf, cap, need: lib.hetmem_torch_stats_json(buf, cap, need))


def empty_cache():
    """Gives hetmem's cached, unused device memory back to the driver (what
    torch.cuda.empty_cache() does too once use_hetmem_allocator() has set the hooks).

    Raises:
        StreamCapturingError: a CUDA graph capture is under way.
        DriverError: the driver failed.
    """
    _check(_lib.load().hetmem_torch_empty_cache())


# ---- offload ---------------------------------------------------------------------------------------

_HUGE = 2 << 20
# hetmem backends whose device memory PyTorch can use (the tests add "sim" with a fake
# torch module).
_GPU_BACKENDS = ("cuda", "rocm")


def _pinned_bytes(n):
    """Pinned bytes the store's host pool uses for n bytes (src/pool/host/)."""
    if n >= _HUGE:
        return -(-n // _HUGE) * _HUGE
    return max(1 << max(n - 1, 0).bit_length(), 4096)


class _CudaBytes:
    """nbytes of device memory at ptr, as __cuda_array_interface__ (v3) uint8 bytes."""

    def __init__(self, ptr, nbytes):
        self.__cuda_array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (ptr, False),
            "version": 3,
            "strides": None,
            "stream": None,
        }


class _Param:
    __slots__ = ("pid", "dtype", "shape", "nbytes")

    def __init__(self, pid, dtype, shape, nbytes):
        self.pid, self.dtype, self.shape, self.nbytes = pid, dtype, shape, nbytes


class _Offload:
    """What offload() attaches to a model (model._hetmem_offload)."""

    def __init__(self, torch, mgr, store, device):
        self.torch = torch
        self.mgr = mgr
        self.store = store
        self.device = device
        self.cuda = torch.device("cuda", device)
        self.streams = {}  # raw cudaStream_t -> Stream
        self.params = {}  # id(Parameter) -> (Parameter, _Param)
        self.modules = []  # (module, [(Parameter, _Param)])
        self.buffers = []  # (module, name, original device)
        self.hooks = []
        self.active = {}  # id(module) -> stack of guard lists
        self._bases = {}  # dtype -> 1-element tensor on the device
        self.warned_grad = False
        self.copies = 0  # device tensors that torch.as_tensor copied (should stay 0)

    def placeholder(self, dtype, shape):
        """A tensor of the right dtype, device and shape that owns no memory of its own:
        one element of the device, expanded (stride 0)."""
        base = self._bases.get(dtype)
        if base is None:
            base = self._bases[dtype] = self.torch.zeros(1, dtype=dtype, device=self.cuda)
        return base.expand(shape) if shape else base.view(())

    def stream(self):
        raw = self.torch.cuda.current_stream(self.cuda).cuda_stream
        s = self.streams.get(raw)
        if s is None:
            s = self.streams[raw] = Stream.wrap(self.mgr, raw, self.device)
        return s

    def tensor(self, guard, p):
        torch = self.torch
        obj = _CudaBytes(guard.ptr, p.nbytes)
        if torch.is_inference_mode_enabled():
            with torch.inference_mode(False):
                t = torch.as_tensor(obj, device=self.cuda)
        else:
            t = torch.as_tensor(obj, device=self.cuda)
        if t.data_ptr() != guard.ptr:
            # Correct, but a copy rather than hetmem's memory: say so once.
            self.copies += 1
            if self.copies == 1:
                warnings.warn(
                    "hetmem.torch.offload: torch.as_tensor copied a parameter instead of "
                    f"wrapping hetmem's device memory (device {t.device})",
                    stacklevel=2,
                )
        return t.view(p.dtype).view(p.shape)

    def pre_hook(self, module, params):
        torch = self.torch
        if not self.warned_grad and torch.is_grad_enabled():
            if any(prm.requires_grad for prm, _ in params):
                self.warned_grad = True
                warnings.warn(
                    "hetmem.torch.offload is for inference: run the model under "
                    "torch.no_grad() (weights are released after each module's "
                    "forward, so autograd must not keep them for backward)",
                    stacklevel=3,
                )
        stream = self.stream()
        guards = []
        try:
            for prm, p in params:
                g = self.store.acquire(p.pid, stream)
                guards.append(g)
                prm.data = self.tensor(g, p)
        except BaseException:
            for prm, p in params:
                prm.data = self.placeholder(p.dtype, p.shape)
            for g in guards:
                g.release()
            raise
        self.active.setdefault(id(module), []).append(guards)

    def post_hook(self, module, params):
        stack = self.active.get(id(module))
        if not stack:
            return
        guards = stack.pop()
        for prm, p in params:
            prm.data = self.placeholder(p.dtype, p.shape)
        # Each release records an event on the stream: the memory is not reused before
        # the kernels queued so far (the module's) are done.
        for g in guards:
            g.release()

    def close(self):
        # Nothing of the store's may be freed under kernels still running.
        self.torch.cuda.synchronize(self.cuda)
        for stack in self.active.values():
            for guards in stack:
                for g in guards:
                    if not g.released:
                        g.release()
        self.active.clear()
        for s in self.streams.values():
            s.close()
        self.streams.clear()
        self.store.close()
        self.mgr.close()


def offload(
    model,
    device_budget,
    host_budget=None,
    device=0,
    *,
    prefetch_depth=None,
    backend=None,
    checksums=False,
    planner="static",
    spare_slots=None,
):
    """Offloads ``model``'s parameters to hetmem's tier store: a drop-in for
    ``accelerate.cpu_offload(model)`` for inference (run under torch.no_grad()).

    Every parameter is registered with the store (hetmem copies its bytes to host
    memory; the CPU tensor is then let go, so the model is held once on the host, in
    pinned memory once it has been loaded) and replaced by a placeholder that owns no
    memory. A forward pre-hook on each module that owns parameters acquires them on
    the current CUDA stream and points ``param.data`` at hetmem's device memory, zero
    copy; a forward post-hook puts the placeholders back and releases them. The store
    learns the execution order on the first forward and prefetches along it from the
    second. Buffers (small) are moved to the device once, as accelerate does.

    ``device_budget``: device bytes the resident parameters may use. ``host_budget``:
    pinned host bytes (default: enough for the whole model plus the staging ring).
    ``backend``: hetmem backend (default $HETMEM_BACKEND, else automatic; it must be
    the GPU's: "cuda", or "rocm" under ROCm PyTorch). ``planner``: what stays on the
    device, ``"static"`` (default: the largest parameters for good, the rest streamed
    through room sized for them; a transformer's mixed sizes move about 10% fewer
    bytes than with ``"belady"``, the store's own default) or ``"belady"``.
    ``spare_slots``: room kept for streaming, in the largest streamed parameters
    (default: 1, or 2 when a module owns several parameters, which its hook holds at
    once, e.g. a weight and a bias).

    Parameters used outside their own module's forward (e.g. read by the parent
    module) are not loaded for that use; the models of transformers are fine.
    Returns the model; its store is ``model._hetmem_store`` (``.stats()``).

    Raises:
        BackendUnavailableError: hetmem's GPU backend cannot be opened.
        InvalidArgumentError: an unknown ``backend``, budgets the store cannot use
            (a host budget below its staging ring), or two parameters of one name.
        UnknownDeviceError: no such ``device``.
        OutOfMemoryError: a parameter larger than ``device_budget``, or the store's
            memory cannot be allocated.
        InvalidSizeError: a parameter hetmem cannot hold.
        UnknownNumaNodeError, NumaNodeWithoutMemoryError: the GPU's NUMA node has no
            memory for the store's staging ring.
        SystemCallError, DriverError: a system or driver call failed.
        ConfigError: the NUMA topology in sysfs cannot be read.
        UnsupportedError: the backend has no device (the host backend).
        RuntimeError: the backend is not a GPU's, or the model is offloaded already.
        ValueError: ``device_budget`` is not positive.
        ImportError: PyTorch is not installed.
    The hooks raise at forward time what TierStore.acquire raises.
    """
    torch = _torch()
    if getattr(model, "_hetmem_offload", None) is not None:
        raise RuntimeError("this model is offloaded already (remove_offload first)")
    if device_budget <= 0:
        raise ValueError("device_budget must be positive")
    mgr = Manager(backend if backend is not None else os.environ.get("HETMEM_BACKEND"))
    try:
        if mgr.backend not in _GPU_BACKENDS:
            raise RuntimeError(
                f"offload needs hetmem's GPU backend, got {mgr.backend!r} "
                "(check HETMEM_BACKEND and that the CUDA driver is found)"
            )
        # Modules that own parameters, and the distinct parameters (tied ones once).
        owners = []
        seen = {}
        for module in model.modules():
            own = [(n, p) for n, p in module._parameters.items() if p is not None]
            if own:
                owners.append((module, own))
                for _, p in own:
                    seen.setdefault(id(p), p)
        sizes = [p.numel() * p.element_size() for p in seen.values()]
        if spare_slots is None:
            spare_slots = 2 if any(len(own) > 1 for _, own in owners) else 1
        if host_budget is None:
            host_budget = sum(_pinned_bytes(n) for n in sizes if n) + (16 << 20) + (64 << 20)
        store = TierStore(
            mgr,
            device_budget,
            host_budget,
            learn=True,
            device=device,
            prefetch_depth=prefetch_depth,
            checksums=checksums,
            planner=planner,
            spare_slots=spare_slots,
        )
    except BaseException:
        mgr.close()
        raise
    st = _Offload(torch, mgr, store, device)
    try:
        names = {id(p): n for n, p in model.named_parameters(remove_duplicate=True)}
        for module, own in owners:
            entries = []
            for _, prm in own:
                key = id(prm)
                if key not in st.params:
                    with torch.no_grad():
                        t = prm.data
                        if t.device.type != "cpu":
                            t = t.to("cpu")
                        t = t.contiguous()
                        nbytes = t.numel() * t.element_size()
                        if nbytes == 0:
                            prm.data = t.to(st.cuda)
                            continue
                        pid = store.register(names.get(key, f"param{len(st.params)}"),
                                             t.data_ptr(), nbytes)
                        p = _Param(pid, t.dtype, tuple(t.shape), nbytes)
                        # hetmem holds a copy now: let the CPU storage go.
                        prm.data = st.placeholder(p.dtype, p.shape)
                        del t
                    st.params[key] = (prm, p)
                entries.append((prm, st.params[key][1]))
            if entries:
                st.modules.append((module, entries))
        for module in model.modules():
            for name, b in list(module._buffers.items()):
                if b is not None and b.device != st.cuda:
                    st.buffers.append((module, name, b.device))
                    module._buffers[name] = b.to(st.cuda)
        for module, entries in st.modules:
            st.hooks.append(
                module.register_forward_pre_hook(
                    lambda m, args, _e=entries: st.pre_hook(m, _e)
                )
            )
            post = lambda m, args, out, _e=entries: st.post_hook(m, _e)  # noqa: E731
            try:
                h = module.register_forward_hook(post, always_call=True)
            except TypeError:  # PyTorch before 2.1: no always_call
                h = module.register_forward_hook(post)
            st.hooks.append(h)
    except BaseException:
        for h in st.hooks:
            h.remove()
        try:
            _restore(st)  # the parameters registered so far get their bytes back
        finally:
            st.close()
        raise
    model._hetmem_offload = st
    model._hetmem_store = store
    return model


def remove_offload(model, restore=True):
    """Undoes offload(): removes the hooks and, with ``restore``, gives every
    parameter its bytes back as a CPU tensor (read from the store) and moves buffers
    back where they were; then closes the store. Without ``restore`` the parameters
    stay placeholders (the model is unusable; use it to free everything quickly).

    Raises:
        RuntimeError: the model is not offloaded by hetmem.
        DriverError: reading a parameter back from the device failed (the store is
            closed all the same).
    """
    st = getattr(model, "_hetmem_offload", None)
    if st is None:
        raise RuntimeError("this model is not offloaded by hetmem")
    for h in st.hooks:
        h.remove()
    st.hooks.clear()
    try:
        if restore:
            _restore(st)
    finally:
        st.close()
        del model._hetmem_offload
        del model._hetmem_store
    return model


def _restore(st):
    """Gives every registered parameter its bytes back as a CPU tensor (read from the
    store), and moves the buffers back where they were."""
    torch = st.torch
    with torch.no_grad():
        for prm, p in st.params.values():
            t = torch.empty(p.shape, dtype=p.dtype, device="cpu")
            st.store.read_into(p.pid, t.data_ptr(), p.nbytes)
            prm.data = t
        for module, name, dev in st.buffers:
            b = module._buffers.get(name)
            if b is not None:
                module._buffers[name] = b.to(dev)
