#!/usr/bin/env python3
"""GPU check of hetmem's PyTorch integration (issue 6), in one run.

Needs PyTorch with a CUDA GPU, transformers, accelerate and numpy; downloads nothing
(models are built from configs with fixed seeds). libhetmem.so comes from $HETMEM_LIB
(else the repository's target/). Writes logs under $OUT/torch_check/ if $OUT is set.

  1. hetmem as PyTorch's allocator, each allocator in its own subprocess (the switch
     must come before CUDA is initialised): a 2-layer Llama (hidden 1024, fp16, the
     same weights in both, saved by a preparation step): forward logits and greedy
     generate(max_new_tokens=16) compared with PyTorch's own allocator (and hetmem's
     live blocks > 0: the tensors really came from it); and a torch.empty/del loop
     timed under both (target: hetmem/torch <= 1.10).
  2. offload of an 8-layer Llama (hidden 4096, intermediate 11008, 32 heads, vocab
     32000, fp16: 1,881,214,976 parameters = 3,762,429,952 bytes), 1x128 tokens, device
     budget half the model: the model wholly on the GPU (the reference), accelerate
     infer_auto_device_map + dispatch_model (same budget), accelerate.cpu_offload,
     then hetmem.torch.offload (last, so that a crash in it cannot cost the
     baselines), all on the reference's weights; plus pinned H2D bandwidth.
     Targets: outputs match, hetmem forward <= 62 ms and >= 6x faster than
     dispatch_model, zero copy, remove_offload gives the weights back byte for byte.
  3. PyTorch's allocator hooks under hetmem (issue 14), in their own subprocess: the
     C++ hooks built on this host and set (else, with $HETMEM_TORCH_HOOKS_PREBUILT naming
     a library built elsewhere for this torch, the part runs again with it and both
     are reported); (a) tensor.record_stream: a tensor written on the current stream is
     read on a side stream behind a long kernel, recorded, freed, and the memory
     allocated again and overwritten on the current stream: the side stream must read
     the old bytes intact (the same steps without record_stream are run first and
     reported, to show the hazard is real); (b) torch.cuda.empty_cache() lowers
     hetmem's reserved bytes; (c) a torch.cuda.graph capture raises "CUDA graph capture
     with hetmem's allocator is not supported yet" before it starts, and allocations
     work after it (turn this into a real capture check once graph pools exist).

Each part runs in a subprocess under a timeout (90 + 80 + 80 + 240 + 2 x 90 s at
worst; a normal run takes about 3 minutes); children print a RESULT line after each step and
the last one counts, so a failure or hang still lets the rest report. Prints a
table, then one JSON line. Exit status: 0 every part ran and every target
passed; 1 a part failed or a target was missed; 77 skipped (no PyTorch, transformers,
accelerate or CUDA GPU here: the message says which).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
PYROOT = os.path.dirname(HERE)
if PYROOT not in sys.path:
    sys.path.insert(0, PYROOT)

SKIP = 77
HETMEM_TARGET_MS = 62.0
SPEEDUP_TARGET = 6.0
ALLOC_RATIO_TARGET = 1.10
GIB = 1 << 30

SMALL = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=2,
             num_attention_heads=16, num_key_value_heads=16, vocab_size=32000,
             max_position_embeddings=2048)
BIG = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=8,
           num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
           max_position_embeddings=2048)


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, file=sys.stderr, flush=True)


def result(d):
    print("RESULT " + json.dumps(d), flush=True)


def gpu_backend_name(torch):
    return "rocm" if getattr(torch.version, "hip", None) else "cuda"


def llama(config_kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**config_kw)
    return cfg, LlamaForCausalLM


def median_ms(fn, warmup, reps, torch):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), times


def compare(torch, got, ref):
    """Logits within fp16 tolerance: allclose(atol=rtol=1e-2). The argmax agreement is
    reported beside it, never instead of it (a stale weight can keep the top token)."""
    got, ref = got.float(), ref.float()
    diff = (got - ref).abs().max().item()
    argmax = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    close = bool(torch.allclose(got, ref, atol=1e-2, rtol=1e-2))
    return {"max_abs_diff": diff, "argmax_agree": argmax, "bitwise_equal": diff == 0.0,
            "ok": close}


# ---- children ------------------------------------------------------------------------------------


def child_prep(d):
    """CPU only: the small model's weights and the inputs, saved for both allocators."""
    import accelerate
    import torch
    import transformers

    info = {"torch": torch.__version__, "cuda": torch.cuda.is_available(),
            "transformers": transformers.__version__, "accelerate": accelerate.__version__}
    if torch.cuda.is_available():
        # Queries only: cudaGetDeviceCount / properties do not initialise the allocator,
        # and this process is not the one that switches it anyway.
        info["card"] = torch.cuda.get_device_name(0)
        info["gpu_memory"] = torch.cuda.get_device_properties(0).total_memory
    cfg, cls = llama(SMALL)
    torch.manual_seed(0)
    model = cls(cfg).half().eval()
    torch.save(model.state_dict(), os.path.join(d, "small.pt"))
    g = torch.Generator().manual_seed(1)
    torch.save(torch.randint(0, SMALL["vocab_size"], (1, 64), generator=g),
               os.path.join(d, "ids.pt"))
    info["small_params"] = sum(p.numel() for p in model.parameters())
    result(info)


