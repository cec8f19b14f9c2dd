"""Every status code of include/hetmem.h has its exception class, and the docstring of
every public function lists the classes of the codes its C calls can return, as the
header documents them per call (its "Errors:" lines, "as hetmem_x" references, and
"fails with CODE" in its prose)."""

import inspect
import os
import re
import sys
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
PYROOT = os.path.dirname(HERE)
REPO = os.path.dirname(PYROOT)
if PYROOT not in sys.path:
    sys.path.insert(0, PYROOT)

os.environ.setdefault("HETMEM_BACKEND", "sim")

import hetmem  # noqa: E402
import hetmem.core as core  # noqa: E402
import hetmem.torch as ht  # noqa: E402
from hetmem import _lib  # noqa: E402


def read_header():
    with open(os.path.join(REPO, "include", "hetmem.h")) as f:
        return f.read()


def header_codes():
    """{"OUT_OF_MEMORY": -1, ...}: the error codes the header defines."""
    return {k: int(v) for k, v in re.findall(r"#define HETMEM_ERR_([A-Z_0-9]+) (-?\d+)",
                                             read_header())}


def codes_per_function():
    """{function: {code name, ...}}: what the header says each function returns."""
    names = set(header_codes())
    text = re.sub(r"^\s*#[^\n]*", " ", read_header(), flags=re.M)
    said, refs, comment = {}, {}, ""
    for m in re.finditer(r"/\*(.*?)\*/|([^;/]*?\b(hetmem_\w+)\s*\([^;]*\)\s*;)", text, re.S):
        if m.group(1) is not None:
            comment = m.group(1)
            continue
        if m.group(2).lstrip().startswith("typedef"):
            continue
        # Its "Errors:" paragraphs, and "fails with CODE" anywhere in its comment.
        text_of = " ".join(re.findall(r"Errors:(.*?)(?=\n\s*\*\s*\n|$)", comment, re.S))
        text_of += " " + " ".join(re.findall(r"fail\w* with (?:HETMEM_ERR_)?([A-Z_]+)", comment))
        words = set(re.findall(r"\b(?:HETMEM_ERR_)?([A-Z][A-Z_]+)\b", text_of))
        said[m.group(3)] = words & names
        refs[m.group(3)] = re.findall(r"\bas (hetmem_\w+)", text_of)

    def resolve(name, seen):
        out = set(said[name])
        for r in refs[name]:
            if r in said and r not in seen:
                out |= resolve(r, seen | {r})
        return out

    return {name: resolve(name, {name}) for name in said}


# Codes any call that reaches C may return (header "Conventions"): documented once, on
# HetmemError and in hetmem.core's docstring.
GENERAL = {"NULL_POINTER", "INVALID_HANDLE", "FORKED", "PANIC"}

