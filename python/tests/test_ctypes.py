"""Tests of hetmem's Python package (ctypes layer) on the simulated GPU.

Run from the repository root:
    HETMEM_BACKEND=sim PYTHONPATH=python python3 -m unittest discover -s python/tests -v
(tests/it/python.rs runs exactly this with HETMEM_LIB set to the cdylib cargo built).
"""

import array
import ctypes
import importlib.util
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
PYROOT = os.path.dirname(HERE)
REPO = os.path.dirname(PYROOT)
if PYROOT not in sys.path:
    sys.path.insert(0, PYROOT)

os.environ.setdefault("HETMEM_BACKEND", "sim")
# The backend the default Manager() opens: sim, or cuda over the fake driver (tests/it/python.rs).
BACKEND = os.environ["HETMEM_BACKEND"]

import hetmem  # noqa: E402
from hetmem import _lib  # noqa: E402
from hetmem import DEVICE, HOST, MANAGED, PINNED, HetmemError  # noqa: E402

MIB = 1 << 20
HAVE_TORCH = importlib.util.find_spec("torch") is not None


def read_header():
    with open(os.path.join(REPO, "include", "hetmem.h")) as f:
        return f.read()


def pattern(n, seed):
    """n deterministic bytes that differ by seed."""
    return bytes((i * 31 + seed * 7 + (i >> 8)) & 0xFF for i in range(n))


