"""Evaluation: reasoning benchmarks (pass@1 scored by SkyThought's rules, or a SkyThought
hand-off) and safety benchmarks (guard verdicts -> harmful rate, over-refusal, refusal), one
`metrics.json` per (run, task) under the registry's results directory.

Modules: `tasks` (the benchmark registry, eval/tasks/*.yaml: groups and report order too),
`reasoning` (answer extraction and verification), `safety` (rates from verdicts), `metrics` (rates
with Wilson intervals), `skythought` (command + result parsing), and the `thinksafe evaluate` stage:
`run` (entry and phases), `models` (which model and run, from the run record or the registry),
`jobs` (per-task plans, reuse of finished results), `generate` (resumable generation), `score`.
"""

from thinksafe.evaluate.metrics import Rate, mean_pass_at_1, rate, wilson_interval
from thinksafe.evaluate.reasoning import (
    Check,
    answers_equal,
    check_answer,
    extract_answer,
    extract_choice,
    normalize_answer,
)
from thinksafe.evaluate.tasks import EvalItem, TaskSpec, expand_tasks, get_task, list_tasks, load_items

__all__ = [
    "Check",
    "EvalItem",
    "Rate",
    "TaskSpec",
    "answers_equal",
    "check_answer",
    "expand_tasks",
    "extract_answer",
    "extract_choice",
    "get_task",
    "list_tasks",
    "load_items",
    "mean_pass_at_1",
    "normalize_answer",
    "rate",
    "wilson_interval",
]
