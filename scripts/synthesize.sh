#!/usr/bin/env bash
# Usage: ./scripts/synthesize.sh [devices] [model_type] [size] [guard]
#   Self-generate this model's ThinkSafe data into outputs/data/<model>_<guard>/ (train.jsonl, stats.json).
#   guard: a name in thinksafe/guards/specs.py, e.g. llama-guard-3, wildguard, refusal-judge (default: the family's).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

help_or_arg_count 4 "[devices] [model_type] [size] [guard]" "$@"
devices="${1:-}"; model_type="${2:-}"; size="${3:-}"; guard="${4:-}"
# plan validates every argument and resolves the output directory from the registry
plan_file="$(mktemp)"
trap 'rm -f "${plan_file}"' EXIT
thinksafe plan "${devices}" "${model_type}" "${size}" --guard "${guard}" > "${plan_file}"
declare -A plan=()
while IFS=$'\t' read -r key value; do plan["${key}"]="${value}"; done < "${plan_file}"

if [[ "${plan[devices]}" == "cpu" ]]; then
  export CUDA_VISIBLE_DEVICES=""
else
  export CUDA_VISIBLE_DEVICES="${plan[devices]}"
fi
thinksafe synthesize --model "${plan[model_type]}/${plan[size]}" --guard "${plan[guard]}" --out "${plan[data_dir]}"
