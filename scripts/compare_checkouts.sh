#!/bin/bash
# Cold exports of one bench checkpoint by two checkouts of shardex, alternating, N rounds: the
# export time the manifest records (plan -> stitch), the wall time, the captures and the peak
# PSS summed over the process tree. `sync` and a pause before each run, so that one export's
# writeback does not land in the next one's time.
#
#   git worktree add /tmp/old <commit>
#   bash scripts/compare_checkouts.sh /tmp/old . demo 4
#   bash scripts/compare_checkouts.sh /tmp/old . 70b-sparse 2 --zero-copy
#   VERIFY=1 bash scripts/compare_checkouts.sh /tmp/old . 6.7b-bf16 2   # + `shardex verify` of each export
#
# With VERIFY=1 each export is also verified by the same checkout (`shardex verify`), the
# checkpoint read into the page cache first as scripts/bench.py does; its wall time is printed.
# Both checkouts run with this checkout's .venv; checkpoints come from bench-cache/ (scripts/bench.py).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
before=$(cd "$1" && pwd); after=$(cd "$2" && pwd); case_name=$3; rounds=$4; shift 4
python="$here/.venv/bin/python"
work=$(mktemp -d /tmp/shardex-compare-XXXX)
trap 'rm -rf "$work"' EXIT
for _ in $(seq "$rounds"); do
  for side in "$before" "$after"; do
    rm -rf "$work/out" "$work/cache"; sync; sleep 3
    start=$(date +%s.%N)
    (cd "$side" && "$python" -m shardex export "$here/bench-cache/$case_name" "$work/out" --no-verify --quiet \
      --capture-cache-dir "$work/cache" "$@" >/dev/null)
    end=$(date +%s.%N)
    "$python" - "$work/out/manifest.json" "$side" "$start" "$end" <<'PY'
import json, sys
path, side, start, end = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
with open(path) as f:
    m = json.load(f)
captures = {k: round(v, 1) for k, v in m["capture_seconds"].items()}
peak = m["peak_memory"]["total_pss_bytes"] / 1e9
print(f"{side}: export {m['timings']['total']:.2f} s, wall {end - start:.2f} s, captures {captures}, peak {peak:.2f} GB")
PY
    if [[ -n "${VERIFY:-}" ]]; then
      cat "$here/bench-cache/$case_name"/* >/dev/null; sync; sleep 3
      start=$(date +%s.%N)
      (cd "$side" && "$python" -m shardex verify "$work/out" --quiet >/dev/null)
      end=$(date +%s.%N)
      echo "$side: verify wall $(echo "$end - $start" | bc) s"
    fi
  done
done
