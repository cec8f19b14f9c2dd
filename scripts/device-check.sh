#!/usr/bin/env bash
# Checks that need a GPU, in two halves:
#   scripts/device-check.sh build   here (no GPU needed): builds the test and example
#                                   binaries and copies them into .device-bin/
#   scripts/device-check.sh run     on the GPU host (no Rust there): runs them all with
#                                   the CUDA backend, logs under $OUT, prints a table last
# With the device tool: run(command="bash scripts/device-check.sh run",
#                           carry=[".device-bin"], timeout_s=480)
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
        name = m["target"]["name"] + ("-lib" if m["target"]["kind"] == ["lib"] else "")
        shutil.copy(m["executable"], os.path.join(sys.argv[1], name))
' "$BIN"
  cargo build --release --examples --benches
  cp target/release/examples/info target/release/examples/replay target/release/examples/stream_file "$BIN/"
  for b in alloc pool pinning; do
    f=$(ls -t target/release/deps/$b-* | grep -v '\.d$' | head -n1); cp "$f" "$BIN/bench-$b"
  done
  # The fake HIP runtime and fixtures the tests read, at the paths they expect.
  mkdir -p "$BIN/shared/traces"; cp ../shared/traces/llama_generate.csv "$BIN/shared/traces/"
  strip "$BIN"/* 2>/dev/null || true
  du -sh "$BIN"
}

run() {
  OUT=${OUT:-/tmp/device-out}; mkdir -p "$OUT"
  export HETMEM_BACKEND=cuda HETMEM_LOG=info
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
  declare -A R
  step() { local name=$1; shift; echo "== $name"; "$@" >"$OUT/$name.log" 2>&1; R[$name]=$?; tail -n 3 "$OUT/$name.log"; }
  step info        "$BIN/info" --json
  step conformance "$BIN/conformance"
  step cuda-unit   "$BIN/hetmem-lib" cuda --include-ignored
  step pool-tests  "$BIN/pool"
  step replay-cuda "$BIN/replay" --trace "$BIN/shared/traces/llama_generate.csv" --backend cuda --json
  step replay-sim  "$BIN/replay" --trace "$BIN/shared/traces/llama_generate.csv" --backend sim --json
  step replay-training-cuda "$BIN/replay" --synthetic training --backend cuda --json
  step bench-alloc "$BIN/bench-alloc" --bench
  step bench-pool  "$BIN/bench-pool" --bench
  step bench-pinning "$BIN/bench-pinning" --bench
  step stream-file "$BIN/stream_file" --gib 8 --json
  echo; echo "== summary ($(cat "$OUT/gpu.txt"))"
  for k in info conformance cuda-unit pool-tests replay-cuda replay-sim replay-training-cuda bench-alloc bench-pool bench-pinning stream-file; do
    printf '%-22s rc=%s\n' "$k" "${R[$k]}"
  done
  for k in replay-cuda replay-sim replay-training-cuda; do
    tail -n1 "$OUT/$k.log" | python3 -c 'import json,sys; d=json.loads(sys.stdin.read()); print(sys.argv[1], d["backend"], "ratio", d["reserved_over_allocated"], "alloc med/p99", d["alloc_ns_median"], d["alloc_ns_p99"], "free med", d["free_ns_median"])' "$k" 2>/dev/null
  done
  grep -A6 "alloc+free" "$OUT/bench-alloc.log" "$OUT/bench-pool.log" | tail -n 14
  tail -n 8 "$OUT/bench-pinning.log"; tail -n 1 "$OUT/stream-file.log"
}

case "${1:-}" in
  build) build ;;
  run) run ;;
  *) echo "usage: $0 build|run" >&2; exit 2 ;;
esac
