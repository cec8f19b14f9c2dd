#!/usr/bin/env bash
# Checks that need a GPU, in two halves:
#   scripts/device-check.sh build   here (no GPU needed): builds the test and example
#                                   binaries and copies them into .device-bin/
#   scripts/device-check.sh run [GROUP...]
#                                   on the GPU host (no Rust there): runs the groups
#                                   (pool: issue 3, host: issue 4, stream: issue 5,
#                                   torch: issue 6, vmm and fork: issue 14; shim-gpu:
#                                   issue 18, by name only; default the others; also streams: issue 14 item 6 alone, a few
#                                   seconds, which pool's cuda-unit step runs too) with
#                                   the CUDA backend, logs under $OUT, prints a table last
# With the device tool: run(command="bash scripts/device-check.sh run", carry=[".device-bin"],
#                           timeout_s=560); all groups take about 8 minutes on an H200
#                           (estimate, never run), so split them if a rerun is likely.
# Rehearsal here, on the fake CUDA driver that `cargo test` builds (about 95 s on 2 cores;
# speeds meaningless, the mechanics and every rc are what it checks):
#   LD_LIBRARY_PATH=$PWD/target/fake-cuda FAKE_CUDA_MEM_BYTES=$((8<<30)) OUT=/tmp/rehearsal \
#   STREAM_SHAPE="--layers 16 --layer-mib 64 --budget-mib 512" STREAM_FILE_GIB=1 \
#   STREAM_LLAMA="--shape llama --layers 4 --layer-mib 48 --budget-mib 130" FORK_GIB=1 \
#     bash scripts/device-check.sh run pool host stream fork
# (replay-training-cuda fails there: its 11.3 GB peak does not fit 8 GiB.)
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=.device-bin

