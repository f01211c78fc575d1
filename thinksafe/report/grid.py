"""A grid's report: the paper's Table 1 layout (one row per model x variant, reasoning then safety
columns), each cell the mean over seeds with its spread and 95% interval, naming how many seeds and
samples it holds; grid.csv beside it (one line per cell, every seed's value) and grid.png.

Interval: with two or more seeds, Student's t interval of the mean over seeds (what a seed sweep
asks: how far would another seed land); with one seed, that run's own interval (Wilson, from its
metrics.json). The spread is the seeds' sample standard deviation. Runs come from their metrics.json
files (thinksafe.report.collect), never from directory names.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from thinksafe.io import atomic_write_json, atomic_write_text
from thinksafe.report.collect import (
    MEANS,
    OVERREFUSAL_TASK,
    REFUSAL_TASK,
    collect_runs,
    order_tasks,
    primary,
    summary_values,
)
from thinksafe.report.plot import save_figure, style_rate_axes

GRID_NAME = "grid"
# Student's t, 97.5th percentile, by degrees of freedom (1-30); beyond, the normal 1.96.
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


@dataclass
class GridRow:
    """One row of the table: a model, a variant and a sweep point, with each seed's run."""

    model: str
    variant: str
    point: str
    runs: dict = field(default_factory=dict)  # seed (None for the base model) -> run name

    @property
    def label(self) -> str:
        return f"{self.model} {self.variant}" + (f" ({self.point})" if self.point else "")


@dataclass(frozen=True)
class SeedCell:
    """A metric over the seeds of one row: mean, spread, 95% interval, seeds and samples."""

    mean: float
    sd: float | None
    low: float | None
    high: float | None
    seeds: int
    samples: int
    per_seed: tuple  # (seed, value) in seed order

    def cell(self) -> str:
        text = f"{100 * self.mean:.1f}"
        if self.sd is not None:
            text += f" ± {100 * self.sd:.1f}"
        if self.low is not None and self.high is not None:
            text += f" [{100 * self.low:.1f}, {100 * self.high:.1f}]"
        return text + f" ({self.seeds} seed{'s' if self.seeds != 1 else ''}, n={self.samples})"


def t_975(df: int) -> float:
    return T_975[df - 1] if df <= len(T_975) else 1.96


def over_seeds(values: dict) -> SeedCell | None:
    """{seed: Value} -> the cell (None when no seed has the metric)."""
    found = [(seed, v) for seed, v in values.items() if v is not None]
    if not found:
        return None
    rates = [v.value for _, v in found]
    samples = sum(v.n or 0 for _, v in found)
    per_seed = tuple((seed, v.value) for seed, v in found)
    if len(found) == 1:
        only = found[0][1]
        return SeedCell(only.value, None, only.low, only.high, 1, samples, per_seed)
    mean, sd = statistics.fmean(rates), statistics.stdev(rates)
    half = t_975(len(rates) - 1) * sd / math.sqrt(len(rates))
    return SeedCell(mean, sd, max(0.0, mean - half), min(1.0, mean + half), len(rates), samples, per_seed)


def grid_columns(runs: dict, rows: list[GridRow]) -> list[str]:
    """The tasks the rows' runs hold, reasoning first then safety (the task files' order), then the
    paper's two summary means."""
    names = {task for row in rows for run in row.runs.values() if run in runs for task in runs[run]}
    return [*order_tasks(names), *MEANS]


def row_cells(runs: dict, row: GridRow, columns: list[str]) -> dict[str, SeedCell | None]:
    cells = {}
    for column in columns:
        per_seed = {}
        for seed, run in row.runs.items():
            if run not in runs:
                per_seed[seed] = None
            elif column in MEANS:
                per_seed[seed] = summary_values(runs, run)[column]
            else:
                per_seed[seed] = primary(runs, run, column)
        cells[column] = over_seeds(per_seed)
    return cells