def big_pattern(n, seed):
    block = pattern(4096, seed)
    return (block * (n // 4096 + 1))[:n]


class ErrorAssertions(unittest.TestCase):
    def assertHetmemError(self, name, fn, *args, **kwargs):
        with self.assertRaises(HetmemError) as cm:
            fn(*args, **kwargs)
        self.assertEqual(cm.exception.name, name, str(cm.exception))
        self.assertEqual(cm.exception.code, getattr(_lib, name), str(cm.exception))
        # Raised as the class of its code.
        self.assertIs(type(cm.exception), hetmem.ERRORS[cm.exception.code])
        return cm.exception


class TestLibrary(unittest.TestCase):
    def test_version_matches_the_header(self):
        header = read_header()
        want = re.search(r'#define HETMEM_VERSION "([^"]+)"', header).group(1)
        self.assertEqual(hetmem.version(), want)

    def test_every_header_function_is_declared(self):
        header = read_header()
        names = set(_lib.parse_declarations(header))
        self.assertGreater(len(names), 40)
        # Every function, with the header's own types and parameter names.
        self.assertEqual(_lib.parse_declarations(_lib.DECLARATIONS),
                         _lib.parse_declarations(header), "header vs _lib.DECLARATIONS")
        lib = _lib.load()
        self.assertEqual(set(lib.functions()), names)
        for name, fn in lib.functions().items():
            self.assertEqual(fn._fn.argtypes, [_lib.TYPES[t].ctype for t, _ in fn.params], name)
            self.assertIs(fn._fn.restype, _lib.RESULTS[fn.result], name)

    def test_constants_match_the_header(self):
        header = read_header()
        consts = dict(re.findall(r"#define (HETMEM_[A-Z_0-9]+) (-?\d+)\b", header))
        consts = {k: int(v) for k, v in consts.items() if not k.startswith("HETMEM_VERSION")}
        self.assertGreater(len(consts), 30)
        for k, v in consts.items():
            self.assertEqual(getattr(_lib, k), v, k)

    def test_config_struct_matches_the_library(self):
        lib = _lib.load()
        self.assertEqual(
            lib.hetmem_store_config_size(), ctypes.sizeof(_lib.hetmem_store_config_t)
        )

    def test_library_path_honours_HETMEM_LIB(self):
        if os.environ.get("HETMEM_LIB"):
            self.assertEqual(hetmem.library_path(), os.path.realpath(os.environ["HETMEM_LIB"]))
        self.assertTrue(os.path.isfile(hetmem.library_path()))

    def _run_isolated(self, env_lib):
        """Imports a copy of the package that is outside the repository."""
        tmp = tempfile.mkdtemp()
        try:
            shutil.copytree(os.path.join(PYROOT, "hetmem"), os.path.join(tmp, "hetmem"),
                            ignore=shutil.ignore_patterns("__pycache__"))
            env = dict(os.environ, PYTHONPATH=tmp, PYTHONDONTWRITEBYTECODE="1")
            env.pop("CARGO_TARGET_DIR", None)
            env.pop("HETMEM_LIB", None)
            if env_lib is not None:
                env["HETMEM_LIB"] = env_lib
            code = (
                "import hetmem\n"
                "try:\n"
                "    hetmem.Manager('sim')\n"
                "except ImportError as e:\n"
                "    print('IMPORTERROR', type(e).__name__, e)\n"
            )
            return subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp,
                                  capture_output=True, text=True, timeout=60)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def test_missing_library_is_a_clear_import_error(self):
        out = self._run_isolated(None)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertIn("IMPORTERROR LibraryNotFound", out.stdout)
        self.assertIn("cargo build --release", out.stdout)
        self.assertIn("target/release/libhetmem.so", out.stdout)
        self.assertIn("deps/libhetmem.so", out.stdout)

    def test_bad_HETMEM_LIB_is_a_clear_import_error(self):
        out = self._run_isolated("/nonexistent/libhetmem.so")
        self.assertIn("IMPORTERROR LibraryNotFound", out.stdout)
        self.assertIn("HETMEM_LIB='/nonexistent/libhetmem.so' is not a file", out.stdout)

    def test_wrong_calls_fail_in_python(self):
        lib = _lib.load()
        with hetmem.Manager("sim") as mgr:
            s = mgr.stream()
            # A stream handle where a manager is expected (ctypes' check, as TypeError).
            with self.assertRaisesRegex(TypeError, "hetmem_free: .*LP_hetmem_manager_t"):
                lib.hetmem_free(s.handle, None)
            # A str where a size is expected.
            with self.assertRaisesRegex(TypeError, r"hetmem_alloc: size \(size_t\)"):
                lib.hetmem_alloc(mgr.handle, 0, -1, "4096", None)
            # Too few arguments.
            with self.assertRaises(TypeError):
                lib.hetmem_copy(mgr.handle, 0, 0)
            s.close()


class TestManager(ErrorAssertions):
    def setUp(self):
        self.mgr = hetmem.Manager()  # HETMEM_BACKEND

    def tearDown(self):
        self.mgr.close()

    def test_backend_and_devices(self):
        self.assertEqual(self.mgr.backend, BACKEND)
        self.assertGreaterEqual(self.mgr.device_count, 1)
        free, total = self.mgr.mem_info(0)
        self.assertGreater(total, 0)
        self.assertLessEqual(free, total)
        self.assertIn(BACKEND, repr(self.mgr))

    def test_alloc_every_placement_and_round_trip(self):
        n = MIB
        data = big_pattern(n, 1)
        bufs = {}
        for placement in (HOST, PINNED, DEVICE, MANAGED):
            b = self.mgr.alloc(placement, n)
            self.assertEqual(b.size, n)
            self.assertNotEqual(b.ptr, 0)
            bufs[placement] = b
        by_name = self.mgr.alloc("pinned", 4096)
        self.assertEqual(by_name.placement, PINNED)
        by_name.free()
        # host -> device -> managed -> pinned, then read back each.
        bufs[HOST].write(data)
        bufs[DEVICE].copy_from(bufs[HOST])
        bufs[MANAGED].copy_from(bufs[DEVICE])
        bufs[DEVICE].copy_to(bufs[PINNED])
        for placement, b in bufs.items():
            self.assertEqual(b.read(), data, f"placement {placement}")
        # Host-addressable memory is visible to the CPU directly.
        self.assertEqual(bytes(bufs[PINNED].host_view()[:64]), data[:64])
        self.assertEqual(bytes(bufs[MANAGED].host_view()[n - 64:]), data[n - 64:])
        with self.assertRaises(ValueError):
            bufs[DEVICE].host_view()
        # Offsets inside buffers.
        bufs[DEVICE].write(b"hetmem!", offset=4096)
        self.assertEqual(bufs[DEVICE].read(7, offset=4096), b"hetmem!")
        self.mgr.copy(bufs[HOST].ptr + 100, bufs[DEVICE].ptr + 4096, 7)
        self.assertEqual(bufs[HOST].read(7, offset=100), b"hetmem!")
        # read_into a caller buffer.
        out = bytearray(16)
        bufs[DEVICE].read_into(out, 7, offset=4096)
        self.assertEqual(bytes(out[:7]), b"hetmem!")
        for b in bufs.values():
            b.free()
        self.assertTrue(all(b.freed for b in bufs.values()))
        self.assertEqual(self.mgr.stats()["live_buffers"], 0)

    def test_write_accepts_buffers_ctypes_and_addresses(self):
        b = self.mgr.alloc(DEVICE, 64)
        b.write(bytearray(b"A" * 8))
        b.write(memoryview(b"B" * 8), offset=8)
        b.write(array.array("I", [0x44434343]), offset=16)  # "CCCD" little endian
        cbuf = ctypes.create_string_buffer(b"EEEE", 4)
        b.write(cbuf, offset=20)
        b.write(ctypes.addressof(cbuf), offset=24, n=2)
        self.assertEqual(b.read(26), b"A" * 8 + b"B" * 8 + b"CCCD" + b"EEEE" + b"EE")
        with self.assertRaises(TypeError):
            b.write(ctypes.addressof(cbuf))  # an address needs a size
        with self.assertRaises(ValueError):
            b.write(b"xy", n=3)
        b.free()

    def test_errors_have_codes_names_and_messages(self):
        b = self.mgr.alloc(DEVICE, 4096)
        ptr = b.ptr
        b.free()
        # Double free through the manager: the library says FOREIGN_POINTER.
        e = self.assertHetmemError("HETMEM_ERR_FOREIGN_POINTER", self.mgr.free, ptr)
        self.assertIn("hetmem_free", e.message)
        # Double free through the Buffer: refused before C.
        self.assertHetmemError("HETMEM_ERR_FOREIGN_POINTER", b.free)
        self.assertHetmemError("HETMEM_ERR_INVALID_SIZE", self.mgr.alloc, DEVICE, 0)
        self.assertHetmemError("HETMEM_ERR_INVALID_SIZE", self.mgr.alloc, HOST, 0)
        foreign = ctypes.create_string_buffer(64)
        self.assertHetmemError(
            "HETMEM_ERR_FOREIGN_POINTER", self.mgr.free, ctypes.addressof(foreign)
        )
        self.assertHetmemError("HETMEM_ERR_FOREIGN_POINTER", self.mgr.free, 0xDEADBEEF)
        self.assertHetmemError("HETMEM_ERR_NULL_POINTER", self.mgr.free, 0)
        self.assertHetmemError("HETMEM_ERR_UNKNOWN_DEVICE", self.mgr.alloc, DEVICE, 64, 99)
        self.assertHetmemError("HETMEM_ERR_UNKNOWN_NUMA_NODE", self.mgr.alloc, HOST, 64, 999)
        self.assertHetmemError("HETMEM_ERR_INVALID_ARGUMENT", self.mgr.alloc, 42, 64)
        self.assertHetmemError("HETMEM_ERR_OUT_OF_MEMORY", self.mgr.alloc, DEVICE, 1 << 62)
        with self.assertRaises(ValueError):
            self.mgr.alloc("vram", 64)
        with self.assertRaises(ValueError):
            self.mgr.alloc(DEVICE, -1)
        d = self.mgr.alloc(DEVICE, 4096)
        self.assertHetmemError("HETMEM_ERR_OUT_OF_BOUNDS", d.write, b"x" * 4097)
        self.assertHetmemError("HETMEM_ERR_OUT_OF_BOUNDS", d.read, 16, 4090)
        self.assertHetmemError(
            "HETMEM_ERR_FOREIGN_POINTER", self.mgr.copy, d, ctypes.addressof(foreign), 16
        )
        d.free()
        # After a success the last error is empty again.
        self.mgr.alloc(HOST, 64).free()
        self.assertEqual(hetmem.last_error(), "")
        self.assertEqual(hetmem.status_string(-22), "HETMEM_ERR_FOREIGN_POINTER")
        self.assertEqual(hetmem.status_string(12345), "HETMEM_ERR_UNKNOWN_STATUS")

    def test_bad_backend_and_closed_manager(self):
        self.assertHetmemError("HETMEM_ERR_INVALID_ARGUMENT", hetmem.Manager, "no-such")
        m = hetmem.Manager("sim")
        b = m.alloc(DEVICE, 4096)
        m.close()
        m.close()  # closing twice is fine
        self.assertTrue(m.closed)
        self.assertHetmemError("HETMEM_ERR_INVALID_HANDLE", m.alloc, DEVICE, 64)
        self.assertHetmemError("HETMEM_ERR_INVALID_HANDLE", lambda: m.backend)
        self.assertHetmemError("HETMEM_ERR_INVALID_HANDLE", b.read)
        # A stale handle passed to C directly is an error code, not a crash.
        lib = _lib.load()
        rc = lib.hetmem_manager_destroy(ctypes.cast(ctypes.c_void_p(0x1234), _lib.ManagerP))
        self.assertEqual(rc, _lib.HETMEM_ERR_INVALID_HANDLE)

    def test_context_managers_free(self):
        with hetmem.Manager("sim") as m:
            with m.alloc(DEVICE, 4096) as b:
                b.write(b"x")
                self.assertEqual(m.stats()["live_buffers"], 1)
            self.assertTrue(b.freed)
            self.assertEqual(m.stats()["live_buffers"], 0)
            m.alloc(DEVICE, 4096)  # dropped at once: freed by the garbage collector
            self.assertEqual(m.stats()["live_buffers"], 0)
        self.assertTrue(m.closed)

    def test_streams(self):
        n = 256 * 1024
        data = big_pattern(n, 3)
        pinned = self.mgr.alloc(PINNED, n)
        dev = self.mgr.alloc(DEVICE, n)
        with self.mgr.stream(0) as s:
            raw = s.raw
            self.assertNotEqual(raw, 0)
            pinned.write(data)
            dev.copy_from(pinned, stream=s)
            s.synchronize()
            self.assertEqual(dev.read(), data)
            # The caller's raw stream, wrapped (as offload wraps PyTorch's).
            w = hetmem.Stream.wrap(self.mgr, raw, 0)
            self.assertEqual(w.raw, raw)
            dev.write(data[::-1])
            pinned.copy_from(dev, stream=w)
            w.synchronize()
            self.assertEqual(bytes(pinned.host_view()), data[::-1])
            w.close()
            # Letting go of the wrapper left the stream usable.
            dev.copy_from(pinned, stream=s)
            s.synchronize()
        d0 = self.mgr.wrap_stream(0)
        self.assertEqual(d0.raw, 0)
        d0.close()
        d0.close()  # closing twice is fine
        self.assertHetmemError("HETMEM_ERR_INVALID_HANDLE", d0.synchronize)
        if BACKEND == "sim":
            # Only the simulator knows every stream there is; a driver cannot tell a
            # made-up handle from a real one.
            self.assertHetmemError("HETMEM_ERR_INVALID_ARGUMENT", hetmem.Stream.wrap, self.mgr,
                                   0x5EED)
        self.assertHetmemError("HETMEM_ERR_UNKNOWN_DEVICE", self.mgr.stream, 99)
        with hetmem.Manager("sim") as other:
            theirs = other.stream()
            self.assertHetmemError("HETMEM_ERR_FOREIGN_HANDLE", dev.copy_from, pinned,
                                   stream=theirs)
            theirs.close()
        with self.assertRaises(TypeError):
            dev.copy_from(pinned, stream=123)
        pinned.free()
        dev.free()

    def test_managed_prefetch_and_advise(self):
        n = 64 * 1024
        m = self.mgr.alloc(MANAGED, n)
        data = big_pattern(n, 5)
        ctypes.memmove(m.ptr, data, n)
        self.mgr.prefetch(m, n, 0)
        self.mgr.prefetch(m, n, -1)
        self.mgr.advise(m, n, _lib.HETMEM_ADVISE_SET_READ_MOSTLY, 0)
        self.assertEqual(m.read(), data)
        d = self.mgr.alloc(DEVICE, n)
        self.assertHetmemError("HETMEM_ERR_INVALID_ARGUMENT", self.mgr.prefetch, d, n, 0)
        m.free()
        d.free()

    def test_stats_dict(self):
        b = self.mgr.alloc(DEVICE, 3 * MIB)
        st = self.mgr.stats()
        for key in ("backend", "devices", "live_buffers", "live_bytes", "host", "pinned",
                    "device", "managed", "tier"):
            self.assertIn(key, st)
        self.assertEqual(st["backend"], BACKEND)
        self.assertEqual(st["live_buffers"], 1)
        self.assertEqual(st["live_bytes"], 3 * MIB)
        self.assertEqual(st["device"][0]["current"], 3 * MIB)
        self.assertIsNone(st["tier"])
        b.free()


    def test_fork_after_pinning(self):
        """A forked child (a fork-started DataLoader worker) gets ForkedError from the
        parent's objects and has no mapping of its pinned memory; closing and freeing
        there succeed; the parent carries on."""
        pinned = self.mgr.alloc(PINNED, 8 * MIB)
        pinned.write(b"\x42" * 4096)
        dev = self.mgr.alloc(DEVICE, MIB)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report through the pipe, never return into unittest
            os.close(r)
            msg = "ok"
            try:
                calls = {
                    "alloc": lambda: self.mgr.alloc(DEVICE, 4096),
                    "read": lambda: pinned.read(16),
                    "host_view": pinned.host_view,
                    "copy": lambda: dev.copy_from(pinned, 4096),
                    "mem_info": lambda: self.mgr.mem_info(0),
                }
                for name, call in calls.items():
                    try:
                        call()
                        msg = f"{name} did not raise"
                    except hetmem.ForkedError as e:
                        if e.name != "HETMEM_ERR_FORKED" or "forked" not in str(e):
                            msg = f"{name}: {e}"
                    if msg != "ok":
                        break
                at = pinned.ptr
                with open("/proc/self/maps") as f:
                    for line in f:
                        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                        if lo < at + pinned.size and at < hi:
                            msg = f"the pinned buffer is mapped in the child: {line}"
                pinned.free()
                dev.free()
                self.mgr.close()
            except BaseException as e:  # noqa: BLE001 - everything goes to the parent
                msg = repr(e)
            os.write(w, msg.encode())
            os._exit(0)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            msg = f.read().decode()
        _, status = os.waitpid(pid, 0)
        self.assertEqual((msg, status), ("ok", 0))
        self.assertTrue(issubclass(hetmem.ForkedError, HetmemError))
        self.assertEqual(pinned.read(4096), b"\x42" * 4096)
        dev.copy_from(pinned, MIB)
        self.assertEqual(dev.read(16), b"\x42" * 16)


class TestEvents(ErrorAssertions):
    """hetmem.Event over hetmem_event_*: ordering one stream's work after another's
    without a host wait, and what the calls refuse."""

    def setUp(self):
        self.mgr = hetmem.Manager()  # HETMEM_BACKEND

    def tearDown(self):
        self.mgr.close()

    def test_a_stream_waits_for_an_event_of_another(self):
        n = 256 * 1024
        data = big_pattern(n, 7)
        src = self.mgr.alloc(PINNED, n)
        dev = self.mgr.alloc(DEVICE, n)
        back = self.mgr.alloc(PINNED, n)
        src.write(data)
        with self.mgr.stream() as s1, self.mgr.stream() as s2, self.mgr.event() as e:
            self.assertTrue(e.query(), "an event never recorded counts as passed")
            dev.copy_from(src, stream=s1)
            e.record(s1)
            s2.wait_event(e)  # no host wait: s2's copy runs after s1's
            back.copy_from(dev, stream=s2)
            s2.synchronize()
            self.assertEqual(back.read(), data)
            e.synchronize()
            self.assertTrue(e.query())
            e.record(s2)  # recorded again: now s2's tail
            e.synchronize()
        self.assertHetmemError("HETMEM_ERR_INVALID_HANDLE", e.query)  # the with closed it
        e.close()  # closing twice is fine
        for b in (src, dev, back):
            b.free()

    def test_an_event_outlives_its_manager(self):
        m = hetmem.Manager()
        e = hetmem.Event(m, 0)
        with m.stream() as s:
            e.record(s)
        m.close()
        e.synchronize()
        self.assertTrue(e.query())
        e.close()

    def test_events_refuse_what_is_not_theirs(self):
        self.assertHetmemError("HETMEM_ERR_INVALID_ARGUMENT", self.mgr.event, -1)
        self.assertHetmemError("HETMEM_ERR_UNKNOWN_DEVICE", self.mgr.event, 99)
        with self.assertRaises(OverflowError):
            self.mgr.event(1 << 31)
        e = self.mgr.event()
        s = self.mgr.stream()
        with self.assertRaises(TypeError):
            e.record(None)
        with self.assertRaises(TypeError):
            s.wait_event(None)
        with hetmem.Manager() as other:
            theirs, their_event = other.stream(), other.event()
            self.assertHetmemError("HETMEM_ERR_FOREIGN_HANDLE", e.record, theirs)
            self.assertHetmemError("HETMEM_ERR_FOREIGN_HANDLE", s.wait_event, their_event)
            theirs.close()
            their_event.close()
        s.close()
        self.assertHetmemError("HETMEM_ERR_INVALID_HANDLE", e.record, s)
        e.close()
        with hetmem.Manager("host") as host:
            self.assertHetmemError("HETMEM_ERR_UNKNOWN_DEVICE", host.event)

    def test_an_event_of_one_device_on_another(self):
        os.environ["HETMEM_SIM_DEVICES"] = "2"
        try:
            m = hetmem.Manager("sim")
        finally:
            del os.environ["HETMEM_SIM_DEVICES"]
        with m, m.event(0) as e, m.stream(1) as s1:
            self.assertEqual(m.device_count, 2)
            self.assertHetmemError("HETMEM_ERR_INVALID_ARGUMENT", e.record, s1)
            s1.wait_event(e)  # waiting across devices is allowed, as the drivers do


class TestTierStore(ErrorAssertions):
    SIZE = 3 * MIB  # four of them, room for two on the device

    def setUp(self):
        self.mgr = hetmem.Manager("sim")
        self.data = [big_pattern(self.SIZE, 10 + i) for i in range(4)]

    def tearDown(self):
        self.mgr.close()

    def make(self, learn=True, **kw):
        # A 3 MiB parameter takes two whole 2 MiB pages on the device: room for two.
        store = hetmem.TierStore(self.mgr, 2 * 4 * MIB + MIB, 64 * MIB, learn=learn, **kw)
        ids = [store.register(f"layer.{i}", d) for i, d in enumerate(self.data)]
        self.assertEqual(ids, [0, 1, 2, 3])
        return store, ids

    def test_register_acquire_release_read(self):
        store, ids = self.make(checksums=True)
        self.assertEqual(store.lookup("layer.2"), 2)
        self.assertEqual(store.param_size(3), self.SIZE)
        self.assertEqual(store.residency(0), ("cold", 0))
        with self.mgr.stream() as s:
            with store.acquire(0, s) as g:
                self.assertNotEqual(g.ptr, 0)
                self.assertEqual(g.size, self.SIZE)
                state, refs = store.residency(0)
                self.assertIn(state, ("device", "loading"))
                self.assertEqual(refs, 1)
                g.mark_dirty()
            self.assertTrue(g.released)
            self.assertHetmemError("HETMEM_ERR_INVALID_HANDLE", g.release)
            self.assertHetmemError("HETMEM_ERR_INVALID_HANDLE", g.mark_dirty)
            s.synchronize()
            # Stream through all four (two fit): evictions, loads from the host tier.
            for _ in range(2):
                for i in ids:
                    store.acquire(i, s).release()
                    g = store.acquire(i)  # no stream: valid at once
                    g.release()
        for i in ids:
            self.assertEqual(store.read(i), self.data[i], f"layer.{i}")
        out = bytearray(self.SIZE)
        store.read_into(2, out)
        self.assertEqual(bytes(out), self.data[2])
        st = store.stats()
        self.assertEqual(st["params"], 4)
        self.assertGreater(st["evictions"], 0)
        self.assertGreater(st["loads"], 0)
        self.assertEqual(st["checksum_mismatches"], 0)
        self.assertEqual(self.mgr.stats(store)["tier"], st)
        store.close()
        store.close()

    def test_three_guards_do_not_fit_two(self):
        store, _ = self.make()
        g0, g1 = store.acquire(0), store.acquire(1)
        self.assertHetmemError("HETMEM_ERR_OUT_OF_MEMORY", store.acquire, 2)
        # With a timeout it waits, then fails the same way (no other thread releases).
        t0 = time.monotonic()
        self.assertHetmemError("HETMEM_ERR_OUT_OF_MEMORY", store.acquire, 2, None, 0.05)
        self.assertGreaterEqual(time.monotonic() - t0, 0.04)
        self.assertFalse(store.dont_need(0), "a parameter in use is not dropped")
        g0.release()
        g1.release()
        store.close()

    def test_hints(self):
        store, _ = self.make()
        store.dont_need(0)
        store.dont_need(1)
        self.assertTrue(store.will_need(3))
        self.assertIn(store.residency(3)[0], ("device", "loading"))
        store.keep_resident(3)
        store.priority(2, 5)
        store.set_sequence([0, 1, 2, 3])
        store.set_sequence([])
        store.keep_resident(3, False)
        self.assertTrue(store.dont_need(3))
        self.assertEqual(store.residency(3)[0], "host")
        self.assertHetmemError("HETMEM_ERR_UNKNOWN_PARAM", store.set_sequence, [0, 99])
        self.assertHetmemError("HETMEM_ERR_UNKNOWN_PARAM", store.will_need, 99)
        self.assertHetmemError("HETMEM_ERR_UNKNOWN_PARAM", store.dont_need, 99)
        self.assertHetmemError("HETMEM_ERR_UNKNOWN_PARAM", store.keep_resident, 99)
        self.assertHetmemError("HETMEM_ERR_UNKNOWN_PARAM", store.priority, 99, 1)
        self.assertHetmemError("HETMEM_ERR_UNKNOWN_PARAM", store.acquire, 99)
        self.assertHetmemError("HETMEM_ERR_UNKNOWN_PARAM", store.read, 99)
        self.assertHetmemError("HETMEM_ERR_UNKNOWN_PARAM", store.lookup, "layer.9")
        store.close()

    def test_register_errors(self):
        store, _ = self.make()
        self.assertHetmemError("HETMEM_ERR_INVALID_ARGUMENT", store.register, "layer.0", b"x")
        self.assertHetmemError("HETMEM_ERR_INVALID_SIZE", store.register, "empty", b"")
        self.assertHetmemError("HETMEM_ERR_INVALID_SIZE", store.register, "empty2", bytearray())
        self.assertHetmemError("HETMEM_ERR_NULL_POINTER", store.register, "null", 0, 16)
        self.assertHetmemError(
            "HETMEM_ERR_OUT_OF_MEMORY", store.register, "too.big", bytes(3 * self.SIZE)
        )
        self.assertHetmemError(
            "HETMEM_ERR_INVALID_ARGUMENT", hetmem.TierStore, self.mgr, 0, 64 * MIB
        )
        self.assertHetmemError(
            "HETMEM_ERR_UNKNOWN_DEVICE", hetmem.TierStore, self.mgr, MIB, 64 * MIB, device=99
        )
        store.close()
        self.assertHetmemError("HETMEM_ERR_INVALID_HANDLE", store.acquire, 0)

    def test_register_from_raw_addresses_without_copies(self):
        store = hetmem.TierStore(self.mgr, 8 * MIB, 64 * MIB)
        cbuf = ctypes.create_string_buffer(pattern(5000, 1), 5000)
        a = store.register("raw.addr", ctypes.addressof(cbuf), 5000)
        b = store.register("ctypes.obj", cbuf)
        c = store.register("bytearray", bytearray(pattern(777, 2)))
        d = store.register("memoryview", memoryview(pattern(999, 3)))
        e = store.register("array", array.array("f", [1.5, -2.0, 3.25]))
        f = store.register("ptr", ctypes.cast(cbuf, ctypes.POINTER(ctypes.c_char)), 10)
        g = store.register("prefix", pattern(100, 4), 10)
        # hetmem copied the bytes: the caller's memory may change or go at once.
        ctypes.memset(cbuf, 0, 5000)
        del cbuf
        self.assertEqual(store.read(a), pattern(5000, 1))
        self.assertEqual(store.read(b), pattern(5000, 1))
        self.assertEqual(store.read(c), pattern(777, 2))
        self.assertEqual(store.read(d), pattern(999, 3))
        self.assertEqual(store.read(e), struct.pack("<3f", 1.5, -2.0, 3.25))
        self.assertEqual(store.read(f), pattern(5000, 1)[:10])
        self.assertEqual(store.read(g), pattern(100, 4)[:10])
        with store.acquire(a) as gd:
            self.assertEqual(gd.size, 5000)
        self.assertEqual(store.read(a), pattern(5000, 1))
        with self.assertRaises(TypeError):
            store.register("no.size", 0x1000)
        with self.assertRaises(TypeError):
            store.register("bad.type", 1.5, 4)
        store.close()

    def test_register_safetensors(self):
        header = json.dumps({
            "st.a": {"dtype": "U8", "shape": [5], "data_offsets": [0, 5]},
            "st.b": {"dtype": "F32", "shape": [2], "data_offsets": [5, 13]},
        }).encode()
        header += b" " * (-len(header) % 8)
        body = bytes([1, 2, 3, 4, 5]) + struct.pack("<2f", 0.5, 2.0)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "t.safetensors")
            with open(path, "wb") as f:
                f.write(struct.pack("<Q", len(header)) + header + body)
            store = hetmem.TierStore(self.mgr, 8 * MIB, 64 * MIB)
            store.register("first", b"z")
            ids = store.register_safetensors(path)
            self.assertEqual(ids, [1, 2])
            self.assertEqual(store.read(store.lookup("st.a")), bytes([1, 2, 3, 4, 5]))
            with store.acquire(ids[1]):
                pass
            self.assertEqual(store.read(ids[1]), struct.pack("<2f", 0.5, 2.0))
            self.assertHetmemError("HETMEM_ERR_INVALID_ARGUMENT", store.register_safetensors,
                                   path)
            self.assertHetmemError("HETMEM_ERR_CONFIG", store.register_safetensors,
                                   os.path.join(tmp, "missing.safetensors"))
            store.close()

    def passes(self, store, ids, n, stream):
        for _ in range(n):
            for i in ids:
                g = store.acquire(i, stream)
                g.release()
        stream.synchronize()

    def test_learn_mode_learns_the_sequence(self):
        with self.mgr.stream() as s:
            learnt, ids = self.make(learn=True)
            self.passes(learnt, ids, 1, s)
            self.assertEqual(learnt.stats()["sequences_learnt"], 0)
            self.passes(learnt, ids, 3, s)
            st = learnt.stats()
            self.assertGreaterEqual(st["sequences_learnt"], 1, st)
            self.assertGreater(st["prefetches"], 0, st)
            for i in ids:
                self.assertEqual(learnt.read(i), self.data[i])
            learnt.close()

            lru, ids = self.make(learn=False)
            self.passes(lru, ids, 4, s)
            st_lru = lru.stats()
            self.assertEqual(st_lru["sequences_learnt"], 0)
            # A loop larger than the cache: LRU never hits, the learnt order does.
            self.assertEqual(st_lru["hits"], 0, st_lru)
            self.assertGreater(st["hits"] + st["prefetches"], 0, st)
            lru.close()

    def test_static_planner_keeps_a_fixed_set(self):
        with self.assertRaises(ValueError):
            self.make(planner="min")
        with self.mgr.stream() as s:
            store, ids = self.make(learn=True, planner="static")
            self.passes(store, ids, 3, s)  # learn, then two planned passes
            before = store.stats()
            self.passes(store, ids, 4, s)
            st = store.stats()
            # Room for two: one stays for good, the other three stream through the rest.
            self.assertEqual((st["loads"] - before["loads"]) / 4, 3, st)
            on_device = [i for i in ids if store.residency(i)[0] in ("device", "loading")]
            self.assertIn(len(on_device), (1, 2), on_device)
            for i in ids:
                self.assertEqual(store.read(i), self.data[i])
            store.close()

    def test_guard_outlives_its_store(self):
        store, _ = self.make()
        g = store.acquire(1)
        store.close()
        g.release()


