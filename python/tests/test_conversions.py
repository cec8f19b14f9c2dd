"""The checked conversion layer of hetmem._lib: every C function is reached through it,
every C type refuses what ctypes would silently truncate, and the public API refuses
the values the issue found truncated (an offset of 2**64 + 8 that wrote at 8, ids of
2**32 + 1 taken as 1, names cut at a NUL, ``Manager("sim\\0junk")`` opening sim,
``register(None, ...)`` registering "None")."""

import ctypes
import os
import sys
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
PYROOT = os.path.dirname(HERE)
REPO = os.path.dirname(PYROOT)
if PYROOT not in sys.path:
    sys.path.insert(0, PYROOT)

os.environ.setdefault("HETMEM_BACKEND", "sim")

import hetmem  # noqa: E402
from hetmem import _lib  # noqa: E402

MIB = 1 << 20

# The range of each C integer type on the Linux targets hetmem builds for (LP64).
RANGES = {
    "int": (-(1 << 31), (1 << 31) - 1),
    "uint32_t": (0, (1 << 32) - 1),
    "uint64_t": (0, (1 << 64) - 1),
    "size_t": (0, (1 << 64) - 1),
    "ssize_t": (-(1 << 63), (1 << 63) - 1),
    "uintptr_t": (0, (1 << 64) - 1),
}


class Index:
    """An integer that is no int (as numpy's): has __index__."""

    def __init__(self, v):
        self.v = v

    def __index__(self):
        return self.v


def read_header():
    with open(os.path.join(REPO, "include", "hetmem.h")) as f:
        return f.read()


