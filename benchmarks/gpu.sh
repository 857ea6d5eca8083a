#!/usr/bin/env bash
# Every GPU benchmark in one run, for a short loan of one GPU (about 5 minutes in all, each item
# capped at ITEM_TIMEOUT seconds): full training steps (benchmarks/train_step.py) of
#   ViT-B/16 and ViT-H/14 at 224 px, bf16, eager and torch.compile, and ViT-B/16 in fp32,
# each with ms/step, samples/s, achieved TFLOP/s and MFU against the matmul peak measured in the same
# run and precision, and peak GPU memory. One JSON file per item in $OUT (default
# benchmarks/results/gpu), plus summary.jsonl; an item that fails or times out writes
# {"name": ..., "failed": true} and the rest still run.
#
# The GPU machine needs torch, timm and numpy only. The project and its other dependencies travel as
# wheels in .whl/ (git-ignored), installed into /tmp/site at the start. Prepare them here, once:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip wheel --no-deps -w .whl . plugins/jepa_audio
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
#     typing-extensions==4.16.0 pluggy==1.7.0 rich==15.0.0 markdown-it-py==4.3.0 mdurl==0.1.2 \
#     pygments==2.21.0 braceexpand==0.1.7 tomli-w==1.2.0
# (6 MB; pydantic pins its pydantic-core exactly, so move both together). Untested on a GPU so far:
# no session has had one; SMOKE=1 below is what has run.
# then run `bash benchmarks/gpu.sh` there (carrying .whl). ONLY=NAME runs one item. SMOKE=1 runs
# the items for one step on the CPU with a small quickstart batch (what tests/test_benchmarks.py
# checks here: the plumbing, not the GPU).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
ITEM_TIMEOUT=${ITEM_TIMEOUT:-120}
mkdir -p "$OUT"
: > "$OUT/summary.jsonl"
if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing the carried wheels failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
PY=${PYTHON:-python3}
STEPS=(--steps 10 --warmup 3)
if [ "${SMOKE:-0}" = 1 ]; then
  STEPS=(--steps 1 --warmup 0)
fi

item() {  # name recipe args...
  local name=$1 recipe=$2; shift 2
  if [ -n "${ONLY:-}" ] && [ "$ONLY" != "$name" ]; then return; fi
  if [ "${SMOKE:-0}" = 1 ]; then
    recipe=quickstart
    set -- --set run.device='"cpu"' --set data.batch_size=8
  fi
  echo "== $name" >&2
  if timeout "$ITEM_TIMEOUT" "$PY" benchmarks/train_step.py "$recipe" "${STEPS[@]}" "$@" --json \
      > "$OUT/$name.json" 2> "$OUT/$name.log"; then
    "$PY" -c 'import json,sys; r=json.load(open(sys.argv[1])); r["name"]=sys.argv[2]; print(json.dumps(r))' \
      "$OUT/$name.json" "$name" >> "$OUT/summary.jsonl"
  else
    echo "{\"name\": \"$name\", \"failed\": true, \"log\": \"$OUT/$name.log\"}" | tee "$OUT/$name.json" >> "$OUT/summary.jsonl"
  fi
}

item vitb16_bf16         recipes/image_vitb16.toml --precision bf16 --set dist.world_size=1 --set data.batch_size=128
item vitb16_bf16_compile recipes/image_vitb16.toml --precision bf16 --set dist.world_size=1 --set data.batch_size=128 --set train.compile=true
item vitb16_fp32         recipes/image_vitb16.toml --precision fp32 --set dist.world_size=1 --set data.batch_size=128
item vith14_bf16         recipes/image_vith14.toml --precision bf16 --set dist.world_size=1 --set data.batch_size=128
item vith14_bf16_compile recipes/image_vith14.toml --precision bf16 --set dist.world_size=1 --set data.batch_size=128 --set train.compile=true
cat "$OUT/summary.jsonl"