class TestTorchEntryPoints(unittest.TestCase):
    """hetmem_torch_malloc / hetmem_torch_free through ctypes, as PyTorch calls them."""

    def test_malloc_free_reuse_and_stats(self):
        from hetmem import torch as ht

        lib = _lib.load()
        a = lib.hetmem_torch_malloc(MIB, 0, None)
        self.assertTrue(a, hetmem.last_error())
        lib.hetmem_torch_free(a, MIB, 0, None)
        self.assertEqual(hetmem.last_error(), "")
        b = lib.hetmem_torch_malloc(MIB, 0, None)
        self.assertEqual(b, a, "freed memory is reused at once on the same stream")
        c = lib.hetmem_torch_malloc(3000, 0, None)
        self.assertTrue(c)
        self.assertNotEqual(c, b)
        st = ht.hetmem_allocator_stats()
        self.assertEqual(st["backend"], BACKEND)
        self.assertGreaterEqual(st["live_blocks"], 2)
        dev = st["devices"][0]
        self.assertIn("allocated_bytes.all.current", dev["stats"])
        lib.hetmem_torch_free(b, MIB, 0, None)
        lib.hetmem_torch_free(c, 3000, 0, None)
        lib.hetmem_torch_free(b, MIB, 0, None)  # double free: reported, ignored
        self.assertIn("hetmem_torch_free", hetmem.last_error())
        lib.hetmem_torch_free(None, 0, 0, None)
        self.assertEqual(hetmem.last_error(), "")
        self.assertIsNone(lib.hetmem_torch_malloc(0, 0, None))
        self.assertEqual(hetmem.last_error(), "")
        self.assertIsNone(lib.hetmem_torch_malloc(-5, 0, None))
        self.assertNotEqual(hetmem.last_error(), "")
        self.assertIsNone(lib.hetmem_torch_malloc(64, 99, None))
        self.assertIn("unknown device", hetmem.last_error())
        ht.empty_cache()
        d = lib.hetmem_torch_malloc(MIB, 0, None)
        self.assertTrue(d)
        lib.hetmem_torch_free(d, MIB, 0, None)
        ht.empty_cache()

    def test_automatic_selection_never_hands_torch_the_simulator(self):
        # In a fresh process with no HETMEM_BACKEND: the GPU backend if one opens,
        # otherwise a clear error and no pointer (never simulator addresses).
        code = (
            "import hetmem; from hetmem import _lib, torch as ht\n"
            "p = _lib.load().hetmem_torch_malloc(4096, 0, None)\n"
            "print('backend', ht.hetmem_allocator_stats()['backend'] if p else None)\n"
            "print('error', hetmem.last_error())\n"
        )
        env = {k: v for k, v in os.environ.items() if k != "HETMEM_BACKEND"}
        env["PYTHONPATH"] = PYROOT
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, timeout=60)
        self.assertEqual(out.returncode, 0, out.stderr)
        backend = out.stdout.split("backend ", 1)[1].split("\n", 1)[0]
        if backend == "None":
            self.assertIn("a GPU backend is needed", out.stdout)
        else:
            self.assertIn(backend, ("cuda", "rocm"), out.stdout)


