"""The checked conversion layer of hetmem._lib: every C function is reached through it,
and every C type refuses what ctypes would silently truncate."""

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


if __name__ == "__main__":
    unittest.main()
