#!/usr/bin/env bash
# Usage: ./scripts/grid.sh <grid.yaml> [--dry-run] [--recheck] [--verbose]
#   Models x variants x seeds (x a sweep) in one command, then one report:
#   ./scripts/grid.sh configs/grids/demo.yaml   (the CPU demo: base, ThinkSafe, ThinkSafe+KL, 2 seeds)
#   Each run is train_and_eval.sh's; what already finished is skipped. Keys: thinksafe/grid/config.py.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

help_or_arg_count 4 "<grid.yaml> [--dry-run] [--recheck] [--verbose]" "$@"
thinksafe grid "$@"
