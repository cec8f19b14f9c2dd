"""hetmem as PyTorch's allocator with the C++ hooks (record_stream, empty_cache, graph
pools) and without them (the Python fallback), on the fake torch of fake_torch.py, whose
FakeHooksLibrary stands in for hetmem/torch_hooks.cpp; the build and cache of that
piece with a stand-in compiler; and, where $HETMEM_TORCH_PYTHON names a Python with a
CUDA build of PyTorch (no GPU needed), the real piece built and driven through PyTorch.
Stream ordering itself is tested in Rust (src/ffi/torch.rs) on the simulator's clock."""

import ctypes
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import types
import unittest
import warnings
from unittest import mock

HERE = os.path.dirname(os.path.abspath(__file__))
PYROOT = os.path.dirname(HERE)
for p in (PYROOT, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

import fake_torch as torch  # noqa: E402
import hetmem  # noqa: E402
import hetmem.torch as ht  # noqa: E402
from hetmem import _lib, _torch_hooks  # noqa: E402

MIB = 1 << 20
GRAPHS = "CUDA graph capture with hetmem's allocator is not supported yet"


def reserved():
    devs = ht.hetmem_allocator_stats()["devices"]
    return sum(d["reserved"] for d in devs)


class FakeTorchCase(unittest.TestCase):
    def setUp(self):
        patch = mock.patch.dict(sys.modules, {"torch": torch})
        patch.start()
        self.addCleanup(patch.stop)
        self.reset()
        self.addCleanup(self.reset)
        self.lib = _lib.load()
        self.cuda = torch.device("cuda", 0)

    @staticmethod
    def reset():
        torch._reset_allocator()
        ht._allocator = None
        ht._hooks_error = None
        _torch_hooks._keep.clear()

    def tensor(self, n):
        p = self.lib.hetmem_torch_malloc(n, 0, None)
        self.assertTrue(p, hetmem.last_error())
        return torch.Tensor(p, torch.uint8, (n,), self.cuda)

    def free(self, t):
        self.lib.hetmem_torch_free(t.ptr, t.numel(), 0, None)


class TestWithTheHooks(FakeTorchCase):
    def setUp(self):
        super().setUp()
        self.hooks = torch.FakeHooksLibrary()
        patch = mock.patch.object(_torch_hooks, "load", lambda _torch: self.hooks)
        patch.start()
        self.addCleanup(patch.stop)

    def test_record_stream_empty_cache_and_graphs_reach_hetmem(self):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback warning
            alloc = ht.use_hetmem_allocator()
        self.assertIs(ht.use_hetmem_allocator(), alloc)
        self.assertEqual(ht.allocator_hooks(), {"installed": True})
        a = torch._Allocators.current
        self.assertIsNotNone(a.record_stream_fn)

        # record_stream reaches hetmem: its own stream is fine; memory that is not
        # hetmem's is ignored, as PyTorch's own allocator ignores memory it did not make.
        t = self.tensor(MIB)
        t.record_stream(torch.cuda.Stream(0))
        inside = torch.Tensor(t.ptr + 4096, torch.uint8, (16,), self.cuda)
        inside.record_stream(torch.cuda.Stream(0))
        buf = ctypes.create_string_buffer(64)
        foreign = torch.Tensor(ctypes.addressof(buf), torch.uint8, (64,), self.cuda)
        foreign.record_stream(torch.cuda.Stream(0))
        self.assertIn("hetmem_torch_record_stream", hetmem.last_error())
        if os.environ.get("HETMEM_BACKEND") == "sim":
            # Any other failure raises: a value that is no stream of the simulator's.
            with self.assertRaises(RuntimeError) as cm:
                t.record_stream(torch.cuda.Stream(0xDEAD))
            self.assertIn("hetmem_torch_record_stream", str(cm.exception))
        self.free(t)

        # torch.cuda.empty_cache() gives hetmem's cached memory back.
        before = reserved()
        self.assertGreaterEqual(before, MIB)
        torch.cuda.empty_cache()
        self.assertLess(reserved(), before)

        # Graph capture fails before it starts, with the message PyTorch raises.
        with self.assertRaises(RuntimeError) as cm:
            with torch.cuda.graph(torch.cuda.CUDAGraph()):
                self.fail("the capture began")
        self.assertIn(GRAPHS, str(cm.exception))
        with self.assertRaises(RuntimeError) as cm:
            with torch.cuda.use_mem_pool(torch.cuda.MemPool()):
                self.fail("allocations went to a pool")
        self.assertIn(GRAPHS, str(cm.exception))
        # End and release of a pool hetmem never began: end raises; release (called
        # from destructors) only reports.
        with self.assertRaises(RuntimeError) as cm:
            a.end_allocate_to_pool_fn(0, (7, 0))
        self.assertIn(GRAPHS, str(cm.exception))
        a.release_pool_fn(0, (7, 0))
        self.assertEqual(len(self.hooks.release_messages), 1)
        self.assertIn(GRAPHS, self.hooks.release_messages[0])

    def test_hooks_are_set_only_on_hetmem_s_allocator(self):
        ht.use_hetmem_allocator()
        # A table whose malloc is not the one the allocator was made with.
        with self.assertRaises(_torch_hooks.HooksUnavailable) as cm:
            _torch_hooks.install(torch, self.lib, "hetmem_torch_malloc")
        self.assertIn("not hetmem's", str(cm.exception))
        torch._reset_allocator()
        with self.assertRaises(_torch_hooks.HooksUnavailable):
            _torch_hooks.install(torch, self.lib, "hetmem_torch_malloc_cxx")


class TestWithoutTheHooks(FakeTorchCase):
    def test_fallback_warns_and_record_stream_raises(self):
        # The real build: this fake torch has no C++ headers, so it cannot succeed.
        with self.assertWarns(RuntimeWarning) as w:
            ht.use_hetmem_allocator()
        msg = str(w.warning)
        self.assertIn("could not be set", msg)
        self.assertIn("record_stream() raises", msg)
        info = ht.allocator_hooks()
        self.assertFalse(info["installed"])
        self.assertIn(info["reason"], msg)
        self.assertIsNone(torch._Allocators.current.record_stream_fn)

        t = self.tensor(MIB)
        with self.assertRaises(RuntimeError) as cm:
            t.record_stream(torch.cuda.Stream(0))
        self.assertIn("record_stream is not available", str(cm.exception))
        self.assertIn(info["reason"], str(cm.exception))
        self.free(t)

        before = reserved()
        torch.cuda.empty_cache()
        self.assertLess(reserved(), before)

        with self.assertRaises(RuntimeError) as cm:
            with torch.cuda.graph(torch.cuda.CUDAGraph()):
                self.fail("the capture began")
        self.assertIn(GRAPHS, str(cm.exception))
        with self.assertRaises(RuntimeError) as cm:
            with torch.cuda.use_mem_pool(torch.cuda.MemPool()):
                self.fail("allocations went to a pool")
        self.assertIn(GRAPHS, str(cm.exception))


def fake_torch_tree(root, cuda_major="13", headers=True, crt=True):
    """A directory laid out like an installed torch plus the nvidia wheels."""
    tdir = os.path.join(root, "site", "torch")
    os.makedirs(os.path.join(tdir, "lib"))
    if headers:
        h = os.path.join(tdir, "include", "torch", "csrc", "cuda")
        os.makedirs(h)
        open(os.path.join(h, "CUDAPluggableAllocator.h"), "w").close()
    inc = os.path.join(root, "site", "nvidia", f"cu{cuda_major}", "include")
    os.makedirs(os.path.join(inc, "crt"))
    open(os.path.join(inc, "cuda_runtime_api.h"), "w").close()
    if crt:
        open(os.path.join(inc, "crt", "host_defines.h"), "w").close()
    return types.SimpleNamespace(
        __file__=os.path.join(tdir, "__init__.py"),
        __version__="2.11.0+test",
        version=types.SimpleNamespace(cuda=f"{cuda_major}.0"),
        _C=types.SimpleNamespace(_GLIBCXX_USE_CXX11_ABI=True),
    ), inc


class TestBuild(unittest.TestCase):
    """The build and its cache, with a stand-in compiler that logs its calls."""

    def setUp(self):
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.root = tmp.name
        self.log = os.path.join(self.root, "calls")
        self.cxx = os.path.join(self.root, "cxx")
        with open(self.cxx, "w") as f:
            f.write(textwrap.dedent(f"""\
                #!/bin/sh
                echo "$@" >> {self.log}
                [ -n "$FAIL_BUILD" ] && {{ echo "error: it broke" >&2; exit 1; }}
                while [ $# -gt 0 ]; do [ "$1" = -o ] && echo built > "$2"; shift; done
                """))
        os.chmod(self.cxx, 0o755)
        env = {"CXX": self.cxx, "HETMEM_CACHE_DIR": os.path.join(self.root, "cache"),
               "CUDA_HOME": "", "CUDA_PATH": "", "HETMEM_TORCH_HOOKS_LIB": ""}
        patch = mock.patch.dict(os.environ, env)
        patch.start()
        self.addCleanup(patch.stop)

    def calls(self):
        if not os.path.exists(self.log):
            return []
        with open(self.log) as f:
            return f.read().splitlines()

    def test_builds_once_and_caches_by_torch_version(self):
        fake, inc = fake_torch_tree(self.root)
        with mock.patch.object(sys, "path", [os.path.join(self.root, "site")]):
            out = _torch_hooks.build(fake)
            self.assertEqual(_torch_hooks.build(fake), out)
        self.assertEqual(len(self.calls()), 1, self.calls())
        self.assertTrue(out.startswith(os.path.join(self.root, "cache", "torch_hooks-2.11.0_test-")))
        args = self.calls()[0]
        for want in ("-std=c++17", "-D_GLIBCXX_USE_CXX11_ABI=1", f"-isystem {inc}",
                     "-lc10_cuda", "-ltorch_cuda", _torch_hooks.SOURCE):
            self.assertIn(want, args)
        self.assertEqual(os.listdir(os.path.join(self.root, "cache")), [os.path.basename(out)])

    def test_failures_say_why(self):
        fake, _ = fake_torch_tree(self.root)
        with mock.patch.dict(os.environ, {"FAIL_BUILD": "1"}):
            with self.assertRaises(_torch_hooks.HooksUnavailable) as cm:
                _torch_hooks.build(fake)
        self.assertIn("error: it broke", str(cm.exception))
        self.assertEqual(os.listdir(os.path.join(self.root, "cache")), [])  # no half file

        with mock.patch.dict(os.environ, {"CXX": "", "PATH": self.root}):
            with self.assertRaises(_torch_hooks.HooksUnavailable) as cm:
                _torch_hooks.build(fake)
        self.assertIn("no C++ compiler", str(cm.exception))

        with mock.patch.dict(os.environ, {"HETMEM_TORCH_HOOKS_LIB": "/nonexistent.so"}):
            with self.assertRaises(_torch_hooks.HooksUnavailable) as cm:
                _torch_hooks.build(fake)
        self.assertIn("HETMEM_TORCH_HOOKS_LIB", str(cm.exception))

        # A prebuilt library is taken only for the torch it was built for.
        for name, ok in (("torch_hooks-2.10.0.so", False), ("torch_hooks-2.11.0_test.so", True),
                         ("torch_hooks-2.11.0_test-0123abcd.so", True), ("mine.so", True)):
            lib = os.path.join(self.root, name)
            open(lib, "w").close()
            with mock.patch.dict(os.environ, {"HETMEM_TORCH_HOOKS_LIB": lib}):
                if ok:
                    self.assertEqual(_torch_hooks.build(fake), lib)
                else:
                    with self.assertRaises(_torch_hooks.HooksUnavailable) as cm:
                        _torch_hooks.build(fake)
                    self.assertIn("another PyTorch", str(cm.exception))
        self.assertEqual(len(self.calls()), 1)  # the failed build only

    def test_missing_headers_name_what_to_install(self):
        root = os.path.join(self.root, "a")
        fake, _ = fake_torch_tree(root, crt=False)
        with mock.patch.object(sys, "path", []), \
                self.assertRaises(_torch_hooks.HooksUnavailable) as cm:
            _torch_hooks.cuda_include_dirs(fake)
        self.assertIn("crt/host_defines.h", str(cm.exception))
        self.assertIn("nvidia-cuda-crt==13.0.*", str(cm.exception))
        root = os.path.join(self.root, "b")
        fake, _ = fake_torch_tree(root, headers=False)
        with self.assertRaises(_torch_hooks.HooksUnavailable) as cm:
            _torch_hooks.build(fake)
        self.assertIn("CUDAPluggableAllocator.h", str(cm.exception))


REAL_CHILD = r"""
import ctypes, json, os, sys
import torch
import hetmem
import hetmem.torch as ht
from hetmem import _lib, _torch_hooks

out = {"torch": torch.__version__}
ht.use_hetmem_allocator()
out["hooks"] = ht.allocator_hooks()
lib = _lib.load()

# record_stream through PyTorch's own dispatch (c10's recordStream -> the allocator's
# hook): a probe built like the hooks, since a CUDA tensor needs a GPU.
probe_so = os.path.join(_torch_hooks.cache_dir(), "probe.so")
cmd = _torch_hooks.build_command(torch, probe_so, source=sys.argv[1])
import subprocess
subprocess.run(cmd, check=True, capture_output=True)
probe = ctypes.CDLL(probe_so)
probe.probe_record_stream.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p,
                                      ctypes.c_size_t]
err = ctypes.create_string_buffer(1024)
p = lib.hetmem_torch_malloc(1 << 20, 0, None)
out["record_live"] = probe.probe_record_stream(p, None, err, 1024)
# No stream of the simulator's (aligned as a real one, which PyTorch checks):
# hetmem's error, thrown by the hook.
out["record_bad_stream"] = probe.probe_record_stream(p, 0xDEAD000, err, 1024)
out["record_bad_stream_error"] = err.value.decode()
lib.hetmem_torch_free(p, 1 << 20, 0, None)
# Not hetmem's memory (any more): ignored, as PyTorch's own allocator does.
out["record_freed"] = probe.probe_record_stream(p, None, err, 1024)
out["record_freed_last_error"] = hetmem.last_error()

# empty_cache through torch._C (torch.cuda.empty_cache() skips it without a GPU).
def reserved():
    return sum(d["reserved"] for d in ht.hetmem_allocator_stats()["devices"])
out["reserved_before"] = reserved()
torch._C._cuda_emptyCache()
out["reserved_after"] = reserved()

# The graph-pool hooks, as torch.cuda.graph and use_mem_pool reach them.
try:
    torch._C._cuda_beginAllocateCurrentThreadToPool(0, (0, 1))
    out["begin"] = "no error"
except RuntimeError as e:
    out["begin"] = str(e)
try:
    torch._C._cuda_endAllocateToPool(0, (0, 1))
    out["end"] = "no error"
except RuntimeError as e:
    out["end"] = str(e)
torch._C._cuda_releasePool(0, (0, 1))  # reports on stderr, never raises
out["released"] = True

# The installer refuses an allocator that is not hetmem's.
try:
    _torch_hooks.install(torch, lib, "hetmem_torch_malloc")
    out["other_allocator"] = "installed"
except _torch_hooks.HooksUnavailable as e:
    out["other_allocator"] = str(e)
print("RESULT " + json.dumps(out))
"""


@unittest.skipUnless(os.environ.get("HETMEM_TORCH_PYTHON"),
                     "set HETMEM_TORCH_PYTHON to a Python with a CUDA build of PyTorch")
class TestRealTorch(unittest.TestCase):
    """The real torch_hooks.cpp, built against the PyTorch of $HETMEM_TORCH_PYTHON (a
    CUDA build; no GPU needed) and called by PyTorch's own C++ (c10's allocator
    dispatch) on hetmem's simulator."""

    def test_real_hooks(self):
        with tempfile.TemporaryDirectory() as d:
            env = dict(os.environ, PYTHONPATH=PYROOT, HETMEM_BACKEND="sim",
                       HETMEM_CACHE_DIR=os.environ.get("HETMEM_CACHE_DIR", d))
            r = subprocess.run(
                [os.environ["HETMEM_TORCH_PYTHON"], "-c", REAL_CHILD,
                 os.path.join(HERE, "torch_hooks_probe.cpp")],
                env=env, capture_output=True, text=True, timeout=600)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")][-1]
        out = json.loads(line[7:])
        self.assertEqual(out["hooks"], {"installed": True}, out)
        self.assertEqual(out["record_live"], 0, out)
        self.assertNotEqual(out["record_bad_stream"], 0, out)
        self.assertIn("hetmem_torch_record_stream", out["record_bad_stream_error"])
        self.assertEqual(out["record_freed"], 0, out)
        self.assertIn("no live block", out["record_freed_last_error"])
        self.assertGreater(out["reserved_before"], out["reserved_after"])
        self.assertIn(GRAPHS, out["begin"])
        self.assertIn(GRAPHS, out["end"])
        self.assertIn("hetmem_torch_release_pool", r.stderr)
        self.assertIn("not hetmem's", out["other_allocator"])


if __name__ == "__main__":
    unittest.main()