# Each public function or property -> the C functions it calls (directly or through
# other methods). A class's own entry ("Manager") is its constructor, documented in the
# class docstring.
CALLS = {
    "status_string": ["hetmem_status_string"],
    "last_error": ["hetmem_last_error"],
    "version": ["hetmem_version"],
    "Manager": ["hetmem_manager_create"],
    "Manager.handle": [],
    "Manager.closed": [],
    "Manager.backend": ["hetmem_manager_backend"],
    "Manager.device_count": ["hetmem_device_count"],
    "Manager.mem_info": ["hetmem_mem_info"],
    "Manager.alloc": ["hetmem_alloc"],
    "Manager.free": ["hetmem_free"],
    "Manager.copy": ["hetmem_copy"],
    "Manager.copy_from_host": ["hetmem_copy_from_host"],
    "Manager.copy_to_host": ["hetmem_copy_to_host"],
    "Manager.read": ["hetmem_copy_to_host"],
    "Manager.prefetch": ["hetmem_prefetch"],
    "Manager.advise": ["hetmem_advise"],
    "Manager.stream": ["hetmem_stream_create"],
    "Manager.wrap_stream": ["hetmem_stream_wrap"],
    "Manager.event": ["hetmem_event_create"],
    "Manager.stats": ["hetmem_stats_json"],
    "Manager.close": ["hetmem_manager_destroy"],
    "Buffer": [],
    "Buffer.freed": [],
    "Buffer.free": ["hetmem_free"],
    "Buffer.write": ["hetmem_copy_from_host"],
    "Buffer.read": ["hetmem_copy_to_host"],
    "Buffer.read_into": ["hetmem_copy_to_host"],
    "Buffer.copy_from": ["hetmem_copy"],
    "Buffer.copy_to": ["hetmem_copy"],
    "Buffer.host_view": [],
    "Stream": ["hetmem_stream_create"],
    "Stream.wrap": ["hetmem_stream_wrap"],
    "Stream.handle": [],
    "Stream.raw": ["hetmem_stream_raw"],
    "Stream.synchronize": ["hetmem_stream_synchronize"],
    "Stream.wait_event": ["hetmem_stream_wait_event"],
    "Stream.close": ["hetmem_stream_destroy"],
    "Stream.destroy": ["hetmem_stream_destroy"],
    "Event": ["hetmem_event_create"],
    "Event.handle": [],
    "Event.record": ["hetmem_event_record"],
    "Event.query": ["hetmem_event_query"],
    "Event.synchronize": ["hetmem_event_synchronize"],
    "Event.close": ["hetmem_event_destroy"],
    "Event.destroy": ["hetmem_event_destroy"],
    "TierStore": ["hetmem_store_config_init", "hetmem_store_create"],
    "TierStore.handle": [],
    "TierStore.register": ["hetmem_store_register"],
    "TierStore.register_safetensors": ["hetmem_store_register_safetensors"],
    "TierStore.lookup": ["hetmem_store_lookup"],
    "TierStore.param_size": ["hetmem_store_param_size"],
    "TierStore.set_sequence": ["hetmem_store_set_sequence"],
    "TierStore.will_need": ["hetmem_store_will_need"],
    "TierStore.dont_need": ["hetmem_store_dont_need"],
    "TierStore.keep_resident": ["hetmem_store_keep_resident"],
    "TierStore.priority": ["hetmem_store_priority"],
    "TierStore.residency": ["hetmem_store_residency"],
    "TierStore.acquire": ["hetmem_store_acquire", "hetmem_store_acquire_timeout"],
    "TierStore.read": ["hetmem_store_param_size", "hetmem_store_read"],
    "TierStore.read_into": ["hetmem_store_read"],
    "TierStore.stats": ["hetmem_stats_json"],
    "TierStore.close": ["hetmem_store_destroy"],
    "Guard": [],
    "Guard.size": ["hetmem_store_param_size"],
    "Guard.released": [],
    "Guard.mark_dirty": ["hetmem_guard_mark_dirty"],
    "Guard.release": ["hetmem_guard_release"],
    "torch.use_hetmem_allocator": [],
    "torch.allocator_hooks": [],
    "torch.hetmem_allocator_stats": ["hetmem_torch_stats_json"],
    "torch.empty_cache": ["hetmem_torch_empty_cache"],
    "torch.offload": ["hetmem_manager_create", "hetmem_store_config_init",
                      "hetmem_store_create", "hetmem_store_register"],
    "torch.remove_offload": ["hetmem_store_read", "hetmem_guard_release",
                             "hetmem_stream_destroy", "hetmem_store_destroy",
                             "hetmem_manager_destroy"],
}

# Codes a call can return that the Python function never raises, and why.
NOT_RAISED = {
    # The size is asked for, then given: BUFFER_TOO_SMALL is handled inside.
    "Manager.stats": {"BUFFER_TOO_SMALL"},
    "TierStore.stats": {"BUFFER_TOO_SMALL"},
    "TierStore.register_safetensors": {"BUFFER_TOO_SMALL"},
    "TierStore.read": {"BUFFER_TOO_SMALL"},
    "torch.hetmem_allocator_stats": {"BUFFER_TOO_SMALL"},
    # The guard's id is one the store has; restore reads each parameter into its size.
    "Guard.size": {"UNKNOWN_PARAM"},
    "torch.remove_offload": {"UNKNOWN_PARAM", "BUFFER_TOO_SMALL"},
}