def empty_del_us(torch, dev, size, n, max_s=1.0):
    """µs per torch.empty(size) + del on dev: n iterations, or fewer when they take
    longer than max_s (so a slow allocator cannot eat the run's time)."""
    count = 0
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    while count < n:
        for _ in range(256):
            x = torch.empty(size, dtype=torch.uint8, device=dev)
            del x
        count += 256
        if time.perf_counter() - t0 > max_s:
            break
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / count * 1e6


def child_alloc(d, which):
    """One allocator: forward, generate, and the torch.empty/del loop."""
    out = {"allocator": which}
    if which == "hetmem":
        import hetmem.torch as ht

        ht.use_hetmem_allocator()  # before anything touches CUDA
        out["library"] = __import__("hetmem").library_path()
    import torch

    try:
        out["allocator_backend"] = torch.cuda.memory.get_allocator_backend()
    except Exception as e:  # the name is informational only
        out["allocator_backend"] = f"? ({type(e).__name__}: {e})"

    cfg, cls = llama(SMALL)
    model = cls(cfg).half().eval()
    model.load_state_dict(torch.load(os.path.join(d, "small.pt")))
    dev = torch.device("cuda", 0)
    model.to(dev)
    ids = torch.load(os.path.join(d, "ids.pt")).to(dev)
    with torch.no_grad():
        logits = model(ids).logits
        torch.save(logits.float().cpu(), os.path.join(d, f"logits_{which}.pt"))
        gen = model.generate(ids[:, :32], attention_mask=torch.ones_like(ids[:, :32]),
                             max_new_tokens=16, do_sample=False, pad_token_id=0)
    out["tokens"] = gen[0, 32:].tolist()
    if which == "hetmem":
        # Proof that PyTorch's tensors came from hetmem: the model's weights are live
        # blocks of hetmem's allocator now.
        st = ht.hetmem_allocator_stats()
        out["hetmem_stats"] = {
            "backend": st.get("backend"),
            "live_blocks": st.get("live_blocks"),
            "live_bytes": st.get("live_bytes"),
            "model_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        }
    log(which, "forward and generate done", json.dumps(out.get("hetmem_stats")))
    result(out)  # a partial result: the parent keeps the last RESULT line
    # torch.empty/del loop: median of 5 repetitions per size, per allocation+free.
    loop = {}
    for size, n in ((1 << 20, 20000), (16 << 20, 20000), (256 << 20, 5000)):
        empty_del_us(torch, dev, size, 1000, max_s=0.5)  # warm-up
        loop[str(size)] = statistics.median(
            empty_del_us(torch, dev, size, n) for _ in range(5))
        log(which, f"torch.empty/del {size} B: {loop[str(size)]:.2f} us")
    out["empty_del_us"] = loop
    if which == "hetmem":
        st = ht.hetmem_allocator_stats()
        out["hetmem_stats"]["peak_allocated"] = [
            dv.get("stats", {}).get("allocated_bytes.all.peak") for dv in st.get("devices", [])
        ]
    result(out)
    # Out of memory is a Python exception (hetmem's C++ entry point throws; a NULL
    # would become a tensor at address 0), and the allocator works after it.
    try:
        x = torch.empty(1 << 50, dtype=torch.uint8, device=dev)
        out["oom"] = f"no error: {x.data_ptr():#x}"
    except Exception as e:
        out["oom"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        y = torch.ones(1 << 20, device=dev)
        out["oom_then_alloc_ok"] = float(y.sum().item()) == float(1 << 20)
        del y
    log(which, "out of memory:", out["oom"])
    result(out)


def build_big(torch, state_dict=None):
    """The 8-layer Llama in fp16 on the CPU: initialised on the GPU with a fixed seed
    (fast; the non-persistent rotary buffers are right), then moved; with state_dict,
    those weights loaded (so every method runs the reference's weights whatever the
    RNG does)."""
    cfg, cls = llama(BIG)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = cls(cfg)
    model = model.half().to("cpu").eval()
    torch.cuda.empty_cache()
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return model


def model_bytes(model):
    return sum(p.numel() * p.element_size() for p in model.parameters())


def child_offload(d):
    """The reference, then accelerate's two offloads, then hetmem's (last: a crash in
    it cannot cost the baselines). A RESULT line after each method keeps what was
    measured if a later one hangs or crashes."""
    import gc

    import torch

    out = {"card": torch.cuda.get_device_name(0), "methods": {}}
    dev = torch.device("cuda", 0)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, BIG["vocab_size"], (1, 128), generator=g).to(dev)

    def forward(model):
        with torch.no_grad():
            return model(ids).logits

    def check(logits):
        if "ref" not in state:
            return {"ok": False, "error": "no reference (gpu_resident failed)"}
        return compare(torch, logits.cpu(), state["ref"])

    def record(name, fn):
        t0 = time.perf_counter()
        try:
            out["methods"][name] = fn()
        except Exception as e:  # one failure still lets the rest run
            traceback.print_exc()
            out["methods"][name] = {"error": f"{type(e).__name__}: {e}"}
        out["methods"][name]["wall_s"] = round(time.perf_counter() - t0, 1)
        log(name, json.dumps(out["methods"][name])[:400])
        result(out)  # before the clean-up, which raises if the method broke the context
        try:
            gc.collect()
            torch.cuda.empty_cache()
        except Exception:  # the next method then fails and says so; this one is kept
            traceback.print_exc()

    state = {}

    # Pinned H2D bandwidth (context for the offload figures).
    def bandwidth():
        x = torch.empty(GIB, dtype=torch.uint8, pin_memory=True)
        y = torch.empty(GIB, dtype=torch.uint8, device=dev)
        ms, _ = median_ms(lambda: y.copy_(x, non_blocking=True), 1, 5, torch)
        bw = GIB / (ms / 1e3) / 1e9
        out["link_floor_ms_half"] = state.get("half", 3_762_429_952 // 2) / (bw * 1e9) * 1e3
        return {"pinned_h2d_gbps": bw, "ms_per_gib": ms}

    # The reference: the whole model on the GPU; its CPU weights are kept (state_dict
    # shares their storage) for the other methods and for remove_offload's check.
    def reference():
        m = build_big(torch)
        n = model_bytes(m)
        state["params"] = sum(p.numel() for p in m.parameters())
        state["bytes"], state["half"] = n, n // 2
        m.to(dev)
        ms, _ = median_ms(lambda: forward(m), 2, 5, torch)
        state["ref"] = forward(m).float().cpu()
        m.to("cpu")
        state["sd"] = m.state_dict()
        state["model"] = m
        return {"forward_ms": ms, "model_bytes": n, "params": state["params"]}

    record("gpu_resident", reference)
    half = state.get("half", 3_762_429_952 // 2)
    out["model_bytes"] = state.get("bytes", 3_762_429_952)
    out["device_budget"] = half
    record("h2d", bandwidth)

    def fresh():
        m = state.pop("model", None)
        return m if m is not None else build_big(torch, state.get("sd"))

    def accelerate_dispatch():
        from accelerate import dispatch_model, infer_auto_device_map
        from accelerate.hooks import remove_hook_from_submodules

        m = fresh()
        dmap = infer_auto_device_map(
            m, max_memory={0: half, "cpu": 512 * GIB},
            no_split_module_classes=list(getattr(m, "_no_split_modules", None) or []))
        on_gpu = sorted(k for k, v in dmap.items() if str(v) in ("0", "cuda", "cuda:0"))
        dispatch_model(m, device_map=dmap)
        ms, times = median_ms(lambda: forward(m), 2, 5, torch)
        res = {"forward_ms": ms, "times_ms": times, "on_gpu": on_gpu,
               "cmp": check(forward(m))}
        remove_hook_from_submodules(m)
        return res

    record("accelerate_dispatch", accelerate_dispatch)

    def accelerate_cpu_offload():
        from accelerate import cpu_offload

        m = fresh()
        cpu_offload(m, execution_device=dev)
        ms, times = median_ms(lambda: forward(m), 1, 3, torch)
        res = {"forward_ms": ms, "times_ms": times,
               "cmp": check(forward(m))}
        return res

    record("accelerate_cpu_offload", accelerate_cpu_offload)

    def hetmem_offload():
        import hetmem.torch as ht

        m = fresh()
        t0 = time.perf_counter()
        ht.offload(m, device_budget=half, device=0, backend=gpu_backend_name(torch))
        setup_s = time.perf_counter() - t0
        store = m._hetmem_store
        first = []
        for _ in range(2):  # warm-up: the first pass learns the order and pins
            t1 = time.perf_counter()
            forward(m)
            torch.cuda.synchronize()
            first.append((time.perf_counter() - t1) * 1e3)
        before = store.stats()
        ms, times = median_ms(lambda: forward(m), 0, 7, torch)
        after = store.stats()
        logits = forward(m)
        res = {"forward_ms": ms, "times_ms": times, "warmup_ms": first,
               "setup_s": setup_s, "cmp": check(logits),
               "zero_copy": m._hetmem_offload.copies == 0}
        res["per_forward"] = {k: (after.get(k, 0) - before.get(k, 0)) / 7 for k in
                              ("bytes_loaded", "loads", "hits", "prefetches", "evictions",
                               "staged_loads", "unplanned_evictions", "pool_syncs",
                               "pool_maps")}
        res["store"] = after
        # Undo, and check the weights come back byte for byte.
        ht.remove_offload(m)
        sd = state.get("sd")
        if sd is not None:
            a = m.state_dict()
            res["remove_offload_restores"] = all(torch.equal(a[k], sd[k]) for k in sd)
        return res

    record("hetmem_offload", hetmem_offload)
    result(out)


GRAPHS_UNSUPPORTED = "CUDA graph capture with hetmem's allocator is not supported yet"


def child_hooks(d):
    """hetmem's allocator with PyTorch's C++ hooks: record_stream, empty_cache, graphs."""
    import hetmem.torch as ht

    t0 = time.perf_counter()
    ht.use_hetmem_allocator()  # before anything touches CUDA; builds the hooks if needed
    import torch

    out = {"hooks": ht.allocator_hooks(), "setup_s": round(time.perf_counter() - t0, 2),
           "hooks_lib": os.environ.get("HETMEM_TORCH_HOOKS_LIB")}
    log("hooks:", json.dumps(out["hooks"]))
    result(out)
    dev = torch.device("cuda", 0)
    side = torch.cuda.Stream(dev)
    n = (64 << 20) // 4  # float32 elements: 64 MiB
    # About 0.2 s of side-stream work ahead of its read (the clock rate is a guess: the
    # figure only has to outlast the current stream's overwrite, microseconds).
    cycles = int(0.2 * 2e9)

    def reuse(record):
        """x written on the current stream, read on `side` after a long kernel, freed
        (after record_stream if `record`), then the memory allocated again on the
        current stream and overwritten: did the side stream read x's bytes?"""
        cur = torch.cuda.current_stream(dev)
        x = torch.full((n,), 7.0, device=dev)
        x_ptr = x.data_ptr()
        side.wait_stream(cur)
        with torch.cuda.stream(side):
            torch.cuda._sleep(cycles)
            seen = x.clone()  # allocated on side, read behind the sleep
        if record:
            x.record_stream(side)
        del x
        z = torch.empty(n, device=dev)
        aliased = z.data_ptr() == x_ptr
        z.fill_(-1.0)
        torch.cuda.synchronize()
        intact = bool((seen == 7.0).all().item())
        del z, seen
        return {"aliased": aliased, "intact": intact}

    res = {}
    try:
        res["without_record_stream"] = reuse(False)
        res["with_record_stream"] = reuse(True)
    except Exception as e:
        traceback.print_exc()
        res["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    out["record_stream"] = res
    log("record_stream:", json.dumps(res))
    result(out)

    # empty_cache: a large block freed stays cached by hetmem until empty_cache.
    def reserved():
        return sum(dv.get("reserved", 0) for dv in ht.hetmem_allocator_stats()["devices"])

    try:
        y = torch.empty(512 << 20, dtype=torch.uint8, device=dev)
        del y
        torch.cuda.synchronize()
        before, free_before = reserved(), torch.cuda.mem_get_info(dev)[0]
        torch.cuda.empty_cache()
        after, free_after = reserved(), torch.cuda.mem_get_info(dev)[0]
        out["empty_cache"] = {"reserved_before": before, "reserved_after": after,
                              "driver_free_gain": free_after - free_before}
    except Exception as e:
        traceback.print_exc()
        out["empty_cache"] = {"error": f"{type(e).__name__}: {e}"}
    log("empty_cache:", json.dumps(out["empty_cache"]))
    result(out)

    # Graph capture: must fail before it begins, and leave the allocator usable.
    g = torch.cuda.CUDAGraph()
    prev = torch.cuda.current_stream(dev)
    static = torch.ones(1 << 20, device=dev)
    gr = {}
    try:
        with torch.cuda.graph(g):
            static2 = static * 2  # noqa: F841
        gr["error"] = None
    except Exception as e:
        gr["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    finally:
        # torch.cuda.graph's __enter__ made its side stream current; a failed
        # capture_begin means its __exit__ never ran.
        torch.cuda.set_stream(prev)
    gr["capturing_after"] = torch.cuda.is_current_stream_capturing()
    try:
        gr["alloc_after_ok"] = float(torch.ones(1 << 20, device=dev).sum().item()) == float(1 << 20)
    except Exception as e:
        gr["alloc_after_ok"] = False
        gr["alloc_after_error"] = f"{type(e).__name__}: {e}"
    out["graph"] = gr
    log("graph:", json.dumps(gr))
    result(out)


# ---- parent ---------------------------------------------------------------------------------------


def run_child(args, timeout, logdir, name, env):
    cmd = [sys.executable, os.path.abspath(__file__), "--child"] + args
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        rc, so, se = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        rc = "timeout"
        so = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        se = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
    wall = time.perf_counter() - t0
    if logdir:
        with open(os.path.join(logdir, f"{name}.log"), "w") as f:
            f.write(f"$ {' '.join(cmd)}\nrc={rc} wall={wall:.1f}s\n--- stdout\n{so}\n--- stderr\n{se}")
    res = None
    for line in so.splitlines():  # the last RESULT line: children print partial ones
        if line.startswith("RESULT "):
            try:
                res = json.loads(line[7:])
            except ValueError:  # cut short by a kill
                pass
    tail = "\n".join((se or "").strip().splitlines()[-15:])
    if res is None:
        print(f"--- {name} failed (rc={rc}); last lines of its stderr:\n{tail}", flush=True)
        return {"error": f"rc={rc}", "rc": rc, "stderr_tail": tail[-2000:]}, wall
    if rc != 0:
        print(f"--- {name} ended with rc={rc} after its last result; last lines of its "
              f"stderr:\n{tail}", flush=True)
        res["stderr_tail"] = tail[-2000:]
    res["rc"] = rc
    res["wall_s"] = round(wall, 1)
    return res, wall


def fmt(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--skip-allocator", action="store_true", help="skip part 1")
    ap.add_argument("--skip-offload", action="store_true", help="skip part 2")
    ap.add_argument("--skip-hooks", action="store_true", help="skip part 3")
    a = ap.parse_args()
    if a.child:
        kind, rest = a.child[0], a.child[1:]
        {"prep": child_prep, "alloc": child_alloc, "offload": child_offload,
         "hooks": child_hooks}[kind](*rest)
        return 0

    import importlib.util

    missing = [m for m in ("torch", "transformers", "accelerate", "numpy")
               if importlib.util.find_spec(m) is None]
    if missing:
        print(f"SKIP: {', '.join(missing)} not installed here; this check needs PyTorch "
              "with a CUDA GPU, transformers, accelerate and numpy.")
        print(json.dumps({"skipped": True, "reason": f"missing {', '.join(missing)}"}))
        return SKIP
    import hetmem

    try:
        lib = os.path.abspath(hetmem.library_path())
    except ImportError as e:
        print(f"FAIL: {e}")
        print(json.dumps({"skipped": False, "ok": False, "error": str(e)}))
        return 1

    logdir = None
    if os.environ.get("OUT"):
        logdir = os.path.join(os.environ["OUT"], "torch_check")
        os.makedirs(logdir, exist_ok=True)
    env = dict(os.environ, HETMEM_LIB=lib, PYTHONPATH=PYROOT + os.pathsep
               + os.environ.get("PYTHONPATH", ""))
    env.pop("HETMEM_BACKEND", None)  # the GPU's backend, found automatically
    t_start = time.perf_counter()
    report = {"skipped": False, "library": lib}
    with tempfile.TemporaryDirectory(prefix="hetmem-torch-check-") as d:
        prep, _ = run_child(["prep", d], 90, logdir, "prep", env)
        report["prep"] = prep
        if "error" not in prep and not prep.get("cuda"):
            print("SKIP: PyTorch sees no CUDA GPU here.")
            print(json.dumps({"skipped": True, "reason": "no CUDA GPU"}))
            return SKIP
        card = prep.get("card", "?")
        print(f"card: {card}; torch {prep.get('torch')}, transformers "
              f"{prep.get('transformers')}, accelerate {prep.get('accelerate')}; library {lib}",
              flush=True)

        # Part 1: the allocator.
        p1 = {}
        if not a.skip_allocator and "error" not in prep:
            for which in ("torch", "hetmem"):
                p1[which], _ = run_child(["alloc", d, which], 80, logdir, f"alloc_{which}", env)
            try:
                import torch

                lt = torch.load(os.path.join(d, "logits_torch.pt"))
                lh = torch.load(os.path.join(d, "logits_hetmem.pt"))
                p1["logits"] = compare(torch, lh, lt)
            except Exception as e:
                p1["logits"] = {"error": f"{type(e).__name__}: {e}", "ok": False}
            try:
                p1["tokens_equal"] = p1["torch"]["tokens"] == p1["hetmem"]["tokens"]
                ratios = {s: p1["hetmem"]["empty_del_us"][s] / p1["torch"]["empty_del_us"][s]
                          for s in p1["torch"]["empty_del_us"]}
                p1["empty_del_ratio"] = ratios
                p1["empty_del_ratio_total"] = (
                    sum(p1["hetmem"]["empty_del_us"].values())
                    / sum(p1["torch"]["empty_del_us"].values()))
            except Exception as e:
                p1.setdefault("error", f"{type(e).__name__}: {e}")
        report["allocator"] = p1

        # Part 2: offload.
        p2 = {}
        if not a.skip_offload:
            p2, _ = run_child(["offload", d], 240, logdir, "offload", env)
        report["offload"] = p2

        # Part 3: the allocator hooks (record_stream, empty_cache, graph capture).
        p3 = {}
        if not a.skip_hooks and "error" not in prep:
            henv = dict(env)
            henv.pop("HETMEM_TORCH_HOOKS_LIB", None)  # what a user gets: built here
            p3["host_build"], _ = run_child(["hooks", d], 90, logdir, "hooks", henv)
            prebuilt = os.environ.get("HETMEM_TORCH_HOOKS_PREBUILT")
            installed = (p3["host_build"].get("hooks") or {}).get("installed")
            if not installed and prebuilt:
                henv["HETMEM_TORCH_HOOKS_LIB"] = os.path.abspath(prebuilt)
                p3["prebuilt"], _ = run_child(["hooks", d], 90, logdir, "hooks_prebuilt", henv)
        report["hooks"] = p3
    report["wall_s"] = round(time.perf_counter() - t_start, 1)

    # Targets.
    t = {}
    if not a.skip_allocator:
        t["allocator_same_logits"] = bool(p1.get("logits", {}).get("ok"))
        t["allocator_same_tokens"] = bool(p1.get("tokens_equal"))
        # Every size within 10%, not just the sum (a slow small size hides behind a
        # fast large one there).
        r = p1.get("empty_del_ratio") or {}
        t["allocator_empty_del_within_10pct"] = bool(r) and max(r.values()) <= ALLOC_RATIO_TARGET
        hs = p1.get("hetmem", {}).get("hetmem_stats") or {}
        t["allocator_is_hetmem"] = ((hs.get("live_blocks") or 0) > 0
                                   and hs.get("backend") in ("cuda", "rocm"))
        t["allocator_oom_raises_and_recovers"] = (
            p1.get("hetmem", {}).get("oom_then_alloc_ok") is True)
    if not a.skip_offload:
        m = p2.get("methods", {})
        h = m.get("hetmem_offload", {}).get("forward_ms")
        acc = m.get("accelerate_dispatch", {}).get("forward_ms")
        t["hetmem_offload_output_matches"] = bool(
            m.get("hetmem_offload", {}).get("cmp", {}).get("ok"))
        t["accelerate_outputs_match"] = all(
            m.get(k, {}).get("cmp", {}).get("ok") for k in
            ("accelerate_dispatch", "accelerate_cpu_offload"))
        t["hetmem_offload_le_62ms"] = h is not None and h <= HETMEM_TARGET_MS
        t["hetmem_6x_faster_than_dispatch"] = (
            h is not None and acc is not None and acc / h >= SPEEDUP_TARGET)
        t["hetmem_offload_zero_copy"] = bool(m.get("hetmem_offload", {}).get("zero_copy"))
        # The order learnt on the first pass drives loads ahead of their acquires.
        t["hetmem_offload_prefetches"] = (
            m.get("hetmem_offload", {}).get("per_forward", {}).get("prefetches", 0) > 0)
        t["remove_offload_restores"] = bool(m.get("hetmem_offload", {})
                                            .get("remove_offload_restores"))
    if not a.skip_hooks:
        # The run whose hooks were set (the host's build, else the prebuilt library).
        h3 = p3.get("prebuilt") or p3.get("host_build") or {}
        t["hooks_installed"] = bool((h3.get("hooks") or {}).get("installed"))
        rs = h3.get("record_stream") or {}
        t["record_stream_keeps_side_stream_bytes"] = (
            (rs.get("with_record_stream") or {}).get("intact") is True)
        ec = h3.get("empty_cache") or {}
        t["empty_cache_reaches_hetmem"] = (
            "reserved_before" in ec and ec["reserved_after"] < ec["reserved_before"])
        gr = h3.get("graph") or {}
        t["graph_capture_refused_clearly"] = (
            GRAPHS_UNSUPPORTED in (gr.get("error") or "")
            and gr.get("capturing_after") is False and gr.get("alloc_after_ok") is True)
    report["targets"] = t
    report["ok"] = bool(t) and all(t.values())

    # Table.
    print(f"\n== hetmem + PyTorch on {card}")
    if not a.skip_allocator:
        print("-- part 1: hetmem as PyTorch's CUDA allocator (2-layer Llama, hidden 1024)")
        lg = p1.get("logits", {})
        print(f"  logits vs PyTorch's allocator: max|diff| {fmt(lg.get('max_abs_diff'), '.3g')}"
              f", argmax agree {fmt(lg.get('argmax_agree'), '.3f')}, "
              f"bitwise {lg.get('bitwise_equal')}")
        print(f"  generate(16) tokens equal: {p1.get('tokens_equal')}")
        tu = p1.get("torch", {}).get("empty_del_us", {})
        hu = p1.get("hetmem", {}).get("empty_del_us", {})
        print(f"  {'torch.empty+del size':>22} {'torch µs':>9} {'hetmem µs':>10} {'ratio':>6}")
        for s in tu:
            print(f"  {int(s):>22} {tu[s]:>9.2f} {fmt(hu.get(s), '.2f'):>10} "
                  f"{fmt(p1.get('empty_del_ratio', {}).get(s), '.2f'):>6}")
        print(f"  total ratio {fmt(p1.get('empty_del_ratio_total'), '.3f')} "
              f"(target: every size <= {ALLOC_RATIO_TARGET})")
        print(f"  hetmem allocator stats: {p1.get('hetmem', {}).get('hetmem_stats')}; "
              f"PyTorch's allocator backend: torch {p1.get('torch', {}).get('allocator_backend')}"
              f", hetmem {p1.get('hetmem', {}).get('allocator_backend')}")
        print(f"  out of memory: torch {p1.get('torch', {}).get('oom')}; "
              f"hetmem {p1.get('hetmem', {}).get('oom')}")
    if not a.skip_offload:
        m = p2.get("methods", {})
        print(f"-- part 2: offload, 8-layer Llama ({fmt(p2.get('model_bytes', 0) / 1e9, '.3f')} GB"
              f" fp16), 1x128 tokens, device budget {fmt(p2.get('device_budget', 0) / 1e9, '.3f')}"
              " GB")
        print(f"  {'method':<26} {'forward ms':>10} {'vs hetmem':>9} {'max|diff|':>9} "
              f"{'argmax':>6} ok")
        h = m.get("hetmem_offload", {}).get("forward_ms")
        for k in ("gpu_resident", "hetmem_offload", "accelerate_dispatch",
                  "accelerate_cpu_offload"):
            r = m.get(k, {})
            c = r.get("cmp", {})
            ms = r.get("forward_ms")
            rel = (ms / h) if (ms and h) else None
            err = f"  ERROR {r['error']}" if "error" in r else ""
            print(f"  {k:<26} {fmt(ms):>10} {fmt(rel, '.2f'):>9} "
                  f"{fmt(c.get('max_abs_diff'), '.3g'):>9} {fmt(c.get('argmax_agree'), '.3f'):>6}"
                  f" {c.get('ok', '-')}{err}")
        bw = m.get("h2d", {}).get("pinned_h2d_gbps")
        print(f"  pinned H2D {fmt(bw)} GB/s; the non-resident half alone needs "
              f"{fmt(p2.get('link_floor_ms_half'))} ms over the link")
        ho = m.get("hetmem_offload", {})
        print(f"  hetmem per forward: {ho.get('per_forward')}; warm-up ms {ho.get('warmup_ms')}"
              f"; setup {fmt(ho.get('setup_s'), '.1f')} s; zero copy {ho.get('zero_copy')}")
        print(f"  accelerate dispatch_model on GPU: "
              f"{m.get('accelerate_dispatch', {}).get('on_gpu')}")
        if "error" in p2:
            print(f"  offload child failed: {p2['error']}")
    if not a.skip_hooks:
        print("-- part 3: PyTorch's allocator hooks under hetmem")
        for which in ("host_build", "prebuilt"):
            h = p3.get(which)
            if not h:
                continue
            print(f"  [{which}] hooks {h.get('hooks')}; set up in {h.get('setup_s')} s"
                  + (f" from {h['hooks_lib']}" if h.get("hooks_lib") else ""))
            rs = h.get("record_stream") or {}
            print(f"  [{which}] reuse under a side stream's read: without record_stream "
                  f"{rs.get('without_record_stream')}, with it {rs.get('with_record_stream')}"
                  + (f"  ERROR {rs['error']}" if "error" in rs else ""))
            print(f"  [{which}] empty_cache: {h.get('empty_cache')}")
            print(f"  [{which}] graph capture: {h.get('graph')}")
            if "error" in h:
                print(f"  [{which}] child failed: {h['error']}")
    rcs = {"prep": report["prep"].get("rc")}
    rcs.update({f"alloc_{k}": p1.get(k, {}).get("rc") for k in ("torch", "hetmem") if k in p1})
    if p2:
        rcs["offload"] = p2.get("rc")
    for which in ("host_build", "prebuilt"):
        if which in p3:
            rcs[f"hooks_{which}"] = p3[which].get("rc")
    print(f"-- child exit codes: {rcs}")
    print("-- targets")
    for k, v in t.items():
        print(f"  {'PASS' if v else 'FAIL'}  {k}")
    print(f"  total {report['wall_s']} s")
    print(json.dumps(report, default=str))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
