#!/usr/bin/env python3
"""Replays an allocator trace through PyTorch's own CUDA caching allocator, for the
comparison with hetmem's device pool in the same device session.

    python3 python/bench/replay_torch.py TRACE.csv [--json]

TRACE.csv is the format `examples/replay.rs` reads and writes (`action,addr,size,
stream,time_us`; `alloc` and `free_completed` rows are replayed by address): the shared
llama trace, or a synthetic one from `replay --synthetic NAME --write-trace PATH`.
Each call is timed (`torch.cuda.caching_allocator_alloc` / `caching_allocator_delete`,
one Python call each, so a few hundred ns of interpreter are in every figure); the
driver calls PyTorch made are read from its own statistics (`num_device_alloc`,
`num_device_free`, `num_alloc_retries`). The last line is one JSON object.
"""

import json
import sys
import time


def read_trace(path):
    ops = []
    live = {}
    with open(path) as f:
        for n, line in enumerate(f):
            if n == 0 and line.startswith("action"):
                continue
            parts = line.strip().split(",")
            if len(parts) < 4:
                continue
            action, addr, size, stream = parts[0], int(parts[1]), int(parts[2]), int(parts[3])
            if action == "alloc":
                if addr in live:
                    ops.append(("free", live.pop(addr)))
                live[addr] = n
                ops.append(("alloc", n, size, stream))
            elif action == "free_completed" and addr in live:
                ops.append(("free", live.pop(addr)))
    return ops


def main():
    args = sys.argv[1:]
    as_json = "--json" in args
    paths = [a for a in args if not a.startswith("--")]
    if len(paths) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    import torch

    if not torch.cuda.is_available():
        print("replay_torch: no CUDA device", file=sys.stderr)
        return 1
    ops = read_trace(paths[0])
    streams = {}
    ptrs = {}
    alloc_ns, free_ns = [], []
    torch.cuda.init()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_stats()
    clock = time.perf_counter_ns
    t0 = time.perf_counter()
    for op in ops:
        if op[0] == "alloc":
            _, oid, size, sid = op
            s = streams.get(sid)
            if s is None:
                s = streams[sid] = torch.cuda.current_stream() if sid == 0 else torch.cuda.Stream()
            a = clock()
            ptrs[oid] = torch.cuda.caching_allocator_alloc(size, 0, s)
            alloc_ns.append(clock() - a)
        else:
            p = ptrs.pop(op[1])
            a = clock()
            torch.cuda.caching_allocator_delete(p)
            free_ns.append(clock() - a)
    wall = time.perf_counter() - t0
    st = torch.cuda.memory_stats()
    for p in ptrs.values():
        torch.cuda.caching_allocator_delete(p)
    torch.cuda.synchronize()
    alloc_ns.sort()
    free_ns.sort()

    def pct(v, p):
        return v[round((len(v) - 1) * p)] if v else 0

    peak_req = st.get("requested_bytes.all.peak", 0)
    out = {
        "trace": paths[0],
        "allocator": "pytorch " + torch.__version__,
        "events": len(ops),
        "peak_requested": peak_req,
        "peak_reserved": st["reserved_bytes.all.peak"],
        "reserved_over_requested": round(st["reserved_bytes.all.peak"] / peak_req, 4) if peak_req else None,
        "num_device_alloc": st["num_device_alloc"] - before.get("num_device_alloc", 0),
        "num_device_free": st["num_device_free"] - before.get("num_device_free", 0),
        "num_alloc_retries": st["num_alloc_retries"] - before.get("num_alloc_retries", 0),
        "alloc_ns_median": pct(alloc_ns, 0.5),
        "alloc_ns_p99": pct(alloc_ns, 0.99),
        "free_ns_median": pct(free_ns, 0.5),
        "wall_s": round(wall, 4),
    }
    if as_json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:24} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