@unittest.skipIf(HAVE_TORCH, "PyTorch is installed here")
class TestWithoutTorch(unittest.TestCase):
    def test_hetmem_torch_imports_and_explains(self):
        import hetmem.torch as ht

        for fn, args in ((ht.use_hetmem_allocator, ()), (ht.offload, (object(), MIB))):
            with self.assertRaises(ImportError) as cm:
                fn(*args)
            self.assertIn("needs PyTorch", str(cm.exception))
        self.assertNotIn("torch", sys.modules)

    def test_torch_check_script_skips_cleanly(self):
        script = os.path.join(PYROOT, "bench", "torch_check.py")
        out = subprocess.run([sys.executable, script], capture_output=True, text=True,
                             timeout=120, env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
        self.assertEqual(out.returncode, 77, out.stdout + out.stderr)
        self.assertIn("SKIP", out.stdout)
        last = json.loads(out.stdout.strip().splitlines()[-1])
        self.assertTrue(last["skipped"])


class TestPythonSafety(ErrorAssertions):
    """What the ctypes layer must not let through: dangling views, integers that do not
    fit their C type, finalizers that erase an error message."""

    def setUp(self):
        self.mgr = hetmem.Manager("sim")

    def tearDown(self):
        self.mgr.close()

    def test_host_view_keeps_its_buffer_and_refuses_after_close(self):
        import gc

        view = self.mgr.alloc("host", MIB).host_view()  # the Buffer is a temporary
        gc.collect()
        view[0] = b"x"
        self.assertEqual(view[0], b"x")
        del view  # else close() refuses (tests/test_host_views.py)
        b = self.mgr.alloc("host", 4096)
        self.mgr.close()
        with self.assertRaises(hetmem.HetmemError) as e:
            b.host_view()
        self.assertEqual(e.exception.name, "HETMEM_ERR_INVALID_HANDLE")

    def test_integers_that_do_not_fit_are_refused(self):
        with self.assertRaises(OverflowError):
            self.mgr.alloc("host", 2**64 + 4096)
        with self.assertRaises(OverflowError):
            self.mgr.stream(2**31)
        store = hetmem.TierStore(self.mgr, 8 * MIB, 64 * MIB)
        store.register("p0", b"a" * 32)
        store.register("p1", b"b" * 32)
        with self.mgr.stream() as s:
            with self.assertRaises(OverflowError):
                store.acquire(2**32 + 1, s)
        with self.assertRaises(OverflowError):
            store.priority(0, 2**31)
        store.close()

    def test_collected_buffers_never_erase_an_error_message(self):
        import gc

        pool = [self.mgr.alloc("host", 4096) for _ in range(400)]

        class Chain:
            """Garbage that frees one Buffer when collected and leaves another link."""

            def __init__(self):
                self.me = self

            def __del__(self):
                if pool:
                    pool.pop()
                Chain()

        Chain()
        old = gc.get_threshold()
        gc.set_threshold(1)
        try:
            messages = set()
            for _ in range(100):
                try:
                    self.mgr.alloc("host", 0)
                except hetmem.HetmemError as e:
                    messages.add(e.message)
        finally:
            gc.set_threshold(*old)
            pool.clear()
        self.assertEqual(len(messages), 1, messages)
        self.assertIn("zero", messages.pop())


if __name__ == "__main__":
    unittest.main()
