"""hetmem.profile_start / profile_finish (the C ABI's hetmem_profile_*): a recording made
from Python holds the device and pinned allocations of a run and ends complete."""

import os
import struct
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
PYROOT = os.path.dirname(HERE)
if PYROOT not in sys.path:
    sys.path.insert(0, PYROOT)

os.environ.setdefault("HETMEM_BACKEND", "sim")

import hetmem  # noqa: E402


class ProfileTest(unittest.TestCase):
    def test_record_from_python(self):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "py.hrec")
            if os.environ.get("HETMEM_PROFILE"):
                self.skipTest("a recording from the environment is on")
            hetmem.profile_start(path)
            try:
                with self.assertRaises(hetmem.ConfigError):
                    hetmem.profile_start(path)  # one at a time
                with hetmem.Manager() as mgr:
                    for placement in (hetmem.DEVICE, hetmem.PINNED):
                        b = mgr.alloc(placement, 1 << 20, 0)
                        b.free()
            finally:
                events, dropped = hetmem.profile_finish()
            self.assertGreaterEqual(events, 5)  # 2 allocs, 2 frees, the end
            self.assertEqual(dropped, 0)
            with open(path, "rb") as f:
                head = f.read(64)
            self.assertEqual(head[:8], b"HETMREC\0")
            self.assertEqual(struct.unpack("<H", head[8:10])[0], 1)
            # Finishing again: nothing recorded.
            self.assertEqual(hetmem.profile_finish(), (0, 0))


if __name__ == "__main__":
    unittest.main()
