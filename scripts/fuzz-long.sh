#!/usr/bin/env bash
# Runs the fuzzer (fuzz/, hetmem-fuzz) for a while: one run after another over several
# seeds, thread counts and legs (the C ABI, the tier store, both), each run its own
# process, so that a crash or a hang ends that run only and is counted.
#
# Built with AddressSanitizer and debug assertions (overflow checks, the library's
# debug_assert!s) where the toolchain allows: the stable toolchain's own sanitizer
# runtime, reached with RUSTC_BOOTSTRAP=1 -Zsanitizer=address, in target/asan. Where
# that build fails the script says so and uses a plain release build.
#
# Usage: scripts/fuzz-long.sh [--minutes M] [--run-seconds S] [--first-seed N]
#                             [--threads "2 4 8 1"] [--legs "both capi tier"]
#                             [--no-asan] [--out DIR]
# Defaults: 30 minutes, runs of 150 s, seeds from 1000, threads 2 4 8 1 6 3 in turn,
# legs both capi both tier in turn, target/fuzz-long for the logs.
#
# Prints a line per run and, last, the totals as one JSON object: runs, calls,
# bad_inputs, threads (the counts used), seconds, crashes, hangs, wrong_bytes, panics,
# wrong_status, undocumented, contract, new_findings, findings (merged over the runs).
# Exit status 1 when a run crashed, hung, read a wrong byte, caught a panic or found
# anything that is not a known defect (KNOWN in fuzz/src/capi/mod.rs: none now).
set -euo pipefail
cd "$(dirname "$0")/.."

minutes=30
run_seconds=150
first_seed=1000
threads="2 4 8 1 6 3"
legs="both capi both tier"
asan=1
out=target/fuzz-long
while [ $# -gt 0 ]; do
  case "$1" in
    --minutes) minutes=$2; shift 2 ;;
    --run-seconds) run_seconds=$2; shift 2 ;;
    --first-seed) first_seed=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --legs) legs=$2; shift 2 ;;
    --no-asan) asan=0; shift ;;
    --out) out=$2; shift 2 ;;
    *) echo "usage: $0 [--minutes M] [--run-seconds S] [--first-seed N] [--threads \"2 4\"] [--legs \"both capi tier\"] [--no-asan] [--out DIR]" >&2; exit 2 ;;
  esac
done

host=$(rustc -vV | sed -n 's/^host: //p')
build=plain
if [ "$asan" = 1 ]; then
  # An explicit --target keeps build scripts and proc-macros uninstrumented.
  if RUSTC_BOOTSTRAP=1 RUSTFLAGS="-Zsanitizer=address -Cdebug-assertions=on -Coverflow-checks=on" \
     CARGO_TARGET_DIR=target/asan cargo build --release -p hetmem-fuzz --bin hetmem-fuzz --target "$host"; then
    bin=target/asan/$host/release/hetmem-fuzz
    build="AddressSanitizer, debug assertions"
  else
    echo "fuzz-long: no AddressSanitizer build with this toolchain: a plain release build" >&2
  fi
fi
if [ "$build" = plain ]; then
  cargo build --release -p hetmem-fuzz --bin hetmem-fuzz
  bin=target/release/hetmem-fuzz
fi
# A memory error exits 86 (1 is the fuzzer's "new finding"); leaks are reported too.
export ASAN_OPTIONS=allocator_may_return_null=1:detect_leaks=1:exitcode=86
# The fuzzer's own runs must not panic unwinding past a hang: show where.
export RUST_BACKTRACE=1

mkdir -p "$out"
rm -f "$out"/run-*.json "$out"/run-*.log "$out"/runs.txt
read -r -a tlist <<<"$threads"
read -r -a llist <<<"$legs"
total=$(awk "BEGIN { print int($minutes * 60) }")
start=$SECONDS
i=0
echo "fuzz-long: $build build, $minutes minutes, runs of up to $run_seconds s, $out"
while :; do
  left=$((total - (SECONDS - start)))
  [ "$left" -ge 5 ] || break
  secs=$((left < run_seconds ? left : run_seconds))
  seed=$((first_seed + i))
  t=${tlist[$((i % ${#tlist[@]}))]}
  l=${llist[$((i % ${#llist[@]}))]}
  set +e
  # A run that outlives its time by far is hung past the fuzzer's own watchdog.
  timeout --kill-after=10 $((secs + 240)) "$bin" --seed "$seed" --threads "$t" --legs "$l" \
    --seconds "$secs" --hang-after 60 --quiet --json \
    >"$out/run-$seed.json" 2>"$out/run-$seed.log"
  rc=$?
  set -e
  echo "$seed $t $l $secs $rc" >>"$out/runs.txt"
  printf 'run %s: seed %s, %s threads, %s, %s s: exit %s\n' "$i" "$seed" "$t" "$l" "$secs" "$rc"
  i=$((i + 1))
done

python3 - "$out" "$build" <<'EOF'
import json, sys, collections
out, build = sys.argv[1], sys.argv[2]
keys = ["calls", "bad_inputs", "seconds", "crashes", "hangs", "wrong_bytes", "panics",
        "wrong_status", "undocumented", "contract", "new_findings", "bytes_checked"]
tot = collections.Counter()
threads = set()
runs = 0
found = {}
problems = []
for line in open(f"{out}/runs.txt"):
    seed, t, legs, secs, rc = line.split()
    runs += 1
    threads.add(int(t))
    rc = int(rc)
    text = open(f"{out}/run-{seed}.json").read().strip().splitlines()
    d = None
    if text:
        try:
            d = json.loads(text[-1])
        except ValueError:
            d = None
    if d is None or rc not in (0, 1, 3):
        # Killed by a signal, a sanitizer's report (86), the timeout (124, 137).
        kind = "hangs" if rc in (124, 137) else "crashes"
        tot[kind] += 1
        tot["seconds"] += int(secs)
        log = open(f"{out}/run-{seed}.log", errors="replace").read()
        problems.append(f"seed {seed} ({t} threads, {legs}): exit {rc}, {kind}; "
                        f"log {out}/run-{seed}.log: {log[-600:]!r}")
        continue
    for k in keys:
        tot[k] += d.get(k, 0)
    for f in d["findings"]:
        k = (f["kind"], f["call"], f["key"])
        if k in found:
            found[k]["count"] += f["count"]
        else:
            found[k] = dict(f, seed=int(seed))
    if d.get("new_findings") or d.get("wrong_bytes") or d.get("crashes") or d.get("hangs") or d.get("panics"):
        problems.append(f"seed {seed} ({t} threads, {legs}): see {out}/run-{seed}.log")
summary = {"build": build, "runs": runs, "threads": sorted(threads)}
summary.update({k: (round(tot[k], 1) if k == "seconds" else tot[k]) for k in keys})
summary["findings"] = sorted(found.values(), key=lambda f: (f["known"] is not None, f["kind"], f["call"]))
for p in problems:
    print("PROBLEM:", p, file=sys.stderr)
for f in summary["findings"]:
    print(f"  {f['kind']} x{f['count']} in {f['call']} [{f['key']}]"
          + (f" (known: {f['known']})" if f["known"] else " (NEW)")
          + f": {f['example'][:300]}", file=sys.stderr)
json.dump(summary, open(f"{out}/summary.json", "w"), indent=1)
print(json.dumps({k: v for k, v in summary.items() if k != "findings"}
                 | {"findings": len(summary["findings"])}))
bad = tot["crashes"] + tot["hangs"] + tot["wrong_bytes"] + tot["panics"] + tot["new_findings"]
sys.exit(1 if bad else 0)
EOF
