"""summary.md: the table of every run and task, its notes, the comparison with the paper's table
and the refusal-by-source section."""

from __future__ import annotations

from pathlib import Path

from thinksafe.evaluate.tasks import TaskSpec
from thinksafe.report.collect import (
    MEANS,
    OVERREFUSAL_TASK,
    REASONING_MEAN,
    MeanDeparture,
    Value,
    data_set_of,
    is_base,
    mean_departures,
    mean_of,
    metric_value,
    order_runs,
    order_tasks,
    summary_values,
    task_specs,
)


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
PAPER_PAGE_PATH = Path(__file__).resolve().parents[2] / PAPER_PAGE


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