CLASSES = {"Manager": core.Manager, "Buffer": core.Buffer, "Stream": core.Stream,
           "Event": core.Event, "TierStore": core.TierStore, "Guard": core.Guard}


def public_api():
    """{"Manager.alloc": its function or property, ...}: everything a user calls."""
    out = {}
    for name in ("status_string", "last_error", "version"):
        out[name] = getattr(core, name)
    for cname, cls in CLASSES.items():
        out[cname] = cls
        for attr, value in vars(cls).items():
            # Slots (Guard.ptr, ...) are data, not calls.
            if not attr.startswith("_") and not inspect.ismemberdescriptor(value):
                out[f"{cname}.{attr}"] = value
    for name in ht.__all__:
        out[f"torch.{name}"] = getattr(ht, name)
    return out


def docstring(obj):
    if isinstance(obj, (classmethod, staticmethod)):
        obj = obj.__func__
    return inspect.getdoc(obj) or ""


class TestErrorClasses(unittest.TestCase):
    def test_every_status_code_has_a_documented_exception_class(self):
        codes = header_codes()
        self.assertGreater(len(codes), 20)
        self.assertEqual(set(hetmem.ERRORS), set(codes.values()),
                         "a code of the header without its class (or one too many)")
        seen = set()
        for name, code in codes.items():
            cls = hetmem.ERRORS[code]
            with self.subTest(name):
                self.assertTrue(issubclass(cls, hetmem.HetmemError))
                self.assertEqual(cls.code, code)
                self.assertIn(f"HETMEM_ERR_{name}", cls.__doc__ or "")
                self.assertIs(getattr(hetmem, cls.__name__), cls, "exported from hetmem")
                self.assertIn(cls.__name__, hetmem.__all__)
                e = hetmem.HetmemError(code, "m")
                self.assertIs(type(e), cls)
                self.assertEqual((e.code, e.name, e.message), (code, f"HETMEM_ERR_{name}", "m"))
                self.assertIs(type(cls()), cls, "made without its code")
                self.assertNotIn(cls, seen)
                seen.add(cls)
        self.assertIs(hetmem.ERRORS[codes["FORKED"]], hetmem.ForkedError)
        # A code this package does not know stays a HetmemError.
        self.assertIs(type(hetmem.HetmemError(-1234, "m")), hetmem.HetmemError)

    def test_general_codes_are_documented_once(self):
        for doc in (hetmem.HetmemError.__doc__, core.__doc__):
            for name in GENERAL:
                self.assertIn(hetmem.ERRORS[header_codes()[name]].__name__, doc, name)

    def test_the_table_names_every_public_function_and_its_calls(self):
        api = public_api()
        self.assertEqual(set(api), set(CALLS), "public API vs CALLS (add the new name)")
        declared = set(_lib.parse_declarations(read_header()))
        for name, fns in CALLS.items():
            self.assertLessEqual(set(fns), declared, name)
            obj = api[name]
            if isinstance(obj, property):
                obj = obj.fget
            if isinstance(obj, (classmethod, staticmethod)):
                obj = obj.__func__
            if inspect.isclass(obj):
                obj = obj.__init__
            # What it calls directly must be in its row (indirect calls are added by hand).
            direct = set(re.findall(r"\b(hetmem_\w+)\s*\(", inspect.getsource(obj)))
            self.assertLessEqual(direct & declared, set(fns), name)

    def test_docstrings_list_the_exception_of_every_code(self):
        api = public_api()
        per_function = codes_per_function()
        classes = {name: hetmem.ERRORS[code].__name__ for name, code in header_codes().items()}
        for name, fns in CALLS.items():
            need = set().union(*(per_function[f] for f in fns)) if fns else set()
            need -= GENERAL | NOT_RAISED.get(name, set())
            doc = docstring(api[name])
            raises = doc.split("Raises:", 1)[1] if "Raises:" in doc else ""
            for code in sorted(need):
                with self.subTest(f"{name} {code}"):
                    self.assertIn(classes[code], raises,
                                  f"{name}: its C calls {fns} can return {code}")


if __name__ == "__main__":
    unittest.main()
