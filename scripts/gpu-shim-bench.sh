#!/usr/bin/env bash
# The GPU side of the LD_PRELOAD shim in observe mode against no shim, on an
# allocation-heavy CUDA program (preload/bench/gpu_alloc.c), runs interleaved:
#   scripts/gpu-shim-bench.sh SHIM GPU_ALLOC_BIN LIBCUDART [RUNS] [ROUNDS] [LARGEST]
# Prints each run's JSON, then the medians and the ratio shim/plain of the total
# (target: <= 1.03). A benchmark, not a test: on the fake driver (cargo test's
# target/tmp/preload/fake-gpu) the figures say only what the wrappers cost around a
# slow fake.
set -euo pipefail
shim=$1 bin=$2 lib=$3 runs=${4:-7} rounds=${5:-20} largest=${6:-67108864}
plain=() pre=()
for i in $(seq "$runs"); do
  p=$(env -u LD_PRELOAD "$bin" "$lib" "$rounds" "$largest"); echo "plain $p"; plain+=("$p")
  s=$(LD_PRELOAD="$shim" HETMEM_GPU_MODE=observe "$bin" "$lib" "$rounds" "$largest"); echo "shim  $s"; pre+=("$s")
done
python3 - "${#plain[@]}" "${plain[@]}" "${pre[@]}" <<'PY'
import json, statistics, sys
n = int(sys.argv[1]); a = [json.loads(x) for x in sys.argv[2:2 + n]]; b = [json.loads(x) for x in sys.argv[2 + n:]]
out = {}
for k in ("malloc_free_ns", "async_ns", "mem_get_info_ns", "total_ms"):
    p, s = statistics.median(x[k] for x in a), statistics.median(x[k] for x in b)
    out[k] = {"plain": round(p, 2), "shim": round(s, 2), "ratio": round(s / p, 3)}
assert len({x["check"] for x in a + b}) <= 2, "different work"
print(json.dumps(out))
r = out["total_ms"]["ratio"]
print(f"observe-mode overhead: total {r}x (target <= 1.03)")
PY