def grid_table(runs: dict, rows: list[GridRow], title: str) -> tuple[str, list[str], dict]:
    columns = grid_columns(runs, rows)
    cells = {row.label: row_cells(runs, row, columns) for row in rows}
    header = ["model", "variant", *[_column_title(runs, c) for c in columns]]
    lines = [f"# {title}", "",
             "Mean over seeds ± their standard deviation [95% interval] (seeds, samples). Interval: Student's t "
             "over the seeds' values with two or more seeds, the run's own Wilson interval with one. Rates in %.", "",
             "| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    for row in rows:
        variant = row.variant + (f" ({row.point})" if row.point else "")
        lines.append("| " + " | ".join([row.model, variant, *[
            cells[row.label][c].cell() if cells[row.label][c] else "—" for c in columns]]) + " |")
    missing = [f"{row.label}: seed {seed} ({run})" for row in rows for seed, run in row.runs.items() if run not in runs]
    lines += ["", "Runs, by seed:", ""]
    lines += [f"- {row.label}: " + ", ".join(f"{'seed ' + str(s) if s is not None else 'base'} `{r}`"
                                             for s, r in row.runs.items()) for row in rows]
    if missing:
        lines += ["", "Not evaluated yet (left out of the cells): " + "; ".join(missing)]
    return "\n".join(lines) + "\n", columns, cells


def _column_title(runs: dict, column: str) -> str:
    if column in MEANS:
        return column
    metric = next((m[column]["metric"] for m in runs.values() if column in m), "")
    return f"{column} {metric}".strip()


def grid_csv(rows: list[GridRow], columns: list[str], cells: dict) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["model", "variant", "point", "column", "mean", "sd", "ci95_low", "ci95_high", "seeds",
                     "samples", "per_seed"])
    for row in rows:
        for column in columns:
            cell = cells[row.label][column]
            if cell is None:
                continue
            writer.writerow([row.model, row.variant, row.point, column, cell.mean, cell.sd, cell.low, cell.high,
                             cell.seeds, cell.samples, ";".join(f"{s}:{v}" for s, v in cell.per_seed)])
    return out.getvalue()


def plot_axes(runs: dict) -> tuple[tuple[str, str], tuple[str, str]] | None:
    """(x, y) as (column, axis label): refusal vs over-refusal when the runs hold them (the demo),
    else the paper's safety vs reasoning means."""
    tasks = {task for metrics in runs.values() for task in metrics}
    if REFUSAL_TASK[0] in tasks and OVERREFUSAL_TASK[0] in tasks:
        return ((OVERREFUSAL_TASK[0], "over-refusal on XSTest safe prompts (%) ↓"),
                (REFUSAL_TASK[0], "refusal on held-out harmful prompts (%) ↑"))
    safety, reasoning = MEANS
    return (reasoning, "reasoning: mean pass@1 (%) →"), (safety, "safety: mean harmful-response rate (%) ↓")


def write_plot(rows: list[GridRow], cells: dict, axes: tuple, path: Path) -> None:
    """Each row's mean with its interval, and each seed's own point faint behind it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (x_col, x_label), (y_col, y_label) = axes
    fig, ax = plt.subplots(figsize=(7, 5.5))
    for row in rows:
        x, y = cells[row.label].get(x_col), cells[row.label].get(y_col)
        if x is None or y is None:
            continue
        seeds = dict(x.per_seed).keys() & dict(y.per_seed).keys()
        line = ax.errorbar([100 * x.mean], [100 * y.mean], fmt="*" if row.variant == "base" else "o",
                           xerr=[[100 * (x.mean - (x.low if x.low is not None else x.mean))],
                                 [100 * ((x.high if x.high is not None else x.mean) - x.mean)]],
                           yerr=[[100 * (y.mean - (y.low if y.low is not None else y.mean))],
                                 [100 * ((y.high if y.high is not None else y.mean) - y.mean)]],
                           capsize=4, markersize=10, label=f"{row.label} ({x.seeds} seed{'s' * (x.seeds != 1)})")
        ax.scatter([100 * dict(x.per_seed)[s] for s in seeds], [100 * dict(y.per_seed)[s] for s in seeds],
                   alpha=0.35, s=18, color=line[0].get_color())
    style_rate_axes(ax, x_label, y_label, "Mean over seeds, 95% intervals (faint: each seed)")
    save_figure(fig, path)


def write_grid_report(rows: list[GridRow], results: Path, out: Path, title: str = "grid") -> dict[str, Path]:
    """grid.md, grid.csv, grid.png and grid.json (the rows and their runs) under `out`."""
    runs = collect_runs(results)
    text, columns, cells = grid_table(runs, rows, title)
    files = {ext: out / f"{GRID_NAME}.{ext}" for ext in ("md", "csv", "png", "json")}
    atomic_write_text(files["md"], text)
    atomic_write_text(files["csv"], grid_csv(rows, columns, cells))
    write_plot(rows, cells, plot_axes(runs), files["png"])
    atomic_write_json(files["json"], {"title": title, "columns": columns, "rows": [
        {"model": r.model, "variant": r.variant, "point": r.point,
         "runs": {str(s): run for s, run in r.runs.items()},
         "cells": {c: (vars(cells[r.label][c]) if cells[r.label][c] else None) for c in columns}} for r in rows]})
    return files
