#!/usr/bin/env python3
"""Checks the outputs of `prof` against the formats their viewers read.

    check_prof_outputs.py [--snapshot FILE [--complete]] [--perfetto FILE] [--svg FILE]
                          [--report-json FILE]

- snapshot: loads with a restricted unpickler that refuses every class (plain
  containers only, as PyTorch's viewer needs), with only the opcodes the viewer's
  JavaScript unpickler (torch/utils/viz/MemoryViz.js) reads, at protocol 2-4; every
  segment's blocks tile it in address order and sum to it; the segment's sizes match
  its blocks; each device's history replays backwards from the final segments as the
  viewer does (and, with --complete, back to an empty device).
- perfetto: a JSON object with traceEvents, each event checked against the trace-event
  format (Chrome's "Trace Event Format" document: phases C, X, i, M used here, their
  required fields and types); slices on one thread nest.
- svg: well-formed XML with a peak marked.
Prints a one-line summary per file; exits non-zero on the first failure.
"""
import io
import json
import pickle
import pickletools
import sys
import xml.etree.ElementTree as ET

# The opcodes MemoryViz.js's unpickle() handles.
JS_OPCODES = {
    "PROTO", "FRAME", "EMPTY_DICT", "EMPTY_LIST", "EMPTY_TUPLE", "MARK", "SETITEMS", "SETITEM",
    "APPENDS", "APPEND", "LIST", "TUPLE", "DICT", "BININT", "BININT1", "BININT2", "LONG1",
    "SHORT_BINUNICODE", "BINUNICODE", "NEWTRUE", "NEWFALSE", "NONE", "BINFLOAT", "TUPLE1",
    "TUPLE2", "TUPLE3", "MEMOIZE", "BINPUT", "LONG_BINPUT", "BINGET", "LONG_BINGET", "STOP",
}


class Refusing(pickle.Unpickler):
    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"class {module}.{name} refused: plain containers only")


def fail(msg):
    print("FAIL:", msg)
    sys.exit(1)


def check_snapshot(path, complete):
    raw = open(path, "rb").read()
    if raw[0] != 0x80 or not 2 <= raw[1] <= 4:
        fail(f"{path}: pickle protocol {raw[1]}, the viewer reads 2-4")
    for op, _arg, _pos in pickletools.genops(raw):
        if op.name not in JS_OPCODES:
            fail(f"{path}: opcode {op.name} the viewer's unpickler does not read")
    snap = Refusing(io.BytesIO(raw)).load()
    if not isinstance(snap, dict) or not {"segments", "device_traces"} <= snap.keys():
        fail(f"{path}: not a snapshot dictionary")
    states = {"active_allocated", "active_pending_free", "inactive"}
    final = {}  # device -> (segments {addr: size}, blocks {addr: size})
    nblocks = 0
    for seg in snap["segments"]:
        for k in ("device", "address", "total_size", "allocated_size", "requested_size",
                  "stream", "segment_type", "blocks"):
            if k not in seg:
                fail(f"{path}: segment without {k}")
        addr = seg["address"]
        alloc = req = 0
        segs, blocks = final.setdefault(seg["device"], ({}, {}))
        segs[seg["address"]] = seg["total_size"]
        for b in seg["blocks"]:
            if b["state"] not in states:
                fail(f"{path}: block state {b['state']}")
            if "address" in b and b["address"] != addr:
                fail(f"{path}: block at {b['address']:#x} where its segment's blocks reach {addr:#x}")
            if b["size"] <= 0 or b["requested_size"] > b["size"]:
                fail(f"{path}: block sizes {b}")
            if b["state"] != "inactive":
                alloc += b["size"]
                req += b["requested_size"]
                blocks[addr] = b["size"]
                nblocks += 1
            addr += b["size"]
        if addr != seg["address"] + seg["total_size"]:
            fail(f"{path}: blocks of segment {seg['address']:#x} sum to {addr - seg['address']}, "
                 f"not its {seg['total_size']}")
        if alloc != seg["allocated_size"] or req != seg["requested_size"]:
            fail(f"{path}: segment {seg['address']:#x} says {seg['allocated_size']} allocated, "
                 f"its blocks {alloc}")
    # Backwards from the final state, as MemoryViz.js's simulate_memory does.
    nev = 0
    for dev, trace in enumerate(snap["device_traces"]):
        segs, blocks = (dict(x) for x in final.get(dev, ({}, {})))
        segs = sorted([a, s] for a, s in segs.items())
        live = set(blocks)
        for e in reversed(trace):
            nev += 1
            a, s, act = e["addr"], e["size"], e["action"]
            for k in ("action", "addr", "size", "stream", "frames"):
                if k not in e:
                    fail(f"{path}: device {dev} event without {k}: {e}")
            if act == "alloc":
                if a not in live:
                    fail(f"{path}: device {dev}: alloc of {a:#x}, not live after it")
                live.discard(a)
            elif act == "free_completed":
                if a in live:
                    fail(f"{path}: device {dev}: free of {a:#x}, live after it")
                live.add(a)
            elif act in ("segment_map", "segment_alloc"):
                hit = [x for x in segs if x[0] <= a and a + s <= x[0] + x[1]]
                if not hit:
                    fail(f"{path}: device {dev}: {act} {a:#x}+{s} not in any segment after it")
                x = hit[0]
                segs.remove(x)
                if act == "segment_alloc" and (x[0], x[1]) != (a, s):
                    fail(f"{path}: device {dev}: segment_alloc {a:#x} is part of a larger segment")
                if x[0] < a:
                    segs.append([x[0], a - x[0]])
                if a + s < x[0] + x[1]:
                    segs.append([a + s, x[0] + x[1] - a - s])
            elif act in ("segment_unmap", "segment_free"):
                if any(x[0] < a + s and a < x[0] + x[1] for x in segs):
                    fail(f"{path}: device {dev}: {act} {a:#x} overlaps memory mapped after it")
                segs.append([a, s])
                segs.sort()
                if act == "segment_unmap":  # the viewer merges touching runs
                    merged = []
                    for x in segs:
                        if merged and merged[-1][0] + merged[-1][1] == x[0]:
                            merged[-1][1] += x[1]
                        else:
                            merged.append(list(x))
                    segs = merged
            elif act not in ("free_requested", "oom", "snapshot", "free"):
                fail(f"{path}: unknown action {act}")
        if complete and (live or segs):
            fail(f"{path}: device {dev}: history does not start from an empty device "
                 f"({len(live)} blocks, {len(segs)} segments before it)")
    print(f"snapshot ok: {path}: {len(snap['segments'])} segments, {nblocks} live blocks, "
          f"{nev} history events on {len(snap['device_traces'])} device(s)")


