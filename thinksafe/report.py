"""`thinksafe report [results root]`: one table over every evaluated run, plus the trade-off plot.

Reads results/<run>/<task>/metrics.json (written by `thinksafe evaluate`), and writes
results/summary.md, summary.csv and summary.png. Run name, task and whether a run is a base model
come from each metrics.json, never from directory names. Rows are runs (base models first),
columns each task's metric (in the task files' order) as a percentage with its 95% Wilson interval
and sample count. Two summary columns follow the paper's headline: mean harmful rate over the
harmful-rate tasks (lower is better) and mean pass@1 over the reasoning tasks; a mean over other
tasks than the paper's (one missing, or one the paper did not have) is marked with the tasks
that differ, in the table, the CSV and the plot's legend, and so is a mean whose tasks ran on
other data or settings than the paper's (HarmBench's standard set instead of the paper's 602
prompts, --limit, another judge): the section "Against the paper's table" says why, run by run,
and HarmBench's cells name their set. A section compares refusal on the held-out prompts of the
demo's training source (AdvBench) with refusal on HarmBench's and StrongREJECT's prompts. The plot
shows safety against reasoning; for runs without reasoning tasks (the CPU demo) it shows refusal on
held-out harmful prompts against over-refusal on XSTest's safe prompts.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

from thinksafe.errors import ThinksafeError
from thinksafe.evaluate.tasks import TaskSpec, all_tasks, data_set_name, paper_departures, report_order
from thinksafe.io import atomic_write_text, read_json

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


# --- reading --------------------------------------------------------------------------------


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


# --- table ----------------------------------------------------------------------------------


def columns(runs: dict) -> list[tuple[str, str, bool]]:
    """(task, primary metric, higher is better) for every task any run has."""
    seen: dict[str, tuple[str, bool]] = {}
    for tasks in runs.values():
        for task, m in tasks.items():
            seen.setdefault(task, (m["metric"], bool(m.get("higher_is_better"))))
    return [(t, *seen[t]) for t in order_tasks(seen)]


# How each cell of the paper's headline is reproduced, and what still differs. summary.md lives in
# the results root, so the link points at this checkout's copy.
PAPER_PAGE = "docs/paper.md"
PAPER_PAGE_PATH = Path(__file__).resolve().parent.parent / PAPER_PAGE


def markdown_table(runs: dict) -> str:
    cols = columns(runs)
    names = order_runs(runs)
    specs = task_specs()
    summaries = {run: summary_values(runs, run) for run in names}
    summary_cols = [c for c in MEANS if any(summaries[r][c] for r in names)]
    arrows = {True: "↑", False: "↓"}
    header = ["run"] + [f"{t} {metric} {arrows[up]}" for t, metric, up in cols]
    header += [f"{c} {arrows[c == REASONING_MEAN]}" for c in summary_cols]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    departures = {run: mean_departures(runs, run) for run in names}
    for run in names:
        cells = [f"**{run}** (base)" if is_base(runs, run) else run]
        cells += [_task_cell(runs[run].get(t), specs.get(t)) for t, _, _ in cols]
        cells += [_mean_cell(summaries[run][c], departures[run].get(c)) for c in summary_cols]
        lines.append("| " + " | ".join(cells) + " |")
    marked = any(departures.values())
    notes = ["", "Percentages with 95% Wilson intervals and the number of samples judged.",
             *([MARKED_MEANS_NOTE] if marked else []),
             f"Comparing with the paper's table: the command for each cell and the remaining departures "
             f"are in [{PAPER_PAGE}]({PAPER_PAGE_PATH.as_uri()}).",
             *_provenance_notes(runs, specs)]
    sections = [_paper_comparison(runs, names, summary_cols, departures), _refusal_by_source(runs, names)]
    return "\n".join(lines + notes) + "\n" + "".join(f"\n{section}" for section in sections if section)


MARKED_MEANS_NOTE = ("A mean marked partial lacks some of the paper's tasks, one marked \"not in the paper\" "
                     "averages a task the paper did not have (both named), one marked \"not comparable\" has "
                     "the paper's tasks on other data or settings (listed below): none of them is the paper's mean.")


def _task_cell(m: dict | None, spec: TaskSpec | None) -> str:
    """A task's primary value; a task whose file names its sets (HarmBench) says which set it is."""
    value = Value.from_metrics(m) if m else None
    if value is None:
        return "–"
    named = spec is not None and spec.set_names and data_set_of(m, spec)
    return value.cell() + (f" ({data_set_of(m, spec)} set)" if named else "")


