#!/usr/bin/env bash
# Every GPU measurement the open GPU issue asks for, in one run (docs/gpu.md). On the lent
# device machine (no network): bring cp312 manylinux wheels of ray (trimmed: no ray/jars,
# rllib, serve, llm), diffusers, pydantic(-core), jsonschema and its dependencies, tensorboardX,
# segment-anything and importlib-metadata in .whl/, then:
#   bash benchmarks/gpu_check.sh        # writes JSON + logs under $OUT (default ./gpu-out)
# Each step has its own time limit so one slow compile cannot eat the others' budget.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-$PWD}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv" 2>&1
run() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; echo "$name exit $?" | tee -a "$OUT/exits.txt"
  grep -E '^\{|/ loop|ratio' "$OUT/$name.log" | tail -20
}
run graph_vs_loop 240 python3 benchmarks/bench_graph_vs_loop.py --out "$OUT/graph_vs_loop.json"
run mask2img 300 python3 benchmarks/bench_gpu.py --skip-graph --batches 1,4,8 --out "$OUT/mask2img.json"
run finetune 180 python3 benchmarks/bench_finetune.py --preset sdxl-random --resolution 768 --steps 10
