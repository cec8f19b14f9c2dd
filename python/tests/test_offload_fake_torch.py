"""hetmem.torch.offload's plumbing on the sim backend, with a fake torch module
(tests/fake_torch.py) standing in for PyTorch. Real PyTorch on a GPU is checked by
python/bench/torch_check.py."""

import os
import sys
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

nn = torch.nn


def data(n, seed):
    return bytes((i * 131 + seed * 17 + (i >> 7)) & 0xFF for i in range(n))


def tensor(shape, dtype, seed):
    n = torch._numel(shape) * dtype.itemsize
    return torch.Tensor.from_bytes(data(n, seed), dtype, shape)


class Leaf(nn.Module):
    """A module with one weight that records what its forward saw."""

    def __init__(self, w, fail=False):
        super().__init__()
        self.weight = w if isinstance(w, torch.Parameter) else torch.Parameter(w)
        self.seen = []
        self.fail = fail

    def forward(self, x):
        w = self.weight.data
        self.seen.append((w.device, w.ptr, w.shape, w.dtype, w.expanded))
        if self.fail:
            raise ValueError("forward failed")
        return x


class Block(nn.Module):
    """Owns a parameter directly and has children that own parameters."""

    def __init__(self, seed):
        super().__init__()
        self.scale = torch.Parameter(tensor((256,), torch.float32, seed))
        self.attn = Leaf(tensor((256, 256), torch.float16, seed + 1))
        self.mlp = Leaf(tensor((256, 512), torch.float16, seed + 2))
        self.norm = Leaf(tensor((), torch.float32, seed + 3))
        self.bias = Leaf(tensor((256,), torch.bfloat16, seed + 4))
        self.seen = []

    def forward(self, x):
        s = self.scale.data
        self.seen.append((s.device, s.ptr, s.shape, s.dtype, s.expanded))
        for m in (self.attn, self.mlp, self.norm, self.bias):
            x = m(x)
        return x


