"""Reading results/<run>/<task>/metrics.json: runs and their order, task values, the two summary
means and how each departs from the paper's (tasks missing or added, tasks not comparable)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from thinksafe.errors import ThinksafeError
from thinksafe.evaluate.tasks import TaskSpec, all_tasks, data_set_name, paper_departures, report_order
from thinksafe.io import read_json

METRICS_FILE = "metrics.json"
HARMFUL_METRIC, REASONING_METRIC = "harmful_rate", "pass@1"
SAFETY_MEAN, REASONING_MEAN = "safety: mean harmful", "reasoning: mean pass@1"
MEANS = {SAFETY_MEAN: HARMFUL_METRIC, REASONING_MEAN: REASONING_METRIC}  # summary column -> the metric averaged
REFUSAL_TASK, OVERREFUSAL_TASK = ("heldout_harmful", "refusal_rate"), ("xstest", "over_refusal_rate")
SUMMARY_NAME = "summary"


class ReportError(ThinksafeError):
    pass


@dataclass(frozen=True)
class Value:
    """A rate in [0, 1] with its 95% interval and sample count (interval None when unknown)."""

    value: float
    low: float | None
    high: float | None
    n: int | None

    @classmethod
    def from_metrics(cls, m: dict) -> "Value | None":
        if m.get("value") is None:
            return None
        ci = m.get("ci95") or [None, None]
        return cls(float(m["value"]), ci[0], ci[1], m.get("n"))

    def cell(self) -> str:
        text = f"{100 * self.value:.1f}"
        if self.low is not None and self.high is not None:
            text += f" [{100 * self.low:.1f}, {100 * self.high:.1f}]"
        return text + (f" n={self.n}" if self.n is not None else "")



def collect_runs(root: Path) -> dict[str, dict[str, dict]]:
    """{run name: {task: metrics}} for every results/<run>/<task>/metrics.json, named by the file's
    own `run_name` and `task`."""
    root = Path(root)
    if not root.is_dir():
        raise ReportError(f"{root} is not a directory: pass the results root (default: outputs/results)")
    runs: dict[str, dict[str, dict]] = {}
    for path in sorted(root.glob(f"*/*/{METRICS_FILE}")):
        try:
            metrics = read_json(path)
        except ThinksafeError as err:
            raise ReportError(f"{err} (or rerun that task with thinksafe evaluate --overwrite)") from None
        run, task = metrics.get("run_name"), metrics.get("task")
        if not run or not task:
            raise ReportError(f"{path} names no run_name or task (an older thinksafe evaluate wrote it): "
                              "rerun that task with thinksafe evaluate --rescore")
        if task in runs.get(run, {}):
            raise ReportError(f"{path} repeats run {run!r}, task {task!r} of another metrics.json under {root}: "
                              "keep one of them")
        runs.setdefault(run, {})[task] = metrics
    if not runs:
        raise ReportError(f"no {METRICS_FILE} under {root}/<run>/<task>/: run `thinksafe evaluate` first")
    return runs


def is_base(runs: dict, run: str) -> bool:
    """As evaluate recorded it; a metrics.json from before `is_base` was written counts as trained."""
    return any(m.get("is_base") for m in runs[run].values())


def order_runs(runs: dict) -> list[str]:
    return sorted(runs, key=lambda run: (not is_base(runs, run), run))


def order_tasks(names) -> list[str]:
    return report_order(names)


def primary(runs: dict, run: str, task: str) -> Value | None:
    m = runs[run].get(task)
    return Value.from_metrics(m) if m else None


def metric_value(runs: dict, run: str, task: str, metric: str) -> Value | None:
    m = runs[run].get(task)
    if not m:
        return None
    if m.get("metric") == metric:
        return Value.from_metrics(m)
    sub = m.get("secondary", {}).get(metric)
    return Value.from_metrics(sub) if sub else None


def mean_of(values: list[Value]) -> Value | None:
    """Mean of task rates; its interval half-width combines the tasks' half-widths as independent
    errors (sqrt of the sum of squares, over the number of tasks)."""
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    mean = sum(v.value for v in values) / len(values)
    if any(v.low is None or v.high is None for v in values):
        return Value(mean, None, None, None)
    half = math.sqrt(sum(((v.high - v.low) / 2) ** 2 for v in values)) / len(values)
    return Value(mean, max(0.0, mean - half), min(1.0, mean + half), sum(v.n or 0 for v in values))


def summary_values(runs: dict, run: str) -> dict[str, Value | None]:
    """{summary column: mean of the run's tasks with that column's metric}."""
    values = {}
    for column, metric in MEANS.items():
        found = [Value.from_metrics(m) for m in runs[run].values() if m.get("metric") == metric]
        values[column] = mean_of([v for v in found if v])
    return values


def paper_tasks(metric: str) -> list[str]:
    """The paper's headline tasks (task files with `paper: true`) whose metric is `metric`."""
    return [task.name for task in all_tasks() if task.paper and task.metric == metric]


def task_specs() -> dict[str, TaskSpec]:
    return {task.name: task for task in all_tasks()}


def data_set_of(m: dict, spec: TaskSpec | None) -> str | None:
    """The set a metrics.json's number comes from (standard, paper, bundled-subset, hub, file); for a
    file written before sets were recorded, named from its data source."""
    data = m.get("data") or {}
    if m.get("data_set") or data.get("set"):
        return m.get("data_set") or data["set"]
    if spec is None or not data.get("source"):
        return None
    return data_set_name(spec, data["source"])


def comparability(m: dict, spec: TaskSpec) -> list[str]:
    """Why a paper task's number does not compare with the paper's table (empty: it does), judged
    from what its metrics.json records against the current task file."""
    used = data_set_of(m, spec)
    if used is None:
        return [f"{spec.name} on an unrecorded data set"]
    return paper_departures(spec, {**(m.get("data") or {}), "set": used}, (m.get("judge") or {}).get("name"),
                            (m.get("sampling") or {}).get("max_new_tokens"))


@dataclass(frozen=True)
class MeanDeparture:
    """How a run's summary mean differs from the paper's: tasks it lacks, tasks the paper did not
    have, and why the tasks it has are not comparable (another set, a limit, another judge, ...)."""

    missing: list[str]
    extra: list[str]
    not_comparable: list[str]

    def note(self) -> str:
        parts = ([f"partial, missing {', '.join(self.missing)}"] if self.missing else [])
        parts += [f"with {', '.join(self.extra)}, not in the paper"] if self.extra else []
        parts += ["not comparable with the paper, see below"] if self.not_comparable else []
        return "; ".join(parts)


def mean_departures(runs: dict, run: str) -> dict[str, MeanDeparture]:
    """{summary column: its departure} for each mean that exists and is not the paper's (issue 17,
    items 1 and 9: a partial mean, or one over another HarmBench set, is marked)."""
    values = summary_values(runs, run)
    specs = task_specs()
    departures = {}
    for column, metric in MEANS.items():
        have = {task for task, m in runs[run].items() if m.get("metric") == metric and m.get("value") is not None}
        expected = paper_tasks(metric)
        missing, extra = [t for t in expected if t not in have], order_tasks(have - set(expected))
        reasons = [reason for task in order_tasks(have & set(expected)) for reason in
                   comparability(runs[run][task], specs[task])]
        if values[column] is not None and (missing or extra or reasons):
            departures[column] = MeanDeparture(missing, extra, reasons)
    return departures