build() {
  set -e
  rm -rf "$BIN" && mkdir -p "$BIN"
  # Test executables, as cargo names them (hash suffixes stripped).
  cargo test --release --workspace --no-run --message-format=json 2>/dev/null |
    python3 -c '
import json, sys, shutil, os
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        name = m["target"]["name"] + ("-lib" if {"lib", "rlib"} & set(m["target"]["kind"]) else "")
        shutil.copy(m["executable"], os.path.join(sys.argv[1], name))
' "$BIN"
  cargo build --release --examples --benches
  cargo build --release --lib
  cp target/release/examples/{info,replay,stream_file,stream_layers,fork_check} target/release/libhetmem.so "$BIN/"
  for b in alloc pool pinning vmm; do
    f=$(ls -t target/release/deps/$b-* | grep -v '\.d$' | head -n1); cp "$f" "$BIN/bench-$b"
  done
  # hetmem.torch's C++ hooks, prebuilt for the GPU host's PyTorch (torch_check.py tries
  # the host's own build first: it needs the CUDA runtime headers, which a pip-installed
  # torch lacks, and the host has no network). Only where $HETMEM_TORCH_PYTHON names a
  # Python with that same CUDA PyTorch (2.11.0+cu130 there) and its CUDA headers.
  if [ -n "${HETMEM_TORCH_PYTHON:-}" ]; then
    HETMEM_CACHE_DIR=$PWD/$BIN/torch-hooks-cache PYTHONPATH=$PWD/python "$HETMEM_TORCH_PYTHON" -c '
import shutil, sys, torch
from hetmem import _torch_hooks as h
shutil.copy(h.build(torch), f"{sys.argv[1]}/torch_hooks-{h.version_tag(torch)}.so")' "$BIN"
    rm -rf "$BIN/torch-hooks-cache"
  fi
  # The LD_PRELOAD shim and the allocation benchmark for the shim-gpu group (issue 18).
  cargo build --release -p hetmem-preload
  cp target/release/libhetmem_preload.so "$BIN/"
  cc -O2 -Wall -Wextra -Werror preload/bench/gpu_alloc.c -o "$BIN/gpu_alloc" -ldl
  # The fake HIP runtime and fixtures the tests read, at the paths they expect.
  mkdir -p "$BIN/shared/traces"; cp ../shared/traces/llama_generate.csv "$BIN/shared/traces/"
  strip "$BIN"/* 2>/dev/null || true
  du -sh "$BIN"
}

run() {
  OUT=${OUT:-/tmp/device-out}; mkdir -p "$OUT"
  export HETMEM_BACKEND=cuda HETMEM_LOG=info
  local groups=("$@"); [ ${#groups[@]} -eq 0 ] && groups=(vmm pool host stream torch fork)
  # No nvidia-smi: a rehearsal against the fake driver (LD_LIBRARY_PATH=target/fake-cuda).
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$OUT/gpu.txt" 2>&1 ||
    echo "no nvidia-smi (rehearsal?)" >"$OUT/gpu.txt"
  cat "$OUT/gpu.txt"
  declare -A R T; local order=()
  # Every step has a time limit (STEP_S, default 150 s) so that one hang cannot spend
  # the session's device time; rc 124 in the summary means it was cut off.
  step() {
    local name=$1; shift; echo "== $name"; order+=("$name"); local t0=$SECONDS
    timeout -k 5 "${STEP_S:-150}" "$@" >"$OUT/$name.log" 2>&1; R[$name]=$?
    T[$name]=$((SECONDS - t0)); tail -n 3 "$OUT/$name.log"
  }
  for g in "${groups[@]}"; do case $g in
    pool)
      step info        "$BIN/info" --json
      step conformance "$BIN/conformance"
      step cuda-unit   "$BIN/hetmem-lib" cuda --include-ignored
      step pool-tests  "$BIN/pool"
      step replay-cuda "$BIN/replay" --trace "$BIN/shared/traces/llama_generate.csv" --backend cuda --json
      step replay-sim  "$BIN/replay" --trace "$BIN/shared/traces/llama_generate.csv" --backend sim --json
      step replay-training-cuda "$BIN/replay" --synthetic training --backend cuda --json
      step bench-alloc "$BIN/bench-alloc" --bench
      step bench-pool  "$BIN/bench-pool" --bench ;;
    host)
      step bench-pinning "$BIN/bench-pinning" --bench
      step stream-file "$BIN/stream_file" --gib "${STREAM_FILE_GIB:-8}" --json ;;
    stream)
      # A model twice the budget: 8 GiB in 32 layers of 256 MiB through 4 GiB.
      # STREAM_SHAPE shrinks it for a rehearsal on the fake driver.
      local shape=(${STREAM_SHAPE:---layers 32 --layer-mib 256 --budget-mib 4096})
      step stream-layers     "$BIN/stream_layers" "${shape[@]}" --passes 5 --json
      step stream-layers-lru "$BIN/stream_layers" "${shape[@]}" --passes 3 --policy lru --json
      step stream-layers-checksums "$BIN/stream_layers" --layers 16 --layer-mib 16 --budget-mib 96 --passes 4 --checksums --policy learn --json
      # Llama-7B's shapes, 8 layers (3588 MiB) through half: the two planners side by side.
      local llama=(${STREAM_LLAMA:---shape llama --layers 8 --layer-mib 386 --budget-mib 1794})
      step stream-llama-belady "$BIN/stream_layers" "${llama[@]}" --passes 4 --json
      step stream-llama-static "$BIN/stream_layers" "${llama[@]}" --passes 4 --planner static --json ;;
    vmm)
      # Issue 14: what each VMM call costs on this card (the sim's defaults are other
      # GPUs' figures), then every trace through hetmem's pool on CUDA beside PyTorch's
      # own caching allocator replaying the same file, in this one session.
      step bench-vmm "$BIN/bench-vmm" --bench
      local t
      for t in training ddp serving random; do
        "$BIN/replay" --synthetic "$t" --backend sim --write-trace "$OUT/$t.csv" >/dev/null 2>&1
      done
      for t in llama training ddp serving random; do
        local f="$OUT/$t.csv"; [ "$t" = llama ] && f="$BIN/shared/traces/llama_generate.csv"
        step "replay14-$t-cuda" "$BIN/replay" --trace "$f" --backend cuda --json
        step "replay14-$t-torch" python3 python/bench/replay_torch.py "$f" --json
      done ;;
    streams)
      # Issue 14, item 6: a copy with no stream reads what stream 0's queued copy wrote,
      # and the pool hands a block between two threads' per-thread streams (2) behind the
      # first thread's queued copy (both fail on the fake driver without the fixes).
      step streams "$BIN/hetmem-lib" --include-ignored gpu_sync_copy_follows_the_legacy_stream \
        gpu_per_thread_stream_hand_over_between_threads ;;
    torch)
      local hooks; hooks=$(ls "$PWD/$BIN"/torch_hooks-*.so 2>/dev/null | head -n1)
      STEP_S=${TORCH_S:-420} HETMEM_LIB=$PWD/$BIN/libhetmem.so PYTHONPATH=$PWD/python \
        HETMEM_TORCH_HOOKS_PREBUILT=$hooks step torch-check python3 python/bench/torch_check.py ;;
    shim-gpu)
      # Issue 18: an unmodified PyTorch (each shim mode, cudaMallocAsync backend, a model
      # over the limit), CuPy, pin-on-copy of 4 GiB and the observe-mode overhead under
      # libhetmem_preload.so; about 6 minutes (estimate, never run): run it alone.
      STEP_S=${SHIM_GPU_S:-540} step shim-gpu python3 python/bench/shim_gpu_check.py \
        --shim "$PWD/$BIN/libhetmem_preload.so" --bench-bin "$PWD/$BIN/gpu_alloc" ;;
    fork)
      # Fork after pinning FORK_GIB (8) GiB: fork time, the child's RSS and the memory it
      # took, with MADV_DONTFORK (hetmem's default) and without; the child's error.
      step fork-dontfork "$BIN/fork_check" --gib "${FORK_GIB:-8}" --json
      step fork-inherit  "$BIN/fork_check" --gib "${FORK_GIB:-8}" --json --no-dontfork ;;
    *) echo "unknown group $g" >&2 ;;
  esac; done
  echo; echo "== summary ($(cat "$OUT/gpu.txt"))"
  for k in "${order[@]}"; do printf '%-24s rc=%-4s %4ss\n' "$k" "${R[$k]}" "${T[$k]}"; done
  for k in replay-cuda replay-sim replay-training-cuda; do
    [ -f "$OUT/$k.log" ] && tail -n1 "$OUT/$k.log" | python3 -c 'import json,sys; d=json.loads(sys.stdin.read()); print(sys.argv[1], d["backend"], "ratio", d["reserved_over_allocated"], "alloc med/p99", d["alloc_ns_median"], d["alloc_ns_p99"], "free med", d["free_ns_median"])' "$k" 2>/dev/null
  done
  for k in stream-layers stream-layers-lru stream-layers-checksums stream-llama-belady stream-llama-static; do
    [ -f "$OUT/$k.log" ] && tail -n1 "$OUT/$k.log" | python3 -c 'import json,sys; d=json.loads(sys.stdin.read()); print(sys.argv[1], d["device"], "moved/pass MiB", round(d["bytes_moved_per_pass"]/2**20), "optimum" if d["optimal_bytes_per_pass"] else "lower bound", round((d["optimal_bytes_per_pass"] or d.get("lower_bound_bytes_per_pass") or 0)/2**20), "pass ms", round(d["pass_ms"],2), "overlap", round(d["overlap_efficiency"],3), "GB/s", round(d["effective_gbps"],1), "link", round(d["link_gbps"],1), "fraction", round(d["fraction_of_link"],3), "mismatches", d["checksum_mismatches"], "host peak MiB", d["host_peak_bytes"]>>20)' "$k" 2>/dev/null
  done
  for t in llama training ddp serving random; do
    [ -f "$OUT/replay14-$t-cuda.log" ] && tail -n1 "$OUT/replay14-$t-cuda.log" | python3 -c 'import json,sys; d=json.loads(sys.stdin.read()); print("hetmem ", sys.argv[1], "ratio", d["reserved_over_allocated"], "device allocs", d["num_device_alloc"], "alloc med/p99 ns", d["alloc_ns_median"], d["alloc_ns_p99"], "wall s", d["wall_s"])' "$t" 2>/dev/null
    [ -f "$OUT/replay14-$t-torch.log" ] && tail -n1 "$OUT/replay14-$t-torch.log" | python3 -c 'import json,sys; d=json.loads(sys.stdin.read()); print("pytorch", sys.argv[1], "ratio", d["reserved_over_requested"], "device allocs", d["num_device_alloc"], "alloc med/p99 ns", d["alloc_ns_median"], d["alloc_ns_p99"], "wall s", d["wall_s"])' "$t" 2>/dev/null
  done
  [ -f "$OUT/bench-vmm.log" ] && grep -E "^(2|20)MiB" "$OUT/bench-vmm.log"
  [ -f "$OUT/bench-alloc.log" ] && grep -A6 "alloc+free" "$OUT/bench-alloc.log" "$OUT/bench-pool.log" | tail -n 14
  [ -f "$OUT/bench-pinning.log" ] && tail -n 8 "$OUT/bench-pinning.log"
  [ -f "$OUT/stream-file.log" ] && tail -n 1 "$OUT/stream-file.log"
  [ -f "$OUT/torch-check.log" ] && tail -n 25 "$OUT/torch-check.log"
  [ -f "$OUT/shim-gpu.log" ] && grep -E "^(ok  |FAIL)" "$OUT/shim-gpu.log"
  for k in fork-dontfork fork-inherit; do
    [ -f "$OUT/$k.log" ] && tail -n1 "$OUT/$k.log" | python3 -c 'import json,sys; d=json.loads(sys.stdin.read()); m=lambda k: None if d[k] is None else round(d[k]/1024); print(sys.argv[1], d["backend"], d["gib"], "GiB dontfork", d["dontfork"], "pin ms", round(d["pin_ms"]), "fork ms", round(d["fork_ms"],1), "child VmRSS MiB", m("child_vmrss_kib"), "private", m("child_private_dirty_kib"), "shared", m("child_shared_dirty_kib"), "MemAvailable drop MiB", m("mem_available_drop_kib"), "child error Forked", d["child_error_forked"], "parent ok", d["parent_ok_after"])' "$k" 2>/dev/null
  done
  # The status: 0 only when every step returned 0.
  for k in "${order[@]}"; do [ "${R[$k]}" = 0 ] || return 1; done
  return 0
}

case "${1:-}" in
  build) build ;;
  run) shift; run "$@" ;;
  *) echo "usage: $0 build|run" >&2; exit 2 ;;
esac
