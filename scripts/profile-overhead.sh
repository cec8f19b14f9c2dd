#!/usr/bin/env bash
# The profiler's overhead, side by side in one run (issue 19): stream_layers with and
# without HETMEM_PROFILE (the same bytes at >= 0.98x the effective rate) and the replay
# of the shared PyTorch trace (<= 1.10x the wall time), runs interleaved, medians.
#   scripts/profile-overhead.sh [RUNS]          (default 7; builds the examples first)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-7}
cargo build -q --release --example stream_layers --example replay
trace=../shared/traces/llama_generate.csv
replay_args=(--trace "$trace")
[ -f "$trace" ] || replay_args=(--synthetic training)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
sl_args=(--layers 16 --layer-mib 16 --budget-mib 128 --passes 6 --json)
for i in $(seq "$runs"); do
  for mode in off on; do
    env=()
    [ $mode = on ] && env=(HETMEM_PROFILE="$out/sl.hrec")
    env "${env[@]}" target/release/examples/stream_layers "${sl_args[@]}" | tail -n 1 >>"$out/sl-$mode.jsonl"
    [ $mode = on ] && env=(HETMEM_PROFILE="$out/replay.hrec")
    s=$(date +%s%N)
    env "${env[@]}" target/release/examples/replay "${replay_args[@]}" --json | tail -n 1 >>"$out/replay-$mode.jsonl"
    e=$(date +%s%N)
    echo "$(( (e - s) / 1000 ))" >>"$out/replay-$mode.proc_us"
  done
done
python3 - "$out" "$runs" <<'PY'
import json, statistics, sys
out, runs = sys.argv[1], sys.argv[2]
load = lambda f: [json.loads(l) for l in open(f"{out}/{f}")]
med = statistics.median
sl = {m: load(f"sl-{m}.jsonl") for m in ("off", "on")}
rp = {m: load(f"replay-{m}.jsonl") for m in ("off", "on")}
proc = {m: [int(x) / 1e6 for x in open(f"{out}/replay-{m}.proc_us")] for m in ("off", "on")}
bytes_same = all(a["bytes_moved_per_pass"] == b["bytes_moved_per_pass"] for a, b in zip(sl["off"], sl["on"]))
g = {m: med(d["effective_gbps"] for d in sl[m]) for m in sl}
w = {m: med(d["wall_s"] for d in rp[m]) for m in rp}
p = {m: med(proc[m]) for m in proc}
a = {m: med(d["alloc_ns_median"] for d in rp[m]) for m in rp}
res = {
    "runs": int(runs),
    "stream_layers_effective_gbps": g, "stream_layers_rate_ratio": g["on"] / g["off"],
    "stream_layers_same_bytes": bytes_same,
    "replay_wall_s": w, "replay_wall_ratio": w["on"] / w["off"],
    "replay_process_s": p, "replay_process_ratio": p["on"] / p["off"],
    "replay_alloc_ns_median": a, "replay_events": rp["on"][0]["events"],
}
print(json.dumps(res))
PY
