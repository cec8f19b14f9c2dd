#!/usr/bin/env python3
"""GPU check of the LD_PRELOAD shim's GPU side (issue 18), in one run, on a lent GPU.

  shim_gpu_check.py --shim .device-bin/libhetmem_preload.so [--bench-bin .device-bin/gpu_alloc]

Every program runs in a child process, first without the shim (the reference), then
under it (LD_PRELOAD) in each mode; each child writes the shim's counters
(HETMEM_GPU_STATS) so the check also proves the shim saw the calls.

  1. PyTorch inference: a 2-layer Llama (hidden 1024, fp16, built from a config with
     seed 0, the model family python/bench/torch_check.py uses), forward logits and
     greedy generate(16): equal to the plain run under observe, pool, limit (8 GiB),
     oversubscribe, and with PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync under
     observe and pool; torch.cuda.mem_get_info() under the limit shows total = 8 GiB.
  2. The same model over a 128 MiB limit: fails cleanly (torch.OutOfMemoryError caught,
     exit 3) under limit, runs with outputs equal to the plain run under oversubscribe.
  3. CuPy: an array computation equal to NumPy's under no shim, observe, pool, limit.
  4. Pin-on-copy: 4 GiB from malloc copied to the device with the runtime's cudaMemcpy
     (ctypes on the libcudart PyTorch loaded): plain (pageable), a cudaHostAlloc buffer
     (the pinned link), and under HETMEM_GPU_PIN_ON_COPY=64M (first and later copies);
     target: later copies >= 0.9x the pinned link.
  5. Observe-mode overhead with preload/bench/gpu_alloc.c (scripts/gpu-shim-bench.sh):
     target <= 1.03x.

Prints a table, then one JSON line. Exit 0: all passed; 1: a check failed; 77: no
PyTorch or CUDA GPU here.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

SKIP = 77
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

CHILD = r'''
import json, os, sys, time, ctypes
what, out = sys.argv[1], sys.argv[2]
res = {}
def done(code=0):
    with open(out, "w") as f:
        json.dump(res, f)
    sys.exit(code)
if what in ("llama", "llama-over"):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=2,
                      num_attention_heads=16, num_key_value_heads=16, vocab_size=32000)
    model = LlamaForCausalLM(cfg).to(torch.float16).eval()
    ids = torch.randint(0, 32000, (2, 64), generator=torch.Generator().manual_seed(1))
    try:
        model = model.to("cuda")
        with torch.no_grad():
            logits = model(ids.cuda()).logits.float().cpu()
            gen = model.generate(ids.cuda(), max_new_tokens=16, do_sample=False).cpu()
    except torch.OutOfMemoryError as e:
        res["oom"] = str(e).splitlines()[0][:200]
        res["mem_get_info"] = list(torch.cuda.mem_get_info())
        done(3)
    res["mem_get_info"] = list(torch.cuda.mem_get_info())
    res["tokens"] = gen.tolist()
    torch.save(logits, out + ".logits.pt")
    done()
if what == "cupy":
    import cupy, numpy
    a = cupy.arange(1 << 24, dtype=cupy.float32)
    b = cupy.sqrt(a * 2.0 + 1.0)
    c = cupy.asnumpy(b[::4096])
    n = numpy.sqrt(numpy.arange(1 << 24, dtype=numpy.float32)[::4096] * 2.0 + 1.0)
    res["equal"] = bool(numpy.array_equal(c, n))
    res["sum"] = float(cupy.asnumpy(b.sum()))
    done()
if what == "pin":
    import torch
    torch.cuda.init(); torch.zeros(1, device="cuda")
    lib = next(l.split()[-1] for l in open("/proc/self/maps") if "libcudart" in l)
    rt = ctypes.CDLL(lib)
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    n = 4 << 30
    host = libc.malloc(ctypes.c_size_t(n))
    ctypes.memset(host, 1, n)
    dev = ctypes.c_void_p()
    assert rt.cudaMalloc(ctypes.byref(dev), ctypes.c_size_t(n)) == 0
    def copy(src):
        t = time.perf_counter()
        rc = rt.cudaMemcpy(dev, ctypes.c_void_p(src), ctypes.c_size_t(n), 1)
        rt.cudaDeviceSynchronize()
        return rc, n / (time.perf_counter() - t) / 1e9
    res["copies_gbps"] = [copy(host)[1] for _ in range(3)]
    if os.environ.get("PIN_REFERENCE") == "1":
        pinned = ctypes.c_void_p()
        assert rt.cudaHostAlloc(ctypes.byref(pinned), ctypes.c_size_t(n), 0) == 0
        ctypes.memset(pinned, 1, n)
        res["pinned_gbps"] = max(copy(pinned.value)[1] for _ in range(3))
    res["lib"] = lib
    done()
'''


def child(what, env, tmp, tag, timeout=300):
    out = os.path.join(tmp, f"{what}-{tag}.json")
    stats = os.path.join(tmp, f"{what}-{tag}.stats.json")
    e = dict(os.environ)
    for k in list(e):
        if k.startswith("HETMEM_") or k in ("LD_PRELOAD", "PYTORCH_CUDA_ALLOC_CONF"):
            del e[k]
    e.update(env)
    if "LD_PRELOAD" in env:
        e["HETMEM_GPU_STATS"] = stats
    try:
        p = subprocess.run([sys.executable, "-c", CHILD, what, out], env=e, capture_output=True,
                           text=True, timeout=timeout)
        rc, err = p.returncode, p.stderr[-2000:]
    except subprocess.TimeoutExpired:
        rc, err = 124, "timeout"
    res = json.load(open(out)) if os.path.exists(out) else {}
    st = json.load(open(stats)) if os.path.exists(stats) else None
    return rc, res, st, err, out + ".logits.pt"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shim", required=True)
    ap.add_argument("--bench-bin")
    a = ap.parse_args()
    try:
        import torch
        if not torch.cuda.is_available():
            raise ImportError("no CUDA GPU")
        import transformers  # noqa: F401
    except Exception as e:  # noqa: BLE001
        print(f"skipped: {e}")
        return SKIP
    shim = os.path.abspath(a.shim)
    pre = {"LD_PRELOAD": shim}
    rows, ok = [], True

    def row(name, passed, detail):
        nonlocal ok
        ok = ok and passed
        rows.append({"check": name, "ok": passed, "detail": detail})
        print(f"{'ok  ' if passed else 'FAIL'} {name}: {detail}", flush=True)

    tmp = tempfile.mkdtemp(prefix="shim_gpu_check-")
    rc, ref, _, err, ref_logits = child("llama", {}, tmp, "plain")
    if rc != 0:
        row("llama plain", False, f"rc {rc}: {err}")
        print(json.dumps({"ok": False, "rows": rows}))
        return 1
    ref_l = torch.load(ref_logits)
    modes = {
        "observe": {},
        "pool": {"HETMEM_GPU_MODE": "pool"},
        "limit": {"HETMEM_DEVICE_LIMIT": "0:8G"},
        "oversubscribe": {"HETMEM_DEVICE_LIMIT": "0:8G", "HETMEM_GPU_MODE": "oversubscribe"},
        "observe-cudaMallocAsync": {"PYTORCH_CUDA_ALLOC_CONF": "backend:cudaMallocAsync"},
        "pool-cudaMallocAsync": {"PYTORCH_CUDA_ALLOC_CONF": "backend:cudaMallocAsync",
                                 "HETMEM_GPU_MODE": "pool"},
    }
    for name, env in modes.items():
        rc, res, st, err, lg = child("llama", {**pre, **env}, tmp, name)
        if rc != 0:
            row(f"llama {name}", False, f"rc {rc}: {err}")
            continue
        l = torch.load(lg)
        same_tokens = res["tokens"] == ref["tokens"]
        diff = float((l - ref_l).abs().max())
        seen = st and (st["kinds"]["device"]["allocs"] + st.get("pool_served", 0)) > 0
        detail = f"tokens equal {same_tokens}, logits max diff {diff:.3g}, shim saw {st and st['kinds']['device']}"
        if name == "pool" or name.startswith("pool-"):
            detail += f", pool served {st and st.get('pool_served')}"
        if name == "limit":
            t = res["mem_get_info"][1]
            detail += f", mem_get_info {res['mem_get_info']}"
            row("mem_get_info shows the limit", t == 8 << 30 and res["mem_get_info"][0] <= t,
                f"{res['mem_get_info']}")
        row(f"llama {name}", bool(same_tokens and diff <= 1e-3 and seen), detail)
    over = {"HETMEM_DEVICE_LIMIT": "0:128M"}
    rc, res, st, err, _ = child("llama", {**pre, **over}, tmp, "over-limit")
    row("model over the limit fails cleanly", rc == 3 and "oom" in res,
        f"rc {rc}, {res.get('oom')}, refused {st and st.get('refused')}, mem_get_info {res.get('mem_get_info')}")
    rc, res, st, err, lg = child("llama", {**pre, **over, "HETMEM_GPU_MODE": "oversubscribe"}, tmp, "over-os")
    if rc == 0:
        diff = float((torch.load(lg) - ref_l).abs().max())
        row("model over the limit runs oversubscribed", res["tokens"] == ref["tokens"] and diff <= 1e-3,
            f"logits max diff {diff:.3g}, oversubscribed {st and st['kinds']['oversubscribed']}, prefetches {st and st.get('prefetches')}")
    else:
        row("model over the limit runs oversubscribed", False, f"rc {rc}: {err}")
    try:
        import cupy  # noqa: F401
        rc, cref, _, err, _ = child("cupy", {}, tmp, "plain")
        for name, env in {"observe": {}, "pool": {"HETMEM_GPU_MODE": "pool"},
                          "limit": {"HETMEM_DEVICE_LIMIT": "0:4G"}}.items():
            rc, res, st, err, _ = child("cupy", {**pre, **env}, tmp, name)
            row(f"cupy {name}", rc == 0 and res.get("equal") and res.get("sum") == cref.get("sum")
                and bool(st and (st["kinds"]["device"]["allocs"] + st.get("pool_served", 0)) > 0),
                f"rc {rc}, {res}, device {st and st['kinds']['device']} {err if rc else ''}")
    except ImportError:
        row("cupy", False, "CuPy is not installed")
    rc, plain, _, err, _ = child("pin", {"PIN_REFERENCE": "1"}, tmp, "plain")
    if rc == 0:
        link = plain["pinned_gbps"]
        rc2, pin, st, err2, _ = child("pin", {**pre, "HETMEM_GPU_PIN_ON_COPY": "64M"}, tmp, "pin")
        later = min(pin["copies_gbps"][1:]) if rc2 == 0 else 0
        row("pageable copy plain 6-11 GB/s", 4 <= max(plain["copies_gbps"]) <= 14,
            f"plain {[round(x, 1) for x in plain['copies_gbps']]} GB/s, pinned link {link:.1f}")
        row("pin-on-copy >= 0.9x the pinned link", rc2 == 0 and later >= 0.9 * link,
            f"{[round(x, 1) for x in pin.get('copies_gbps', [])]} GB/s vs link {link:.1f}, "
            f"pin misses/hits {st and (st['pin_misses'], st['pin_hits'])} {err2 if rc2 else ''}")
        if a.bench_bin:
            b = subprocess.run(["bash", os.path.join(ROOT, "scripts/gpu-shim-bench.sh"), shim,
                                a.bench_bin, plain["lib"], "7", "20"], capture_output=True, text=True)
            last = [l for l in b.stdout.splitlines() if l.startswith("{")]
            r = json.loads(last[-1])["total_ms"]["ratio"] if last else None
            row("observe overhead <= 1.03x", r is not None and r <= 1.03, f"{last[-1] if last else b.stderr[-500:]}")
    else:
        row("pin-on-copy", False, f"plain rc {rc}: {err}")
    print(json.dumps({"ok": ok, "rows": rows}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