class TestLayer(unittest.TestCase):
    def test_every_entry_point_goes_through_the_checked_layer(self):
        decls = _lib.parse_declarations(read_header())
        lib = _lib.load()
        funcs = lib.functions()
        self.assertEqual(set(funcs), set(decls))
        for name, fn in funcs.items():
            self.assertIsInstance(fn, _lib.Function, name)
            self.assertIs(getattr(lib, name), fn)
            for spelling, pname in fn.params:
                self.assertIn(spelling, _lib.TYPES, f"{name}: {pname}")
            # Each parameter is converted, or is a ctypes object ctypes checks.
            converted = {i for i, _, _ in fn._convert}
            for i, (spelling, pname) in enumerate(fn.params):
                self.assertEqual(i in converted, _lib.TYPES[spelling].convert is not _lib._passed,
                                 f"{name}: {pname}")
        # The Library holds nothing else: no CDLL, no raw ctypes function pointer.
        for key, value in vars(lib).items():
            self.assertNotIsInstance(value, (ctypes.CDLL, ctypes._CFuncPtr), key)
            self.assertTrue(key == "path" or isinstance(value, _lib.Function), key)
        self.assertFalse(hasattr(lib, "__getitem__"))
        # Nor does any module of the package (a CDLL there would be a way around).
        import hetmem.core
        import hetmem.torch  # noqa: F401
        for mod in [m for k, m in sys.modules.items() if k.startswith("hetmem")]:
            for key, value in vars(mod).items():
                self.assertNotIsInstance(value, (ctypes.CDLL, ctypes._CFuncPtr),
                                         f"{mod.__name__}.{key}")

    def test_every_integer_type_refuses_what_does_not_fit(self):
        for spelling, (lo, hi) in RANGES.items():
            conv = _lib.TYPES[spelling].convert
            with self.subTest(spelling):
                self.assertEqual(_lib.TYPES[spelling].ctype(hi).value, hi)
                for ok in (lo, hi, 0, Index(hi)):
                    self.assertEqual(conv(ok, "t"), int(getattr(ok, "v", ok)))
                # Each would wrap in ctypes: lo - 1 to hi, hi + 1 to lo, 2**64 + k to k.
                for bad in (lo - 1, hi + 1, hi + (1 << 64), Index(hi + 1)):
                    with self.assertRaisesRegex(OverflowError, f"t: .* C {spelling}"):
                        conv(bad, "t")
                for bad in (1.0, "1", b"1", None, True, [1]):
                    with self.assertRaises(TypeError):
                        conv(bad, "t")

    def test_addresses_refuse_what_is_no_address(self):
        for spelling in ("void*", "const void*"):
            conv = _lib.TYPES[spelling].convert
            with self.subTest(spelling):
                self.assertEqual(conv((1 << 64) - 1, "a"), (1 << 64) - 1)
                self.assertIsNone(conv(None, "a"))
                buf = ctypes.create_string_buffer(4)
                self.assertIs(conv(buf, "a"), buf)
                for bad in (-1, 1 << 64, (1 << 64) + 8):
                    with self.assertRaises(OverflowError):
                        conv(bad, "a")
                for bad in (1.5, "x", True, bytearray(2)):
                    with self.assertRaises(TypeError):
                        conv(bad, "a")
        # Bytes are read-only: a source, never a destination.
        self.assertEqual(_lib.TYPES["const void*"].convert(b"ab", "a"), b"ab")
        with self.assertRaises(TypeError):
            _lib.TYPES["void*"].convert(b"ab", "a")

    def test_c_strings_refuse_nul_none_and_non_strings(self):
        conv = _lib.TYPES["const char*"].convert
        self.assertEqual(conv("layer.0", "s"), b"layer.0")
        self.assertEqual(conv("é", "s"), "é".encode())
        self.assertEqual(conv(b"raw", "s"), b"raw")
        for bad in ("a\0b", b"a\0", "\0"):
            with self.assertRaisesRegex(ValueError, "embedded NUL"):
                conv(bad, "s")
        with self.assertRaises(ValueError):
            conv("\udc80", "s")  # a lone surrogate: no UTF-8 for it
        for bad in (None, 5, 1.0, bytearray(b"x")):
            with self.assertRaises(TypeError):
                conv(bad, "s")

    def test_arrays_convert_each_element(self):
        conv = _lib.TYPES["const uint32_t*"].convert
        arr = conv([0, Index(7), (1 << 32) - 1], "ids")
        self.assertEqual(list(arr), [0, 7, (1 << 32) - 1])
        with self.assertRaisesRegex(OverflowError, r"ids\[1\]"):
            conv([1, 1 << 32], "ids")
        with self.assertRaisesRegex(TypeError, r"ids\[0\]"):
            conv([1.0], "ids")
        for bad in ("abc", b"abc", 5):
            with self.assertRaises(TypeError):
                conv(bad, "ids")

    def test_struct_fields_are_the_headers_and_are_checked(self):
        import re

        body = re.search(r"typedef struct hetmem_store_config \{(.*?)\} hetmem_store_config_t;",
                         read_header(), re.S).group(1)
        body = re.sub(r"/\*.*?\*/", "", body, flags=re.S)
        fields = tuple(_lib._param(f.strip()) for f in body.split(";") if f.strip())
        self.assertEqual(fields, _lib.STORE_CONFIG_FIELDS)
        cfg = _lib.hetmem_store_config_t()
        _lib.fill(cfg, device=3, prefetch_depth=(1 << 64) - 1)
        self.assertEqual((cfg.device, cfg.prefetch_depth), (3, (1 << 64) - 1))
        with self.assertRaises(OverflowError):
            _lib.fill(cfg, device=1 << 32)  # ctypes would store 0
        with self.assertRaises(OverflowError):
            _lib.fill(cfg, spare_slots=1 << 64)
        with self.assertRaises(TypeError):
            _lib.fill(cfg, staging_slots=2.0)

    def test_raw_calls_refuse_too(self):
        lib = _lib.load()
        with self.assertRaisesRegex(OverflowError, r"hetmem_status_string: status \(int\)"):
            lib.hetmem_status_string(1 << 32)  # ctypes: 0, "HETMEM_OK"
        with self.assertRaisesRegex(OverflowError, r"hetmem_torch_malloc: size \(ssize_t\)"):
            lib.hetmem_torch_malloc(1 << 63, 0, None)
        with self.assertRaisesRegex(OverflowError, "pool_a"):
            lib.hetmem_torch_release_pool(0, 1 << 64, 0)
        with self.assertRaisesRegex(ValueError, "embedded NUL"):
            lib.hetmem_manager_create(b"sim\0junk", ctypes.byref(_lib.ManagerP()))
        with self.assertRaisesRegex(TypeError, r"takes 2 arguments \(1 given\)"):
            lib.hetmem_manager_create(None)