def _mean_cell(value: Value | None, departure: MeanDeparture | None) -> str:
    if value is None:
        return "–"
    return value.cell() + (f" ({departure.note()})" if departure else "")


def _paper_comparison(runs: dict, names: list[str], summary_cols: list[str],
                      departures: dict[str, dict[str, MeanDeparture]]) -> str:
    """Per run and summary mean: comparable with the paper's table, or why not."""
    if not summary_cols:
        return ""
    lines = [f"### Against the paper's table ([{PAPER_PAGE}]({PAPER_PAGE_PATH.as_uri()}))", ""]
    for run in names:
        parts = []
        for column in summary_cols:
            if summary_values(runs, run)[column] is None:
                continue
            departure = departures[run].get(column)
            if departure is None:
                parts.append(f"{column}: comparable")
                continue
            why = ([f"missing {', '.join(departure.missing)}"] if departure.missing else [])
            why += [f"with {', '.join(departure.extra)}"] if departure.extra else []
            why += departure.not_comparable
            parts.append(f"{column}: not comparable ({'; '.join(why)})")
        if parts:
            lines.append(f"- {run}: " + ". ".join(parts))
    return "\n".join(lines) + "\n"


PAPER_SET_MARK = " (the paper's set)"


def _provenance_notes(runs: dict, specs: dict[str, TaskSpec]) -> list[str]:
    judges: dict[str, set[str]] = {}
    data: dict[str, set[str]] = {}
    sets: dict[str, dict[str, list[str]]] = {}  # task -> set name -> runs, for tasks whose file names sets
    for run, tasks in runs.items():
        for task, m in tasks.items():
            if m.get("judge"):
                judges.setdefault(task, set()).add(m["judge"].get("label") or m["judge"].get("name", "?"))
            if m.get("data"):
                data.setdefault(task, set()).add(f"{m['data'].get('source')}: {m['data'].get('location')}")
            spec = specs.get(task)
            if spec is not None and spec.set_names:
                sets.setdefault(task, {}).setdefault(data_set_of(m, spec) or "unrecorded", []).append(run)
    notes = [f"- judge {label}: {', '.join(order_tasks(t for t, j in judges.items() if label in j))}"
             for label in sorted({label for j in judges.values() for label in j})]
    notes += [f"- data of {t}: {'; '.join(sorted(d))}" for t, d in sorted(data.items())]
    for task, by_set in sorted(sets.items()):
        paper = specs[task].paper_set["name"] if specs[task].paper_set else None
        described = "; ".join(f"{name}{PAPER_SET_MARK if name == paper else ''}: {', '.join(sorted(members))}"
                              for name, members in sorted(by_set.items()))
        notes.append(f"- {task} set: {described}")
    return notes


# Refusal on harmful prompts from the demo's training source and from others (issue 17, item 11).
# The demo trains on AdvBench prompts and its held-out set is more AdvBench: a gain there may not
# carry to prompts written elsewhere, so HarmBench's and StrongREJECT's prompts are shown beside it.
# All columns use one judge, the refusal-phrase judge on the final answer (every safety task records
# it as refusal_rate_phrase), so they differ only in the prompts.
IN_DISTRIBUTION = (("heldout_harmful", "held-out AdvBench (the demo's training source)"),)
OUT_OF_DISTRIBUTION = (("harmbench", "HarmBench"), ("strongreject", "StrongREJECT"))
PHRASE_REFUSAL = "refusal_rate_phrase"
OOD_MEAN = "other sources: mean"


def refusal_by_source(runs: dict, run: str) -> dict[str, Value | None]:
    """{column: refusal rate} for the in- and out-of-distribution harmful-prompt sets and their mean."""
    values = {task: metric_value(runs, run, task, PHRASE_REFUSAL) for task, _ in IN_DISTRIBUTION + OUT_OF_DISTRIBUTION}
    values[OOD_MEAN] = mean_of([values[t] for t, _ in OUT_OF_DISTRIBUTION if values[t]])
    return values