def check_perfetto(path):
    d = json.load(open(path))
    if not isinstance(d, dict) or not isinstance(d.get("traceEvents"), list):
        fail(f"{path}: no traceEvents list")
    phases = {}
    slices = {}
    for e in d["traceEvents"]:
        ph = e.get("ph")
        phases[ph] = phases.get(ph, 0) + 1
        if not isinstance(e.get("name"), str):
            fail(f"{path}: event without a name: {e}")
        if not isinstance(e.get("pid"), int) or not isinstance(e.get("tid"), int):
            fail(f"{path}: pid and tid must be integers: {e}")
        if ph == "M":
            if e["name"] not in ("process_name", "thread_name", "process_sort_index",
                                 "thread_sort_index", "process_labels"):
                fail(f"{path}: metadata {e['name']}")
            if not isinstance(e.get("args", {}).get("name", ""), str):
                fail(f"{path}: metadata without args.name: {e}")
            continue
        ts = e.get("ts")
        if not isinstance(ts, (int, float)) or ts < 0:
            fail(f"{path}: ts must be a non-negative number of microseconds: {e}")
        if ph == "C":
            args = e.get("args")
            if not isinstance(args, dict) or not args or not all(
                    isinstance(v, (int, float)) for v in args.values()):
                fail(f"{path}: counter args must be numbers: {e}")
        elif ph == "X":
            if not isinstance(e.get("dur"), (int, float)) or e["dur"] < 0:
                fail(f"{path}: complete event without a non-negative dur: {e}")
            slices.setdefault((e["pid"], e["tid"]), []).append((ts, ts + e["dur"]))
        elif ph in ("i", "I"):
            if e.get("s", "t") not in ("g", "p", "t"):
                fail(f"{path}: instant scope {e.get('s')}")
        else:
            fail(f"{path}: phase {ph} not expected from prof")
        if "args" in e and not isinstance(e["args"], dict):
            fail(f"{path}: args must be an object: {e}")
    for key, xs in slices.items():
        xs.sort()
        stack = []
        for a, b in xs:
            while stack and stack[-1] <= a + 1e-6:
                stack.pop()
            if stack and b > stack[-1] + 1e-6:
                fail(f"{path}: slices on {key} overlap without nesting at {a} us")
            stack.append(b)
    print(f"perfetto ok: {path}: {sum(phases.values())} events {dict(sorted(phases.items()))}")


def check_svg(path):
    text = open(path).read()
    if path.endswith((".html", ".htm")):
        start, end = text.index("<svg"), text.rindex("</svg>") + 6
        text = text[start:end]
    root = ET.fromstring(text)
    if not root.tag.endswith("svg"):
        fail(f"{path}: not an SVG")
    if "peak" not in text:
        fail(f"{path}: no peak marked")
    print(f"plot ok: {path}: {len(list(root.iter()))} elements")


def main(argv):
    i = 0
    complete = "--complete" in argv
    argv = [a for a in argv if a != "--complete"]
    while i < len(argv):
        k, v = argv[i], argv[i + 1]
        if k == "--snapshot":
            check_snapshot(v, complete)
        elif k == "--perfetto":
            check_perfetto(v)
        elif k == "--svg":
            check_svg(v)
        elif k == "--report-json":
            r = json.load(open(v))
            for key in ("events", "tiers", "leaks", "complete"):
                if key not in r:
                    fail(f"{v}: report without {key}")
            print(f"report ok: {v}: {r['events']} events, {len(r['tiers'])} tiers")
        else:
            fail(f"unknown argument {k}")
        i += 2


if __name__ == "__main__":
    main(sys.argv[1:])
