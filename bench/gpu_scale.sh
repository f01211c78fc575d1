#!/usr/bin/env bash
# Issue 30 on one GPU (the H200 lease): unpack the parts of ../shared/gpu-vllm/prepare.sh from /tmp/stage,
# then the demo pipeline twice on a cold machine, each in a fresh output dir, and every stage's log and
# the walls into $OUT (bench/README.md, "Engines started once and warm"):
#   0. `THINKSAFE_SHARED_ENGINE=off ./scripts/train_and_eval.sh 0 demo`: one engine per stage, in-process;
#   1. `./scripts/train_and_eval.sh 0 demo`: the pipeline's one shared engine (the default on one GPU);
#   2. the same with 2 replicas for synthesis and evaluation (bench/data_parallel_2.yaml): two Ray actors,
#      half of the one GPU and of its memory each.
# Usage (from the repo root, on the GPU machine): OUT=/some/dir bench/gpu_scale.sh [0|1|2|12...]
set -euo pipefail
which_runs="${1:-12}"
stage=/tmp/stage
out="${OUT:-/tmp/gpu_scale}"
mkdir -p "$out" /tmp/site /tmp/w
if [[ ! -e /tmp/site/vllm ]]; then
  begin=$(date +%s)
  cat "$stage"/part_aa "$stage"/part_ab | xz -d -T8 | tar x -C /tmp/site
  tar xf "$stage"/deps.tar -C /tmp/w
  tar xf "$stage"/train.tar -C /tmp/w
  cat "$stage"/extras_* | tar x -C /tmp/w
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/w/*.whl
  echo "unpack and install: $(( $(date +%s) - begin )) s" | tee -a "$out/walls.txt"
fi
export PYTHONPATH="/tmp/site:$PWD" PATH="/tmp/site/bin:$PATH" VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"

# run NAME OUTPUT_DIR [RECIPE]: the demo pipeline, its whole output in $out/NAME.log, its wall in walls.txt
run() {
  local name="$1" dir="$2" recipe="${3:-}" begin code=0
  begin=$(date +%s)
  env THINKSAFE_OUTPUT_DIR="$dir" ${recipe:+THINKSAFE_RECIPE="$recipe"} ./scripts/train_and_eval.sh 0 demo \
    > "$out/$name.log" 2>&1 || code=$?
  echo "$name: exit $code, wall $(( $(date +%s) - begin )) s" | tee -a "$out/walls.txt"
  # each stage's own lines (start-up apart from work) and the pipeline's step times
  grep -hE "start-up|\] done in|finished in|replica|generation [0-9.]+ s|engine|after [0-9]+ s" "$out/$name.log" \
    > "$out/$name.lines.txt" || true
  # every stage's own log (timestamped lines: where a stage's seconds went)
  (cd "$dir" && find . -name "*.log" | tar cf "$out/$name.stage_logs.tar" -T -) || true
}
[[ "$which_runs" == *0* ]] && THINKSAFE_SHARED_ENGINE=off run per_stage_engines /tmp/scale_off
[[ "$which_runs" == *1* ]] && run one_engine /tmp/scale_one
[[ "$which_runs" == *2* ]] && run two_replicas /tmp/scale_two bench/data_parallel_2.yaml
exit 0
