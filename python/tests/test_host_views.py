"""Buffer.host_view() never outlives its memory: every way the memory can go away
(free(), Manager.free of the address, the manager's close(), leaving either ``with``
block, garbage collection of the Buffer) raises BufferError or waits for the view.

Each scenario runs in a fresh interpreter: before the fix, reading the view after the
memory went was a use-after-free (SIGSEGV on 16 MiB of host memory, which is unmapped
when freed); in a subprocess a regression is a failed test, not a crashed runner.
"""

import os
import subprocess
import sys
import textwrap
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
PYROOT = os.path.dirname(HERE)

# What every child starts with: a manager on the simulator, a large buffer helper and
# `refused(fn)`, which notes when fn does not raise BufferError and lets the child go
# on (to read the view, as a user would: before the fix, that read crashed).
PRELUDE = r"""
import atexit, ctypes, gc, os, sys
import hetmem

N = 16 << 20  # large enough that the allocator unmaps it when it is freed
mgr = hetmem.Manager("sim")
not_refused = []


def refused(fn, *args):
    try:
        fn(*args)
    except BufferError as e:
        return str(e)
    not_refused.append(repr(fn))
    return ""


@atexit.register
def report():
    if not_refused:
        print("did not raise BufferError:", not_refused, flush=True)
        os._exit(3)


def filled(placement="host"):
    b = mgr.alloc(placement, N)
    b.write(b"\x5a" * 4096, offset=N - 4096)
    return b
"""


class TestHostViews(unittest.TestCase):
    def run_child(self, code):
        """Runs ``code`` after PRELUDE in a new interpreter; it must exit 0 (a crash is
        a failure here, with its signal) and print "done"."""
        env = dict(os.environ, PYTHONPATH=PYROOT, PYTHONDONTWRITEBYTECODE="1",
                   HETMEM_BACKEND="sim")
        r = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code)],
                           env=env, capture_output=True, text=True, timeout=120)
        died = f" (killed by signal {-r.returncode})" if r.returncode < 0 else ""
        self.assertEqual(r.returncode, 0, f"the child failed{died}:\n{r.stdout}{r.stderr}")
        self.assertIn("done", r.stdout, r.stdout + r.stderr)
        return r.stdout

    def test_free_under_a_view_raises_and_keeps_the_memory(self):
        out = self.run_child("""
            for placement in ("host", "pinned", "managed"):
                b = filled(placement)
                v = b.host_view()
                msg = refused(b.free)
                assert v[N - 1] == b"\\x5a", v[N - 1]  # read after the refused free
                assert "host view" in msg, msg
                assert not b.freed
                v[0] = b"w"
                assert b.read(1) == b"w"
                del v
                b.free()
                assert b.freed
            assert mgr.stats()["live_buffers"] == 0
            print("done")
        """)
        self.assertIn("done", out)

    def test_manager_free_of_the_address_raises_and_marks_the_buffer(self):
        self.run_child("""
            b = filled()
            v = b.host_view()
            refused(mgr.free, b.ptr)
            assert v[N - 1] == b"\\x5a"
            del v
            mgr.free(b.ptr)
            # The Buffer knows: no view of freed memory, no second free in C.
            assert b.freed
            for fn in (b.host_view, b.free, b.read):
                try:
                    fn()
                    raise AssertionError(f"{fn} after Manager.free did not raise")
                except hetmem.ForeignPointerError:
                    pass
            print("done")
        """)

    def test_close_and_its_with_block_raise_under_a_view(self):
        self.run_child("""
            b = filled("pinned")
            v = b.host_view()
            refused(mgr.close)
            assert v[N - 1] == b"\\x5a"
            assert not mgr.closed
            del v
            mgr.close()
            assert mgr.closed

            def leave_with_a_view():
                with hetmem.Manager("sim") as m:
                    view = m.alloc("host", N).host_view()
                    view[N - 1] = b"q"
                    leave_with_a_view.kept = (m, view)
            refused(leave_with_a_view)
            m, view = leave_with_a_view.kept
            assert view[N - 1] == b"q" and not m.closed
            del view, leave_with_a_view.kept
            m.close()
            print("done")
        """)

    def test_buffer_with_block_raises_under_a_view(self):
        self.run_child("""
            kept = []
            def leave():
                with filled() as b:
                    kept.append(b.host_view())
            refused(leave)
            assert kept[0][N - 1] == b"\\x5a"
            kept.clear()
            gc.collect()
            assert mgr.stats()["live_buffers"] == 0, "freed once the view went"
            print("done")
        """)

    def test_collection_never_frees_under_a_view(self):
        self.run_child("""
            v = filled().host_view()  # the Buffer is a temporary
            gc.collect()
            assert v[N - 1] == b"\\x5a"
            v[0] = b"x"
            assert mgr.stats()["live_buffers"] == 1
            del v
            gc.collect()
            assert mgr.stats()["live_buffers"] == 0
            print("done")
        """)

    def test_views_made_from_a_view_count_as_views(self):
        # memoryview(view) (what numpy.frombuffer holds) and ctypes.cast keep the
        # array, and so the export, alive after the array's own name is gone.
        self.run_child("""
            b = filled()
            mv = memoryview(b.host_view()).cast("B")[N - 16:]
            refused(b.free)
            refused(mgr.close)
            assert mv[15] == 0x5a
            mv.release()
            del mv
            p = ctypes.cast(b.host_view(), ctypes.POINTER(ctypes.c_char))
            refused(b.free)
            assert p[N - 1] == b"\\x5a"
            del p
            b.free()
            # Many views, dropped one by one: free waits for the last.
            b = filled()
            views = [b.host_view() for _ in range(5)]
            while views:
                refused(b.free)
                views.pop()
            b.free()
            print("done")
        """)

    def test_views_refused_where_no_memory_is(self):
        self.run_child("""
            d = mgr.alloc("device", 4096)
            try:
                d.host_view()
                raise AssertionError("a view of device memory")
            except ValueError:
                pass
            b = filled()
            b.free()
            try:
                b.host_view()
                raise AssertionError("a view of freed memory")
            except hetmem.ForeignPointerError:
                pass
            c = filled()
            mgr.close()
            try:
                c.host_view()
                raise AssertionError("a view after close")
            except hetmem.InvalidHandleError:
                pass
            print("done")
        """)


if __name__ == "__main__":
    unittest.main()