class Rotary(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("inv_freq", tensor((4,), torch.float32, 99))

    def forward(self, x):
        return x


class Model(nn.Module):
    def __init__(self, layers=3):
        super().__init__()
        self.embed = Leaf(tensor((256, 256), torch.float16, 1))
        self.layers = nn.Module()
        for i in range(layers):
            setattr(self.layers, str(i), Block(10 * (i + 1)))
        self.rotary = Rotary()
        self.head = Leaf(self.embed.weight)  # tied

    def forward(self, x):
        x = self.embed(x)
        for b in self.layers._modules.values():
            x = b(x)
        self.rotary(x)
        return self.head(x)


def total_bytes(model):
    return sum(p.numel() * p.element_size() for _, p in model.named_parameters())


class TestOffloadWithFakeTorch(unittest.TestCase):
    def setUp(self):
        patch = mock.patch.dict(sys.modules, {"torch": torch})
        patch.start()
        self.addCleanup(patch.stop)

    def test_refuses_a_backend_torch_cannot_use(self):
        with self.assertRaises(RuntimeError) as cm:
            ht.offload(Model(), 1 << 20, backend="sim")
        self.assertIn("GPU backend", str(cm.exception))

    def test_offload_forward_and_remove(self):
        model = Model()
        params = dict(model.named_parameters())
        self.assertEqual(len(params), 1 + 3 * 5)  # the tied head weight once
        original = {n: p.data.bytes() for n, p in params.items()}
        shapes = {n: (p.data.shape, p.data.dtype) for n, p in params.items()}
        budget = total_bytes(model) // 2
        with mock.patch.object(ht, "_GPU_BACKENDS", ("sim",)):
            ht.offload(model, budget, backend="sim")
        store = model._hetmem_store
        self.assertIsInstance(store, hetmem.TierStore)
        # The static planner, room for one streamed parameter: each module owns one.
        self.assertEqual(store.config.planner, hetmem._lib.HETMEM_PLANNER_STATIC)
        self.assertEqual(store.config.spare_slots, 1)
        with self.assertRaises(RuntimeError):
            ht.offload(model, budget, backend="sim")
        cuda = torch.device("cuda", 0)
        # Placeholders: right shape, dtype and device, no memory of their own.
        for n, p in params.items():
            self.assertEqual((p.data.shape, p.data.dtype), shapes[n], n)
            self.assertEqual(p.data.device, cuda, n)
            self.assertTrue(p.data.expanded or p.data.shape == (), n)
        self.assertEqual(model.rotary._buffers["inv_freq"].device, cuda)
        ids = {n: store.lookup(n) for n in params}
        self.assertEqual(sorted(ids.values()), list(range(len(params))))

        leaves = [model.embed, model.head] + [
            m for b in model.layers._modules.values() for m in (b, b.attn, b.mlp, b.norm, b.bias)
        ]
        with torch.no_grad():
            for _ in range(3):
                model("x")
        for leaf in leaves:
            self.assertEqual(len(leaf.seen), 3)
            for dev, ptr, shape, dtype, expanded in leaf.seen:
                self.assertEqual(dev, cuda)
                self.assertFalse(expanded, "the forward saw a placeholder")
                self.assertNotEqual(ptr, 0)
        self.assertEqual(model.layers._modules["0"].attn.seen[0][2:4],
                         (shapes["layers.0.attn.weight"]))
        self.assertEqual(model.layers._modules["1"].norm.seen[0][2], ())
        self.assertEqual(model.layers._modules["2"].bias.seen[0][3], torch.bfloat16)
        self.assertEqual(model._hetmem_offload.copies, 0, "as_tensor wrapped, no copy")
        # After the forward: placeholders back, nothing held.
        for n, p in params.items():
            self.assertTrue(p.data.expanded or p.data.shape == (), n)
            self.assertEqual(store.residency(ids[n])[1], 0, n)
        st = store.stats()
        self.assertEqual(st["params"], len(params))
        # The tied head makes the embedding's weight the first and the last acquire of a
        # pass: learnt from pass 1 as far as its second use, extended on pass 2, never
        # dropped.
        self.assertEqual((st["sequences_learnt"], st["sequences_dropped"]), (2, 0), st)
        self.assertGreater(st["evictions"], 0, st)
        # The learnt order drives the loads: some are queued ahead of their acquire.
        self.assertGreater(st["prefetches"], 0, st)
        self.assertLessEqual(st["device_peak_bytes"], budget + 512 * len(params), st)
        # The store holds the bytes that were registered.
        for n in params:
            self.assertEqual(store.read(ids[n]), original[n], n)

        # inference_mode works too, and grad mode warns once.
        with torch.no_grad(), torch.inference_mode():
            model("x")
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            model("x")
            model("x")
        self.assertEqual(sum("for inference" in str(x.message) for x in w), 1)

        # A failing forward: the hooks still put the placeholders back and release.
        model.layers._modules["1"].mlp.fail = True
        with torch.no_grad(), self.assertRaises(ValueError):
            model("x")
        model.layers._modules["1"].mlp.fail = False
        for n, p in params.items():
            self.assertEqual(store.residency(ids[n])[1], 0, n)
            self.assertTrue(p.data.expanded or p.data.shape == (), n)
        with torch.no_grad():
            model("x")

        # remove_offload: the bytes come back as CPU tensors, buffers go home.
        ht.remove_offload(model)
        self.assertFalse(hasattr(model, "_hetmem_store"))
        for n, p in params.items():
            self.assertEqual(p.data.device, torch.CPU, n)
            self.assertEqual((p.data.shape, p.data.dtype), shapes[n], n)
            self.assertEqual(p.data.bytes(), original[n], n)
        self.assertIs(model.head.weight, model.embed.weight)
        self.assertEqual(model.rotary._buffers["inv_freq"].device, torch.CPU)
        before = len(model.embed.seen)
        model("x")  # no hooks: the CPU weights as they are
        self.assertEqual(model.embed.seen[before][0], torch.CPU)
        with self.assertRaises(RuntimeError):
            ht.remove_offload(model)

    def test_a_failed_offload_leaves_the_model_as_it_was(self):
        model = Model(layers=2)
        params = dict(model.named_parameters())
        original = {n: p.data.bytes() for n, p in params.items()}
        # Room for the embedding and the attention weights, not the MLP's 256 KiB.
        with mock.patch.object(ht, "_GPU_BACKENDS", ("sim",)):
            with self.assertRaises(hetmem.HetmemError) as cm:
                ht.offload(model, 200 * 1024, backend="sim")
        self.assertEqual(cm.exception.name, "HETMEM_ERR_OUT_OF_MEMORY")
        self.assertFalse(hasattr(model, "_hetmem_store"))
        for n, p in params.items():
            self.assertEqual(p.data.device, torch.CPU, n)
            self.assertEqual(p.data.bytes(), original[n], n)
        self.assertEqual(model.embed.weight.data.bytes(), original["embed.weight"])
        model("x")
        self.assertEqual(model.embed.seen[-1][0], torch.CPU)

    def test_modules_with_several_parameters_get_room_for_two(self):
        model = Model()
        model.embed.bias = torch.Parameter(tensor((64,), torch.float32, 7))
        with mock.patch.object(ht, "_GPU_BACKENDS", ("sim",)):
            ht.offload(model, total_bytes(model) // 2, backend="sim")
        store = model._hetmem_store
        self.assertEqual(store.config.spare_slots, 2)
        with torch.no_grad():
            for _ in range(3):
                model("x")
        self.assertEqual(store.stats()["checksum_mismatches"], 0)
        ht.remove_offload(model)

    def test_offload_frees_the_cpu_copies(self):
        model = Model(layers=1)
        w = model.layers._modules["0"].mlp.weight
        old = w.data
        with mock.patch.object(ht, "_GPU_BACKENDS", ("sim",)):
            ht.offload(model, 1 << 20, backend="sim")
        self.assertIsNot(w.data, old)
        self.assertIsNot(w.data._mem, old._mem, "the CPU bytes are not held by the model")
        ht.remove_offload(model, restore=False)
        self.assertTrue(w.data.expanded)


if __name__ == "__main__":
    unittest.main()