class TestPublicApi(unittest.TestCase):
    """What each public entry point refuses, with nothing reaching C."""

    def setUp(self):
        self.mgr = hetmem.Manager("sim")

    def tearDown(self):
        self.mgr.close()

    def test_offsets_and_addresses_beyond_64_bits(self):
        b = self.mgr.alloc("device", 64)
        b.write(bytes(range(64)))
        for call in (
            lambda: b.write(b"hi", offset=(1 << 64) + 8),
            lambda: b.read(2, offset=(1 << 64) + 8),
            lambda: b.read_into(bytearray(2), 2, offset=(1 << 64) + 8),
            lambda: b.copy_from(b, 2, offset=(1 << 64) + 8),
            lambda: b.copy_to(b, 2, dst_offset=(1 << 64) + 8),
            lambda: self.mgr.copy(b.ptr + (1 << 64), b, 2),
            lambda: self.mgr.free(b.ptr + (1 << 64)),
            lambda: self.mgr.prefetch(b.ptr + (1 << 64), 2, 0),
        ):
            with self.assertRaises(OverflowError):
                call()
        self.assertEqual(b.read(), bytes(range(64)), "nothing was written at offset 8")
        self.assertFalse(b.freed)
        with self.assertRaises(ValueError):
            b.copy_from(b, 2, src_offset=-8)  # would read before the buffer
        b.free()

    def test_sizes_devices_and_raw_streams(self):
        for call in (
            lambda: self.mgr.alloc("host", (1 << 64) + 4096),
            lambda: self.mgr.alloc((1 << 32) + hetmem.HOST, 64),
            lambda: self.mgr.alloc("device", 64, (1 << 32)),
            lambda: self.mgr.mem_info(1 << 32),
            lambda: self.mgr.stream(1 << 31),
            lambda: self.mgr.wrap_stream(1 << 64),
            lambda: hetmem.status_string(1 << 32),
        ):
            with self.assertRaises(OverflowError):
                call()
        with self.assertRaises(TypeError):
            self.mgr.alloc("host", True)
        with self.assertRaises(TypeError):
            self.mgr.alloc("host", 64.0)
        self.mgr.alloc("host", Index(64)).free()  # numpy-style integers are integers
        self.assertEqual(self.mgr.stats()["live_buffers"], 0)

    def test_backend_names(self):
        for bad in ("sim\0junk", b"sim\0"):
            with self.assertRaisesRegex(ValueError, "embedded NUL"):
                hetmem.Manager(bad)
        with self.assertRaises(TypeError):
            hetmem.Manager(42)
        with hetmem.Manager(b"sim") as m:
            self.assertEqual(m.backend, "sim")

    def test_tier_store(self):
        store = hetmem.TierStore(self.mgr, 8 * MIB, 64 * MIB)
        a = store.register("a", b"x" * 32)
        b = store.register(b"b", b"y" * 32)
        self.assertEqual((a, b), (0, 1))
        # Names: cut at a NUL, or str(None), they would be other names.
        with self.assertRaisesRegex(ValueError, "embedded NUL"):
            store.register("na\0me", b"z")
        with self.assertRaises(TypeError):
            store.register(None, b"z")
        with self.assertRaises(TypeError):
            store.register(7, b"z")
        for name in ("na", "None", "7"):
            with self.assertRaises(hetmem.UnknownParamError):
                store.lookup(name)
        with self.assertRaises(TypeError):
            store.lookup(None)
        with self.assertRaisesRegex(ValueError, "embedded NUL"):
            store.register_safetensors("model\0.safetensors")
        self.assertEqual(store.stats()["params"], 2)
        # Ids: 2**32 + 1 would be id 1.
        for call in (
            lambda: store.set_sequence([(1 << 32) + 1, 1 << 32]),
            lambda: store.acquire((1 << 32) + 1),
            lambda: store.acquire(0, timeout=float(1 << 64)),
            lambda: store.will_need((1 << 32) + 1),
            lambda: store.dont_need((1 << 32) + 1),
            lambda: store.keep_resident((1 << 32) + 1),
            lambda: store.priority(0, 1 << 31),
            lambda: store.residency((1 << 32) + 1),
            lambda: store.param_size((1 << 32) + 1),
            lambda: store.read((1 << 32) + 1),
        ):
            with self.assertRaises(OverflowError):
                call()
        with self.assertRaises(TypeError):
            store.set_sequence([0, 1.0])
        store.set_sequence([Index(1), 0])
        self.assertEqual(store.residency(1), ("cold", 0))
        store.close()
        # Settings: device 2**32 would be device 0.
        for kw in ({"device": 1 << 32}, {"prefetch_depth": 1 << 64},
                   {"staging_slot_size": 1 << 64}, {"spare_slots": 1 << 65}):
            with self.subTest(kw):
                with self.assertRaises(OverflowError):
                    hetmem.TierStore(self.mgr, 8 * MIB, 64 * MIB, **kw)
        with self.assertRaises(OverflowError):
            hetmem.TierStore(self.mgr, 1 << 64, 64 * MIB)

    def test_errors_pickle_as_their_class(self):
        import pickle

        with self.assertRaises(hetmem.InvalidSizeError) as cm:
            self.mgr.alloc("host", 0)
        e = pickle.loads(pickle.dumps(cm.exception))
        self.assertIs(type(e), hetmem.InvalidSizeError)
        self.assertEqual((e.code, e.message), (cm.exception.code, cm.exception.message))


if __name__ == "__main__":
    unittest.main()