def base_run_of(runs: dict, run: str) -> str | None:
    """The base run of a run's family when exactly one was evaluated (the reference for changes)."""
    family = next((m.get("family") for m in runs[run].values() if m.get("family")), None)
    bases = [r for r in runs if is_base(runs, r) and family and
             any(m.get("family") == family for m in runs[r].values())]
    return bases[0] if len(bases) == 1 and bases[0] != run else None


def _refusal_by_source(runs: dict, names: list[str]) -> str:
    shown = [run for run in names if any(t in runs[run] for t, _ in IN_DISTRIBUTION)
             and any(t in runs[run] for t, _ in OUT_OF_DISTRIBUTION)]
    if not shown:
        return ""
    header = ["run", *(f"{label} ↑" for _, label in IN_DISTRIBUTION + OUT_OF_DISTRIBUTION), f"{OOD_MEAN} ↑",
              "XSTest safe over-refusal ↓"]
    lines = ["### Refusal on harmful prompts by source: the training distribution and others", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    keys = [t for t, _ in IN_DISTRIBUTION + OUT_OF_DISTRIBUTION] + [OOD_MEAN]
    for run in shown:
        base = base_run_of(runs, run)
        values = refusal_by_source(runs, run)
        reference = refusal_by_source(runs, base) if base else {}
        cells = [_with_change(values[k], reference.get(k)) for k in keys]
        cells.append(_with_change(metric_value(runs, run, *OVERREFUSAL_TASK),
                                  metric_value(runs, base, *OVERREFUSAL_TASK) if base else None))
        lines.append("| " + " | ".join([f"**{run}** (base)" if is_base(runs, run) else run, *cells]) + " |")
    lines += ["", ("Refusal by the refusal-phrase judge on the final answer in every column (the same judge, "
                   "other prompts); in brackets the change from the base model of the same family, in points.")]
    return "\n".join(lines) + "\n"


def _with_change(value: Value | None, reference: Value | None) -> str:
    if value is None:
        return "–"
    change = f" ({100 * (value.value - reference.value):+.1f})" if reference is not None else ""
    return value.cell() + change


def csv_text(runs: dict) -> str:
    """Every metric (primary and secondary) of every task: value, ci_low, ci_high, n."""
    metric_names: list[tuple[str, str]] = []
    for task in order_tasks({t for tasks in runs.values() for t in tasks}):
        for tasks in runs.values():
            m = tasks.get(task)
            if not m:
                continue
            for name in [m["metric"], *m.get("secondary", {})]:
                if (task, name) not in metric_names:
                    metric_names.append((task, name))
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    header = ["run", "is_base"]
    for task, name in metric_names:
        header += [f"{task}/{name}", f"{task}/{name}/ci_low", f"{task}/{name}/ci_high", f"{task}/{name}/n"]
    # /missing, /extra: the tasks that make a mean differ from the paper's; /not_comparable: why the
    # tasks it has do not compare (another set, a limit, another judge); each ";"-joined
    for name in MEANS:
        header += [name, f"{name}/ci_low", f"{name}/ci_high", f"{name}/missing", f"{name}/extra",
                   f"{name}/not_comparable"]
    writer.writerow(header)
    for run in order_runs(runs):
        row = [run, is_base(runs, run)]
        for task, name in metric_names:
            v = metric_value(runs, run, task, name)
            row += [v.value, v.low, v.high, v.n] if v else ["", "", "", ""]
        summaries, departures = summary_values(runs, run), mean_departures(runs, run)
        for name in MEANS:
            v = summaries[name]
            departure = departures.get(name, MeanDeparture([], [], []))
            row += [v.value, v.low, v.high] if v else ["", "", ""]
            row += [";".join(departure.missing), ";".join(departure.extra), ";".join(departure.not_comparable)]
        writer.writerow(row)
    return buffer.getvalue()


# --- plot -----------------------------------------------------------------------------------


def plot_panels(runs: dict) -> list[dict]:
    """The panels that have data: safety vs reasoning, and refusal vs over-refusal. Each panel's
    `labels` name its points' runs, marking base models and means that are not the paper's."""
    names = order_runs(runs)
    base = {run: " (base)" if is_base(runs, run) else "" for run in names}
    tradeoff = [(run, summary_values(runs, run)[REASONING_MEAN], summary_values(runs, run)[SAFETY_MEAN])
                for run in names]
    refusal = [(run, metric_value(runs, run, *OVERREFUSAL_TASK), metric_value(runs, run, *REFUSAL_TASK))
               for run in names]
    panels = []
    points = [(r, x, y) for r, x, y in tradeoff if x and y]
    if points:
        partial = {r: _departure_label(mean_departures(runs, r)) for r, _, _ in points}
        panels.append({"points": points, "xlabel": "reasoning: mean pass@1 (%) →",
                       "ylabel": "safety: mean harmful-response rate (%) ↓", "title": "Safety vs reasoning",
                       "labels": {r: r + base[r] + partial[r] for r, _, _ in points}})
    points = [(r, x, y) for r, x, y in refusal if x and y]
    if points:
        panels.append({"points": points, "xlabel": "over-refusal on XSTest safe prompts (%) ↓",
                       "ylabel": "refusal on held-out harmful prompts (%) ↑",
                       "title": "Refusal vs over-refusal", "labels": {r: r + base[r] for r, _, _ in points}})
    return panels


def _departure_label(departures: dict[str, MeanDeparture]) -> str:
    labels = ["partial means"] if any(d.missing or d.extra for d in departures.values()) else []
    labels += ["not comparable"] if any(d.not_comparable for d in departures.values()) else []
    return f" ({', '.join(labels)})" if labels else ""


def _errors(values: list) -> list[list[float]]:
    low = [100 * (v.value - v.low) if v.low is not None else 0.0 for v in values]
    high = [100 * (v.high - v.value) if v.high is not None else 0.0 for v in values]
    return [low, high]


def write_plot(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display: write files only
    import matplotlib.pyplot as plt

    panels = plot_panels(runs)
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(6.5 * max(1, len(panels)), 5), squeeze=False)
    if not panels:
        axes[0][0].text(0.5, 0.5, "no run has both metrics of a panel\n(see summary.md)", ha="center", va="center")
        axes[0][0].set_axis_off()
    for ax, panel in zip(axes[0], panels):
        for run, x, y in panel["points"]:
            base = is_base(runs, run)
            ax.errorbar([100 * x.value], [100 * y.value], xerr=_errors([x]), yerr=_errors([y]),
                        fmt="*" if base else "o", markersize=14 if base else 8, capsize=4,
                        color="black" if base else None, label=panel["labels"][run])
        ax.set_xlim(-3, 103)  # rates: the same 0-100 scale for every report
        ax.set_ylim(-3, 103)
        ax.set_xlabel(panel["xlabel"])
        ax.set_ylabel(panel["ylabel"])
        ax.set_title(panel["title"] + " (95% intervals)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


# --- the stage ------------------------------------------------------------------------------


def write_report(root: Path, out: Path | None = None) -> dict[str, Path]:
    runs = collect_runs(root)
    out = Path(out or root)
    files = {ext: out / f"{SUMMARY_NAME}.{ext}" for ext in ("md", "csv", "png")}
    atomic_write_text(files["md"], markdown_table(runs))
    atomic_write_text(files["csv"], csv_text(runs))
    write_plot(runs, files["png"])
    return files


def main(argv: list[str] | None = None) -> int:
    from thinksafe.registry import results_root

    parser = argparse.ArgumentParser(prog="thinksafe report", description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", default=None, help="results root (default: the registry's, outputs/results)")
    parser.add_argument("--out", default=None, help="where summary.{md,csv,png} go (default: the results root)")
    args = parser.parse_args(argv)
    root = Path(args.root) if args.root else results_root()
    files = write_report(root, Path(args.out) if args.out else None)
    print(files["md"].read_text(encoding="utf-8"))
    print("written: " + ", ".join(str(p) for p in files.values()))
    return 0
